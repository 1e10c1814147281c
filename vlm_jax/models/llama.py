"""Llama-family decoders (Llama 2/3, Vicuna, Qwen2), layers stacked with `nn.scan`, with an optional KV cache.

Same interface as `gemma.Gemma` (`embed`, `__call__`, `logits`, and the config attributes the VLM glue reads:
depth, num_kv_heads, head_dim, dtype, width, vocab_size), so either can be the language model of a VLM. The
differences from Gemma: no sqrt(width) input scaling, RMSNorm multiplies by `scale` (not 1 + scale), SwiGLU
(SiLU gate), RoPE with a configurable base and optional linear / llama3 frequency scaling, optional q/k/v
biases (Qwen2) and an untied output head.

Param names (per-layer ones stacked on a leading L axis) and the HF `LlamaForCausalLM` / `Qwen2ForCausalLM`
tensors they hold (torch Linear weights are [out, in]; ours are [in, out], with heads split out):

  embedder/input_embedding          [V, D]     model.embed_tokens.weight
  layers/pre_attention_norm/scale   [L, D]     model.layers.{i}.input_layernorm.weight
  layers/attn/q_proj/w              [L,N,D,H]  model.layers.{i}.self_attn.q_proj.weight [N*H, D]
  layers/attn/q_proj/b              [L,N,H]    model.layers.{i}.self_attn.q_proj.bias   (qkv_bias only)
  layers/attn/k_proj/{w,b}          [L,K,D,H]  model.layers.{i}.self_attn.k_proj.{weight,bias} [K*H, D]
  layers/attn/v_proj/{w,b}          [L,K,D,H]  model.layers.{i}.self_attn.v_proj.{weight,bias} [K*H, D]
  layers/attn/o_proj/w              [L,N,H,D]  model.layers.{i}.self_attn.o_proj.weight [D, N*H]
  layers/pre_ffw_norm/scale         [L, D]     model.layers.{i}.post_attention_layernorm.weight
  layers/mlp/gate/w                 [L, D, F]  model.layers.{i}.mlp.gate_proj.weight [F, D]
  layers/mlp/up/w                   [L, D, F]  model.layers.{i}.mlp.up_proj.weight   [F, D]
  layers/mlp/down/w                 [L, F, D]  model.layers.{i}.mlp.down_proj.weight [D, F]
  final_norm/scale                  [D]        model.norm.weight
  lm_head/w                         [D, V]     lm_head.weight [V, D]                 (absent if tie_embeddings)

The cache is the same as Gemma's: {"k": [L,B,K,S,H], "v": [L,B,K,S,H]}, [L,B,S,H] with one kv head (per-layer
weights: a list of L such dicts of [B,K,S,H] or [B,S,H]), written at one shared slot index.
"""
import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax.models.layers import (apply_rope, attend, check_heads, constrain_batch, dense, heads_matrix, layer_stack,
                                   project, run_layers, update_cache)

# Keys each rope scaling type needs (besides "rope_type"); all values are numbers.
ROPE_SCALING_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def _rope_scaling_tuple(value):
  """None, a dict or a sequence of (key, value) pairs (e.g. back from JSON) -> sorted tuple of pairs."""
  if value is None:
    return None
  items = dict(value.items() if isinstance(value, dict) else value)
  rope_type = items.get("rope_type")
  if rope_type not in ROPE_SCALING_KEYS:
    raise ValueError(f"rope_scaling type {rope_type!r} is not supported; use one of {sorted(ROPE_SCALING_KEYS)}.")
  expected = {"rope_type", *ROPE_SCALING_KEYS[rope_type]}
  if missing := sorted(expected - set(items)):
    raise ValueError(f"rope_scaling {rope_type!r} is missing {missing}.")
  if unknown := sorted(set(items) - expected):
    raise ValueError(f"rope_scaling {rope_type!r} has unknown keys {unknown}.")
  return tuple(sorted((k, v if k == "rope_type" else float(v)) for k, v in items.items()))


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  vocab_size: int = 32000
  rope_base: float = 10_000.0
  # None, or sorted (key, value) pairs: (("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
  # ("original_max_position_embeddings", 8192.0), ("rope_type", "llama3")) or (("factor", 2.0),
  # ("rope_type", "linear")). A dict is accepted and normalised to this hashable form.
  rope_scaling: tuple | None = None
  qkv_bias: bool = False  # Qwen2
  tie_embeddings: bool = False
  norm_eps: float = 1e-6
  dtype: str = "float32"
  remat: str = "none"
  scan_unroll: int | bool = 1  # nn.scan's `unroll` over the layers (see GemmaConfig)
  stacked_layers: bool = True  # see GemmaConfig
  fuse_projections: bool | None = None  # see GemmaConfig

  def __post_init__(self):
    object.__setattr__(self, "rope_scaling", _rope_scaling_tuple(self.rope_scaling))
    check_heads(self.num_heads, self.num_kv_heads, self.head_dim)

  @property
  def query_scale(self) -> float:
    return self.head_dim ** -0.5

  def rope_inv_freq(self) -> np.ndarray:
    """float32 [H/2] inverse frequencies, computed as transformers does (float32, then the scaling rule)."""
    h = self.head_dim
    inv_freq = (1.0 / (np.float32(self.rope_base) ** (np.arange(0, h, 2).astype(np.float32) / h))).astype(np.float32)
    if self.rope_scaling is None:
      return inv_freq
    s = dict(self.rope_scaling)
    if s["rope_type"] == "linear":
      return (inv_freq / np.float32(s["factor"])).astype(np.float32)
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between.
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


class RMSNorm(nn.Module):
  """Llama's RMSNorm: normalise in float32, cast back, multiply by `scale` (initialised to ones)."""
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones_init(), (x.shape[-1],))
    var = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
    normed = (x.astype(jnp.float32) * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)
    return scale.astype(x.dtype) * normed


def _proj(module, name, shape, bias_shape, init):
  """A {"w"[, "b"]} param dict (biases zero-initialised) under one name, like gemma.py's einsum params."""
  def make(rng, *_):
    return {"w": init(rng, shape), **({"b": jnp.zeros(bias_shape)} if bias_shape else {})}
  return module.param(name, make)


class Attention(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x_BTD, positions_BT, mask_BTS, cache, cache_index):
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    n, k, h, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.width
    init = nn.initializers.normal(stddev=d ** -0.5)

    proj = {name: _proj(self, name, (m, d, h), (m, h) if cfg.qkv_bias else None, init)
            for name, m in (("q_proj", n), ("k_proj", k), ("v_proj", k))}
    # q, k and v: [D, heads * H] matrices, on CPU one GEMM over their concatenation (`layers.project`).
    q_BTX, k_BTX, v_BTX = project(x_BTD, [heads_matrix(p["w"].astype(dtype)) for p in proj.values()],
                                  cfg.fuse_projections)
    if cfg.qkv_bias:
      q_BTX, k_BTX, v_BTX = (y + p["b"].reshape(-1).astype(dtype) for y, p in zip((q_BTX, k_BTX, v_BTX),
                                                                                 proj.values()))
    b, t = x_BTD.shape[:2]
    inv_freq = cfg.rope_inv_freq()
    q_BTNH = apply_rope(q_BTX.reshape(b, t, n, h), positions_BT, inv_freq) * jnp.asarray(cfg.query_scale, dtype)
    k_BTKH = apply_rope(k_BTX.reshape(b, t, k, h), positions_BT, inv_freq)
    new_cache, k_BKSH, v_BKSH = update_cache(cache, k_BTKH, v_BTX.reshape(b, t, k, h), cache_index, dtype)
    out_BTNH = attend(q_BTNH, k_BKSH, v_BKSH, mask_BTS, dtype)
    w_out = _proj(self, "o_proj", (n, h, d), None, init)["w"].astype(dtype)
    return dense(out_BTNH, w_out, 2), new_cache


class FeedForward(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x_BTD):
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    d, f = cfg.width, cfg.mlp_dim
    w_gate = _proj(self, "gate", (d, f), None, nn.initializers.normal(stddev=d ** -0.5))["w"].astype(dtype)
    w_up = _proj(self, "up", (d, f), None, nn.initializers.normal(stddev=d ** -0.5))["w"].astype(dtype)
    w_down = _proj(self, "down", (f, d), None, nn.initializers.normal(stddev=f ** -0.5))["w"].astype(dtype)
    gate_BTF, up_BTF = project(x_BTD, [w_gate, w_up], cfg.fuse_projections)
    return dense(nn.silu(gate_BTF) * up_BTF, w_down)


class Block(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x_BTD, cache, positions_BT, mask_BTS, cache_index):
    cfg = self.cfg
    x_BTD = constrain_batch(x_BTD)
    y = RMSNorm(cfg.norm_eps, name="pre_attention_norm")(x_BTD)
    y, new_cache = Attention(cfg, name="attn")(y, positions_BT, mask_BTS, cache, cache_index)
    x_BTD = x_BTD + y
    y = RMSNorm(cfg.norm_eps, name="pre_ffw_norm")(x_BTD)
    return x_BTD + FeedForward(cfg, name="mlp")(y), new_cache


class Llama(nn.Module):
  """Decoder over already-embedded inputs; `embed` and `logits` are the two ends (as `gemma.Gemma`)."""
  cfg: LlamaConfig

  def setup(self):
    cfg = self.cfg
    # Unit-scale inputs (there is no sqrt(width) multiplier); a tied table doubles as the output head, so it
    # gets the head's D**-0.5 scale instead (the first RMSNorm makes the input scale irrelevant).
    emb_std = cfg.width ** -0.5 if cfg.tie_embeddings else 1.0
    self.embedder = Embedder(cfg.vocab_size, cfg.width, cfg.dtype, emb_std, name="embedder")
    self.layers = layer_stack(Block, cfg, in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast))
    self.final_norm = RMSNorm(cfg.norm_eps, name="final_norm")
    if not cfg.tie_embeddings:
      self.lm_head = self.param("lm_head", lambda rng: {"w": nn.initializers.normal(stddev=cfg.width ** -0.5)(
          rng, (cfg.width, cfg.vocab_size))})

  def embed(self, tokens_BT):
    return self.embedder.encode(tokens_BT)

  def logits(self, x_BTD):
    """float32 vocab logits [B,T,V]."""
    if self.cfg.tie_embeddings:
      return self.embedder.decode(x_BTD)
    return jnp.einsum("BTD,DV->BTV", x_BTD, self.lm_head["w"].astype(x_BTD.dtype),
                      preferred_element_type=jnp.float32)

  def __call__(self, x_BTD, positions_BT, mask_BTS, cache=None, cache_index=0, key_positions_BS=None,
               same_block_BTS=None):
    """Runs the layers: returns (final-normed hidden [B,T,D], updated cache or None).

    mask_BTS says which keys each query sees (keys are the cache slots when a cache is given).
    key_positions_BS and same_block_BTS are accepted for `Gemma`'s interface and unused: they only drive
    sliding-window attention, which these models do not have.
    """
    del key_positions_BS, same_block_BTS
    x_BTD = x_BTD.astype(jnp.dtype(self.cfg.dtype))
    x_BTD, new_cache = run_layers(self.layers, x_BTD, cache, positions_BT, mask_BTS, cache_index)
    return self.final_norm(x_BTD), new_cache


class Embedder(nn.Module):
  vocab_size: int
  width: int
  dtype: str
  stddev: float

  def setup(self):
    self.input_embedding = self.param("input_embedding", nn.initializers.normal(stddev=self.stddev),
                                      (self.vocab_size, self.width))

  def encode(self, tokens_BT):
    return self.input_embedding[tokens_BT].astype(jnp.dtype(self.dtype))

  def decode(self, x_BTD):
    return jnp.einsum("BTD,VD->BTV", x_BTD, self.input_embedding.astype(x_BTD.dtype),
                      preferred_element_type=jnp.float32)
