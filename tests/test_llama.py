"""The Llama-family decoder against transformers' LlamaForCausalLM / Qwen2ForCausalLM on tiny random models."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vlm_jax import treeutil
from vlm_jax.convert import hf_llama, safetensors_io
from vlm_jax.models import vlm
from vlm_jax.models.layers import kv_cache_shape
from vlm_jax.models.llama import Llama, LlamaConfig
from vlm_jax.models.vit import vit_config

VOCAB = 96
TOKENS = np.random.RandomState(0).randint(3, VOCAB, (2, 12))
PROMPT = 5


def rel_err(ours, theirs):
  return float(np.max(np.abs(np.asarray(ours) - theirs)) / np.max(np.abs(theirs)))


def tiny_hf(family: str):
  """Every tensor random (norm scales and biases too), so a wrong or zero-initialised mapping shows up.

  llama: GQA, llama3 rope scaling whose wavelength thresholds (16, 64) put head_dim 16's frequencies in all three
  bands (kept, smoothed, divided), untied head. qwen2: GQA, q/k/v biases, linear rope scaling, tied head.
  """
  from transformers import LlamaConfig as HFLlama, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
  common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=128, bos_token_id=1,
                eos_token_id=2, pad_token_id=0)
  if family == "llama":
    config = HFLlama(head_dim=16, rms_norm_eps=1e-5, tie_word_embeddings=False,
                     rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 64}, **common)
    cls = LlamaForCausalLM
  else:
    config = Qwen2Config(tie_word_embeddings=True, rope_parameters={"rope_type": "linear", "rope_theta": 1000.0,
                                                                    "factor": 2.0}, **common)
    cls = Qwen2ForCausalLM
  torch.manual_seed(0)
  model = cls._from_config(config, attn_implementation="eager")
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * 0.3)
  return model.eval()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def hf_text(request, tmp_path_factory):
  """(torch model, directory it was saved to, our (cfg, params) loaded from there)."""
  model = tiny_hf(request.param)
  path = tmp_path_factory.mktemp(f"hf_{request.param}")
  model.save_pretrained(path)
  return model, str(path), hf_llama.load_text_model(str(path))


@functools.partial(jax.jit, static_argnums=0)
def run(cfg, params, tokens_BT, positions_BT, mask_BTS, cache=None, cache_index=0):
  def fn(m, *args):
    h_BTD, new_cache = m(m.embed(tokens_BT), *args)
    return m.logits(h_BTD), new_cache
  return Llama(cfg).apply({"params": params}, positions_BT, mask_BTS, cache, cache_index, method=fn)


def full_logits(cfg, params, tokens_BT):
  b, t = tokens_BT.shape
  causal_BTT = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
  return run(cfg, params, tokens_BT, jnp.broadcast_to(jnp.arange(t), (b, t)), causal_BTT)[0]


def cached_logits(cfg, params, tokens_BT, prefill, cache_size):
  """Prefill `prefill` tokens into a fresh cache, then extend one token at a time: logits of every position."""
  b, t = tokens_BT.shape
  kv_shape = (cfg.depth, *kv_cache_shape(b, cfg.num_kv_heads, cache_size, cfg.head_dim))
  cache = {"k": jnp.zeros(kv_shape, cfg.dtype), "v": jnp.zeros(kv_shape, cfg.dtype)}
  slots_S = jnp.arange(cache_size)
  mask_BPS = jnp.broadcast_to(slots_S[None] <= jnp.arange(prefill)[:, None], (b, prefill, cache_size))
  logits, cache = run(cfg, params, tokens_BT[:, :prefill], jnp.broadcast_to(jnp.arange(prefill), (b, prefill)),
                      mask_BPS, cache, 0)
  out = [logits]
  for i in range(prefill, t):
    mask_B1S = jnp.broadcast_to(slots_S <= i, (b, 1, cache_size))
    logits, cache = run(cfg, params, tokens_BT[:, i:i + 1], jnp.full((b, 1), i), mask_B1S, cache, i)
    out.append(logits)
  return jnp.concatenate(out, axis=1)


def hf_logits(model, tokens_BT):
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens_BT)).logits.float().numpy()


def test_config_from_hf(hf_text):
  model, _, (cfg, _) = hf_text
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.depth) == (4, 2, 16, 2)
  assert cfg.tie_embeddings == model.config.tie_word_embeddings
  assert cfg.qkv_bias == (model.config.model_type == "qwen2")
  assert dict(cfg.rope_scaling)["rope_type"] == model.config.rope_parameters["rope_type"]
  hash(cfg)  # usable as a static jit argument


def test_rope_frequencies_match_hf(hf_text):
  model, _, (cfg, _) = hf_text
  np.testing.assert_allclose(cfg.rope_inv_freq(), model.model.rotary_emb.inv_freq.numpy(), rtol=1e-6)


def test_full_sequence_logits(hf_text):
  model, _, (cfg, params) = hf_text
  assert rel_err(full_logits(cfg, params, TOKENS), hf_logits(model, TOKENS)) < 1e-4


def test_kv_cache_matches_full_pass(hf_text):
  model, _, (cfg, params) = hf_text
  ours = cached_logits(cfg, params, TOKENS, PROMPT, cache_size=16)
  assert rel_err(ours, full_logits(cfg, params, TOKENS)) < 1e-5
  assert rel_err(ours, hf_logits(model, TOKENS)) < 1e-4


def test_greedy_continuation_matches_generate(hf_text):
  model, _, (cfg, params) = hf_text
  b, steps, size = TOKENS.shape[0], 8, 16
  prompt = TOKENS[:, :PROMPT]
  kv_shape = (cfg.depth, *kv_cache_shape(b, cfg.num_kv_heads, size, cfg.head_dim))
  cache = {"k": jnp.zeros(kv_shape), "v": jnp.zeros(kv_shape)}
  slots_S = jnp.arange(size)
  mask = jnp.broadcast_to(slots_S[None] <= jnp.arange(PROMPT)[:, None], (b, PROMPT, size))
  logits, cache = run(cfg, params, prompt, jnp.broadcast_to(jnp.arange(PROMPT), (b, PROMPT)), mask, cache, 0)
  ours = []
  for i in range(PROMPT, PROMPT + steps):
    ours.append(np.asarray(jnp.argmax(logits[:, -1], axis=-1)))
    logits, cache = run(cfg, params, jnp.asarray(ours[-1])[:, None], jnp.full((b, 1), i),
                        jnp.broadcast_to(slots_S <= i, (b, 1, size)), cache, i)
  with torch.no_grad():
    theirs = model.generate(input_ids=torch.tensor(prompt), attention_mask=torch.ones(prompt.shape, dtype=torch.long),
                            max_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=0)
  np.testing.assert_array_equal(np.stack(ours, axis=1), theirs[:, PROMPT:].numpy())


def test_bfloat16_compute_close_to_float32(hf_text):
  _, _, (cfg, params) = hf_text
  bf16 = dataclasses.replace(cfg, dtype="bfloat16")
  f32 = np.asarray(full_logits(cfg, params, TOKENS))
  assert rel_err(full_logits(bf16, params, TOKENS), f32) < 0.05
  assert rel_err(cached_logits(bf16, params, TOKENS, PROMPT, cache_size=16), f32) < 0.05


def test_params_round_trip_bit_identical(hf_text):
  model, path, (cfg, params) = hf_text
  theirs = {k: v.numpy() for k, v in model.state_dict().items()}
  if cfg.tie_embeddings:
    theirs.pop("lm_head.weight")
  back = hf_llama.params_to_hf(hf_llama.params_from_hf(theirs, cfg), cfg)
  assert sorted(back) == sorted(theirs)
  for name in theirs:
    assert back[name].dtype == theirs[name].dtype, name
    np.testing.assert_array_equal(back[name], theirs[name], err_msg=name)
  # The loaded (nested) params map back to the saved file, too.
  saved = safetensors_io.read(f"{path}/model.safetensors")
  for name, a in hf_llama.params_to_hf(params, cfg).items():
    np.testing.assert_array_equal(a, saved[name], err_msg=name)


def test_llava_prefixes_accepted(hf_text):
  """Names as inside LlavaForConditionalGeneration (transformers 5 and older), vision tensors ignored."""
  model, _, (cfg, params) = hf_text
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  for rename in (lambda k: k.replace("model.", "model.language_model.", 1),
                 lambda k: "language_model." + k):
    llava = {rename(k): v for k, v in sd.items()}
    llava["model.vision_tower.vision_model.post_layernorm.weight"] = np.zeros(3, np.float32)
    llava["model.multi_modal_projector.linear_1.weight"] = np.zeros((3, 3), np.float32)
    flat = hf_llama.params_from_hf(llava, cfg)
    for name, a in treeutil.flatten(params).items():
      np.testing.assert_array_equal(flat[name], a, err_msg=name)


def test_wrong_shape_names_the_key(hf_text):
  model, _, (cfg, _) = hf_text
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  sd["model.layers.1.self_attn.k_proj.weight"] = np.zeros((8, 64), np.float32)
  with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.k_proj\.weight: expected shape \(32, 64\), "
                                       r"found \(8, 64\)"):
    hf_llama.params_from_hf(sd, cfg)
  del sd["model.norm.weight"]
  with pytest.raises(ValueError, match=r"missing norm\.weight"):
    hf_llama.params_from_hf(sd, cfg)


def test_config_to_hf_round_trip(hf_text):
  from transformers import AutoConfig
  _, _, (cfg, _) = hf_text
  d = hf_llama.config_to_hf(cfg)
  assert hf_llama.config_from_hf(d) == cfg
  hf_cfg = AutoConfig.for_model(**d)
  assert hf_llama.config_from_hf(hf_cfg.to_dict()) == cfg


@pytest.mark.parametrize("change, message", [
    (dict(model_type="mistral"), "model_type 'mistral'"),
    (dict(hidden_size=None), "missing field.*hidden_size"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}), "rope type 'yarn'"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}), "low_freq_factor"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
])
def test_config_errors(change, message):
  base = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "vocab_size": 32}
  with pytest.raises(ValueError, match=message):
    hf_llama.config_from_hf({**base, **change})


def test_legacy_rope_fields_and_defaults():
  cfg = hf_llama.config_from_hf({
      "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
      "num_attention_heads": 4, "vocab_size": 32, "rope_theta": 500000.0, "max_position_embeddings": 256,
      "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}})
  assert (cfg.head_dim, cfg.num_kv_heads, cfg.rope_base) == (16, 4, 500000.0)
  assert dict(cfg.rope_scaling)["original_max_position_embeddings"] == 256
  # A config from JSON (scaling as a list of pairs) equals the original.
  assert LlamaConfig(**{**cfg.__dict__, "rope_scaling": [list(p) for p in cfg.rope_scaling]}) == cfg


def test_a_file_with_both_rope_fields_reads_as_transformers_reads_it():
  """transformers 5 takes the legacy `rope_scaling` over `rope_parameters` when a config.json has both."""
  from transformers import LlamaConfig as HFLlamaConfig
  c = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
       "num_attention_heads": 4, "vocab_size": 32, "max_position_embeddings": 256,
       "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
       "rope_scaling": {"rope_type": "linear", "factor": 4.0, "rope_theta": 500000.0}}
  theirs = HFLlamaConfig.from_dict(c).rope_parameters
  cfg = hf_llama.config_from_hf(c)
  assert theirs["rope_type"] == "linear" and dict(cfg.rope_scaling) == {"rope_type": "linear", "factor": 4.0}
  assert cfg.rope_base == theirs["rope_theta"] == 500000.0


def test_works_as_the_vlm_language_model():
  """Llama in the decoder glue (prefill + extend read only the interface Gemma also has) = the full pass."""
  llm = LlamaConfig(width=32, depth=2, mlp_dim=64, num_heads=4, num_kv_heads=2, head_dim=8, vocab_size=VOCAB,
                    qkv_bias=True)
  cfg = vlm.VLMConfig(img=vit_config("mu/14", image_size=28, head_dim_out=32), llm=llm)
  model = vlm.DecoderVLM(cfg)
  images = None  # the text-only path: the image tokens would only lengthen the bidirectional prefix
  mask_ar = np.array([[0] * PROMPT + [1] * (12 - PROMPT)] * 2)
  variables = jax.jit(model.init)(jax.random.key(0), images, TOKENS, mask_ar)
  full = jax.jit(model.apply)(variables, images, TOKENS, mask_ar)
  prefill = jax.jit(lambda v, *a: model.apply(v, *a, None, 20, method="prefill"))
  extend = jax.jit(lambda v, *a: model.apply(v, *a, method="extend"))
  logits, cache = prefill(variables, images, TOKENS[:, :PROMPT], mask_ar[:, :PROMPT])
  steps = [logits]
  for i in range(PROMPT, 12):
    logits, cache = extend(variables, TOKENS[:, i:i + 1], cache)
    steps.append(logits)
  assert rel_err(jnp.concatenate(steps, axis=1), full) < 1e-5
