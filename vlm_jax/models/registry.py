"""Named model configs and (de)serialisation of model configs to JSON."""
import dataclasses

from vlm_jax.models.adapters import AdapterConfig
from vlm_jax.models.gemma import GemmaConfig, gemma_config
from vlm_jax.models.llama import LlamaConfig
from vlm_jax.models.t5 import T5Config
from vlm_jax.models.vit import ViTConfig, vit_config
from vlm_jax.models.vlm import LLM_TYPES, VLMConfig

PALIGEMMA_VOCAB = 256_000 + 1024 + 128  # Gemma + <locNNNN> + <segNNN>


def paligemma(llm_variant: str, res: int, name: str) -> VLMConfig:
  llm = gemma_config(llm_variant, vocab_size=PALIGEMMA_VOCAB)
  img = vit_config("So400m/14", image_size=res, head_dim_out=llm.width)
  return VLMConfig(img=img, llm=llm, name=name)


def tiny(gemma2: bool = False) -> VLMConfig:
  """A ~140k-parameter model for tests: every code path, seconds to compile."""
  img = vit_config("mu/14", image_size=28, head_dim_out=64)
  llm = GemmaConfig(width=64, depth=2, mlp_dim=128, num_heads=4, num_kv_heads=1, head_dim=16, vocab_size=512)
  if gemma2:
    llm = dataclasses.replace(llm, num_kv_heads=2, attn_logits_softcap=50.0, final_logits_softcap=30.0,
                              post_norms=True, query_pre_attn_scalar=24)
  return VLMConfig(img=img, llm=llm, name="tiny_gemma2" if gemma2 else "tiny")


def tiny_llama(adapter: str = "mlp") -> VLMConfig:
  """LLaVA-shaped test model: ViT features before the final norm, an MLP (or resampler) adapter, causal Llama."""
  img = vit_config("mu/14", image_size=28, final_norm=False)
  llm = LlamaConfig(width=64, depth=2, mlp_dim=128, num_heads=4, num_kv_heads=2, head_dim=16, vocab_size=512)
  return VLMConfig(img=img, llm=llm, adapter=AdapterConfig(adapter, num_queries=4, num_heads=4), causal=True,
                   name=f"tiny_llama_{adapter}")


def tiny_t5() -> VLMConfig:
  """PaLI-3-shaped test model: ViT + linear head into a UL2-style (gated-GELU) encoder-decoder."""
  img = vit_config("mu/14", image_size=28, head_dim_out=64)
  llm = T5Config(width=64, num_heads=4, head_dim=16, mlp_dim=128, encoder_depth=2, decoder_depth=2, vocab_size=512)
  return VLMConfig(img=img, llm=llm, name="tiny_t5")


CONFIGS = {
    **{f"paligemma_3b_{r}": (lambda r=r: paligemma("gemma_2b", r, f"paligemma_3b_{r}")) for r in (224, 448, 896)},
    **{f"paligemma2_{size}_{r}": (lambda v=v, r=r, size=size: paligemma(v, r, f"paligemma2_{size}_{r}"))
       for size, v in (("3b", "gemma2_2b"), ("10b", "gemma2_9b"), ("28b", "gemma2_27b")) for r in (224, 448, 896)},
    "tiny": tiny,
    "tiny_gemma2": lambda: tiny(gemma2=True),
    "tiny_llama_mlp": tiny_llama,
    "tiny_llama_resampler": lambda: tiny_llama("resampler"),
    "tiny_t5": tiny_t5,
}


def get_model_config(name: str, **overrides) -> VLMConfig:
  """A named config; overrides apply to the LLM and image configs (e.g. dtype='bfloat16', remat='full')."""
  if name not in CONFIGS:
    raise ValueError(f"Unknown model config {name!r}; known: {', '.join(sorted(CONFIGS))}.")
  return with_overrides(CONFIGS[name](), **overrides)


def with_overrides(cfg: VLMConfig, **overrides) -> VLMConfig:
  """Applies model-wide options (dtype, remat, scan_unroll) to every sub-config that has the field: image
  tower, adapter and language model. A key no sub-config has is rejected."""
  subs = {"img": cfg.img, "llm": cfg.llm, "adapter": cfg.adapter}
  fields = {name: {f.name for f in dataclasses.fields(sub)} for name, sub in subs.items()}
  for key in overrides:
    if not any(key in f for f in fields.values()) or key in ("name", "variant", "kind"):
      raise ValueError(f"Unknown model override {key!r}; allowed: a field of the image, adapter or language "
                       "config (dtype, remat, scan_unroll, fuse_projections, ...), not name / variant / kind.")
  return dataclasses.replace(cfg, **{name: dataclasses.replace(sub, **{k: v for k, v in overrides.items()
                                                                      if k in fields[name]})
                                     for name, sub in subs.items()})


def config_to_dict(cfg: VLMConfig) -> dict:
  return {**dataclasses.asdict(cfg), "llm_type": cfg.llm_type}


def config_from_dict(d: dict, source: str = "config") -> VLMConfig:
  """Inverse of `config_to_dict`, naming the missing or unknown key on failure. `llm_type` (gemma | llama | t5)
  picks the language model's config class; checkpoints written before it existed are Gemma."""
  def build(cls, sub, where):
    fields = {f.name for f in dataclasses.fields(cls)}
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    if not isinstance(sub, dict):
      raise ValueError(f"{source}: '{where}' must be an object.")
    if missing := sorted(required - set(sub)):
      raise ValueError(f"{source}: '{where}' is missing {missing}.")
    if unknown := sorted(set(sub) - fields):
      raise ValueError(f"{source}: '{where}' has unknown keys {unknown}.")
    return cls(**sub)
  for key in ("img", "llm"):
    if key not in d:
      raise ValueError(f"{source}: missing '{key}'.")
  llm_type = d.get("llm_type", "gemma")
  if llm_type not in LLM_TYPES:
    raise ValueError(f"{source}: unknown llm_type {llm_type!r}; known: {sorted(LLM_TYPES)}.")
  ids = ("image_token_id", "bos_id", "eos_id", "pad_id")
  if unknown := sorted(set(d) - {"img", "llm", "name", "adapter", "causal", "llm_type", *ids}):
    raise ValueError(f"{source}: unknown keys {unknown}.")
  return VLMConfig(img=build(ViTConfig, d["img"], "img"), llm=build(LLM_TYPES[llm_type], d["llm"], "llm"),
                   name=d.get("name", ""), adapter=build(AdapterConfig, d.get("adapter", {}), "adapter"),
                   causal=bool(d.get("causal", False)), **{k: d.get(k) for k in ids})
