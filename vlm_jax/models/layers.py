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


def remat_block(block_cls, remat: str):
  if remat == "none":
    return block_cls
  policies = {"full": None, "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims}
  if remat not in policies:
    raise ValueError(f"Unknown remat policy {remat!r}; use none | full | dots.")
  return nn.remat(block_cls, prevent_cse=False, policy=policies[remat])


def layer_stack(block_cls, cfg, in_axes: tuple):
  """`cfg.depth` copies of `block_cls(cfg)`, run by `run_layers`. With `cfg.stacked_layers` (training, checkpoints)
  one `nn.scan` whose params have a leading [depth] axis; otherwise a list of blocks, each with its own params
  (`layers_0`, `layers_1`, ...: see `unstack_layers`). The decode loop uses the list: a scan slices every layer's
  weights out of the stacked arrays at each step, which costs a copy of all weights per generated token."""
  block = remat_block(block_cls, cfg.remat)
  if cfg.stacked_layers:
    return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=in_axes,
                   length=cfg.depth, unroll=cfg.scan_unroll)(cfg)
  return [block(cfg) for _ in range(cfg.depth)]


def run_layers(layers, x, xs, *broadcast):
  """x, xs -> x, ys through a `layer_stack`; xs / ys leaves have a leading [depth] axis either way."""
  if not isinstance(layers, (list, tuple)):
    return layers(x, xs, *broadcast)
  ys = []
  for i, layer in enumerate(layers):
    x, y = layer(x, jax.tree.map(lambda a: a[i], xs), *broadcast)
    ys.append(y)
  return x, jax.tree.map(lambda *a: jnp.stack(a), *ys)


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


def attend(q_BTNH, k_BSKH, v_BSKH, mask_BTS, dtype, logits_softcap=None):
  """Masked softmax attention with grouped KV heads (N query heads, K | N key / value heads): float32 logits
  (capped by `logits_softcap` if set), masked keys at NEG_INF. Returns [B, T, N, H]."""
  b, t, n, h = q_BTNH.shape
  k = k_BSKH.shape[2]
  if k == 1:  # MQA: the queries of all heads are rows of one [B, T*N, H] matrix; no transposes around the GEMMs
    logits_BTNS = jnp.einsum("BMH,BSH->BMS", q_BTNH.reshape(b, t * n, h), k_BSKH[:, :, 0],
                             preferred_element_type=jnp.float32).reshape(b, t, n, -1)
    logits_BTNS = jnp.where(mask_BTS[:, :, None], softcap(logits_BTNS, logits_softcap), NEG_INF)
    probs_BMS = jax.nn.softmax(logits_BTNS, axis=-1).astype(dtype).reshape(b, t * n, -1)
    return jnp.einsum("BMS,BSH->BMH", probs_BMS, v_BSKH[:, :, 0]).reshape(b, t, n, h)
  q_BTKGH = q_BTNH.reshape(b, t, k, n // k, h)
  logits_BKGTS = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32)
  logits_BKGTS = jnp.where(mask_BTS[:, None, None], softcap(logits_BKGTS, logits_softcap), NEG_INF)
  probs_BKGTS = jax.nn.softmax(logits_BKGTS, axis=-1).astype(dtype)
  return jnp.einsum("BKGTS,BSKH->BTKGH", probs_BKGTS, v_BSKH).reshape(b, t, n, h)


def update_cache(cache, k_BTKH, v_BTKH, cache_index, dtype):
  """Writes the new keys / values at `cache_index`: (new cache, all keys, all values) in the compute dtype; without
  a cache (a full pass), (None, the new keys, the new values)."""
  if cache is None:
    return None, k_BTKH, v_BTKH
  new = {name: jax.lax.dynamic_update_slice_in_dim(cache[name], x.astype(cache[name].dtype), cache_index, axis=1)
         for name, x in (("k", k_BTKH), ("v", v_BTKH))}
  return new, new["k"].astype(dtype), new["v"].astype(dtype)
