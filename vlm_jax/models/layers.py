"""Building blocks every model family shares: projections with a CPU-friendly backward, remat policies, and the
layer stack (params stacked under one `nn.scan` for training, or one subtree per layer for the decode loop)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


@jax.custom_vjp
def matmul(x_MK, w_KN):
  """x @ w for a projection: activations [M, K] (rows are tokens) times a weight [K, N].

  Same forward as `x @ w`. Left to autodiff, the weight gradient dW = x^T @ dy has its contracting dimension
  major in both operands, which XLA CPU's fast (YNNPACK) dot does not take: it falls back to a slower Eigen dot
  and may transpose the larger operand (e.g. the [M, 4K] MLP activation gradient) to feed it. When x is the
  narrower operand (K <= N), the backward here transposes x explicitly (a barrier keeps XLA from folding the
  transpose back into the dot) and computes dW as a plain row-major GEMM.
  """
  return x_MK @ w_KN


def _matmul_fwd(x_MK, w_KN):
  return x_MK @ w_KN, (x_MK, w_KN)


def _matmul_bwd(res, dy_MN):
  x_MK, w_KN = res
  if x_MK.shape[1] <= dy_MN.shape[1]:
    dw_KN = jax.lax.optimization_barrier(x_MK.T) @ dy_MN
  else:  # transposing the wider x costs more than the slower dot saves
    dw_KN = jnp.einsum("MK,MN->KN", x_MK, dy_MN)
  return dy_MN @ w_KN.T, dw_KN


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dense(x, w, n_contract: int = 1):
  """x [..., *C] times w [*C, *F] over the n_contract trailing dims of x -> [..., *F], through `matmul`."""
  lead, k = x.shape[:x.ndim - n_contract], int(np.prod(x.shape[x.ndim - n_contract:]))
  out = matmul(x.reshape(-1, k), w.reshape(k, -1))
  return out.reshape(*lead, *w.shape[n_contract:])


def dense_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
  """`dot_general` for flax Dense / DenseGeneral: trailing dims of the input against leading dims of the kernel
  go through `dense`; anything else is plain `lax.dot_general`."""
  (lhs_c, rhs_c), (lhs_b, rhs_b) = dimension_numbers
  n = len(lhs_c)
  if (lhs_b or rhs_b or precision is not None or preferred_element_type is not None
      or tuple(lhs_c) != tuple(range(lhs.ndim - n, lhs.ndim)) or tuple(rhs_c) != tuple(range(n))):
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type)
  return dense(lhs, rhs, n)


def constrain_batch(x):
  """x with its leading (batch) dim split as the input batch is (`sharding.batch_sharding`), the other dims left
  to XLA, when a mesh is set (`jax.set_mesh`: training, evaluation and a sharded `Model` set theirs) and its
  batch axes divide the batch. Each block's input goes through this: left alone on an fsdp mesh, XLA gathers
  the activations over fsdp and splits the weights' contraction instead, so that every device keeps the
  activations of its whole fsdp group and FSDP saves no activation memory."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  from vlm_jax import sharding
  axes = sharding.LOGICAL_TO_MESH["batch"]
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  if not set(axes) <= set(sizes) or x.shape[0] % sharding.axis_size(axes, sizes):
    return x
  P = jax.sharding.PartitionSpec
  return jax.lax.with_sharding_constraint(x, P(axes, *[P.UNCONSTRAINED] * (x.ndim - 1)))


def remat_block(block_cls, remat: str):
  if remat == "none":
    return block_cls
  policies = {"full": None, "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims}
  if remat not in policies:
    raise ValueError(f"Unknown remat policy {remat!r}; use none | full | dots.")
  return nn.remat(block_cls, prevent_cse=False, policy=policies[remat])


def scan_stack(block_cls, cfg, depth: int, in_axes=0, name: str | None = None):
  """`depth` copies of `block_cls(cfg)` as one `nn.scan`: params with a leading [depth] axis, `cfg.remat` per
  block, the loop unrolled by `cfg.scan_unroll`."""
  return nn.scan(remat_block(block_cls, cfg.remat), variable_axes={"params": 0}, split_rngs={"params": True},
                 in_axes=in_axes, length=depth, unroll=cfg.scan_unroll)(cfg, name=name)


def layer_stack(block_cls, cfg, in_axes: tuple, depth: int | None = None):
  """`depth` (default `cfg.depth`) copies of `block_cls(cfg)`, run by `run_layers`. With `cfg.stacked_layers`
  (training, checkpoints) a `scan_stack`; otherwise a list of blocks, each with its own params (`layers_0`,
  `layers_1`, ...: see `unstack_layers`). The decode loop uses the list: a scan slices every layer's weights out
  of the stacked arrays at each step, which costs a copy of all weights per generated token."""
  depth = cfg.depth if depth is None else depth
  if cfg.stacked_layers:
    return scan_stack(block_cls, cfg, depth, in_axes)
  block = remat_block(block_cls, cfg.remat)
  return [block(cfg) for _ in range(depth)]


def run_layers(layers, x, xs, *broadcast):
  """x, xs -> x, ys through a `layer_stack`. Stacked: xs / ys leaves have a leading [depth] axis. List: xs may
  also hold per-layer lists (entry i goes to layer i), and ys come back as a list of per-layer trees; the
  decode loop keeps its KV cache that way, so that no step slices or re-stacks the cache of every layer."""
  if not isinstance(layers, (list, tuple)):
    return layers(x, xs, *broadcast)
  ys = []
  for i, layer in enumerate(layers):
    x, y = layer(x, jax.tree.map(lambda a: a[i], xs, is_leaf=lambda n: isinstance(n, list)), *broadcast)
    ys.append(y)
  return x, ys


def unstack_layers(params: dict, depth: int, name: str = "layers") -> dict:
  """A stacked layer stack's params ({name: leaves [depth, ...]}) as the list layout ({name_0: ..., ...})."""
  params = dict(params)
  stacked = params.pop(name)
  return {**params, **{f"{name}_{i}": jax.tree.map(lambda a: a[i], stacked) for i in range(depth)}}


# ------------------------------------------------------------------------------------------ decoder attention

NEG_INF = -2.3819763e38  # big_vision's mask value: finite, so a fully masked row gives no NaN.


def softcap(x, cap):
  return x if cap is None else jnp.tanh(x / cap) * cap


def heads_matrix(w_MDH):
  """A per-head projection weight [heads, D, H] as one [D, heads * H] matrix."""
  m, d, h = w_MDH.shape
  return jnp.moveaxis(w_MDH, 1, 0).reshape(d, m * h)


def project(x_BTD, w_DXs, fuse: bool | None = None):
  """x times each [D, X_i] matrix of `w_DXs`: a list of [..., X_i].

  fuse: one GEMM over the matrices' concatenation (None: on CPU only). On CPU one large GEMM beats several, and
  the concatenation is hoisted out of the decode loop by XLA (the weights are loop-invariant), whereas a bare
  slice or transpose of a weight counts as too cheap to hoist and is copied again at every step. On
  accelerators separate GEMMs are as fast, and each keeps its weight's tensor-parallel sharding, which a
  concatenation of head- or mlp-sharded weights would reshuffle at every step.
  """
  if not (jax.default_backend() == "cpu" if fuse is None else fuse):
    return [dense(x_BTD, w) for w in w_DXs]
  splits = np.cumsum([w.shape[1] for w in w_DXs])[:-1].tolist()
  return jnp.split(dense(x_BTD, jnp.concatenate(w_DXs, axis=1)), splits, axis=-1)


def attend(q_BTNH, k_BKSH, v_BKSH, mask_BTS, dtype, logits_softcap=None, bias_BNTS=None):
  """Unscaled softmax attention (callers scale the queries) with grouped KV heads (N query heads, K | N key /
  value heads, given heads-major: [B, K, S, H], as `update_cache` returns them). float32 logits, plus
  `bias_BNTS` if given (T5's relative positions; its B may be 1), capped by `logits_softcap` if set; keys where
  `mask_BTS` is False at NEG_INF (None: no mask). Returns [B, T, N, H].

  The layouts suit XLA CPU, whose batched GEMMs want their batch dims leading: otherwise it transposes the
  operands around both GEMMs and runs the softmax over a strided [B, N, T, S] (3-4x the time at ~200 tokens).
  Keys and values come heads-major, so both GEMMs read them (the whole KV cache, in a decode step) in place.
  MQA (K = 1): the queries of all heads are rows of one [B, 1, T*N, H] matrix, with no transposes at all.
  Otherwise heads-major queries [B, K, G*T, H]: for one query token (a decode step) a free reshape, for several
  a transpose of the queries, far cheaper than the [B, N, T, S] work it saves.
  """
  b, t, n, h = q_BTNH.shape
  k, s = k_BKSH.shape[1:3]
  g = n // k

  def probs(logits, mask, bias):  # all three already in the logits' layout
    logits = softcap(logits if bias is None else logits + bias, logits_softcap)
    return jax.nn.softmax(logits if mask is None else jnp.where(mask, logits, NEG_INF), axis=-1).astype(dtype)

  if k == 1:
    logits_BTNS = jnp.einsum("BKMH,BKSH->BKMS", q_BTNH.reshape(b, 1, t * n, h), k_BKSH,
                             preferred_element_type=jnp.float32).reshape(b, t, n, s)
    probs_BTNS = probs(logits_BTNS, None if mask_BTS is None else mask_BTS[:, :, None],
                       None if bias_BNTS is None else jnp.swapaxes(bias_BNTS, 1, 2))
    return jnp.einsum("BKMS,BKSH->BKMH", probs_BTNS.reshape(b, 1, t * n, s), v_BKSH).reshape(b, t, n, h)
  mask_B11TS = None if mask_BTS is None else mask_BTS[:, None, None]
  bias_BKGTS = None if bias_BNTS is None else bias_BNTS.reshape(bias_BNTS.shape[0], k, g, t, s)
  q_BKMH = q_BTNH.reshape(b, t, k, g, h).transpose(0, 2, 3, 1, 4).reshape(b, k, g * t, h)
  logits_BKGTS = jnp.einsum("BKMH,BKSH->BKMS", q_BKMH, k_BKSH,
                            preferred_element_type=jnp.float32).reshape(b, k, g, t, s)
  probs_BKMS = probs(logits_BKGTS, mask_B11TS, bias_BKGTS).reshape(b, k, g * t, s)
  out_BKGTH = jnp.einsum("BKMS,BKSH->BKMH", probs_BKMS, v_BKSH).reshape(b, k, g, t, h)
  return out_BKGTH.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def kv_cache_shape(batch: int, kv_heads: int, slots: int, head_dim: int) -> tuple:
  """One layer's cache keys (or values): heads-major [B, K, C, H], or [B, C, H] with one kv head (MQA). See
  `update_cache`."""
  return (batch, slots, head_dim) if kv_heads == 1 else (batch, kv_heads, slots, head_dim)


def update_cache(cache, k_BTKH, v_BTKH, cache_index, dtype):
  """Writes the new keys / values at slot `cache_index` of a cache {"k", "v"} laid out as `kv_cache_shape`: (new
  cache, all keys [B, K, C, H], all values) in the compute dtype; without a cache (a full pass), (None, the new
  keys [B, K, T, H], the new values).

  The layout lets a decode step's attention GEMMs read the cache in place. XLA CPU transposes a [B, C, K, H] cache
  whole at every step; and where a size-1 axis is dropped for the GEMM, it writes the new slot twice (into the
  carried cache and into the GEMM's view of it), each time into a fresh copy of the whole cache. That still
  happens at batch 1, whose size-1 batch axis the GEMM drops whatever the layout (`decode.loop_carry` cuts it to
  one copy per array).
  """
  k_BKTH, v_BKTH = jnp.swapaxes(k_BTKH, 1, 2), jnp.swapaxes(v_BTKH, 1, 2)
  if cache is None:
    return None, k_BKTH, v_BKTH
  mqa = cache["k"].ndim == 3
  new = {name: jax.lax.dynamic_update_slice_in_dim(cache[name], (x[:, 0] if mqa else x).astype(cache[name].dtype),
                                                   cache_index, axis=1 if mqa else 2)
         for name, x in (("k", k_BKTH), ("v", v_BKTH))}
  heads_major = (lambda c: c[:, None]) if mqa else (lambda c: c)
  return new, heads_major(new["k"]).astype(dtype), heads_major(new["v"]).astype(dtype)


def check_heads(num_heads: int, num_kv_heads: int, head_dim: int):
  """What every decoder's attention needs of its config: query heads in whole groups per kv head, and an even
  head_dim for RoPE's split halves. Checked when a config is built, since a bad one otherwise fails deep inside
  a traced reshape."""
  if num_kv_heads < 1 or num_heads % num_kv_heads:
    raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}.")
  if head_dim % 2:
    raise ValueError(f"head_dim {head_dim} must be even for RoPE.")


def apply_rope(x_BTNH, positions_BT, inv_freq_h):
  """Rotary embedding, split-half convention (HF's rotate_half: the first half of H pairs with the second), at the
  inverse frequencies the model family defines (Gemma's from its base, Llama's rope_scaling too)."""
  angle_BTh = positions_BT[..., None].astype(jnp.float32) * jnp.asarray(inv_freq_h, jnp.float32)
  sin, cos = jnp.sin(angle_BTh)[:, :, None], jnp.cos(angle_BTh)[:, :, None]
  x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BTNH.dtype)
