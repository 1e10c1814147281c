"""Gemma 1 and Gemma 2 decoders, layers stacked with `nn.scan`, with an optional KV cache.

Param names follow big_vision's `models/ppp/gemma.py` (`embedder/input_embedding`, `layers/attn/q_einsum/w`,
...). Axis letters: B batch, T query length, S key length, D width, N query heads, K kv heads,
G query heads per kv head, H head dim, F mlp width, V vocab, L layers.

The cache is a plain dict {"k": [L,B,K,S,H], "v": [L,B,K,S,H]}, heads-major, [L,B,S,H] with one kv head (see
`layers.update_cache`; with per-layer weights, `layers.layer_stack`: a list of L dicts of [B,K,S,H] or [B,S,H]);
new keys and values are written at one shared slot index for the whole batch (`cache_index`), and which slots a
query may see is given by the mask, so rows of different lengths share one cache.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.models.layers import (apply_rope, attend, check_heads, constrain_batch, dense, heads_matrix, layer_stack,
                                   project, run_layers, softcap, update_cache)


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  vocab_size: int = 257152
  query_pre_attn_scalar: int | None = None  # None: head_dim
  attn_logits_softcap: float | None = None
  final_logits_softcap: float | None = None
  post_norms: bool = False  # Gemma 2's post-attention and post-ffw norms
  sliding_window: int | None = None  # Gemma 2 local layers (even indices) see the last `sliding_window` keys.
  rope_base: float = 10_000.0
  norm_eps: float = 1e-6
  dtype: str = "float32"
  remat: str = "none"
  # nn.scan's `unroll` over the layers: True unrolls the layer loop into straight-line code (no per-layer slicing
  # of stacked params, activations and grads; 12-14% faster train steps on XLA CPU (benchmarks/README.md), longer
  # compiles for deep models).
  scan_unroll: int | bool = 1
  # False: one param subtree per layer (`layers.layer_stack`); the decode loop's layout, never a checkpoint's.
  stacked_layers: bool = True
  fuse_projections: bool | None = None  # q/k/v and gate/up as one GEMM each (None: on CPU only; `layers.project`)

  def __post_init__(self):
    check_heads(self.num_heads, self.num_kv_heads, self.head_dim)

  @property
  def query_scale(self) -> float:
    return (self.query_pre_attn_scalar or self.head_dim) ** -0.5


VARIANTS = {
    "gemma_2b": dict(width=2048, depth=18, mlp_dim=16384, num_heads=8, num_kv_heads=1, head_dim=256),
    "gemma_7b": dict(width=3072, depth=28, mlp_dim=24576, num_heads=16, num_kv_heads=16, head_dim=256),
    **{name: dict(kw, attn_logits_softcap=50.0, final_logits_softcap=30.0, post_norms=True) for name, kw in {
        "gemma2_2b": dict(width=2304, depth=26, mlp_dim=9216, num_heads=8, num_kv_heads=4, head_dim=256),
        "gemma2_9b": dict(width=3584, depth=42, mlp_dim=14336, num_heads=16, num_kv_heads=8, head_dim=256),
        "gemma2_27b": dict(width=4608, depth=46, mlp_dim=36864, num_heads=32, num_kv_heads=16, head_dim=128,
                           query_pre_attn_scalar=4608 // 32),
    }.items()},
}


def gemma_config(variant: str, **kw) -> GemmaConfig:
  if variant not in VARIANTS:
    raise ValueError(f"Unknown Gemma variant {variant!r}; known: {sorted(VARIANTS)}.")
  return GemmaConfig(**{**VARIANTS[variant], **kw})


class RMSNorm(nn.Module):
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],))
    var = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
    normed = x.astype(jnp.float32) * jax.lax.rsqrt(var + self.eps)
    return (normed * (1 + scale.astype(jnp.float32))).astype(x.dtype)


class Attention(nn.Module):
  cfg: GemmaConfig

  @nn.compact
  def __call__(self, x_BTD, positions_BT, mask_BTS, cache, cache_index):
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    n, k, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.width
    init = nn.initializers.normal(stddev=d ** -0.5)
    # q, k and v: [D, heads * H] matrices, on CPU one GEMM over their concatenation (`layers.project`).
    if n == k:  # big_vision stores one fused projection when heads are not grouped.
      w = self.param("qkv_einsum", lambda *a: {"w": init(*a)}, (3, n, d, h))["w"].astype(dtype)
      w_DXs = [heads_matrix(w[i]) for i in range(3)]
    else:
      wq = self.param("q_einsum", lambda *a: {"w": init(*a)}, (n, d, h))["w"].astype(dtype)
      wkv = self.param("kv_einsum", lambda *a: {"w": init(*a)}, (2, k, d, h))["w"].astype(dtype)
      w_DXs = [heads_matrix(wq), heads_matrix(wkv[0]), heads_matrix(wkv[1])]
    b, t = x_BTD.shape[:2]
    q_BTNH, k_BTKH, v_BTKH = project(x_BTD, w_DXs, cfg.fuse_projections)
    inv_freq_h = cfg.rope_base ** (-jnp.arange(0, h, 2, dtype=jnp.float32) / h)
    q_BTNH = apply_rope(q_BTNH.reshape(b, t, n, h), positions_BT, inv_freq_h) * jnp.asarray(cfg.query_scale, dtype)
    k_BTKH = apply_rope(k_BTKH.reshape(b, t, k, h), positions_BT, inv_freq_h)
    new_cache, k_BKSH, v_BKSH = update_cache(cache, k_BTKH, v_BTKH.reshape(b, t, k, h), cache_index, dtype)
    out_BTNH = attend(q_BTNH, k_BKSH, v_BKSH, mask_BTS, dtype, cfg.attn_logits_softcap)
    w_out = self.param("attn_vec_einsum", lambda *a: {"w": init(*a)}, (n, h, d))["w"].astype(dtype)
    return dense(out_BTNH, w_out, 2), new_cache


class FeedForward(nn.Module):
  cfg: GemmaConfig

  @nn.compact
  def __call__(self, x_BTD):
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    init = nn.initializers.normal(stddev=cfg.width ** -0.5)
    w_gating = self.param("gating_einsum", init, (2, cfg.width, cfg.mlp_dim)).astype(dtype)
    w_linear = self.param("linear", init, (cfg.mlp_dim, cfg.width)).astype(dtype)
    # [B*T, D] x [D, F] GEMMs (on CPU one over [D, 2F]). An einsum over the stacked (2, D, F) weight puts C outermost
    # in its output and costs XLA CPU a transpose of the [B, T, 2F] activations and of their gradient.
    gate_BTF, up_BTF = project(x_BTD, [w_gating[0], w_gating[1]], cfg.fuse_projections)
    return dense(nn.gelu(gate_BTF, approximate=True) * up_BTF, w_linear)


class Block(nn.Module):
  cfg: GemmaConfig

  @nn.compact
  def __call__(self, x_BTD, scanned, positions_BT, mask_BTS, local_mask_BTS, cache_index):
    layer_idx, cache = scanned
    cfg = self.cfg
    x_BTD = constrain_batch(x_BTD)
    if cfg.sliding_window:  # Gemma 2 alternates local (even layers) and global attention.
      mask_BTS = jnp.where(layer_idx % 2 == 0, local_mask_BTS, mask_BTS)
    y = RMSNorm(cfg.norm_eps, name="pre_attention_norm")(x_BTD)
    y, new_cache = Attention(cfg, name="attn")(y, positions_BT, mask_BTS, cache, cache_index)
    if cfg.post_norms:
      y = RMSNorm(cfg.norm_eps, name="post_attention_norm")(y)
    x_BTD = x_BTD + y
    y = RMSNorm(cfg.norm_eps, name="pre_ffw_norm")(x_BTD)
    y = FeedForward(cfg, name="mlp")(y)
    if cfg.post_norms:
      y = RMSNorm(cfg.norm_eps, name="post_ffw_norm")(y)
    return x_BTD + y, new_cache


class Gemma(nn.Module):
  """Decoder over already-embedded inputs; `embed` and `logits` are the two ends."""
  cfg: GemmaConfig

  def setup(self):
    cfg = self.cfg
    self.embedder = Embedder(cfg, name="embedder")
    self.layers = layer_stack(Block, cfg, in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast))
    self.final_norm = RMSNorm(cfg.norm_eps, name="final_norm")

  def embed(self, tokens_BT):
    return self.embedder.encode(tokens_BT)

  def logits(self, x_BTD):
    return softcap(self.embedder.decode(x_BTD), self.cfg.final_logits_softcap)

  def __call__(self, x_BTD, positions_BT, mask_BTS, cache=None, cache_index=0, key_positions_BS=None,
               same_block_BTS=None):
    """Runs the layers: returns (final-normed hidden [B,T,D], updated cache or None).

    mask_BTS says which keys each query sees (keys are the cache slots when a cache is given).
    key_positions_BS (the position of each key; default: positions_BT) drives Gemma 2's sliding window, which,
    as in transformers, does not cut inside a bidirectional block (same_block_BTS).
    """
    cfg = self.cfg
    x_BTD = x_BTD.astype(jnp.dtype(cfg.dtype))
    local_mask_BTS = mask_BTS
    if cfg.sliding_window:
      kpos_BS = positions_BT if key_positions_BS is None else key_positions_BS
      in_window_BTS = positions_BT[:, :, None] - kpos_BS[:, None, :] < cfg.sliding_window
      if same_block_BTS is not None:
        in_window_BTS |= same_block_BTS
      local_mask_BTS = mask_BTS & in_window_BTS
    x_BTD, new_cache = run_layers(self.layers, x_BTD, (jnp.arange(cfg.depth), cache), positions_BT, mask_BTS,
                                  local_mask_BTS, cache_index)
    return self.final_norm(x_BTD), new_cache


class Embedder(nn.Module):
  cfg: GemmaConfig

  def setup(self):
    # Unit-scale inputs after the sqrt(width) multiplier, and unit-scale tied output logits at init.
    self.input_embedding = self.param("input_embedding", nn.initializers.normal(stddev=self.cfg.width ** -0.5),
                                      (self.cfg.vocab_size, self.cfg.width))

  def encode(self, tokens_BT):
    dtype = jnp.dtype(self.cfg.dtype)
    x_BTD = self.input_embedding[tokens_BT].astype(dtype)
    return x_BTD * jnp.sqrt(jnp.asarray(self.cfg.width, dtype)).astype(dtype)

  def decode(self, x_BTD):
    return jnp.einsum("BTD,VD->BTV", x_BTD, self.input_embedding.astype(x_BTD.dtype),
                      preferred_element_type=jnp.float32)
