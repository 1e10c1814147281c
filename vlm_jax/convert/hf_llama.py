"""HuggingFace `LlamaForCausalLM` / `Qwen2ForCausalLM` text weights <-> vlm_jax `Llama` params.

Flat params are {"embedder/input_embedding": array, "layers/attn/q_proj/w": array, ...}, relative to the
`Llama` module (see vlm_jax/models/llama.py for the full name mapping). Every rule is an exact
reshape/transpose, so a round trip is bit-identical. Input tensor names may carry the `model.` prefix of a
causal LM or the `language_model.` / `model.language_model.` / `language_model.model.` prefixes used inside
`LlavaForConditionalGeneration`; vision tower and projector tensors are ignored.
"""
import os

import jax
import numpy as np

from vlm_jax import fileutil, treeutil
from vlm_jax.convert import hf_files
from vlm_jax.models.llama import ROPE_SCALING_KEYS, LlamaConfig

MODEL_TYPES = ("llama", "qwen2")
REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
# Longest first: "language_model.model.layers.0..." must lose both parts.
TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "language_model.", "model.")
NOT_TEXT = ("vision_tower.", "multi_modal_projector.", "image_newline")


# ---------------------------------------------------------------------------------------------- config


def config_from_hf(hf_config: dict, source: str = "config.json") -> LlamaConfig:
  """Our config from a LlamaForCausalLM / Qwen2ForCausalLM config.json dict (or a LLaVA `text_config`)."""
  c = hf_config
  model_type = c.get("model_type", "llama")
  if model_type not in MODEL_TYPES:
    raise ValueError(f"{source}: model_type {model_type!r} is not supported ({', '.join(MODEL_TYPES)}).")
  if missing := [k for k in REQUIRED if c.get(k) is None]:
    raise ValueError(f"{source}: missing field(s) {', '.join(missing)}.")
  if (act := c.get("hidden_act", "silu")) != "silu":
    raise ValueError(f"{source}: hidden_act {act!r} is not 'silu' (SwiGLU).")
  if model_type == "llama":
    for field in ("attention_bias", "mlp_bias"):
      if c.get(field):
        raise ValueError(f"{source}: {field}=true is not supported (only Qwen2-style q/k/v biases are).")
  if (layer_types := c.get("layer_types")) and any(lt != "full_attention" for lt in layer_types):
    raise ValueError(f"{source}: layer_types {layer_types} has sliding-window layers, which are not supported.")
  if c.get("use_sliding_window") and model_type == "qwen2":
    n_sliding = c["num_hidden_layers"] - c.get("max_window_layers", 28)
    if n_sliding > 0:
      raise ValueError(f"{source}: use_sliding_window=true (sliding-window layers) is not supported.")
  heads = c["num_attention_heads"]
  base, scaling = _rope_from_hf(c, source)
  return LlamaConfig(
      width=c["hidden_size"], depth=c["num_hidden_layers"], mlp_dim=c["intermediate_size"], num_heads=heads,
      num_kv_heads=c.get("num_key_value_heads") or heads, head_dim=c.get("head_dim") or c["hidden_size"] // heads,
      vocab_size=c["vocab_size"], rope_base=base, rope_scaling=scaling, qkv_bias=model_type == "qwen2",
      tie_embeddings=bool(c.get("tie_word_embeddings", False)), norm_eps=float(c.get("rms_norm_eps", 1e-6)))


def _rope_from_hf(c: dict, source: str):
  """(rope_base, rope_scaling dict or None) from transformers 5's `rope_parameters` or the older
  `rope_theta` + `rope_scaling` fields; a file with both is read as transformers reads it, `rope_scaling` first."""
  rope = dict(c.get("rope_scaling") or c.get("rope_parameters") or {})
  if any(isinstance(v, dict) for v in rope.values()):
    raise ValueError(f"{source}: per-layer-type rope_parameters are not supported.")
  base = float(rope.pop("rope_theta", c.get("rope_theta", 10_000.0)))
  rope_type = rope.pop("rope_type", rope.pop("type", "default"))
  if float(rope.pop("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))) != 1.0:
    raise ValueError(f"{source}: partial_rotary_factor != 1 is not supported.")
  if rope_type == "default":
    return base, None
  if rope_type not in ROPE_SCALING_KEYS:
    raise ValueError(f"{source}: rope type {rope_type!r} is not supported (default, "
                     f"{', '.join(sorted(ROPE_SCALING_KEYS))}).")
  if rope_type == "llama3" and "original_max_position_embeddings" not in rope and "max_position_embeddings" in c:
    rope["original_max_position_embeddings"] = c["max_position_embeddings"]  # as transformers defaults it
  if missing := [k for k in ROPE_SCALING_KEYS[rope_type] if k not in rope]:
    raise ValueError(f"{source}: {rope_type} rope scaling is missing field(s) {', '.join(missing)}.")
  return base, {"rope_type": rope_type, **{k: rope[k] for k in ROPE_SCALING_KEYS[rope_type]}}


def config_to_hf(cfg: LlamaConfig, dtype: str = "float32") -> dict:
  """A config.json dict transformers builds the same model from (Qwen2 when there are q/k/v biases)."""
  rope = {"rope_type": "default", "rope_theta": cfg.rope_base}
  if cfg.rope_scaling is not None:
    s = dict(cfg.rope_scaling)
    if "original_max_position_embeddings" in s:
      s["original_max_position_embeddings"] = int(s["original_max_position_embeddings"])
    rope.update(s)
  model_type = "qwen2" if cfg.qkv_bias else "llama"
  out = {"architectures": ["Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"], "model_type": model_type,
         "hidden_size": cfg.width, "num_hidden_layers": cfg.depth, "intermediate_size": cfg.mlp_dim,
         "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
         "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
         "rope_parameters": rope, "tie_word_embeddings": cfg.tie_embeddings, "dtype": dtype}
  if model_type == "llama":
    out.update(attention_bias=False, mlp_bias=False)
  return out


# ---------------------------------------------------------------------------------------------- params


def text_name(name: str) -> str | None:
  """`layers.0.self_attn.q_proj.weight`-style name of a text-model tensor, or None for other tensors."""
  for prefix in TEXT_PREFIXES:
    if name.startswith(prefix):
      name = name[len(prefix):]
      break
  if name.startswith(NOT_TEXT) or name.endswith("rotary_emb.inv_freq"):
    return None
  return name


def hf_shapes(cfg: LlamaConfig) -> dict:
  """{prefix-free HF name: shape} of every tensor a text checkpoint for `cfg` holds."""
  n, k, h, d, f = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.width, cfg.mlp_dim
  out = {"embed_tokens.weight": (cfg.vocab_size, d), "norm.weight": (d,)}
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = (cfg.vocab_size, d)
  for i in range(cfg.depth):
    p = f"layers.{i}."
    out.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                p + "self_attn.q_proj.weight": (n * h, d), p + "self_attn.k_proj.weight": (k * h, d),
                p + "self_attn.v_proj.weight": (k * h, d), p + "self_attn.o_proj.weight": (d, n * h),
                p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                p + "mlp.down_proj.weight": (d, f)})
    if cfg.qkv_bias:
      out.update({p + "self_attn.q_proj.bias": (n * h,), p + "self_attn.k_proj.bias": (k * h,),
                  p + "self_attn.v_proj.bias": (k * h,)})
  return out


def _stack(fn, n):
  return np.stack([fn(i) for i in range(n)])


def params_from_hf(tensors: dict, cfg: LlamaConfig, source: str = "HF checkpoint") -> dict:
  """Flat `Llama` params from HF text-model tensors (numpy, any float dtype, kept as is).

  Raises ValueError naming every missing, unexpected or mis-shaped tensor (prefix-free names).
  """
  sd = {}
  for name, a in tensors.items():
    if (short := text_name(name)) is not None:
      sd[short] = a
  if cfg.tie_embeddings and "lm_head.weight" in sd:
    lm_head = sd.pop("lm_head.weight")
    if not np.array_equal(lm_head, sd.get("embed_tokens.weight")):
      raise ValueError(f"{source}: lm_head.weight differs from embed_tokens.weight, but the config ties them.")
  expected = {name: jax.ShapeDtypeStruct(shape, np.float32) for name, shape in hf_shapes(cfg).items()}
  treeutil.check_shapes(expected, sd, source)

  n, k, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.width
  tl = lambda i, name: sd[f"layers.{i}.{name}"]
  heads = lambda w, m: w.reshape(m, h, d).transpose(0, 2, 1)  # [m*h, d] -> [m, d, h]
  out = {"embedder/input_embedding": sd["embed_tokens.weight"], "final_norm/scale": sd["norm.weight"]}
  if not cfg.tie_embeddings:
    out["lm_head/w"] = sd["lm_head.weight"].T
  lay = "layers/"
  for ours, m in (("q_proj", n), ("k_proj", k), ("v_proj", k)):
    out[f"{lay}attn/{ours}/w"] = _stack(lambda i: heads(tl(i, f"self_attn.{ours}.weight"), m), cfg.depth)
    if cfg.qkv_bias:
      out[f"{lay}attn/{ours}/b"] = _stack(lambda i: tl(i, f"self_attn.{ours}.bias").reshape(m, h), cfg.depth)
  out[lay + "attn/o_proj/w"] = _stack(lambda i: tl(i, "self_attn.o_proj.weight").T.reshape(n, h, d), cfg.depth)
  for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
    out[f"{lay}mlp/{ours}/w"] = _stack(lambda i: tl(i, f"mlp.{theirs}.weight").T, cfg.depth)
  for ours, theirs in (("pre_attention_norm", "input_layernorm"), ("pre_ffw_norm", "post_attention_layernorm")):
    out[f"{lay}{ours}/scale"] = _stack(lambda i: tl(i, f"{theirs}.weight"), cfg.depth)
  return out


def params_to_hf(params: dict, cfg: LlamaConfig) -> dict:
  """Inverse of `params_from_hf` (flat or nested params): HF causal-LM state-dict names -> numpy arrays."""
  flat = treeutil.flatten(params)
  n, h, d = cfg.num_heads, cfg.head_dim, cfg.width
  out = {"model.embed_tokens.weight": flat["embedder/input_embedding"], "model.norm.weight": flat["final_norm/scale"]}
  unheads = lambda w: w.transpose(0, 2, 1).reshape(-1, d)  # [m, d, h] -> [m*h, d]
  lay = "layers/"
  for i in range(cfg.depth):
    p = f"model.layers.{i}."
    for ours in ("q_proj", "k_proj", "v_proj"):
      out[f"{p}self_attn.{ours}.weight"] = unheads(flat[f"{lay}attn/{ours}/w"][i])
      if cfg.qkv_bias:
        out[f"{p}self_attn.{ours}.bias"] = flat[f"{lay}attn/{ours}/b"][i].reshape(-1)
    out[p + "self_attn.o_proj.weight"] = flat[lay + "attn/o_proj/w"][i].reshape(n * h, d).T
    for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
      out[f"{p}mlp.{theirs}.weight"] = flat[f"{lay}mlp/{ours}/w"][i].T
    for ours, theirs in (("pre_attention_norm", "input_layernorm"), ("pre_ffw_norm", "post_attention_layernorm")):
      out[f"{p}{theirs}.weight"] = flat[f"{lay}{ours}/scale"][i]
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = flat["lm_head/w"].T
  return out


# ---------------------------------------------------------------------------------------------- files


def read_config(path: str) -> LlamaConfig:
  """The text config of a HF directory: a Llama / Qwen2 causal LM, or a LLaVA model's `text_config`."""
  file = os.path.join(path, "config.json")
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{path} has no config.json: not a HuggingFace model directory.")
  c = fileutil.read_json(file)
  if isinstance(c.get("text_config"), dict):
    return config_from_hf(c["text_config"], source=f"{file} (text_config)")
  return config_from_hf(c, source=file)


def load_text_model(path: str) -> tuple[LlamaConfig, dict]:
  """(config, nested params) from a HF directory (config.json + single or sharded safetensors).

  Params are float32 (the compute dtype is `config.dtype`). Use them as
  `Llama(config).apply({"params": params}, ...)`.
  """
  cfg = read_config(path)
  flat = params_from_hf(hf_files.read_tensors(path), cfg, source=f"HF checkpoint {path}")
  return cfg, treeutil.unflatten({k: np.asarray(v, np.float32) for k, v in flat.items()})
