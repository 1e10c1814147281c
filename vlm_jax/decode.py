"""THE decode loop: one prefill pass fills the KV cache, then a `lax.while_loop` extends one token per step
on device and stops in-graph once every row has produced EOS (no host sync per token).

Everyone decodes through `decode`: `Model.generate_ids` / `generate`, evaluation and prediction.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp

from vlm_jax.models.vlm import PaliGemma, VLMConfig


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is picked. temperature 0 (the default) is greedy; top_k 0 and top_p 1 are off."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
      raise ValueError(f"Invalid sampling options {self}: need temperature >= 0, top_k >= 0, 0 < top_p <= 1.")

  @classmethod
  def make(cls, sampler: str = "greedy", **kw) -> "Sampling":
    if sampler == "greedy":
      if kw.get("temperature", 0.0):
        raise ValueError("sampler='greedy' takes no temperature; use sampler='sample'.")
      return cls(**kw)
    if sampler == "sample":
      return cls(**{"temperature": 1.0, **kw})
    raise ValueError(f"Unknown sampler {sampler!r}; use 'greedy' or 'sample'.")


def sample_token(logits_BV, rng, sampling: Sampling):
  """int32 [B] next tokens from float32 logits."""
  if sampling.temperature == 0.0 or sampling.top_k == 1:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV / sampling.temperature
  if sampling.top_k:
    kth_B1 = jax.lax.top_k(logits_BV, sampling.top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if sampling.top_p < 1.0:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    cum_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
    # Keep the smallest set of top tokens whose mass reaches top_p (always at least the best one).
    n_keep_B1 = jnp.sum(cum_BV - jax.nn.softmax(sorted_BV, axis=-1) < sampling.top_p, axis=-1, keepdims=True)
    cutoff_B1 = jnp.take_along_axis(sorted_BV, n_keep_B1 - 1, axis=-1)
    logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
  return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "sampling", "eos_id", "pad_id"))
def decode(cfg: VLMConfig, params, images_BHWC, prefix_BT, prefix_mask_BT, rng, *, max_new_tokens: int,
           sampling: Sampling = Sampling(), eos_id: int = 1, pad_id: int = 0, logits_mask_V=None):
  """Generates `max_new_tokens` per row after a (possibly ragged, right-padded) prefix.

  prefix_BT: int32 text tokens (BOS, prompt, separator), rows padded on the right; prefix_mask_BT marks the
  real ones. logits_mask_V (optional bool [V]) restricts which tokens may be produced.
  Returns int32 [B, max_new_tokens], positions after EOS filled with `pad_id`.
  """
  model = PaliGemma(cfg)
  b, t = prefix_BT.shape
  mask_ar_BT = jnp.zeros_like(prefix_BT)
  n_img = 0 if images_BHWC is None else cfg.img.num_patches
  logits_BTV, cache = model.apply(params, images_BHWC, prefix_BT, mask_ar_BT, prefix_mask_BT,
                                  n_img + t + max_new_tokens, method=PaliGemma.prefill)
  last_B = jnp.sum(prefix_mask_BT, axis=-1) - 1
  logits_BV = jnp.take_along_axis(logits_BTV, last_B[:, None, None], axis=1)[:, 0]

  def cond(state):
    step, _, done_B, *_ = state
    return (step < max_new_tokens) & ~jnp.all(done_B)

  def body(state):
    step, out_BN, done_B, logits_BV, cache, rng = state
    rng, step_rng = jax.random.split(rng)
    if logits_mask_V is not None:
      logits_BV = jnp.where(logits_mask_V[None], logits_BV, -jnp.inf)
    token_B = jnp.where(done_B, pad_id, sample_token(logits_BV, step_rng, sampling))
    out_BN = jax.lax.dynamic_update_slice_in_dim(out_BN, token_B[:, None], step, axis=1)
    done_B = done_B | (token_B == eos_id)
    logits_B1V, cache = model.apply(params, token_B[:, None], cache, method=PaliGemma.extend)
    return step + 1, out_BN, done_B, logits_B1V[:, 0], cache, rng

  out_BN = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
  state = (jnp.int32(0), out_BN, jnp.zeros((b,), bool), logits_BV, cache, rng)
  return jax.lax.while_loop(cond, body, state)[1]
