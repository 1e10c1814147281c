"""THE decode loop: one prefill pass (image + prefix) fills the KV cache, then a `lax.while_loop` extends one
token per step on device and stops in-graph once every row is done (no host sync per token).

Everyone decodes through `decode`: `Model.generate_ids` / `generate`, the evaluators, `tools/predict.py` and
training-time evaluation. Strategies (`Sampling`): greedy; sampling with temperature / top-k / top-p; best-of-n
(n samples per row, the best-scoring kept); beam search. Each is compiled once per (batch, prefix length,
max_new_tokens, options) bucket: callers pad batches and prefixes to fixed buckets so later batches reuse it.

The loops (`sample_loop`, `beam_loop`) are pure functions of an `extend(tokens_B, cache) -> (logits_BV, cache)`
step, so they serve any model family whose cache follows one layout rule (see `cache_batch_axis`).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp

from vlm_jax.models.vlm import VLMConfig, model_for, per_layer


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How tokens are picked.

  temperature 0 (the default) is greedy; top_k 0 and top_p 1 are off. best_of > 1 draws that many samples per
  row and keeps the one with the best score; beam_size > 1 runs beam search (deterministic). Scores (for
  best-of and beam search) are the summed log-probabilities of the generated tokens (EOS included) under the
  model, divided by length ** length_penalty, as in transformers.
  """
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  best_of: int = 1
  beam_size: int = 1
  length_penalty: float = 1.0

  def __post_init__(self):
    if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1 or self.best_of < 1 or self.beam_size < 1:
      raise ValueError(f"Invalid sampling options {self}: need temperature >= 0, top_k >= 0, 0 < top_p <= 1, "
                       "best_of >= 1, beam_size >= 1.")
    if self.beam_size > 1 and (self.temperature or self.top_k or self.top_p < 1 or self.best_of > 1):
      raise ValueError("beam search is deterministic: it takes no temperature, top_k, top_p or best_of.")
    if self.best_of > 1 and not self.stochastic:
      raise ValueError("best_of needs sampling (a temperature > 0): greedy draws would all be the same.")

  @property
  def stochastic(self) -> bool:
    return self.temperature > 0 and self.top_k != 1

  @classmethod
  def make(cls, sampler: str = "greedy", **kw) -> "Sampling":
    """sampler: "greedy" | "sample" (temperature defaults to 1) | "beam" (beam_size defaults to 4)."""
    kw = {k: v for k, v in kw.items() if v is not None}
    if sampler == "greedy":  # the options below would change nothing: an error, not a silent no-op
      if (kw.get("temperature", 0.0) or kw.get("top_k", 0) or kw.get("top_p", 1.0) < 1 or kw.get("beam_size", 1) > 1
          or kw.get("best_of", 1) > 1):
        raise ValueError("sampler='greedy' takes no temperature, top_k, top_p, beam_size or best_of; use 'sample' "
                         "or 'beam'.")
      return cls(**kw)
    if sampler == "sample":
      if kw.get("beam_size", 1) > 1:
        raise ValueError("sampler='sample' takes no beam_size; use sampler='beam' for beam search.")
      return cls(**{"temperature": 1.0, **kw})
    if sampler == "beam":
      return cls(**{"beam_size": 4, **kw})
    raise ValueError(f"Unknown sampler {sampler!r}; use 'greedy', 'sample' or 'beam'.")


# What an evaluator config (or generate's keyword arguments) may say about sampling: Sampling.make's arguments
# and the seed.
SAMPLING_KEYS = ("sampler", *(f.name for f in dataclasses.fields(Sampling)), "seed")


def argmax(logits_BV):
  """int32 [B]: jnp.argmax over the last axis (the first index of the maximum), as two single-output reductions:
  XLA CPU vectorizes a max and a min, not argmax's (value, index) pair reduction, which costs ~8x as much over a
  batch of 32k-vocabulary rows (0.8 ms of a ~15 ms batch-8 step)."""
  max_B1 = jnp.max(logits_BV, axis=-1, keepdims=True)
  v = logits_BV.shape[-1]
  first_B = jnp.min(jnp.where(logits_BV == max_B1, jnp.arange(v, dtype=jnp.int32), v), axis=-1)
  return jnp.where(first_B == v, 0, first_B)  # a NaN row (nothing equals its max): token 0, not out of range


def order_keys(x):
  """uint32 keys in the order of the float32 values x: -inf lowest, +inf highest (the sign bit flipped for
  positive values, every bit for negative ones; -0 is taken as 0)."""
  x = x.astype(jnp.float32)
  bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.uint32)
  return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def largest_key(ok, rows: int):
  """uint32 [rows]: per row the largest key t with ok(t_R1) true (ok: [rows, 1] keys -> [rows] bool, true up to
  some key and false above it), set bit by bit from the top: 32 vectorized passes. 0 where ok(1) is false."""
  def step(i, t_R):
    cand_R = t_R | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
    return jnp.where(ok(cand_R[:, None]), cand_R, t_R)
  return jax.lax.fori_loop(0, 32, step, jnp.zeros((rows,), jnp.uint32))


def filter_logits(logits_BV, sampling: Sampling):
  """float32 logits / temperature, -inf outside each row's top_k and top_p sets (ties at a cut are kept).

  Both cuts are found by bisection on the logits' `order_keys`, not by sorting the vocabulary: XLA CPU's sort
  (what lax.top_k runs for k > 1) took 4.7 ms a row over a 32k vocabulary, 38 ms for 8 rows, more than a whole
  decode step of a 50M model; the 32 passes take 0.15 / 1.9 ms. The same sets as sorting: top_k keeps the values
  >= the k-th largest; top_p keeps the fewest top tokens whose probability mass reaches top_p, i.e. the values
  above the largest cut whose mass beyond it still reaches top_p.
  """
  logits_BV = logits_BV / sampling.temperature
  b = logits_BV.shape[0]
  if sampling.top_k:
    keys_BV = order_keys(logits_BV)
    # Counted in float32 (exact below 2^24 tokens): XLA CPU vectorizes that sum better than an integer one.
    count = lambda t_B1: jnp.sum((keys_BV >= t_B1).astype(jnp.float32), axis=-1)
    kth_B1 = largest_key(lambda t_B1: count(t_B1) >= sampling.top_k, b)[:, None]
    logits_BV = jnp.where(keys_BV >= kth_B1, logits_BV, -jnp.inf)
  if sampling.top_p < 1.0:
    keys_BV, probs_BV = order_keys(logits_BV), jax.nn.softmax(logits_BV, axis=-1)
    mass_above = lambda t_B1: jnp.sum(jnp.where(keys_BV > t_B1, probs_BV, 0.0), axis=-1)
    cut_B1 = largest_key(lambda t_B1: mass_above(t_B1) >= sampling.top_p, b)[:, None]
    logits_BV = jnp.where(keys_BV > cut_B1, logits_BV, -jnp.inf)
  return logits_BV


def invert_cdf(weights_BV, u_B):
  """int32 [B]: per row the first positive-weight index whose cumulative weight exceeds u_B * total weight (u in
  [0, 1)), i.e. index i with probability weights[i] / total; never a zero-weight index (a token top-k, top-p or
  the logits mask removed): XLA's cumsum is not exactly flat across zero weights, so they are excluded by name,
  and where u * total rounds up past the last cumulative value the last positive-weight index is taken."""
  cdf_BV = jnp.cumsum(weights_BV, axis=-1)
  index_V = jnp.arange(weights_BV.shape[-1])
  hit_BV = (weights_BV > 0) & (cdf_BV > (u_B * cdf_BV[:, -1])[:, None])
  first_B = jnp.min(jnp.where(hit_BV, index_V, weights_BV.shape[-1]), axis=-1)
  last_B = jnp.max(jnp.where(weights_BV > 0, index_V, 0), axis=-1)
  return jnp.minimum(first_B, last_B).astype(jnp.int32)


def categorical(keys_B, logits_BV):
  """int32 [B]: row b drawn from softmax(logits_BV[b]) with key keys_B[b], from one uniform per row (`invert_cdf`).
  jax.random.categorical draws Gumbel noise for every vocabulary entry instead: 32k random numbers a row and step,
  0.75 ms a row on CPU (3.9 ms for 8) against 0.13 ms (0.73)."""
  u_B = jax.vmap(jax.random.uniform)(keys_B)
  return invert_cdf(jnp.exp(logits_BV - jnp.max(logits_BV, axis=-1, keepdims=True)), u_B)


def sample_token(logits_BV, keys_B, sampling: Sampling):
  """int32 [B] next tokens from float32 logits, row b drawn with its own key keys_B[b]."""
  if not sampling.stochastic:
    return argmax(logits_BV)
  return categorical(keys_B, filter_logits(logits_BV, sampling))


def fold_rows(key, rows_B):
  """[B] keys fold_in(key, r) for the row numbers rows_B: the key of each row of a batch."""
  return jax.vmap(jax.random.fold_in, (None, 0))(key, rows_B)


def row_keys(rng, b: int):
  """[b] per-row keys from `rng`: one key (row r gets fold_in(rng, r)), or already one per row. Raw key data
  (uint32 [2] or [b, 2], e.g. placed on a mesh) is accepted too. A row's samples then depend on its key alone,
  not on the other rows of its batch or on how many there are."""
  if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.wrap_key_data(rng)
  if rng.ndim == 0:
    return fold_rows(rng, jnp.arange(b))
  if rng.shape != (b,):
    raise ValueError(f"rng must be one key or one key per row ({b}), got shape {rng.shape}.")
  return rng


def length_normalized(logp, length, length_penalty: float):
  return logp / jnp.maximum(length, 1).astype(jnp.float32) ** length_penalty


def cache_batch_axis(path, leaf):
  """The cache layout rule: scalars are shared; leaves under "kv" are [layers, batch, ...], or [batch, ...] where
  "kv" holds a list of per-layer caches; others are [batch, ...]."""
  if leaf.ndim == 0:
    return None
  keys = [getattr(k, "key", None) for k in path]
  if "kv" not in keys:
    return 0
  return 0 if isinstance(path[keys.index("kv") + 1], jax.tree_util.SequenceKey) else 1


def gather_cache(cache, rows_B):
  """The cache with its batch rows replaced by rows `rows_B` (int32 [B']) of the old one."""
  def take(path, leaf):
    axis = cache_batch_axis(path, leaf)
    return leaf if axis is None else jnp.take(leaf, rows_B, axis=axis)
  return jax.tree_util.tree_map_with_path(take, cache)


def _masked_logits(logits_BV, logits_mask_V):
  return logits_BV if logits_mask_V is None else jnp.where(logits_mask_V[None], logits_BV, -jnp.inf)


def loop_carry(cache):
  """(squeeze, restore): the cache as a while loop carries it, its arrays without their size-1 axes, and back.
  Where the attention GEMM drops a size-1 axis of the updated cache (the batch axis at batch 1), XLA CPU copies
  the cache at every step, the update going both to the carry and to the GEMM's view; a carry already in that
  view leaves one copy of each array. 8 kv heads at batch 1: 7.8-8.3 -> 6.3-6.5 ms a token. (Beams never run
  with one row.)"""
  shapes = jax.tree.map(jnp.shape, cache)
  squeeze = lambda c: jax.tree.map(lambda x: x.reshape([d for d in x.shape if d != 1]), c)
  restore = lambda c: jax.tree.map(lambda x, shape: x.reshape(shape), c, shapes)
  return squeeze, restore


def sample_loop(extend, logits_BV, cache, rng, *, max_new_tokens: int, sampling: Sampling, eos_id: int,
                pad_id: int, logits_mask_V=None):
  """Greedy / sampled decoding. Returns (tokens int32 [B,N] with pad after EOS, summed log-probs [B], lengths [B]).

  extend(tokens_B, cache) -> (logits_BV, cache); logits_BV are the logits for the first new token. rng: see
  `row_keys` (step s of row r samples with fold_in(key of row r, s)).
  """
  b = logits_BV.shape[0]
  keys_B = row_keys(rng, b) if sampling.stochastic else None

  def pick(step, logits_BV, out_BN, done_B, logp_B, len_B):
    """Token `step` of every row from its logits: (token_B, out_BN, done_B, logp_B, len_B) updated."""
    logits_BV = _masked_logits(logits_BV.astype(jnp.float32), logits_mask_V)
    step_keys_B = None if keys_B is None else jax.vmap(jax.random.fold_in, (0, None))(keys_B, step)
    token_B = jnp.where(done_B, pad_id, sample_token(logits_BV, step_keys_B, sampling))
    token_logp_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BV), token_B[:, None], axis=-1)[:, 0]
    logp_B = logp_B + jnp.where(done_B, 0.0, token_logp_B)
    len_B = len_B + (~done_B).astype(jnp.int32)
    out_BN = jax.lax.dynamic_update_slice_in_dim(out_BN, token_B[:, None], step, axis=1)
    return token_B, out_BN, done_B | (token_B == eos_id), logp_B, len_B

  def cond(state):
    step, _, _, done_B, *_ = state
    return (step < max_new_tokens) & ~jnp.all(done_B)

  squeeze, restore = loop_carry(cache)

  def body(state):  # extend by the last token, then pick the next one: no extend runs after the final token
    step, token_B, *picked, carry = state
    logits_BV, cache = extend(token_B, restore(carry))
    return step + 1, *pick(step, logits_BV, *picked), squeeze(cache)

  state = (jnp.int32(1), *pick(0, logits_BV, jnp.full((b, max_new_tokens), pad_id, jnp.int32),
                               jnp.zeros((b,), bool), jnp.zeros((b,), jnp.float32), jnp.zeros((b,), jnp.int32)),
           squeeze(cache))
  _, _, out_BN, _, logp_B, len_B, _ = jax.lax.while_loop(cond, body, state)
  return out_BN, logp_B, len_B


def beam_loop(extend, logits_BV, cache, *, beam_size: int, max_new_tokens: int, length_penalty: float,
              eos_id: int, pad_id: int, logits_mask_V=None):
  """Beam search. Returns (best tokens int32 [B,N] with pad after EOS, their scores [B]).

  Keeps `beam_size` alive beams and the `beam_size` best finished hypotheses per row. As in transformers, an
  EOS candidate becomes a hypothesis only if it ranks within the top `beam_size` of the step's 2 * beam_size
  candidates (so beam size 1 is greedy), and a row stops once no alive beam can still beat its worst
  hypothesis: transformers' `early_stopping="never"`, the exact rule. Its default (`early_stopping=False`) stops
  when the best alive beam scored at its current length is no better, which with length_penalty > 0 can end the
  search before a better hypothesis appears. Beams cut at max_new_tokens compete with the hypotheses at the end.
  """
  b, v = logits_BV.shape
  w, n = beam_size, max_new_tokens
  cache = gather_cache(cache, jnp.repeat(jnp.arange(b), w))  # rows b*w .. b*w+w-1 are row b's beams
  logits_BWV = jnp.repeat(logits_BV, w, axis=0)
  neg_inf = jnp.float32(-jnp.inf)
  alive_logp_BW = jnp.where(jnp.arange(w) == 0, 0.0, neg_inf)[None].repeat(b, 0)  # one live beam at the start
  seqs_BWN = jnp.full((b, w, n), pad_id, jnp.int32)
  fin_score_BW = jnp.full((b, w), neg_inf)

  def best_possible(step, alive_logp_BW):
    """Upper bound on any score an alive beam can still reach: logp only falls, the length is in [step+2, n]."""
    best_B = jnp.max(alive_logp_BW, axis=-1)
    lengths = jnp.stack([jnp.minimum(step + 2, n), jnp.int32(n)])
    return jnp.max(length_normalized(best_B[None], lengths[:, None], length_penalty), axis=0)

  def cond(state):
    step, _, alive_logp_BW, _, fin_score_BW, *_ = state
    done_B = (fin_score_BW[:, -1] > neg_inf) & (best_possible(step - 1, alive_logp_BW) < fin_score_BW[:, -1])
    return (step < n) & ~jnp.all(done_B)

  def body(state):
    step, seqs_BWN, alive_logp_BW, fin_BWN, fin_score_BW, logits_BWV, cache = state
    logp_BWV = jax.nn.log_softmax(_masked_logits(logits_BWV.astype(jnp.float32), logits_mask_V))
    cand_BK = (alive_logp_BW[:, :, None] + logp_BWV.reshape(b, w, v)).reshape(b, w * v)
    cand_logp_BC, cand_idx_BC = jax.lax.top_k(cand_BK, 2 * w)
    parent_BC, token_BC = cand_idx_BC // v, (cand_idx_BC % v).astype(jnp.int32)
    cand_seqs_BCN = jnp.take_along_axis(seqs_BWN, parent_BC[:, :, None], axis=1)
    cand_seqs_BCN = jax.lax.dynamic_update_slice_in_dim(cand_seqs_BCN, token_BC[:, :, None], step, axis=2)
    is_eos_BC = token_BC == eos_id
    # New hypotheses: EOS candidates among the top w; merged with the old ones, the best w are kept.
    new_fin_BC = jnp.where(is_eos_BC & (jnp.arange(2 * w) < w), length_normalized(cand_logp_BC, step + 1,
                                                                                   length_penalty), neg_inf)
    all_score = jnp.concatenate([fin_score_BW, new_fin_BC], axis=1)
    fin_score_BW, keep_BW = jax.lax.top_k(all_score, w)
    fin_BWN = jnp.take_along_axis(jnp.concatenate([fin_BWN, cand_seqs_BCN], axis=1), keep_BW[:, :, None], axis=1)
    # New alive beams: the best w candidates that did not end.
    alive_logp_BW, pick_BW = jax.lax.top_k(jnp.where(is_eos_BC, neg_inf, cand_logp_BC), w)
    seqs_BWN = jnp.take_along_axis(cand_seqs_BCN, pick_BW[:, :, None], axis=1)
    rows = (jnp.arange(b)[:, None] * w + jnp.take_along_axis(parent_BC, pick_BW, axis=1)).reshape(-1)
    logits_BWV, cache = extend(jnp.take_along_axis(token_BC, pick_BW, axis=1).reshape(-1), gather_cache(cache, rows))
    return step + 1, seqs_BWN, alive_logp_BW, fin_BWN, fin_score_BW, logits_BWV, cache

  state = (jnp.int32(0), seqs_BWN, alive_logp_BW, seqs_BWN, fin_score_BW, logits_BWV, cache)
  step, seqs_BWN, alive_logp_BW, fin_BWN, fin_score_BW, *_ = jax.lax.while_loop(cond, body, state)
  # Beams that reached the length limit count as hypotheses; beams stopped early cannot win anyway.
  cut_BW = jnp.where(step >= n, length_normalized(alive_logp_BW, n, length_penalty), neg_inf)
  all_score = jnp.concatenate([fin_score_BW, cut_BW], axis=1)
  best_B = jnp.argmax(all_score, axis=1)
  best_BN = jnp.take_along_axis(jnp.concatenate([fin_BWN, seqs_BWN], axis=1), best_B[:, None, None], axis=1)[:, 0]
  return best_BN, jnp.take_along_axis(all_score, best_B[:, None], axis=1)[:, 0]


def prefill(cfg: VLMConfig, params, images_BHWC, prefix_BT, prefix_mask_BT, max_new_tokens: int):
  """The loop's start: image and prefix in one pass, filling a KV cache with room for `max_new_tokens`. Returns
  (logits of each row's first new token [B, V], the cache, extend), extend(token_B, cache) -> (logits_BV, cache)
  running one step."""
  # Each layer's weights and KV cache live in arrays of their own, split off once here: slicing them out of
  # stacked [depth, ...] arrays inside the loop would copy every weight and the whole cache at every step.
  cfg, params = per_layer(cfg, params)
  model = model_for(cfg)
  logits_BV, cache = model.apply(params, images_BHWC, prefix_BT, prefix_mask_BT, max_new_tokens, method="start")

  def extend(token_B, cache):
    logits_B1V, cache = model.apply(params, token_B[:, None], cache, method="extend")
    return logits_B1V[:, 0], cache
  return logits_BV, cache, extend


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "sampling", "eos_id", "pad_id",
                                             "return_scores"))
def decode(cfg: VLMConfig, params, images_BHWC, prefix_BT, prefix_mask_BT, rng, *, max_new_tokens: int,
           sampling: Sampling = Sampling(), eos_id: int = 1, pad_id: int = 0, logits_mask_V=None,
           return_scores: bool = False):
  """Generates up to `max_new_tokens` per row after a (possibly ragged, right-padded) prefix.

  prefix_BT: int32 text tokens (BOS, prompt, separator), rows padded on the right; prefix_mask_BT marks the
  real ones. logits_mask_V (optional bool [V]) restricts which tokens may be produced. rng (used by sampling
  only): one jax key, row r then sampling with fold_in(rng, r), or one key per row (`row_keys`). Returns int32
  [B, max_new_tokens], positions after EOS filled with `pad_id`, and with return_scores also float32 [B] scores
  (see `Sampling`).
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
  logits_BV, cache, extend = prefill(cfg, params, images_BHWC, prefix_BT, prefix_mask_BT, max_new_tokens)
  common = dict(max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id, logits_mask_V=logits_mask_V)
  if sampling.beam_size > 1:
    out_BN, score_B = beam_loop(extend, logits_BV, cache, beam_size=sampling.beam_size,
                                length_penalty=sampling.length_penalty, **common)
  elif sampling.best_of > 1:
    b, k = logits_BV.shape[0], sampling.best_of
    rows = jnp.repeat(jnp.arange(b), k)  # rows b*k .. b*k+k-1 are row b's samples
    keys_R = jax.vmap(jax.random.fold_in)(row_keys(rng, b)[rows], jnp.tile(jnp.arange(k), b))
    out_RN, logp_R, len_R = sample_loop(extend, logits_BV[rows], gather_cache(cache, rows), keys_R,
                                        sampling=sampling, **common)
    score_BK = length_normalized(logp_R, len_R, sampling.length_penalty).reshape(b, k)
    best_B = jnp.argmax(score_BK, axis=1)
    out_BN = out_RN.reshape(b, k, -1)[jnp.arange(b), best_B]
    score_B = score_BK[jnp.arange(b), best_B]
  else:
    out_BN, logp_B, len_B = sample_loop(extend, logits_BV, cache, rng, sampling=sampling, **common)
    score_B = length_normalized(logp_B, len_B, sampling.length_penalty)
  return (out_BN, score_B) if return_scores else out_BN
