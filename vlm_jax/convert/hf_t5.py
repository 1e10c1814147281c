"""HuggingFace `T5ForConditionalGeneration` (T5 v1.0 / v1.1, UL2, mT5) directories <-> vlm_jax T5 params:
`load` reads one (a SigLIP + UL2 VLM's language model, `model.llm.init`); `config_to_hf` / `params_to_hf` write
the text model back (no transformers class holds the whole VLM).

The param names and the HF tensor each comes from are listed in `vlm_jax/models/t5.py`. Params here are flat
{"encoder/layers/attn/q_einsum/w": array} dicts relative to the `T5` module (a VLM nests them under its own
prefix). Layers are stacked on axis 0; torch Linear weights ([out, in]) are transposed and split into heads.
Every rule is an exact reshape / transpose, so a round trip is bit-identical.

Tied heads: transformers 5 always ties `lm_head` to `shared` in a fresh model and records the T5 v1.0 output
scaling as `scale_decoder_outputs`; a checkpoint whose file has an `lm_head.weight` different from
`shared.weight` (T5 v1.1 / UL2) keeps its own head. `load` follows the file.
"""
import dataclasses
import os

import numpy as np

from vlm_jax import fileutil, treeutil
from vlm_jax.convert.hf_files import has_own_head, read_tensors
from vlm_jax.models.t5 import T5Config

REQUIRED = ("d_model", "d_kv", "d_ff", "num_layers", "num_heads", "vocab_size")
# transformers' ACT2FN names -> ours.
ACT_NAMES = {"gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new", "gelu_fast": "gelu_new", "gelu": "gelu",
             "silu": "silu", "swish": "silu", "relu": "relu"}
# Copies of `shared.weight` some checkpoints carry, and a tensor transformers ignores on load.
TIED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
IGNORED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)


# ---------------------------------------------------------------------------------------------- config


def config_from_hf(hf: dict, source: str = "config.json") -> T5Config:
  """Our T5Config from a T5ForConditionalGeneration / UL2 config.json dict (HF defaults where HF has them)."""
  model_type = hf.get("model_type", "t5")
  if model_type not in ("t5", "mt5"):
    raise ValueError(f"{source}: model_type {model_type!r} is not supported (t5, mt5; umt5 has per-layer "
                     "position biases).")
  if missing := [k for k in REQUIRED if k not in hf]:
    raise ValueError(f"{source}: missing field(s) {', '.join(missing)}.")
  proj = hf.get("feed_forward_proj", "relu")
  parts = proj.split("-")
  if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
    raise ValueError(f"{source}: feed_forward_proj {proj!r} is neither 'ACT' nor 'gated-ACT'.")
  act = "gelu_new" if proj == "gated-gelu" else parts[-1]  # transformers' special case for T5 v1.1
  if act not in ACT_NAMES:
    raise ValueError(f"{source}: feed_forward_proj {proj!r}: activation {act!r} is not supported "
                     f"({', '.join(sorted(ACT_NAMES))}).")
  tie = hf.get("tie_word_embeddings", True) is not False
  return T5Config(
      width=hf["d_model"], num_heads=hf["num_heads"], head_dim=hf["d_kv"], mlp_dim=hf["d_ff"],
      encoder_depth=hf["num_layers"], decoder_depth=hf.get("num_decoder_layers") or hf["num_layers"],
      vocab_size=hf["vocab_size"], activation=ACT_NAMES[act], gated=len(parts) == 2,
      relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
      relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
      tie_embeddings=tie, scale_decoder_output=hf.get("scale_decoder_outputs", tie),
      norm_eps=hf.get("layer_norm_epsilon", 1e-6),
      decoder_start_id=hf.get("decoder_start_token_id", hf.get("pad_token_id", 0)) or 0)


def config_to_hf(cfg: T5Config, dtype: str = "float32") -> dict:
  if cfg.gated and cfg.activation == "gelu":
    raise ValueError("transformers reads feed_forward_proj 'gated-gelu' as tanh-GELU: a gated erf-GELU T5 has no "
                     "HF config.")
  act = "gelu" if cfg.gated and cfg.activation == "gelu_new" else cfg.activation
  return {"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "d_model": cfg.width,
          "d_kv": cfg.head_dim, "d_ff": cfg.mlp_dim, "num_layers": cfg.encoder_depth,
          "num_decoder_layers": cfg.decoder_depth, "num_heads": cfg.num_heads, "vocab_size": cfg.vocab_size,
          "feed_forward_proj": ("gated-" if cfg.gated else "") + act,
          "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
          "relative_attention_max_distance": cfg.relative_attention_max_distance,
          "layer_norm_epsilon": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
          "scale_decoder_outputs": cfg.scales_output, "decoder_start_token_id": cfg.decoder_start_id,
          "pad_token_id": 0, "eos_token_id": 1, "is_encoder_decoder": True, "dropout_rate": 0.0, "dtype": dtype}


# ---------------------------------------------------------------------------------------------- params


def _ffn_names(cfg: T5Config):
  return ("wi_0", "wi_1", "wo") if cfg.gated else ("wi", "wo")


def hf_shapes(cfg: T5Config) -> dict:
  """The HF tensors (name -> shape) a model of this config has, `lm_head.weight` only when untied."""
  d, f, inner, v = cfg.width, cfg.mlp_dim, cfg.num_heads * cfg.head_dim, cfg.vocab_size
  linear = {"q": (inner, d), "k": (inner, d), "v": (inner, d), "o": (d, inner)}
  ffn = {name: (d, f) if name == "wo" else (f, d) for name in _ffn_names(cfg)}
  out = {"shared.weight": (v, d), "encoder.final_layer_norm.weight": (d,), "decoder.final_layer_norm.weight": (d,)}
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = (v, d)
  for stack, depth in (("encoder", cfg.encoder_depth), ("decoder", cfg.decoder_depth)):
    out[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = (
        cfg.relative_attention_num_buckets, cfg.num_heads)
    for i in range(depth):
      p = f"{stack}.block.{i}.layer."
      attns = [("0", "SelfAttention")] + ([("1", "EncDecAttention")] if stack == "decoder" else [])
      for idx, attn in attns:
        out[f"{p}{idx}.layer_norm.weight"] = (d,)
        out.update({f"{p}{idx}.{attn}.{name}.weight": shape for name, shape in linear.items()})
      ff = len(attns)
      out[f"{p}{ff}.layer_norm.weight"] = (d,)
      out.update({f"{p}{ff}.DenseReluDense.{name}.weight": shape for name, shape in ffn.items()})
  return out


def _check_tensors(tensors: dict, cfg: T5Config, source: str) -> dict:
  """The tensors the model uses, after dropping tied copies (which must equal `shared.weight`)."""
  tensors = {k: v for k, v in tensors.items() if k not in IGNORED}
  copies = TIED_COPIES + (("lm_head.weight",) if cfg.tie_embeddings else ())
  for name in copies:
    if name in tensors and "shared.weight" in tensors:
      if not np.array_equal(tensors[name], tensors["shared.weight"]):
        raise ValueError(f"{source}: {name} differs from shared.weight, but this config ties them"
                         + (" (load with tie_embeddings=False)." if name == "lm_head.weight" else "."))
      tensors = {k: v for k, v in tensors.items() if k != name}
  expected = {k: np.broadcast_to(np.float32(0), shape) for k, shape in hf_shapes(cfg).items()}  # no memory
  treeutil.check_shapes(expected, tensors, source)
  return tensors


def params_from_hf(tensors: dict, cfg: T5Config, source: str = "HF T5 tensors") -> dict:
  """Flat T5 params from HF-named tensors (numpy, any float dtype). Missing, unexpected or mis-shaped tensors
  raise a ValueError naming each key."""
  sd = _check_tensors(tensors, cfg, source)
  n, h, d = cfg.num_heads, cfg.head_dim, cfg.width
  heads_in = lambda w: w.reshape(n, h, d).transpose(0, 2, 1)  # q/k/v [N*H, D] -> [N, D, H]
  heads_out = lambda w: w.T.reshape(n, h, d)  # o [D, N*H] -> [N, H, D]
  out = {"embedder/input_embedding": sd["shared.weight"]}
  if not cfg.tie_embeddings:
    out["lm_head"] = sd["lm_head.weight"]
  for stack, depth in (("encoder", cfg.encoder_depth), ("decoder", cfg.decoder_depth)):
    get = lambda i, name: sd[f"{stack}.block.{i}.layer.{name}"]
    stacked = lambda fn: np.stack([fn(i) for i in range(depth)])
    ours = f"{stack}/layers/"
    out[f"{stack}/relpos_bias"] = sd[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    out[f"{stack}/final_norm/scale"] = sd[f"{stack}.final_layer_norm.weight"]
    out[ours + "pre_attention_norm/scale"] = stacked(lambda i: get(i, "0.layer_norm.weight"))
    out[ours + "attn/q_einsum/w"] = stacked(lambda i: heads_in(get(i, "0.SelfAttention.q.weight")))
    out[ours + "attn/kv_einsum/w"] = stacked(lambda i: np.stack([heads_in(get(i, "0.SelfAttention.k.weight")),
                                                                 heads_in(get(i, "0.SelfAttention.v.weight"))]))
    out[ours + "attn/attn_vec_einsum/w"] = stacked(lambda i: heads_out(get(i, "0.SelfAttention.o.weight")))
    ff = "1"
    if stack == "decoder":
      ff = "2"
      out[ours + "pre_cross_attention_norm/scale"] = stacked(lambda i: get(i, "1.layer_norm.weight"))
      out[ours + "cross_attn/q_einsum/w"] = stacked(lambda i: heads_in(get(i, "1.EncDecAttention.q.weight")))
      out[ours + "cross_attn/attn_vec_einsum/w"] = stacked(lambda i: heads_out(get(i, "1.EncDecAttention.o.weight")))
      out["decoder/cross_kv_einsum/w"] = stacked(lambda i: np.stack([heads_in(get(i, "1.EncDecAttention.k.weight")),
                                                                     heads_in(get(i, "1.EncDecAttention.v.weight"))]))
    out[ours + "pre_ffw_norm/scale"] = stacked(lambda i: get(i, f"{ff}.layer_norm.weight"))
    if cfg.gated:
      out[ours + "mlp/gating_einsum"] = stacked(lambda i: np.stack([get(i, f"{ff}.DenseReluDense.wi_0.weight").T,
                                                                    get(i, f"{ff}.DenseReluDense.wi_1.weight").T]))
    else:
      out[ours + "mlp/wi"] = stacked(lambda i: get(i, f"{ff}.DenseReluDense.wi.weight").T)
    out[ours + "mlp/linear"] = stacked(lambda i: get(i, f"{ff}.DenseReluDense.wo.weight").T)
  return out


def params_to_hf(flat: dict, cfg: T5Config) -> dict:
  """Inverse of `params_from_hf`: HF tensor names -> numpy arrays (no `lm_head.weight` when tied)."""
  n, h, d = cfg.num_heads, cfg.head_dim, cfg.width
  unheads_in = lambda w: w.transpose(0, 2, 1).reshape(n * h, d)  # [N, D, H] -> [N*H, D]
  unheads_out = lambda w: w.reshape(n * h, d).T  # [N, H, D] -> [D, N*H]
  out = {"shared.weight": flat["embedder/input_embedding"]}
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = flat["lm_head"]
  for stack, depth in (("encoder", cfg.encoder_depth), ("decoder", cfg.decoder_depth)):
    ours = f"{stack}/layers/"
    out[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = flat[f"{stack}/relpos_bias"]
    out[f"{stack}.final_layer_norm.weight"] = flat[f"{stack}/final_norm/scale"]
    for i in range(depth):
      p = f"{stack}.block.{i}.layer."
      out[p + "0.layer_norm.weight"] = flat[ours + "pre_attention_norm/scale"][i]
      out[p + "0.SelfAttention.q.weight"] = unheads_in(flat[ours + "attn/q_einsum/w"][i])
      out[p + "0.SelfAttention.k.weight"] = unheads_in(flat[ours + "attn/kv_einsum/w"][i, 0])
      out[p + "0.SelfAttention.v.weight"] = unheads_in(flat[ours + "attn/kv_einsum/w"][i, 1])
      out[p + "0.SelfAttention.o.weight"] = unheads_out(flat[ours + "attn/attn_vec_einsum/w"][i])
      ff = "1"
      if stack == "decoder":
        ff = "2"
        out[p + "1.layer_norm.weight"] = flat[ours + "pre_cross_attention_norm/scale"][i]
        out[p + "1.EncDecAttention.q.weight"] = unheads_in(flat[ours + "cross_attn/q_einsum/w"][i])
        out[p + "1.EncDecAttention.k.weight"] = unheads_in(flat["decoder/cross_kv_einsum/w"][i, 0])
        out[p + "1.EncDecAttention.v.weight"] = unheads_in(flat["decoder/cross_kv_einsum/w"][i, 1])
        out[p + "1.EncDecAttention.o.weight"] = unheads_out(flat[ours + "cross_attn/attn_vec_einsum/w"][i])
      out[f"{p}{ff}.layer_norm.weight"] = flat[ours + "pre_ffw_norm/scale"][i]
      if cfg.gated:
        out[f"{p}{ff}.DenseReluDense.wi_0.weight"] = flat[ours + "mlp/gating_einsum"][i, 0].T
        out[f"{p}{ff}.DenseReluDense.wi_1.weight"] = flat[ours + "mlp/gating_einsum"][i, 1].T
      else:
        out[f"{p}{ff}.DenseReluDense.wi.weight"] = flat[ours + "mlp/wi"][i].T
      out[f"{p}{ff}.DenseReluDense.wo.weight"] = flat[ours + "mlp/linear"][i].T
  return out


# ---------------------------------------------------------------------------------------------- files


def _read(path: str):
  """(T5Config, tensors) of a HF T5ForConditionalGeneration directory. Whether the head is tied follows the file,
  not its tie flag (`hf_files.has_own_head`: T5 v1.1 / UL2 hold their own). The tensors are memory-mapped: deciding
  that reads the head and the embedding only."""
  file = os.path.join(path, "config.json")
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{path} has no config.json: not a HuggingFace model directory.")
  cfg = config_from_hf(fileutil.read_json(file), source=file)
  tensors = read_tensors(path)
  own_head = has_own_head(tensors, "shared.weight")
  return dataclasses.replace(cfg, tie_embeddings=not own_head, scale_decoder_output=cfg.scales_output), tensors


def read_config(path: str) -> T5Config:
  """The T5Config `load` builds for a HF directory, without converting its params."""
  return _read(path)[0]


def load(path: str):
  """(T5Config, {"params": nested params}) from a HF T5ForConditionalGeneration directory; params are float32."""
  cfg, tensors = _read(path)
  flat = params_from_hf(tensors, cfg, source=f"HF checkpoint {path}")
  params = {k: np.asarray(v, np.float32) for k, v in flat.items()}
  return cfg, {"params": treeutil.unflatten(params)}
