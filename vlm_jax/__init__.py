"""vlm_jax: PaliGemma-style vision-language models in JAX. Entry point: `vlm_jax.load(path)`."""
import os

from vlm_jax.api import Model

__all__ = ["Model", "format_of", "load"]


def format_of(path: str) -> str:
  """"big_vision" (an .npz), "vlm_jax" (a checkpoint directory) or "hf" (a HF PaliGemma / LLaVA directory)."""
  from vlm_jax import checkpoint
  if os.path.isfile(path) and path.endswith(".npz"):
    return "big_vision"
  if checkpoint.is_model_dir(path):
    return "vlm_jax"
  if os.path.isfile(os.path.join(path, "config.json")):
    return "hf"
  if not os.path.exists(path):
    raise FileNotFoundError(f"No such file or directory: {path}")
  raise ValueError(f"{path} is neither a HF PaliGemma / LLaVA directory (config.json + *.safetensors), a "
                   "vlm_jax checkpoint (vlm_config.json + params/) nor a big_vision .npz file.")


def load(path: str, dtype: str | None = None, config=None, mesh=None) -> Model:
  """Loads a model from a HuggingFace PaliGemma or LLaVA (SigLIP + Llama / Qwen2) directory, a big_vision `.npz`
  (with `config`), a vlm_jax checkpoint directory, or a training workdir (the model it exported at the end).
  `config`: a model config name such as "paligemma_3b_224" (see `vlm_jax.models.registry.CONFIGS`) or a
  `VLMConfig`; required for .npz, else it replaces the stored one.
  `dtype` (float32 | bfloat16) sets both the stored params and the compute dtype; default: as stored.
  `mesh` (a jax Mesh or a config dict, as `Model.shard` takes): params go straight to their shards on it (for a
  model too big for one device); default: this process's first device.
  """
  from vlm_jax import checkpoint
  from vlm_jax.convert import big_vision, hf
  from vlm_jax.models.registry import get_model_config
  named = get_model_config(config) if isinstance(config, str) else config
  if mesh is not None:
    from vlm_jax import sharding
    mesh = sharding.make_mesh(mesh)
  path = checkpoint.model_dir(path)
  kind = format_of(path)
  if kind == "big_vision":
    if named is None:
      raise ValueError(f"{path} is a big_vision .npz: pass config=NAME (e.g. 'paligemma_3b_224').")
    cfg, params, tok = named, big_vision.load(path, named), None
  elif kind == "vlm_jax":
    cfg, params, tok = checkpoint.load_model(path, named, mesh=mesh)
  else:
    from vlm_jax import fileutil
    from vlm_jax.convert import hf_llava
    is_llava = fileutil.read_json(os.path.join(path, "config.json")).get("model_type") == "llava"
    cfg, params, tok = (hf_llava.load if is_llava else hf.load)(path, named)
  model = Model(cfg, params, tok)
  if mesh is not None:  # host arrays (HF, .npz) are placed shard by shard; a checkpoint's already are
    model = model.shard(mesh)
  return model.with_dtype(dtype) if dtype else model  # a cast keeps each array's sharding
