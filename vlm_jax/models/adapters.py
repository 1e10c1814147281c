"""Adapters: image tokens [B,P,Dv] from the vision tower -> language-model inputs [B,Q,D].

- `linear`: one Dense layer. PaliGemma keeps it inside the ViT as big_vision's `img/head`, so for that family
  the ViT is built with `head_dim_out` and no adapter module exists (checkpoints load by name).
- `mlp`: LLaVA-1.5's projector, Dense -> GELU (exact) -> Dense, names as HF's `linear_1` / `linear_2`.
- `resampler`: a fixed number of learned queries cross-attending to the image tokens (Qwen-VL, CodeFuse-VLM's
  cross-attention adapter): the language model sees `num_queries` tokens whatever the resolution.
"""
import dataclasses

import flax.linen as nn
import jax.numpy as jnp

KINDS = ("linear", "mlp", "resampler")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
  kind: str = "linear"
  num_queries: int = 64  # resampler only
  num_heads: int = 8  # resampler only
  dtype: str = "float32"

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"Unknown adapter kind {self.kind!r}; use one of {KINDS}.")

  def num_tokens(self, num_patches: int) -> int:
    return self.num_queries if self.kind == "resampler" else num_patches


class MLPAdapter(nn.Module):
  width: int
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x_BPD):
    x_BPD = nn.Dense(self.width, dtype=jnp.dtype(self.dtype), name="linear_1")(x_BPD)
    return nn.Dense(self.width, dtype=jnp.dtype(self.dtype), name="linear_2")(nn.gelu(x_BPD, approximate=False))


class Resampler(nn.Module):
  width: int
  num_queries: int
  num_heads: int
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x_BPD):
    dtype = jnp.dtype(self.dtype)
    queries_QD = self.param("queries", nn.initializers.normal(0.02), (self.num_queries, self.width))
    kv_BPD = nn.LayerNorm(name="kv_norm", dtype=dtype)(nn.Dense(self.width, use_bias=False, dtype=dtype,
                                                                name="kv_proj")(x_BPD))
    q_BQD = jnp.broadcast_to(nn.LayerNorm(name="query_norm", dtype=dtype)(queries_QD.astype(dtype)),
                             (x_BPD.shape[0], self.num_queries, self.width))
    out_BQD = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=dtype, name="attn")(q_BQD, kv_BPD)
    return nn.Dense(self.width, dtype=dtype, name="proj")(nn.LayerNorm(name="out_norm", dtype=dtype)(out_BQD))


def make_adapter(cfg: AdapterConfig, width: int):
  """The adapter module for a language model of `width`, or None for `linear` (the ViT's own head)."""
  if cfg.kind == "mlp":
    return MLPAdapter(width, cfg.dtype)
  if cfg.kind == "resampler":
    if width % cfg.num_heads:
      raise ValueError(f"resampler: width {width} is not divisible by num_heads {cfg.num_heads}.")
    return Resampler(width, cfg.num_queries, cfg.num_heads, cfg.dtype)
  return None
