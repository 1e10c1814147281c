"""The T5 / UL2 encoder-decoder backbone against transformers' T5ForConditionalGeneration on tiny random models."""
import dataclasses
import functools
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vlm_jax import decode as decode_lib
from vlm_jax import treeutil
from vlm_jax.convert import hf_t5, safetensors_io
from vlm_jax.convert.hf_files import read_tensors
from vlm_jax.models.layers import unstack_layers
from vlm_jax.models.t5 import T5, T5Config, init_params, relative_position_bucket

VOCAB, EOS, PAD = 64, 1, 0
# Encoder ids with padding (row 1 has 3 pads, masked by attention_mask); decoder ids start with the start token.
ENC = np.array([[5, 9, 3, 17, 22, 8, 40, 11, 2, 7], [12, 4, 33, 9, 21, 6, 13, 0, 0, 0]])
ENC_MASK = (np.arange(10)[None] < np.array([[10], [7]])).astype(np.int32)
DEC = np.array([[0, 14, 3, 27, 9, 50, 2, 19], [0, 8, 8, 41, 30, 5, 16, 44]])
VARIANTS = {
    "gated-gelu": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),  # T5 v1.1 / UL2
    "gated-silu": dict(feed_forward_proj="gated-silu", tie_word_embeddings=False),
    "relu": dict(feed_forward_proj="relu", tie_word_embeddings=True),  # T5 v1.0: tied head, scaled output
}


def rel_err(ours, theirs):
  return float(np.max(np.abs(np.asarray(ours) - theirs)) / np.max(np.abs(theirs)))


def tiny_t5(path, variant: str, seed: int = 0):
  """A saved tiny random HF T5 (every tensor randomised, an own lm head when untied) and its torch model.

  Encoder and decoder depths differ and N*H != D, so a swapped stack or a wrong transpose shows up; few buckets
  and a short max distance put the sequences into the logarithmic buckets.
  """
  from transformers import T5Config as HFConfig
  from transformers import T5ForConditionalGeneration
  kw = VARIANTS[variant]
  config = HFConfig(vocab_size=VOCAB, d_model=32, d_kv=6, d_ff=40, num_layers=2, num_decoder_layers=3, num_heads=4,
                    relative_attention_num_buckets=8, relative_attention_max_distance=12, dropout_rate=0.0,
                    decoder_start_token_id=0, pad_token_id=PAD, eos_token_id=EOS, **kw)
  torch.manual_seed(seed)
  model = T5ForConditionalGeneration._from_config(config, attn_implementation="eager")
  with torch.no_grad():  # embeddings at transformers' own scale, so logits are not flat
    for name, p in model.named_parameters():
      if name == "shared.weight":
        p.copy_(torch.randn_like(p))
      elif "layer_norm" in name:
        p.copy_(1 + 0.3 * torch.randn_like(p))
      else:
        p.copy_(0.3 * torch.randn_like(p))
  model.save_pretrained(path)
  if not kw["tie_word_embeddings"]:
    # transformers 5 ties a fresh model's head; a T5 v1.1 / UL2 checkpoint file carries its own.
    file = f"{path}/model.safetensors"
    tensors = dict(safetensors_io.read(file))
    tensors["lm_head.weight"] = np.random.RandomState(seed).randn(VOCAB, 32).astype(np.float32)
    safetensors_io.write(file, tensors, {"format": "pt"})
    with open(f"{path}/config.json") as f:
      hf_config = json.load(f)
    hf_config.pop("scale_decoder_outputs", None)
    hf_config["tie_word_embeddings"] = False
    with open(f"{path}/config.json", "w") as f:
      json.dump(hf_config, f)
  model = T5ForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
  if not kw["tie_word_embeddings"]:
    assert not torch.equal(model.lm_head.weight, model.shared.weight)
  return model


@pytest.fixture(scope="module", params=list(VARIANTS))
def t5(request, tmp_path_factory):
  """(path, torch model, our config, our params) per variant."""
  path = str(tmp_path_factory.mktemp(f"t5_{request.param}"))
  torch_model = tiny_t5(path, request.param)
  cfg, params = hf_t5.load(path)
  return path, torch_model, cfg, jax.device_put(params)


def hf_logits(torch_model, dec=DEC):
  with torch.no_grad():
    return torch_model(input_ids=torch.tensor(ENC), attention_mask=torch.tensor(ENC_MASK),
                       decoder_input_ids=torch.tensor(dec)).logits.numpy()


@functools.lru_cache(maxsize=None)
def fns(cfg: T5Config):
  """Jitted entry points of the module (op-by-op `apply` recompiles every layer scan on each call)."""
  model = T5(cfg)
  forward = jax.jit(lambda p, enc, mask, dec: model.apply(p, enc, mask, dec))
  encode = jax.jit(lambda p, enc, mask: model.apply(p, model.apply(p, enc, method=T5.embed), mask, method=T5.encode))
  decode = jax.jit(lambda p, dec, enc_BSD, mask: model.apply(p, model.apply(p, dec, method=T5.embed), enc_BSD, mask,
                                                             method=T5.decode))
  init_cache = jax.jit(lambda p, enc_BSD, mask, size: model.apply(p, enc_BSD, mask, size, method=T5.init_cache),
                       static_argnums=3)
  extend = jax.jit(lambda p, tokens, cache: model.apply(p, tokens, cache, method=T5.extend))
  return types.SimpleNamespace(forward=forward, encode=encode, decode=decode, init_cache=init_cache, extend=extend)


def step_fn(cfg, params):
  """decode.py's step: extend(tokens_B, cache) -> (logits_BV, cache)."""
  def extend(token_B, cache):
    logits_B1V, cache = T5(cfg).apply(params, token_B[:, None], cache, method=T5.extend)
    return logits_B1V[:, 0], cache
  return extend


def start(cfg, params, max_new_tokens):
  """First-step logits (from the decoder start token) and the cache, as a decode loop takes them."""
  f = fns(cfg)
  cache = f.init_cache(params, f.encode(params, ENC, ENC_MASK), ENC_MASK, max_new_tokens + 1)
  logits_B1V, cache = f.extend(params, jnp.full((ENC.shape[0], 1), cfg.decoder_start_id, jnp.int32), cache)
  return logits_B1V[:, 0], cache


# ---------------------------------------------------------------------------------------------- model


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(8, 12), (32, 128), (6, 20)])
def test_relative_position_buckets_match_transformers(bidirectional, num_buckets, max_distance):
  from transformers.models.t5.modeling_t5 import T5Attention
  rel = np.arange(-400, 401)
  theirs = T5Attention._relative_position_bucket(torch.tensor(rel), bidirectional=bidirectional,
                                                 num_buckets=num_buckets, max_distance=max_distance).numpy()
  ours = relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=num_buckets,
                                  max_distance=max_distance)
  np.testing.assert_array_equal(ours, theirs)


def test_config_from_hf(t5):
  path, torch_model, cfg, _ = t5
  c = torch_model.config
  assert (cfg.width, cfg.num_heads, cfg.head_dim, cfg.mlp_dim) == (32, 4, 6, 40)
  assert (cfg.encoder_depth, cfg.decoder_depth, cfg.vocab_size) == (2, 3, VOCAB)
  assert cfg.gated == c.is_gated_act
  assert cfg.scales_output == c.scale_decoder_outputs
  assert cfg.tie_embeddings == (torch_model.lm_head.weight is torch_model.shared.weight)


def test_the_config_follows_the_file_when_transformers_resaves_it(t5, tmp_path):
  """transformers 5 writes tie_word_embeddings true when it saves an untied T5 and keeps its lm_head in the file:
  the config read for `model.llm.init` (without the params) follows the file, as loading the params does."""
  from vlm_jax.train_setup import _text_checkpoint
  path, torch_model, cfg, _ = t5
  torch_model.save_pretrained(str(tmp_path))
  config_only, _ = _text_checkpoint(str(tmp_path))
  with_params, _ = _text_checkpoint(str(tmp_path), with_params=True)
  assert config_only == with_params == hf_t5.read_config(str(tmp_path))
  assert config_only.tie_embeddings == cfg.tie_embeddings and config_only.scales_output == cfg.scales_output


def test_logits_match_transformers(t5):
  """Encoder ids with padding and decoder ids -> the same logits as T5ForConditionalGeneration."""
  _, torch_model, cfg, params = t5
  ours = fns(cfg).forward(params, ENC, ENC_MASK, DEC)
  assert ours.dtype == jnp.float32 and ours.shape == (2, DEC.shape[1], VOCAB)
  assert rel_err(ours, hf_logits(torch_model)) < 1e-4


@pytest.mark.parametrize("stacked", [True, False])
def test_cached_extend_equals_teacher_forced(t5, stacked):
  """In both layouts: scanned decoder layers with a [L, ...] cache, and the decode loop's per-layer weights with
  a list of per-layer caches."""
  _, _, cfg, params = t5
  full = np.asarray(fns(cfg).decode(params, DEC, fns(cfg).encode(params, ENC, ENC_MASK), ENC_MASK))
  if not stacked:
    llm = params["params"]
    params = {"params": {**llm, "decoder": unstack_layers(llm["decoder"], cfg.decoder_depth)}}
    cfg = dataclasses.replace(cfg, stacked_layers=False)
  f = fns(cfg)
  enc_BSD = f.encode(params, ENC, ENC_MASK)
  t = DEC.shape[1]
  cache = f.init_cache(params, enc_BSD, ENC_MASK, t + 2)
  layer_shape = (2, cfg.num_heads, ENC.shape[1], cfg.head_dim)
  if stacked:
    assert set(cache["kv"]) == {"self_k", "self_v", "cross_k", "cross_v"}
    assert cache["kv"]["cross_k"].shape == (cfg.decoder_depth, *layer_shape)
  else:
    assert len(cache["kv"]) == cfg.decoder_depth and set(cache["kv"][0]) == {"self_k", "self_v", "cross_k", "cross_v"}
    assert cache["kv"][1]["cross_k"].shape == layer_shape
  # The teacher-forced pass of this layout gives the same logits.
  assert rel_err(np.asarray(f.decode(params, DEC, enc_BSD, ENC_MASK)), full) < 1e-5
  steps = []
  for i in range(t):  # one token at a time
    logits, cache = f.extend(params, DEC[:, i:i + 1], cache)
    steps.append(logits)
  assert int(cache["index"]) == t
  assert rel_err(np.concatenate(steps, axis=1), full) < 1e-5
  # Several tokens per call (a chunk of 3, then the rest) give the same logits too.
  cache = f.init_cache(params, enc_BSD, ENC_MASK, t + 2)
  first, cache = f.extend(params, DEC[:, :3], cache)
  rest, _ = f.extend(params, DEC[:, 3:], cache)
  assert rel_err(np.concatenate([first, rest], axis=1), full) < 1e-5


def lazy_cache():
  """`generate`'s cache argument: transformers 5 sizes a config-built decoder cache by `num_layers` (the
  encoder's depth), so pass lazy ones, under the name this version takes (`cache` from 5.24 on)."""
  import transformers
  from packaging.version import Version
  from transformers.cache_utils import DynamicCache, EncoderDecoderCache
  name = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"
  return {name: EncoderDecoderCache(DynamicCache(), DynamicCache())}


def test_greedy_decoding_matches_transformers_generate(t5):
  _, torch_model, cfg, params = t5
  n = 8
  logits_BV, cache = start(cfg, params, n)
  ours, _, _ = decode_lib.sample_loop(step_fn(cfg, params), logits_BV, cache, jax.random.key(0),
                                      max_new_tokens=n, sampling=decode_lib.Sampling(), eos_id=-1, pad_id=PAD)
  with torch.no_grad():
    theirs = torch_model.generate(input_ids=torch.tensor(ENC), attention_mask=torch.tensor(ENC_MASK), do_sample=False,
                                  max_new_tokens=n, eos_token_id=None, pad_token_id=PAD, **lazy_cache())
  assert theirs[0, 0] == cfg.decoder_start_id
  np.testing.assert_array_equal(np.asarray(ours), theirs[:, 1:].numpy())


def test_beam_search_score_is_teacher_forced_log_prob(t5):
  """beam_loop over the cached decoder: each result scores its teacher-forced log-prob (length_penalty 0), and
  the results are transformers' beam search's."""
  _, torch_model, cfg, params = t5
  n, beams = 6, 3
  eos = 39  # in these random models, ends some rows after 1-3 tokens and not others (EOS 1 ends all at once)
  logits_BV, cache = start(cfg, params, n)
  tokens_BN, score_B = decode_lib.beam_loop(step_fn(cfg, params), logits_BV, cache, beam_size=beams,
                                            max_new_tokens=n, length_penalty=0.0, eos_id=eos, pad_id=PAD)
  tokens_BN = np.asarray(tokens_BN)
  dec_in = np.concatenate([np.full((2, 1), cfg.decoder_start_id), tokens_BN[:, :-1]], axis=1)
  logp_BNV = jax.nn.log_softmax(fns(cfg).forward(params, ENC, ENC_MASK, dec_in), axis=-1)
  token_logp_BN = np.take_along_axis(np.asarray(logp_BNV), tokens_BN[:, :, None], axis=-1)[:, :, 0]
  for row in range(2):
    ends = np.flatnonzero(tokens_BN[row] == eos)
    length = ends[0] + 1 if len(ends) else n
    assert (tokens_BN[row, length:] == PAD).all()
    np.testing.assert_allclose(float(score_B[row]), token_logp_BN[row, :length].sum(), rtol=1e-5, atol=1e-5)
  with torch.no_grad():
    out = torch_model.generate(input_ids=torch.tensor(ENC), attention_mask=torch.tensor(ENC_MASK), do_sample=False,
                               num_beams=beams, max_new_tokens=n, length_penalty=0.0, eos_token_id=eos,
                               pad_token_id=PAD, output_scores=True, return_dict_in_generate=True, **lazy_cache())
  theirs = np.pad(out.sequences[:, 1:].numpy(), ((0, 0), (0, n + 1 - out.sequences.shape[1])))
  after_eos = np.cumsum(np.cumsum(theirs == eos, axis=1), axis=1) > 1  # transformers fills these with EOS
  np.testing.assert_array_equal(tokens_BN, np.where(after_eos, PAD, theirs))
  np.testing.assert_allclose(np.asarray(score_B), out.sequences_scores.numpy(), rtol=1e-4)


# ---------------------------------------------------------------------------------------------- conversion


def test_params_round_trip_bit_identical(t5):
  path, _, cfg, params = t5
  tensors = read_tensors(path)
  flat = hf_t5.params_from_hf(tensors, cfg)
  # The converted tree is exactly the module's tree.
  template = treeutil.flatten(jax.eval_shape(lambda: init_params(cfg))["params"])
  assert {k: v.shape for k, v in flat.items()} == {k: v.shape for k, v in template.items()}
  back = hf_t5.params_to_hf(treeutil.flatten(params["params"]), cfg)
  assert sorted(back) == sorted(tensors)
  for name, a in tensors.items():
    assert back[name].dtype == a.dtype, name
    np.testing.assert_array_equal(back[name], a, err_msg=name)


def test_wrong_or_missing_tensor_names_the_key(t5, tmp_path):
  path, _, cfg, _ = t5
  tensors = dict(read_tensors(path))
  key = "decoder.block.1.layer.1.EncDecAttention.k.weight"
  bad = {**tensors, key: tensors[key][:, :-1]}
  with pytest.raises(ValueError, match=f"{key}: expected shape \\(24, 32\\), found \\(24, 31\\)"):
    hf_t5.params_from_hf(bad, cfg)
  missing = {k: v for k, v in tensors.items() if k != "encoder.block.1.layer.1.layer_norm.weight"}
  with pytest.raises(ValueError, match="missing encoder.block.1.layer.1.layer_norm.weight"):
    hf_t5.params_from_hf(missing, cfg)
  # Through `load`: a directory with one mis-shaped tensor.
  safetensors_io.write(str(tmp_path / "model.safetensors"), bad, {"format": "pt"})
  (tmp_path / "config.json").write_text(open(f"{path}/config.json").read())
  with pytest.raises(ValueError, match=f"HF checkpoint {tmp_path}.*\n.*{key}: expected shape"):
    hf_t5.load(str(tmp_path))


def test_export_loads_in_transformers(t5, tmp_path):
  """vlm_jax -> HF: transformers loads config_to_hf + params_to_hf and computes our logits."""
  from transformers import T5ForConditionalGeneration
  _, torch_model, cfg, params = t5
  tensors = hf_t5.params_to_hf({k: np.asarray(v) for k, v in treeutil.flatten(params["params"]).items()}, cfg)
  safetensors_io.write(str(tmp_path / "model.safetensors"), tensors, {"format": "pt"})
  (tmp_path / "config.json").write_text(json.dumps(hf_t5.config_to_hf(cfg)))
  exported = T5ForConditionalGeneration.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
  assert rel_err(fns(cfg).forward(params, ENC, ENC_MASK, DEC), hf_logits(exported)) < 1e-4


def test_config_errors():
  base = dict(d_model=8, d_kv=2, d_ff=16, num_layers=1, num_heads=4, vocab_size=10)
  with pytest.raises(ValueError, match="missing field\\(s\\) d_ff"):
    hf_t5.config_from_hf({k: v for k, v in base.items() if k != "d_ff"})
  with pytest.raises(ValueError, match="activation 'tanh' is not supported"):
    hf_t5.config_from_hf({**base, "feed_forward_proj": "gated-tanh"})
  with pytest.raises(ValueError, match="umt5"):
    hf_t5.config_from_hf({**base, "model_type": "umt5"})
  cfg = hf_t5.config_from_hf({**base, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False})
  assert (cfg.activation, cfg.gated, cfg.tie_embeddings, cfg.scales_output) == ("gelu_new", True, False, False)
  with pytest.raises(ValueError, match="Unknown T5 activation"):
    T5Config(width=8, num_heads=2, head_dim=4, mlp_dim=16, encoder_depth=1, decoder_depth=1, activation="tanh")
