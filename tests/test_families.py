"""Model families in the training stack: configs, the encoder-decoder loss alignment, text-weight init."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax import config_util, treeutil
from vlm_jax.models.registry import get_model_config
from vlm_jax.models.vlm import EncoderDecoderVLM, init_params, model_for
from vlm_jax.train_setup import (ALLOWED_KEYS, build_model_config, check_config, initial_params, make_tokenizer,
                                 normalize)
from tests.test_model import randomize


@pytest.mark.parametrize("spec,llm_type,adapter,causal", [
    ("configs/siglip_llama.py", "llama", "mlp", True),
    ("configs/siglip_llama.py:adapter=resampler", "llama", "resampler", True),
    ("configs/siglip_ul2.py", "t5", "linear", False),
    ("configs/tiny_synthetic.py", "gemma", "linear", False),
])
def test_family_configs_build_their_model(spec, llm_type, adapter, causal):
  config = config_util.load_config(spec)
  check_config(config)
  cfg = build_model_config(normalize(config).model, make_tokenizer(config))
  assert (cfg.llm_type, cfg.adapter.kind, cfg.causal) == (llm_type, adapter, causal)
  assert jax.eval_shape(lambda: init_params(cfg))["params"]["llm"]


@pytest.mark.parametrize("spec", ["configs/siglip_llama.py", "configs/siglip_ul2.py"])
def test_model_wide_options_reach_every_sub_config(spec):
  config = config_util.load_config(spec)
  for key, value in (("model.scan_unroll", "True"), ("model.remat", "'dots'")):
    config_util.apply_override(config, key, value, ALLOWED_KEYS)
  cfg = build_model_config(normalize(config).model, make_tokenizer(config))
  assert cfg.img.scan_unroll is True and cfg.llm.scan_unroll is True
  assert cfg.img.remat == cfg.llm.remat == "dots"


def test_encoder_decoder_logits_line_up_with_the_targets():
  """logits[:, t] predict tokens[:, t + 1] for every supervised position, whatever each row's prefix length."""
  cfg = get_model_config("tiny_t5")
  params = randomize(init_params(cfg), seed=3)
  images = np.random.RandomState(0).uniform(-1, 1, (2, 28, 28, 3)).astype(np.float32)
  tokens = np.array([[2, 5, 6, 7, 20, 21, 22, 1, 0, 0], [2, 8, 30, 31, 32, 33, 1, 0, 0, 0]])
  n_prefix = [4, 2]
  mask_ar = np.array([[0] * p + [1] * (10 - p) for p in n_prefix])
  mask_input = (tokens > 0).astype(np.int32)
  model = model_for(cfg)
  logits = model.apply(params, images, tokens, mask_ar, mask_input)
  for i, p in enumerate(n_prefix):
    suffix = [t for t in tokens[i, p:] if t]
    dec_in = np.array([[cfg.llm.decoder_start_id] + suffix[:-1]])

    def direct(mdl):
      enc, valid = mdl.encode(jnp.asarray(images[i:i + 1]), jnp.asarray(tokens[i:i + 1, :p]), jnp.ones((1, p)))
      return mdl.llm.decode(mdl.llm.embed(dec_in), enc, valid)
    ref = model.apply(params, method=lambda m: direct(m))
    assert isinstance(model, EncoderDecoderVLM)
    np.testing.assert_allclose(logits[i, p - 1:p - 1 + len(suffix)], ref[0], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def hf_llama_dir(tmp_path_factory):
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM
  torch.manual_seed(0)
  hf_model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                          vocab_size=1536, tie_word_embeddings=False))
  path = str(tmp_path_factory.mktemp("hf") / "llama")
  hf_model.save_pretrained(path)
  return path


def _llm_init_config(llm):
  config = config_util.load_config("configs/siglip_llama.py")
  config.model.llm = llm
  check_config(config)
  config = normalize(config)
  return config, build_model_config(config.model, make_tokenizer(config))


def test_llm_init_loads_hf_text_weights(hf_llama_dir):
  from vlm_jax.convert import hf_llama
  config, cfg = _llm_init_config(dict(init=hf_llama_dir))
  assert cfg.llm.width == 64 and cfg.llm.num_kv_heads == 2
  params = initial_params(config, cfg, log=lambda *_: None)
  _, ref = hf_llama.load_text_model(hf_llama_dir)
  ours = treeutil.flatten(params["llm"])
  for k, v in treeutil.flatten(ref).items():
    np.testing.assert_array_equal(ours[k], v, err_msg=k)
  assert set(params) >= {"img", "adapter", "llm"}


def test_llm_init_grows_the_vocabulary_for_an_image_token(hf_llama_dir):
  """LLaVA's recipe: a HF text model plus one id its tokenizer never produces; the old rows keep their weights."""
  from vlm_jax.convert import hf_llama
  config, cfg = _llm_init_config(dict(init=hf_llama_dir, vocab_size=1540))
  with config.model.unlocked():
    config.model.image_token_id = 1536
  cfg = build_model_config(config.model, make_tokenizer(config))
  assert cfg.llm.vocab_size == 1540 and cfg.image_token_id == 1536
  params = initial_params(config, cfg, log=lambda *_: None)
  _, ref = hf_llama.load_text_model(hf_llama_dir)
  ours, ref = treeutil.flatten(params["llm"]), treeutil.flatten(ref)
  emb, head = ours["embedder/input_embedding"], ours["lm_head/w"]
  assert emb.shape == (1540, 64) and head.shape == (64, 1540)
  np.testing.assert_array_equal(emb[:1536], ref["embedder/input_embedding"])
  np.testing.assert_array_equal(head[:, :1536], ref["lm_head/w"])
  assert np.all(np.std(emb[1536:], axis=1) > 0) and np.all(np.std(head[:, 1536:], axis=0) > 0)
  for k in ref.keys() - {"embedder/input_embedding", "lm_head/w"}:
    np.testing.assert_array_equal(ours[k], ref[k], err_msg=k)


@pytest.mark.parametrize("llm, match", [(dict(vocab_size=1000), "can only grow"),
                                        (dict(num_heads=8), "llm.num_heads cannot change it"),
                                        (dict(type="t5"), "llm.type cannot change it")])
def test_llm_init_refuses_overrides_it_cannot_honour(hf_llama_dir, llm, match):
  with pytest.raises(ValueError, match=match):
    _llm_init_config(dict(init=hf_llama_dir, **llm))
  assert _llm_init_config(dict(init=hf_llama_dir, type="llama"))[1].llm_type == "llama"  # what it is: fine


@pytest.mark.parametrize("model, match", [
    (dict(name="tiny", llm=dict(depth=1)), "fixes the architecture.*model.llm would be ignored"),
    (dict(init="/ckpt/pg", img=dict(variant="B/16")), "needs both img and llm")])
def test_model_keys_that_would_be_ignored_are_refused(model, match):
  config = config_util.load_config("configs/tiny_synthetic.py")
  config.model = model
  with pytest.raises(ValueError, match=match):
    build_model_config(normalize(config).model, make_tokenizer(config))


@pytest.mark.parametrize("key, value, match", [
    ("img", dict(variant="Ti/8", dpth=2), r"config.model.img.dpth: not a field of ViTConfig \(did you mean 'depth'"),
    ("img", dict(depth=2), "config.model.img needs a variant"),
    ("adapter", dict(knd="mlp"), r"config.model.adapter.knd: not a field of AdapterConfig \(did you mean 'kind'"),
    ("llm", dict(variant="gemma_2b", widht=64), r"config.model.llm.widht: not a field of GemmaConfig .*'width'"),
    ("llm", dict(type="llama", widht=64), r"config.model.llm.widht: not a field of LlamaConfig .*'width'"),
    ("llm", dict(type="llama", width=64), r"config.model.llm: .*missing .*required")])
def test_a_misspelt_model_key_names_where_it_is(key, value, match):
  config = config_util.load_config("configs/tiny_synthetic.py")
  config.model[key] = value
  with pytest.raises(ValueError, match=match):
    build_model_config(normalize(config).model, make_tokenizer(config))


def test_img_init_takes_the_vision_tower_of_another_checkpoint(tmp_path):
  """A LLaVA-style model starting from the ViT of a (PaliGemma-family) vlm_jax checkpoint."""
  from vlm_jax.api import Model
  source = config_util.load_config("configs/tiny_synthetic.py")
  src_cfg = build_model_config(normalize(source).model, make_tokenizer(source))
  src_params = randomize(init_params(src_cfg), seed=5)
  Model(src_cfg, src_params).save(str(tmp_path / "pg"))
  config = config_util.load_config("configs/siglip_llama.py")
  config.model.img = dict(config.model.img, init=str(tmp_path / "pg"))
  cfg = build_model_config(normalize(config).model, make_tokenizer(config))
  params = treeutil.flatten(initial_params(normalize(config), cfg, log=lambda *_: None))
  src = treeutil.flatten(src_params["params"])
  img_keys = [k for k in params if k.startswith("img/")]
  assert img_keys and "img/head/kernel" not in params
  for k in img_keys:
    np.testing.assert_array_equal(params[k], src[k], err_msg=k)


def test_sincos_2d_is_the_mae_embedding_in_image_coordinates():
  from vlm_jax.models.adapters import sincos_2d
  grid, d = 3, 16
  emb = sincos_2d(grid, d)
  omega = [1.0 / 10000 ** (i / (d / 4)) for i in range(d // 4)]
  for r in range(grid):
    for c in range(grid):
      want = ([np.sin(r * w) for w in omega] + [np.cos(r * w) for w in omega]
              + [np.sin(c * w) for w in omega] + [np.cos(c * w) for w in omega])
      np.testing.assert_allclose(emb[r * grid + c], want, rtol=1e-6, atol=1e-6)
  # With a fixed extent a place keeps its embedding at any resolution: the centre cell of a 3x3 grid is the
  # one cell of a 1x1 grid.
  np.testing.assert_allclose(sincos_2d(3, d, extent=16.0)[4], sincos_2d(1, d, extent=16.0)[0], atol=1e-6)


def test_adapter_posemb_adds_the_fixed_embedding_and_blocks_hf_export(tmp_path):
  import dataclasses
  from vlm_jax.api import Model
  from vlm_jax.models.adapters import POSEMB_EXTENT, sincos_2d
  from vlm_jax.models.vlm import _image_tokens
  cfg = get_model_config("tiny")
  with_pe = dataclasses.replace(cfg, adapter=dataclasses.replace(cfg.adapter, posemb="sincos2d"))
  params = randomize(init_params(cfg), seed=1)
  images = np.random.RandomState(0).uniform(-1, 1, (2, 28, 28, 3)).astype(np.float32)
  plain, pe = (model_for(c).apply(params, jnp.asarray(images), method=_image_tokens) for c in (cfg, with_pe))
  grid = cfg.img.grid
  np.testing.assert_allclose(pe - plain, np.broadcast_to(sincos_2d(grid, cfg.llm.width, POSEMB_EXTENT), pe.shape),
                             atol=1e-5)
  with pytest.raises(ValueError, match="position embedding"):
    Model(with_pe, params).save_hf(str(tmp_path / "hf"))


def test_resampler_queries_see_where_image_tokens_are():
  """Without position on its keys a cross-attention resampler is blind to the order of the image tokens (any
  permutation gives the same output); with the 2D embeddings on queries and keys it is not."""
  from vlm_jax.models.adapters import Resampler
  x = jnp.asarray(np.random.RandomState(0).randn(1, 16, 32).astype(np.float32))
  module = Resampler(width=32, num_queries=4, num_heads=4)
  params = randomize(module.init(jax.random.key(0), x), seed=2)
  perm = np.random.RandomState(1).permutation(16)
  assert not np.allclose(module.apply(params, x), module.apply(params, x[:, perm]), atol=1e-4)


def test_resampler_locality_bias_makes_each_query_read_its_own_region():
  """With the locality bias a query depends on the image tokens of its own cell, from init: the top-left query's
  output is ~e^10 times as sensitive to the top-left image token as to the bottom-right one (their squared
  distance is ~20 query cells^2); without it (locality 0) the two are about equal."""
  from vlm_jax.models.adapters import Resampler
  x = jnp.asarray(np.random.RandomState(0).randn(1, 36, 32).astype(np.float32))

  def near_over_far(locality):
    module = Resampler(width=32, num_queries=16, num_heads=4, locality=locality)
    params = module.init(jax.random.key(0), x)
    jac = jax.jacobian(lambda x: module.apply(params, x)[0, 0])(x)  # query 0's output [32] by x [1, 36, 32]
    per_token = np.linalg.norm(np.asarray(jac).reshape(32, 36, 32), axis=(0, 2))
    return per_token[0] / per_token[35]
  assert near_over_far(1.0) > 1000
  assert 0.1 < near_over_far(0.0) < 10


def test_the_llava_config_takes_the_llm_directorys_tokenizer(hf_llama_dir, tmp_path):
  """configs/siglip_llama.py:tiny=False reads the tokenizer of its `llm` directory (here a Llama 3-style
  tokenizer.json) unless `tokenizer` names one; without `llm` the error says what to give."""
  import shutil
  from tests.hf_models import train_json_tokenizer
  from vlm_jax.tokenizer import JSONTokenizer
  llm = tmp_path / "llama3"
  shutil.copytree(hf_llama_dir, llm)
  train_json_tokenizer(str(llm))
  config = config_util.load_config(f"configs/siglip_llama.py:tiny=False,llm={llm}")
  tok = make_tokenizer(config)
  assert isinstance(tok, JSONTokenizer) and tok.path == str(llm / "tokenizer.json")
  assert tok.prompt_start == (tok.bos_id,)
  # The model config keeps the tokenizer's special ids (not the HF config's): a model loaded later without its
  # tokenizer files still stops at the EOS it was trained with.
  cfg = build_model_config(normalize(config).model, tok)
  assert (cfg.bos_id, cfg.eos_id, cfg.pad_id) == (tok.bos_id, tok.eos_id, None) and tok.pad_id < 0
  with pytest.raises(ValueError, match=r"siglip_llama.py:tiny=False needs llm=DIR, a local HF Llama / Qwen2"):
    config_util.load_config("configs/siglip_llama.py:tiny=False")
  with pytest.raises(ValueError, match=r"siglip_ul2.py:tiny=False needs llm=DIR, a local HF T5 / UL2"):
    config_util.load_config("configs/siglip_ul2.py:tiny=False")
