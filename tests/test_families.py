"""Model families in the training stack: configs, the encoder-decoder loss alignment, text-weight init."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax import config_util, treeutil
from vlm_jax.models.registry import get_model_config
from vlm_jax.models.vlm import EncoderDecoderVLM, init_params, model_for
from vlm_jax.train_setup import ALLOWED_KEYS, build_model_config, check_config, initial_params, make_tokenizer, normalize
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


def test_model_wide_options_reach_every_sub_config():
  config = config_util.load_config("configs/siglip_llama.py")
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


def test_llm_init_loads_hf_text_weights(tmp_path):
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM
  from vlm_jax.convert import hf_llama
  torch.manual_seed(0)
  hf_model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                          vocab_size=1536, tie_word_embeddings=False))
  hf_model.save_pretrained(tmp_path / "llama")
  config = config_util.load_config("configs/siglip_llama.py")
  config.model.llm = dict(init=str(tmp_path / "llama"))
  check_config(config)
  cfg = build_model_config(normalize(config).model, make_tokenizer(config))
  assert cfg.llm.width == 64 and cfg.llm.num_kv_heads == 2
  params = initial_params(normalize(config), cfg, log=lambda *_: None)
  _, ref = hf_llama.load_text_model(str(tmp_path / "llama"))
  ours = treeutil.flatten(params["llm"])
  for k, v in treeutil.flatten(ref).items():
    np.testing.assert_array_equal(ours[k], v, err_msg=k)
  assert set(params) >= {"img", "adapter", "llm"}


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
