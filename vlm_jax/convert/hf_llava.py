"""HuggingFace `LlavaForConditionalGeneration` directories (SigLIP vision tower, 2-layer GELU MLP projector,
Llama / Qwen2 text model) <-> vlm_jax params of a `DecoderVLM` with an `mlp` adapter and causal attention.

LLaVA feeds the projector the vision tower's last hidden state before its post-layernorm
(`vision_feature_layer=-1`, strategy `full`: SigLIP has no CLS token) and attends causally over image and text;
the matching vlm_jax config has `img.final_norm=False`, `adapter.kind="mlp"` and `causal=True`. Image tokens
come first in our sequence: the same model in transformers takes input_ids [<image> x P][BOS prompt ...].
"""
import dataclasses
import os

import jax
import numpy as np

from vlm_jax import fileutil, treeutil
from vlm_jax.convert import hf, hf_files, hf_llama
from vlm_jax.models.adapters import AdapterConfig
from vlm_jax.models.llama import LlamaConfig
from vlm_jax.models.vit import ViTConfig
from vlm_jax.models.vlm import VLMConfig, check_image_token_id, special_ids

PROJ = "multi_modal_projector."
# LlavaConfig fields vlm_jax's LLaVA glue supports one value of: {field: (transformers' default, that value)}. A
# config.json that leaves a field out means transformers' default, not the value supported here.
FIXED_FIELDS = {"vision_feature_layer": (-2, -1), "vision_feature_select_strategy": ("default", "full"),
                "projector_hidden_act": ("gelu", "gelu"), "multimodal_projector_bias": (True, True)}


def is_llava(cfg: VLMConfig) -> bool:
  return isinstance(cfg.llm, LlamaConfig) and cfg.adapter.kind == "mlp"


def config_from_hf(c: dict, source: str = "config.json") -> VLMConfig:
  if c.get("model_type") != "llava":
    raise ValueError(f"{source}: model_type {c.get('model_type')!r} is not 'llava'.")
  v = c.get("vision_config")
  if not isinstance(v, dict) or v.get("model_type", "siglip_vision_model") != "siglip_vision_model":
    raise ValueError(f"{source}: vision_config must be a SigLIP vision model (siglip_vision_model).")
  if missing := [k for k in hf.REQUIRED_VISION if k not in v]:
    raise ValueError(f"{source}: missing field(s) {', '.join('vision_config.' + k for k in missing)}.")
  hf.check_vision_activation(v, source)
  for key, (default, want) in FIXED_FIELDS.items():
    if (value := c.get(key, default)) != want:
      raise ValueError(f"{source}: {key}={value!r}{'' if key in c else ' (the default)'} is not supported "
                       f"(only {want!r}).")
  if not isinstance(c.get("text_config"), dict):
    raise ValueError(f"{source}: missing field 'text_config'.")
  llm = hf_llama.config_from_hf(c["text_config"], source=f"{source} (text_config)")
  # LlavaConfig ties the head when either flag says so (a true text_config flag overrides a false top-level
  # one), and the model's tying follows the top-level flag.
  llm = dataclasses.replace(llm, tie_embeddings=llm.tie_embeddings or bool(c.get("tie_word_embeddings", False)))
  img = ViTConfig(width=v["hidden_size"], depth=v["num_hidden_layers"], mlp_dim=v["intermediate_size"],
                  num_heads=v["num_attention_heads"], patch_size=v["patch_size"], image_size=v.get("image_size", 224),
                  layernorm_eps=v.get("layer_norm_eps", 1e-6), head_dim_out=None, final_norm=False)
  image_token = c.get("image_token_index", c.get("image_token_id"))
  return VLMConfig(img=img, llm=llm, name=c.get("_name_or_path", ""), adapter=AdapterConfig("mlp"), causal=True,
                   image_token_id=image_token, **hf.special_ids_from_hf(c))


def config_to_hf(cfg: VLMConfig, dtype: str = "float32", tokenizer=None) -> dict:
  if not is_llava(cfg) or not cfg.causal or cfg.img.final_norm:
    raise ValueError("a LLaVA export needs a Llama-family LLM, the mlp adapter, causal=True and ViT features "
                     "before the final norm (img.final_norm=False).")
  check_image_token_id(cfg, tokenizer, "a LLaVA export: config.image_token_id",
                       " Train with config.model.image_token_id (and model.llm.vocab_size above the tokenizer's, "
                       "to make room), or set it on a loaded model: model.config = "
                       "dataclasses.replace(model.config, image_token_id=N).")
  img = cfg.img
  vision = {"model_type": "siglip_vision_model", "hidden_size": img.width, "intermediate_size": img.mlp_dim,
            "num_hidden_layers": img.depth, "num_attention_heads": img.num_heads, "patch_size": img.patch_size,
            "image_size": img.image_size, "layer_norm_eps": img.layernorm_eps, "hidden_act": "gelu_pytorch_tanh",
            "vision_use_head": False}
  text = hf_llama.config_to_hf(cfg.llm, dtype)
  return {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "vision_config": vision,
          "text_config": text, "image_token_index": cfg.image_token_id, "image_seq_length": img.num_patches,
          "vision_feature_layer": -1, "vision_feature_select_strategy": "full", "projector_hidden_act": "gelu",
          "multimodal_projector_bias": True, "tie_word_embeddings": cfg.llm.tie_embeddings, "dtype": dtype}


def params_from_hf(sd: dict, cfg: VLMConfig, source: str = "HF checkpoint") -> dict:
  """Flat {"img/...", "adapter/...", "llm/..."} params from canonical-named (`hf_files.canonical_name`) tensors."""
  out = hf.vision_params_from_hf(sd, cfg.img)
  for layer in ("linear_1", "linear_2"):
    out[f"adapter/{layer}/kernel"] = sd[f"{PROJ}{layer}.weight"].T
    out[f"adapter/{layer}/bias"] = sd[f"{PROJ}{layer}.bias"]
  text = {k: v for k, v in sd.items() if k.startswith(hf_files.T) or k == "lm_head.weight"}
  out.update({f"llm/{k}": v for k, v in hf_llama.params_from_hf(text, cfg.llm, source).items()})
  return out


def params_to_hf(flat: dict, cfg: VLMConfig) -> dict:
  """Inverse of `params_from_hf`: transformers 5 state-dict names -> numpy arrays."""
  out = {f"model.{k.replace(hf_files.V, 'vision_tower.', 1)}": v
         for k, v in hf.vision_params_to_hf(flat, cfg.img).items()}
  for layer in ("linear_1", "linear_2"):
    out[f"model.{PROJ}{layer}.weight"] = flat[f"adapter/{layer}/kernel"].T
    out[f"model.{PROJ}{layer}.bias"] = flat[f"adapter/{layer}/bias"]
  llm = {k.removeprefix("llm/"): v for k, v in flat.items() if k.startswith("llm/")}
  for name, a in hf_llama.params_to_hf(llm, cfg.llm).items():
    out["model.language_model." + name.removeprefix("model.") if name.startswith("model.") else name] = a
  return out


def load(path: str, config: VLMConfig | None = None):
  """(config, params, tokenizer-or-None) from a HF LLaVA directory; every tensor's shape checked by name."""
  file = os.path.join(path, "config.json")
  config = config or config_from_hf(fileutil.read_json(file), source=file)
  sd = {k: v for k, v in hf_files.read_tensors(path).items() if not k.endswith("inv_freq")}  # old files' RoPE buffers
  config, sd = follow_head(config, sd)
  return hf_files.convert_checked(path, config, sd, params_to_hf,
                            lambda sd, cfg: params_from_hf(sd, cfg, f"HF checkpoint {path}"))


def follow_head(config: VLMConfig, sd: dict) -> tuple[VLMConfig, dict]:
  """(config, tensors) of the model transformers builds from a tied `config` and the tensors `sd`: an
  lm_head.weight equal to the embedding is the tied head (dropped), one that differs is kept as the model's own
  head, whatever the tie flags say (transformers warns and unties; `hf_t5.load` follows the file the same way)."""
  if not config.llm.tie_embeddings or "lm_head.weight" not in sd:
    return config, sd
  if not hf_files.has_own_head(sd, hf_files.T + "embed_tokens.weight"):
    return config, {k: v for k, v in sd.items() if k != "lm_head.weight"}
  return dataclasses.replace(config, llm=dataclasses.replace(config.llm, tie_embeddings=False)), sd


def save(out_dir: str, config: VLMConfig, params, tokenizer=None, dtype: str | None = None,
         max_shard_bytes: int = 4 << 30):
  """A new LlavaForConditionalGeneration directory, written atomically."""
  dtype = dtype or config.llm.dtype
  hf_config = config_to_hf(config, dtype, tokenizer)
  flat = {k: np.asarray(jax.device_get(v)) for k, v in treeutil.flatten(params["params"]).items()}
  with fileutil.atomic_dir(out_dir) as tmp:
    hf_files.write_weights(tmp, params_to_hf(flat, config), dtype, max_shard_bytes)
    # Without a tokenizer or ids kept from an import none are written: transformers' Llama defaults apply.
    hf_files.write_config_and_tokenizer(tmp, hf_config, tokenizer, special_ids(config, tokenizer), "LlamaTokenizer")
