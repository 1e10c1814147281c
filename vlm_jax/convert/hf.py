"""HuggingFace `PaliGemmaForConditionalGeneration` directories <-> vlm_jax config and params.

HF stores one tensor per layer in PyTorch layouts ([out, in] linears, [D,3,p,p] convs); we stack layers on
axis 0 in big_vision's layouts. Every rule below is an exact reshape/transpose, so a round trip is
bit-identical. Tensor names are `hf_files.canonical_name`'s; reading and writing the files is `hf_files`'.
"""
import os

import jax
import numpy as np

from vlm_jax import fileutil, treeutil
from vlm_jax.convert.hf_files import (T, V, convert_checked, has_own_head, read_tensors, write_config_and_tokenizer,
                                      write_weights)
from vlm_jax.models.gemma import GemmaConfig
from vlm_jax.models.vit import ViTConfig
from vlm_jax.models.vlm import GEMMA_SPECIAL_IDS, VLMConfig, special_ids
from vlm_jax.tokenizer import special_from_hf_config

# HF config fields with no safe default: a config.json without them is rejected, naming the field.
REQUIRED_TEXT = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "vocab_size")
REQUIRED_VISION = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size")
GELU_TANH = ("gelu_pytorch_tanh", "gelu_fast", "gelu_new")


# ---------------------------------------------------------------------------------------------- config


def config_from_hf(hf: dict, source: str = "config.json") -> VLMConfig:
  """Our model config from a PaliGemma config.json dict (HF defaults for the fields HF may omit)."""
  if hf.get("model_type", "paligemma") != "paligemma":
    raise ValueError(f"{source}: model_type {hf.get('model_type')!r} is not 'paligemma'.")
  for part, required in (("text_config", REQUIRED_TEXT), ("vision_config", REQUIRED_VISION)):
    if not isinstance(hf.get(part), dict):
      raise ValueError(f"{source}: missing field '{part}'.")
    if missing := [k for k in required if k not in hf[part]]:
      raise ValueError(f"{source}: missing field(s) {', '.join(part + '.' + k for k in missing)}.")
  t, v = hf["text_config"], hf["vision_config"]
  text_type = t.get("model_type", "gemma")
  if text_type not in ("gemma", "gemma2"):
    raise ValueError(f"{source}: text_config.model_type {text_type!r} is not supported (gemma, gemma2).")
  if v.get("vision_use_head", False):
    raise ValueError(f"{source}: vision_config.vision_use_head=true is not a PaliGemma vision tower.")
  gemma2 = text_type == "gemma2"
  check_vision_activation(v, source)
  check_text_activation(t, gemma2, source)
  rope = gemma_rope_base(t, source)
  sliding = None
  if gemma2:
    n_layers = t["num_hidden_layers"]
    layer_types = t.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention"
                                           for i in range(n_layers)]
    alternating = [("sliding_attention" if i % 2 == 0 else "full_attention") for i in range(n_layers)]
    if layer_types == alternating:
      sliding = t.get("sliding_window", 4096)
    elif any(lt != "full_attention" for lt in layer_types):
      raise ValueError(f"{source}: text_config.layer_types {layer_types} is neither alternating nor all global.")
  width = t["hidden_size"]
  if hf.get("projection_dim", width) != width:
    raise ValueError(f"{source}: projection_dim {hf['projection_dim']} != text hidden_size {width}.")
  llm = text_gemma_config(
      source, width=width, depth=t["num_hidden_layers"], mlp_dim=t["intermediate_size"],
      num_heads=t["num_attention_heads"], num_kv_heads=t["num_key_value_heads"],
      head_dim=t.get("head_dim", 256), vocab_size=t["vocab_size"], rope_base=float(rope),
      norm_eps=t.get("rms_norm_eps", 1e-6),
      query_pre_attn_scalar=t.get("query_pre_attn_scalar", 256) if gemma2 else None,
      attn_logits_softcap=t.get("attn_logit_softcapping", 50.0) if gemma2 else None,
      final_logits_softcap=t.get("final_logit_softcapping", 30.0) if gemma2 else None,
      post_norms=gemma2, sliding_window=sliding)
  img = ViTConfig(width=v["hidden_size"], depth=v["num_hidden_layers"], mlp_dim=v["intermediate_size"],
                  num_heads=v["num_attention_heads"], patch_size=v["patch_size"],
                  image_size=v.get("image_size", 224), layernorm_eps=v.get("layer_norm_eps", 1e-6),
                  head_dim_out=width)
  return VLMConfig(img=img, llm=llm, name=hf.get("_name_or_path", ""), **special_ids_from_hf(hf))


def check_vision_activation(v: dict, source: str):
  """SigLIP's MLP activation: our ViT always applies tanh-GELU, so a vision_config naming another (which
  transformers would apply) is refused rather than silently run with the wrong one."""
  if (act := v.get("hidden_act", "gelu_pytorch_tanh")) not in GELU_TANH:
    raise ValueError(f"{source}: vision_config.hidden_act {act!r} is not supported (only tanh-GELU: "
                     f"{', '.join(GELU_TANH)}).")


def check_text_activation(t: dict, gemma2: bool, source: str):
  """The Gemma MLP's activation, from the field transformers 5 reads: Gemma 2's `hidden_activation`, Gemma 1's
  `hidden_act`, whose legacy value "gelu" (the official Gemma 1 configs) GemmaConfig maps to tanh-GELU."""
  field = "hidden_activation" if gemma2 else "hidden_act"
  act = t.get(field, "gelu_pytorch_tanh")
  if act not in GELU_TANH and not (act == "gelu" and not gemma2):
    raise ValueError(f"{source}: text_config.{field} {act!r} is not supported (only tanh-GELU: "
                     f"{', '.join(GELU_TANH)}).")


# What an unscaled RoPE dict of a Gemma text config may hold ("type" is rope_type's older name).
PLAIN_ROPE_KEYS = ("rope_type", "type", "rope_theta")


def gemma_rope_base(t: dict, source: str) -> float:
  """The RoPE base of a Gemma text config. Our Gemma has no RoPE scaling, which transformers would apply, so a
  rope type other than "default" or any other RoPE key is refused rather than dropped. transformers reads the
  legacy `rope_scaling` before `rope_parameters`, and `rope_theta` outside them where they lack it."""
  field = "rope_scaling" if t.get("rope_scaling") else "rope_parameters"
  rope = t.get(field) or {}
  if rope.get("rope_type", rope.get("type", "default")) != "default" or set(rope) - set(PLAIN_ROPE_KEYS):
    raise ValueError(f"{source}: text_config.{field} {rope} is not supported (Gemma models here have plain RoPE: "
                     f"rope_type 'default' and no keys but {', '.join(PLAIN_ROPE_KEYS)}).")
  return float(rope.get("rope_theta", t.get("rope_theta", 10000.0)))


def text_gemma_config(source: str, **fields) -> GemmaConfig:
  """`GemmaConfig(**fields)`, its refusal of the attention's shape naming the file and the HF fields."""
  try:
    return GemmaConfig(**fields)
  except ValueError as e:
    raise ValueError(f"{source}: text_config (num_attention_heads, num_key_value_heads, head_dim): {e}") from None


def config_to_hf(cfg: VLMConfig, dtype: str = "float32") -> dict:
  if cfg.causal or not cfg.img.final_norm:
    # transformers' PaliGemma always masks image + prefix bidirectionally (token_type_ids) and applies the vision
    # tower's post_layernorm: no config field turns either off, so such a model would export with other logits.
    raise ValueError("a PaliGemma export needs the prefix-LM mask (causal=False) and ViT features after the final "
                     "norm (img.final_norm=True): transformers' PaliGemma has no setting for either alternative.")
  img, llm = cfg.img, cfg.llm
  gemma2 = llm.post_norms
  text = {
      "model_type": "gemma2" if gemma2 else "gemma", "hidden_size": llm.width, "intermediate_size": llm.mlp_dim,
      "num_hidden_layers": llm.depth, "num_attention_heads": llm.num_heads,
      "num_key_value_heads": llm.num_kv_heads, "head_dim": llm.head_dim, "vocab_size": llm.vocab_size,
      "rms_norm_eps": llm.norm_eps, "rope_parameters": {"rope_theta": llm.rope_base, "rope_type": "default"},
      "hidden_activation" if gemma2 else "hidden_act": "gelu_pytorch_tanh", "num_image_tokens": img.num_patches,
      "tie_word_embeddings": True,
      "max_position_embeddings": 8192, "attention_bias": False,
  }
  if gemma2:
    scalar = llm.query_pre_attn_scalar or llm.head_dim
    if float(scalar) != int(scalar):
      raise ValueError(f"query_pre_attn_scalar={scalar} is not an integer, which HF Gemma 2 configs require.")
    text.update(query_pre_attn_scalar=int(scalar),
                attn_logit_softcapping=llm.attn_logits_softcap, final_logit_softcapping=llm.final_logits_softcap,
                sliding_window=llm.sliding_window or 4096,
                layer_types=[("sliding_attention" if llm.sliding_window and i % 2 == 0 else "full_attention")
                             for i in range(llm.depth)])
  elif llm.attn_logits_softcap or llm.final_logits_softcap or llm.sliding_window or llm.query_pre_attn_scalar:
    raise ValueError("Gemma 2 features (soft-caps, sliding window, query_pre_attn_scalar) need post_norms=True "
                     "to be expressed as a HF gemma2 text config.")
  vision = {"model_type": "siglip_vision_model", "hidden_size": img.width, "intermediate_size": img.mlp_dim,
            "num_hidden_layers": img.depth, "num_attention_heads": img.num_heads, "patch_size": img.patch_size,
            "image_size": img.image_size, "layer_norm_eps": img.layernorm_eps, "hidden_act": "gelu_pytorch_tanh",
            "num_image_tokens": img.num_patches, "projection_dim": llm.width, "vision_use_head": False}
  return {"architectures": ["PaliGemmaForConditionalGeneration"], "model_type": "paligemma",
          "text_config": text, "vision_config": vision, "projection_dim": llm.width, "hidden_size": llm.width,
          "image_token_index": llm.vocab_size, "vocab_size": llm.vocab_size, "tie_word_embeddings": True,
          "dtype": dtype}


# ---------------------------------------------------------------------------------------------- params


def _stack(fn, n):
  return np.stack([fn(i) for i in range(n)])


def vision_params_from_hf(sd: dict, img: ViTConfig) -> dict:
  """Flat {"img/...": array} SigLIP vision-tower params (no projector) from canonical-named HF tensors."""
  nv, dv = img.num_heads, img.width
  get = sd.__getitem__
  vl = lambda i, name: get(f"{V}encoder.layers.{i}.{name}")
  enc = "img/Transformer/encoderblock/"
  out = {
      "img/embedding/kernel": get(V + "embeddings.patch_embedding.weight").transpose(2, 3, 1, 0),
      "img/embedding/bias": get(V + "embeddings.patch_embedding.bias"),
      "img/pos_embedding": get(V + "embeddings.position_embedding.weight")[None],
      "img/Transformer/encoder_norm/scale": get(V + "post_layernorm.weight"),
      "img/Transformer/encoder_norm/bias": get(V + "post_layernorm.bias"),
  }
  for ours, theirs in (("LayerNorm_0", "layer_norm1"), ("LayerNorm_1", "layer_norm2")):
    out[f"{enc}{ours}/scale"] = _stack(lambda i: vl(i, f"{theirs}.weight"), img.depth)
    out[f"{enc}{ours}/bias"] = _stack(lambda i: vl(i, f"{theirs}.bias"), img.depth)
  mha = enc + "MultiHeadDotProductAttention_0/"
  for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
    out[f"{mha}{ours}/kernel"] = _stack(lambda i: vl(i, f"self_attn.{theirs}.weight").T.reshape(dv, nv, -1),
                                        img.depth)
    out[f"{mha}{ours}/bias"] = _stack(lambda i: vl(i, f"self_attn.{theirs}.bias").reshape(nv, -1), img.depth)
  out[mha + "out/kernel"] = _stack(lambda i: vl(i, "self_attn.out_proj.weight").T.reshape(nv, -1, dv), img.depth)
  out[mha + "out/bias"] = _stack(lambda i: vl(i, "self_attn.out_proj.bias"), img.depth)
  for ours, theirs in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
    out[f"{enc}MlpBlock_0/{ours}/kernel"] = _stack(lambda i: vl(i, f"mlp.{theirs}.weight").T, img.depth)
    out[f"{enc}MlpBlock_0/{ours}/bias"] = _stack(lambda i: vl(i, f"mlp.{theirs}.bias"), img.depth)
  return out


def params_from_hf(sd: dict, cfg: VLMConfig) -> dict:
  """Flat {"img/...", "llm/...": array} params from canonical-named HF tensors (numpy, any float dtype)."""
  llm = cfg.llm
  n, k, h, d = llm.num_heads, llm.num_kv_heads, llm.head_dim, llm.width
  get = sd.__getitem__
  tl = lambda i, name: get(f"{T}layers.{i}.{name}")
  out = {
      **vision_params_from_hf(sd, cfg.img),
      "img/head/kernel": get("multi_modal_projector.linear.weight").T,
      "img/head/bias": get("multi_modal_projector.linear.bias"),
      "llm/embedder/input_embedding": get(T + "embed_tokens.weight"),
      "llm/final_norm/scale": get(T + "norm.weight"),
  }

  heads = lambda w, m: w.reshape(m, h, d).transpose(0, 2, 1)  # [m*h, d] -> [m, d, h]
  lay = "llm/layers/"
  q = _stack(lambda i: heads(tl(i, "self_attn.q_proj.weight"), n), llm.depth)
  kv = _stack(lambda i: np.stack([heads(tl(i, "self_attn.k_proj.weight"), k),
                                  heads(tl(i, "self_attn.v_proj.weight"), k)]), llm.depth)
  if n == k:
    out[lay + "attn/qkv_einsum/w"] = np.concatenate([q[:, None], kv], axis=1)
  else:
    out[lay + "attn/q_einsum/w"], out[lay + "attn/kv_einsum/w"] = q, kv
  out[lay + "attn/attn_vec_einsum/w"] = _stack(lambda i: tl(i, "self_attn.o_proj.weight").T.reshape(n, h, d),
                                               llm.depth)
  out[lay + "mlp/gating_einsum"] = _stack(lambda i: np.stack([tl(i, "mlp.gate_proj.weight").T,
                                                              tl(i, "mlp.up_proj.weight").T]), llm.depth)
  out[lay + "mlp/linear"] = _stack(lambda i: tl(i, "mlp.down_proj.weight").T, llm.depth)
  for ours, theirs in _norm_names(llm):
    out[f"{lay}{ours}/scale"] = _stack(lambda i: tl(i, f"{theirs}.weight"), llm.depth)
  return out


def _norm_names(llm: GemmaConfig):
  """(ours, HF) per-layer norm names; HF's Gemma 1 `post_attention_layernorm` is the pre-FFW norm."""
  if llm.post_norms:
    return (("pre_attention_norm", "input_layernorm"), ("post_attention_norm", "post_attention_layernorm"),
            ("pre_ffw_norm", "pre_feedforward_layernorm"), ("post_ffw_norm", "post_feedforward_layernorm"))
  return (("pre_attention_norm", "input_layernorm"), ("pre_ffw_norm", "post_attention_layernorm"))


def vision_params_to_hf(flat: dict, img: ViTConfig) -> dict:
  """Inverse of `vision_params_from_hf`: canonical HF names (no `model.` prefix) -> numpy arrays."""
  dv = img.width
  out = {
      V + "embeddings.patch_embedding.weight": flat["img/embedding/kernel"].transpose(3, 2, 0, 1),
      V + "embeddings.patch_embedding.bias": flat["img/embedding/bias"],
      V + "embeddings.position_embedding.weight": flat["img/pos_embedding"][0],
      V + "post_layernorm.weight": flat["img/Transformer/encoder_norm/scale"],
      V + "post_layernorm.bias": flat["img/Transformer/encoder_norm/bias"],
  }
  enc = "img/Transformer/encoderblock/"
  mha = enc + "MultiHeadDotProductAttention_0/"
  for i in range(img.depth):
    p = f"{V}encoder.layers.{i}."
    for ours, theirs in (("LayerNorm_0", "layer_norm1"), ("LayerNorm_1", "layer_norm2")):
      out[p + theirs + ".weight"] = flat[f"{enc}{ours}/scale"][i]
      out[p + theirs + ".bias"] = flat[f"{enc}{ours}/bias"][i]
    for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
      out[f"{p}self_attn.{theirs}.weight"] = flat[f"{mha}{ours}/kernel"][i].reshape(dv, dv).T
      out[f"{p}self_attn.{theirs}.bias"] = flat[f"{mha}{ours}/bias"][i].reshape(dv)
    out[p + "self_attn.out_proj.weight"] = flat[mha + "out/kernel"][i].reshape(dv, dv).T
    out[p + "self_attn.out_proj.bias"] = flat[mha + "out/bias"][i]
    for ours, theirs in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
      out[f"{p}mlp.{theirs}.weight"] = flat[f"{enc}MlpBlock_0/{ours}/kernel"][i].T
      out[f"{p}mlp.{theirs}.bias"] = flat[f"{enc}MlpBlock_0/{ours}/bias"][i]
  return out


def params_to_hf(flat: dict, cfg: VLMConfig) -> dict:
  """Inverse of `params_from_hf`: HF state-dict names (`model.` prefix) -> numpy arrays."""
  llm = cfg.llm
  n, k, h, d = llm.num_heads, llm.num_kv_heads, llm.head_dim, llm.width
  out = {
      **vision_params_to_hf(flat, cfg.img),
      "multi_modal_projector.linear.weight": flat["img/head/kernel"].T,
      "multi_modal_projector.linear.bias": flat["img/head/bias"],
      T + "embed_tokens.weight": flat["llm/embedder/input_embedding"],
      T + "norm.weight": flat["llm/final_norm/scale"],
  }
  lay = "llm/layers/"
  if n == k:
    qkv = flat[lay + "attn/qkv_einsum/w"]
    q, kv = qkv[:, 0], qkv[:, 1:]
  else:
    q, kv = flat[lay + "attn/q_einsum/w"], flat[lay + "attn/kv_einsum/w"]
  unheads = lambda w: w.transpose(0, 2, 1).reshape(-1, d)  # [m, d, h] -> [m*h, d]
  for i in range(llm.depth):
    p = f"{T}layers.{i}."
    out[p + "self_attn.q_proj.weight"] = unheads(q[i])
    out[p + "self_attn.k_proj.weight"] = unheads(kv[i, 0])
    out[p + "self_attn.v_proj.weight"] = unheads(kv[i, 1])
    out[p + "self_attn.o_proj.weight"] = flat[lay + "attn/attn_vec_einsum/w"][i].reshape(n * h, d).T
    out[p + "mlp.gate_proj.weight"] = flat[lay + "mlp/gating_einsum"][i, 0].T
    out[p + "mlp.up_proj.weight"] = flat[lay + "mlp/gating_einsum"][i, 1].T
    out[p + "mlp.down_proj.weight"] = flat[lay + "mlp/linear"][i].T
    for ours, theirs in _norm_names(llm):
      out[f"{p}{theirs}.weight"] = flat[f"{lay}{ours}/scale"][i]
  return {"model." + name: a for name, a in out.items()}


# ---------------------------------------------------------------------------------------------- files


def read_config(path: str) -> VLMConfig:
  file = os.path.join(path, "config.json")
  if not os.path.isfile(file):
    raise FileNotFoundError(f"{path} has no config.json: not a HuggingFace model directory.")
  return config_from_hf(fileutil.read_json(file), source=file)


def load(path: str, config: VLMConfig | None = None):
  """(config, params, tokenizer-or-None) from a HF PaliGemma directory; shapes checked key by key."""
  config = config or read_config(path)
  sd = read_tensors(path)
  if has_own_head(sd, T + "embed_tokens.weight"):
    raise ValueError(f"{path}: lm_head.weight differs from the input embedding; only tied heads are supported.")
  sd.pop("lm_head.weight", None)
  return convert_checked(path, config, sd, params_to_hf, params_from_hf)


def save(out_dir: str, config: VLMConfig, params, tokenizer=None, dtype: str | None = None,
         max_shard_bytes: int = 4 << 30):
  """Writes config.json, (sharded) model.safetensors and tokenizer files into a new `out_dir`.

  Everything goes into a temporary sibling first and is renamed at the end: no half-written export.
  """
  dtype = dtype or config.llm.dtype
  hf_config = config_to_hf(config, dtype)  # before any writing: a config HF cannot express fails early
  with fileutil.atomic_dir(out_dir) as tmp:
    _write_hf_files(tmp, hf_config, config, params, tokenizer, dtype, max_shard_bytes)


def _write_hf_files(out_dir, hf_config, config, params, tokenizer, dtype, max_shard_bytes):
  flat = {k: np.asarray(jax.device_get(v)) for k, v in treeutil.flatten(params["params"]).items()}
  write_weights(out_dir, params_to_hf(flat, config), dtype, max_shard_bytes)
  if tokenizer is not None and tokenizer.vocab_size <= config.llm.vocab_size:
    # transformers' PaliGemmaProcessor appends its <image> token to the tokenizer: mark image positions with that
    # id (as HF's own PaliGemma checkpoints do), and write the processor files that make it.
    hf_config["image_token_index"] = tokenizer.vocab_size
  write_config_and_tokenizer(out_dir, hf_config, tokenizer, special_ids(config, tokenizer) or GEMMA_SPECIAL_IDS,
                             processor="PaliGemmaProcessor" if tokenizer is not None else None)


def special_ids_from_hf(hf_config: dict) -> dict:
  """{"bos_id", "eos_id", "pad_id"}: VLMConfig's fields for the ids a HF config names."""
  return {f"{k}_id": v for k, v in special_from_hf_config(hf_config).items()}


