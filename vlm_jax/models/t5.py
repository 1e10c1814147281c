"""T5 / UL2 encoder-decoder language backbone (PaLI-3 style), layers stacked with `nn.scan` (the decode loop's
decoder: one module per layer, `stacked_layers=False`), with a decoder KV cache.

The encoder runs bidirectionally over already-embedded inputs (so the VLM glue can put image tokens before the
text prefix); the decoder generates the suffix with causal self-attention and cross-attention to the encoder
output. As in T5: RMSNorm without mean and with a plain scale (no 1 + scale), no query scaling, a relative
position bias (one bucket table per stack, used by every layer of that stack; the encoder's buckets are
bidirectional, the decoder's unidirectional; cross-attention has none), a gated (T5 v1.1 / UL2) or plain
(T5 v1.0) feed-forward, and an untied lm head (v1.1 / UL2) or the tied input embedding with the decoder
output scaled by width ** -0.5 (v1.0).

Axis letters as in gemma.py: B batch, T query length, S key length (encoder length, or cache slots), D width,
N heads, H head dim, F mlp width, V vocab, L layers, K relative-position buckets, C cache slots.

Params, and the HF `T5ForConditionalGeneration` tensors they come from (`i` the layer; `convert/hf_t5.py`
does the mapping; torch Linear weights are [out, in], q/k/v [N*H, D], o [D, N*H]):

  embedder/input_embedding                   [V,D]       shared.weight
  lm_head                                    [V,D]       lm_head.weight (only when not tie_embeddings)
  encoder/relpos_bias                        [K,N]       encoder.block.0.layer.0.SelfAttention
                                                           .relative_attention_bias.weight
  encoder/layers/pre_attention_norm/scale    [L,D]       encoder.block.i.layer.0.layer_norm.weight
  encoder/layers/attn/q_einsum/w             [L,N,D,H]   encoder.block.i.layer.0.SelfAttention.q.weight
  encoder/layers/attn/kv_einsum/w            [L,2,N,D,H] encoder.block.i.layer.0.SelfAttention.{k,v}.weight
  encoder/layers/attn/attn_vec_einsum/w      [L,N,H,D]   encoder.block.i.layer.0.SelfAttention.o.weight
  encoder/layers/pre_ffw_norm/scale          [L,D]       encoder.block.i.layer.1.layer_norm.weight
  encoder/layers/mlp/gating_einsum           [L,2,D,F]   encoder.block.i.layer.1.DenseReluDense.{wi_0,wi_1}.weight
  encoder/layers/mlp/wi                      [L,D,F]     encoder.block.i.layer.1.DenseReluDense.wi.weight (not gated)
  encoder/layers/mlp/linear                  [L,F,D]     encoder.block.i.layer.1.DenseReluDense.wo.weight
  encoder/final_norm/scale                   [D]         encoder.final_layer_norm.weight
  decoder/relpos_bias                        [K,N]       decoder.block.0.layer.0.SelfAttention
                                                           .relative_attention_bias.weight
  decoder/cross_kv_einsum/w                  [L,2,N,D,H] decoder.block.i.layer.1.EncDecAttention.{k,v}.weight
  decoder/layers/pre_attention_norm/scale    [L,D]       decoder.block.i.layer.0.layer_norm.weight
  decoder/layers/attn/{q,kv,attn_vec}_einsum/w           decoder.block.i.layer.0.SelfAttention.{q,k/v,o}.weight
  decoder/layers/pre_cross_attention_norm/scale [L,D]    decoder.block.i.layer.1.layer_norm.weight
  decoder/layers/cross_attn/q_einsum/w       [L,N,D,H]   decoder.block.i.layer.1.EncDecAttention.q.weight
  decoder/layers/cross_attn/attn_vec_einsum/w [L,N,H,D]  decoder.block.i.layer.1.EncDecAttention.o.weight
  decoder/layers/pre_ffw_norm/scale          [L,D]       decoder.block.i.layer.2.layer_norm.weight
  decoder/layers/mlp/...                                 decoder.block.i.layer.2.DenseReluDense.* (as the encoder's)
  decoder/final_norm/scale                   [D]         decoder.final_layer_norm.weight

The cross-attention key/value projections of all decoder layers sit outside the layer scan
(`decoder/cross_kv_einsum`), so `init_cache` computes every layer's cross-attention keys and values from the
encoder output once, and the decoder layers take them as per-layer inputs.

Cache (decode.py's layout rule: leaves under "kv" are [L, B, ...], others [B, ...], scalars shared):
  {"kv": {"self_k", "self_v": [L, *kv_cache_shape], "cross_k", "cross_v": [L,B,N,S,H]}, "enc_valid": bool [B,S],
   "index": int32 scalar}
With per-layer decoder weights (`stacked_layers=False`, the decode loop's layout; `layers.layer_stack`) "kv" is
a list of L such dicts of [B, ...] arrays.
Decoder tokens are written at one shared slot index for the whole batch; a token's decoder position is its
slot (every row starts with the decoder start token at slot 0).
"""
import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.models.layers import (attend, constrain_batch, dense, heads_matrix, kv_cache_shape, layer_stack, project,
                                   run_layers, scan_stack, update_cache)

ACTIVATIONS = {"gelu_new": lambda x: nn.gelu(x, approximate=True), "gelu": lambda x: nn.gelu(x, approximate=False),
               "silu": nn.silu, "relu": nn.relu}


@dataclasses.dataclass(frozen=True)
class T5Config:
  width: int  # d_model
  num_heads: int
  head_dim: int  # d_kv
  mlp_dim: int  # d_ff
  encoder_depth: int
  decoder_depth: int
  vocab_size: int = 32128
  activation: str = "gelu_new"  # gelu_new (tanh) | gelu (erf) | silu | relu
  gated: bool = True  # T5 v1.1 / UL2: act(x wi_0) * (x wi_1); T5 v1.0: act(x wi)
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  tie_embeddings: bool = False  # lm head = input embedding (T5 v1.0); T5 v1.1 / UL2 have their own
  scale_decoder_output: bool | None = None  # decoder output * width ** -0.5 before the head; None: tie_embeddings
  norm_eps: float = 1e-6
  decoder_start_id: int = 0  # T5 starts decoding from the pad token
  dtype: str = "float32"
  remat: str = "none"
  scan_unroll: int | bool = 1  # nn.scan's `unroll` over the encoder and decoder layers (see GemmaConfig)
  fuse_projections: bool | None = None  # q/k/v and gate/up as one GEMM each (None: on CPU only; `layers.project`)
  stacked_layers: bool = True  # the decoder's layers (see GemmaConfig); the encoder runs once, always scanned

  def __post_init__(self):
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"Unknown T5 activation {self.activation!r}; use one of {sorted(ACTIVATIONS)}.")

  @property
  def scales_output(self) -> bool:
    return self.tie_embeddings if self.scale_decoder_output is None else self.scale_decoder_output


def relative_position_bucket(rel, *, bidirectional: bool, num_buckets: int, max_distance: int):
  """T5's bucket (int32, same shape) of relative positions rel = key position - query position.

  Half the buckets (per direction when bidirectional) are exact small distances, the rest logarithmically wider
  bins up to max_distance; further distances share the last bucket. Unidirectional: keys after the query
  (rel > 0) fall in bucket 0, with rel = 0.
  """
  rel = jnp.asarray(rel, jnp.int32)
  buckets = jnp.zeros_like(rel)
  if bidirectional:
    num_buckets //= 2
    buckets = (rel > 0).astype(jnp.int32) * num_buckets
    rel = jnp.abs(rel)
  else:
    rel = -jnp.minimum(rel, 0)
  max_exact = num_buckets // 2
  # The same float32 operations in the same order as transformers / Mesh TensorFlow, so bin edges agree.
  large = jnp.log(jnp.maximum(rel, 1).astype(jnp.float32) / max_exact) / math.log(max_distance / max_exact)
  large = max_exact + (large * (num_buckets - max_exact)).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return buckets + jnp.where(rel < max_exact, rel, large)


def relative_bias(table_KN, query_pos_BT, key_pos_BS, *, bidirectional: bool, cfg: T5Config):
  """float32 [B,N,T,S] attention-logit bias from the bucket table and the positions (B may be 1)."""
  buckets_BTS = relative_position_bucket(key_pos_BS[:, None, :] - query_pos_BT[:, :, None],
                                         bidirectional=bidirectional,
                                         num_buckets=cfg.relative_attention_num_buckets,
                                         max_distance=cfg.relative_attention_max_distance)
  return jnp.transpose(jnp.asarray(table_KN, jnp.float32)[buckets_BTS], (0, 3, 1, 2))


class RMSNorm(nn.Module):
  """T5's layer norm: no mean subtraction, no bias, a plain scale (initialised to one)."""
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.ones_init(), (x.shape[-1],))
    var = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
    return (x.astype(jnp.float32) * jax.lax.rsqrt(var + self.eps) * scale.astype(jnp.float32)).astype(x.dtype)


def _einsum_param(module, name, std, shape, dtype):
  return module.param(name, lambda *a: {"w": nn.initializers.normal(stddev=std)(*a)}, shape)["w"].astype(dtype)


class SelfAttention(nn.Module):
  cfg: T5Config

  @nn.compact
  def __call__(self, x_BTD, bias_BNTS, mask_BTS, cache=None, cache_index=0):
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    n, h, d = cfg.num_heads, cfg.head_dim, cfg.width
    # transformers' init: the query carries the 1/sqrt(head_dim) that T5's attention leaves out.
    wq = _einsum_param(self, "q_einsum", (d * h) ** -0.5, (n, d, h), dtype)
    wkv = _einsum_param(self, "kv_einsum", d ** -0.5, (2, n, d, h), dtype)
    b, t = x_BTD.shape[:2]
    q_BTNH, k_BTNH, v_BTNH = (y.reshape(b, t, n, h) for y in project(
        x_BTD, [heads_matrix(wq), heads_matrix(wkv[0]), heads_matrix(wkv[1])], cfg.fuse_projections))
    cache, k_BNSH, v_BNSH = update_cache(cache, k_BTNH, v_BTNH, cache_index, dtype)
    out_BTNH = attend(q_BTNH, k_BNSH, v_BNSH, mask_BTS, dtype, bias_BNTS=bias_BNTS)
    w_out = _einsum_param(self, "attn_vec_einsum", (n * h) ** -0.5, (n, h, d), dtype)
    return dense(out_BTNH, w_out, 2), cache


class CrossAttention(nn.Module):
  """Attention to precomputed encoder keys / values (their projection is `Decoder.cross_kv`); no position bias."""
  cfg: T5Config

  @nn.compact
  def __call__(self, x_BTD, k_BNSH, v_BNSH, mask_BTS):
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    n, h, d = cfg.num_heads, cfg.head_dim, cfg.width
    wq = _einsum_param(self, "q_einsum", (d * h) ** -0.5, (n, d, h), dtype)
    q_BTNH = dense(x_BTD, heads_matrix(wq)).reshape(*x_BTD.shape[:2], n, h)
    out_BTNH = attend(q_BTNH, k_BNSH.astype(dtype), v_BNSH.astype(dtype), mask_BTS, dtype)
    w_out = _einsum_param(self, "attn_vec_einsum", (n * h) ** -0.5, (n, h, d), dtype)
    return dense(out_BTNH, w_out, 2)


class FeedForward(nn.Module):
  cfg: T5Config

  @nn.compact
  def __call__(self, x_BTD):
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    act = ACTIVATIONS[cfg.activation]
    init_in = nn.initializers.normal(stddev=cfg.width ** -0.5)
    if cfg.gated:
      w_gating = self.param("gating_einsum", init_in, (2, cfg.width, cfg.mlp_dim)).astype(dtype)
      gate_BTF, up_BTF = project(x_BTD, [w_gating[0], w_gating[1]], cfg.fuse_projections)
      hidden_BTF = act(gate_BTF) * up_BTF
    else:
      hidden_BTF = act(dense(x_BTD, self.param("wi", init_in, (cfg.width, cfg.mlp_dim)).astype(dtype)))
    w_out = self.param("linear", nn.initializers.normal(stddev=cfg.mlp_dim ** -0.5), (cfg.mlp_dim, cfg.width))
    return dense(hidden_BTF, w_out.astype(dtype))


class EncoderBlock(nn.Module):
  cfg: T5Config

  @nn.compact
  def __call__(self, x_BTD, bias_BNTS, mask_BTS):
    cfg = self.cfg
    x_BTD = constrain_batch(x_BTD)
    y, _ = SelfAttention(cfg, name="attn")(RMSNorm(cfg.norm_eps, name="pre_attention_norm")(x_BTD), bias_BNTS,
                                           mask_BTS)
    x_BTD = x_BTD + y
    return x_BTD + FeedForward(cfg, name="mlp")(RMSNorm(cfg.norm_eps, name="pre_ffw_norm")(x_BTD)), None


class DecoderBlock(nn.Module):
  cfg: T5Config

  @nn.compact
  def __call__(self, x_BTD, kv, bias_BNTS, mask_BTS, cross_mask_BTS, cache_index):
    """kv: this layer's {"cross_k", "cross_v"} and, when decoding with a cache, {"self_k", "self_v"}."""
    cfg = self.cfg
    x_BTD = constrain_batch(x_BTD)
    cache = {"k": kv["self_k"], "v": kv["self_v"]} if "self_k" in kv else None
    y, cache = SelfAttention(cfg, name="attn")(RMSNorm(cfg.norm_eps, name="pre_attention_norm")(x_BTD), bias_BNTS,
                                               mask_BTS, cache, cache_index)
    x_BTD = x_BTD + y
    y = RMSNorm(cfg.norm_eps, name="pre_cross_attention_norm")(x_BTD)
    x_BTD = x_BTD + CrossAttention(cfg, name="cross_attn")(y, kv["cross_k"], kv["cross_v"], cross_mask_BTS)
    x_BTD = x_BTD + FeedForward(cfg, name="mlp")(RMSNorm(cfg.norm_eps, name="pre_ffw_norm")(x_BTD))
    return x_BTD, None if cache is None else {"self_k": cache["k"], "self_v": cache["v"]}


def _bias_table(module, cfg):
  return module.param("relpos_bias", nn.initializers.normal(stddev=cfg.width ** -0.5),
                      (cfg.relative_attention_num_buckets, cfg.num_heads))


class Encoder(nn.Module):
  cfg: T5Config

  @nn.compact
  def __call__(self, x_BSD, positions_BS, mask_BSS):
    cfg = self.cfg
    bias_BNSS = relative_bias(_bias_table(self, cfg), positions_BS, positions_BS, bidirectional=True, cfg=cfg)
    x_BSD, _ = scan_stack(EncoderBlock, cfg, cfg.encoder_depth, (nn.broadcast, nn.broadcast), name="layers")(
        x_BSD, bias_BNSS, mask_BSS)
    return RMSNorm(cfg.norm_eps, name="final_norm")(x_BSD)


class Decoder(nn.Module):
  cfg: T5Config

  def setup(self):
    cfg = self.cfg
    self.relpos_bias = _bias_table(self, cfg)
    self.cross_kv_einsum = self.param(
        "cross_kv_einsum", lambda *a: {"w": nn.initializers.normal(stddev=cfg.width ** -0.5)(*a)},
        (cfg.decoder_depth, 2, cfg.num_heads, cfg.width, cfg.head_dim))
    self.layers = layer_stack(DecoderBlock, cfg, (0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                              cfg.decoder_depth)
    self.final_norm = RMSNorm(cfg.norm_eps, name="final_norm")

  def cross_kv(self, enc_BSD):
    """Every layer's cross-attention {"cross_k", "cross_v"}: heads-major [L,B,N,S,H] each (as `attend` takes
    them), or a list of L dicts of [B,N,S,H] with per-layer decoder weights."""
    w = self.cross_kv_einsum["w"].astype(jnp.dtype(self.cfg.dtype))  # [L,2,N,D,H]
    kv_L2BNSH = dense(enc_BSD, jnp.moveaxis(w, 3, 0)).transpose(2, 3, 0, 4, 1, 5)  # one GEMM, [D,L,2,N,H] weight
    if not self.cfg.stacked_layers:
      return [{"cross_k": kv_L2BNSH[i, 0], "cross_v": kv_L2BNSH[i, 1]} for i in range(self.cfg.decoder_depth)]
    return {"cross_k": kv_L2BNSH[:, 0], "cross_v": kv_L2BNSH[:, 1]}

  def __call__(self, y_BTD, kv, cross_mask_BTS, query_pos_T, cache_index=0):
    """Final-normed hidden [B,T,D] and the updated {"self_k", "self_v"} (a list of them with per-layer weights;
    None without a cache in `kv`).

    Causal self-attention: query at position p sees keys at positions <= p (the cache slots when cached).
    """
    first = kv[0] if isinstance(kv, list) else kv
    key_pos_S = jnp.arange(first["self_k"].shape[-2]) if "self_k" in first else query_pos_T  # C: kv_cache_shape
    bias_1NTS = relative_bias(self.relpos_bias, query_pos_T[None], key_pos_S[None], bidirectional=False,
                              cfg=self.cfg)
    mask_1TS = key_pos_S[None, None, :] <= query_pos_T[None, :, None]
    x_BTD, new_self = run_layers(self.layers, y_BTD, kv, bias_1NTS, mask_1TS, cross_mask_BTS, cache_index)
    return self.final_norm(x_BTD), new_self


class Embedder(nn.Module):
  cfg: T5Config

  def setup(self):
    self.input_embedding = self.param("input_embedding", nn.initializers.normal(stddev=1.0),
                                      (self.cfg.vocab_size, self.cfg.width))

  def encode(self, tokens_BT):
    # T5 does not scale its embeddings.
    return jnp.asarray(self.input_embedding)[tokens_BT].astype(jnp.dtype(self.cfg.dtype))


class T5(nn.Module):
  """Encoder-decoder: `embed`, `encode`, then `decode` (teacher-forced) or `init_cache` + `extend` (cached)."""
  cfg: T5Config

  def setup(self):
    cfg = self.cfg
    self.embedder = Embedder(cfg, name="embedder")
    self.encoder = Encoder(cfg, name="encoder")
    self.decoder = Decoder(cfg, name="decoder")
    if not cfg.tie_embeddings:
      self.lm_head = self.param("lm_head", nn.initializers.normal(stddev=cfg.width ** -0.5),
                                (cfg.vocab_size, cfg.width))

  def embed(self, tokens_BT):
    """[B,T,D] token embeddings (in cfg.dtype, unscaled), for the encoder or the decoder."""
    return self.embedder.encode(tokens_BT)

  def encode(self, x_BSD, valid_BS, positions_BS=None):
    """Encoder output [B,S,D] (final-normed) for embedded inputs x_BSD, bidirectional over the valid tokens
    (valid_BS). positions_BS (default: the index, as transformers) drive the relative position bias.
    """
    positions_BS = jnp.arange(x_BSD.shape[1])[None] if positions_BS is None else positions_BS
    mask_B1S = valid_BS.astype(bool)[:, None, :]  # every query sees the same keys
    return self.encoder(x_BSD.astype(jnp.dtype(self.cfg.dtype)), positions_BS, mask_B1S)

  def logits(self, h_BTD):
    """float32 [B,T,V] vocab logits from final-normed decoder output."""
    cfg = self.cfg
    if cfg.scales_output:
      h_BTD = h_BTD * jnp.asarray(cfg.width ** -0.5, h_BTD.dtype)
    w_VD = self.embedder.input_embedding if cfg.tie_embeddings else self.lm_head
    return jnp.einsum("BTD,VD->BTV", h_BTD, w_VD.astype(h_BTD.dtype), preferred_element_type=jnp.float32)

  def decode(self, y_BTD, enc_BSD, enc_valid_BS):
    """Teacher-forced decoder pass: float32 logits [B,T,V] for embedded decoder inputs y_BTD at positions 0..T-1
    (decoder start token, then the target shifted right)."""
    dtype = jnp.dtype(self.cfg.dtype)
    h_BTD, _ = self.decoder(y_BTD.astype(dtype), self.decoder.cross_kv(enc_BSD.astype(dtype)),
                            enc_valid_BS.astype(bool)[:, None, :], jnp.arange(y_BTD.shape[1]))
    return self.logits(h_BTD)

  def init_cache(self, enc_BSD, enc_valid_BS, cache_size: int):
    """A decoder cache of `cache_size` self-attention slots with every layer's cross-attention keys / values."""
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    cross = self.decoder.cross_kv(enc_BSD.astype(dtype))
    shape = kv_cache_shape(enc_BSD.shape[0], cfg.num_heads, cache_size, cfg.head_dim)
    if cfg.stacked_layers:
      shape = (cfg.decoder_depth, *shape)
    zeros = lambda: {"self_k": jnp.zeros(shape, dtype), "self_v": jnp.zeros(shape, dtype)}
    kv = [{**zeros(), **c} for c in cross] if isinstance(cross, list) else {**zeros(), **cross}
    return {"kv": kv, "enc_valid": enc_valid_BS.astype(bool), "index": jnp.asarray(0, jnp.int32)}

  def extend(self, tokens_BT, cache):
    """Appends T decoder tokens per row at the shared cache index: (float32 logits [B,T,V], new cache)."""
    t = tokens_BT.shape[1]
    h_BTD, new_self = self.decoder(self.embed(tokens_BT), cache["kv"], cache["enc_valid"][:, None, :],
                                   cache["index"] + jnp.arange(t), cache["index"])
    kv = ([{**old, **new} for old, new in zip(cache["kv"], new_self)] if isinstance(new_self, list)
          else {**cache["kv"], **new_self})
    cache = {"kv": kv, "enc_valid": cache["enc_valid"], "index": cache["index"] + t}
    return self.logits(h_BTD), cache

  def __call__(self, enc_tokens_BS, enc_valid_BS, dec_tokens_BT):
    """Text-only forward pass: logits [B,T,V] of decoder inputs dec_tokens_BT given encoder tokens."""
    enc_BSD = self.encode(self.embed(enc_tokens_BS), enc_valid_BS)
    return self.decode(self.embed(dec_tokens_BT), enc_BSD, enc_valid_BS)


def init_params(cfg: T5Config, seed: int = 0):
  """Random params {"params": ...} of a text-only T5 (the tests' bridge to transformers' T5; a VLM's come from
  `vlm.init_params`)."""

  @jax.jit
  def init(rng):
    tokens = jnp.zeros((1, 2), jnp.int32)
    return T5(cfg).init(rng, tokens, jnp.ones((1, 2), jnp.int32), tokens)
  return init(jax.random.key(seed))
