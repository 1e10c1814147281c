"""PaliGemma glue: image tokens (ViT + projector) then text, one prefix-LM decoder.

Sequence: [image tokens][BOS prefix "\\n"][suffix EOS][pad]. `mask_ar` (big_vision's convention) is 0 for
tokens of the bidirectional prefix block and 1 for causal ones; key k is visible to query q iff
cumsum(mask_ar)[k] <= cumsum(mask_ar)[q] and both are valid input. Image tokens are prefix (mask_ar 0) and
are not scaled by sqrt(width) like text embeddings are.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.models.gemma import Gemma, GemmaConfig
from vlm_jax.models.vit import ViT, ViTConfig


@dataclasses.dataclass(frozen=True)
class VLMConfig:
  img: ViTConfig
  llm: GemmaConfig
  name: str = ""


def prefix_lm_mask(mask_ar_BT, valid_BT):
  """[B,T,T] boolean: query t sees key s iff cumsum(mask_ar)[s] <= cumsum(mask_ar)[t], both valid."""
  cum_BT = jnp.cumsum(mask_ar_BT, axis=-1)
  mask_BTS = cum_BT[:, None, :] <= cum_BT[:, :, None]
  return mask_BTS & valid_BT[:, None, :].astype(bool) & valid_BT[:, :, None].astype(bool)


def same_block(mask_ar_BT):
  """[B,T,T] boolean: t and s are in one bidirectional block (equal cumsum(mask_ar))."""
  cum_BT = jnp.cumsum(mask_ar_BT, axis=-1)
  return cum_BT[:, None, :] == cum_BT[:, :, None]


class PaliGemma(nn.Module):
  cfg: VLMConfig

  def setup(self):
    if self.cfg.img.head_dim_out != self.cfg.llm.width:
      raise ValueError(f"projector width {self.cfg.img.head_dim_out} != LLM width {self.cfg.llm.width}.")
    self.img = ViT(self.cfg.img, name="img")
    self.llm = Gemma(self.cfg.llm, name="llm")

  def embed(self, images_BHWC, tokens_BT, mask_ar_BT, mask_input_BT=None):
    """Embeddings, full-sequence mask_ar and validity of [image tokens][text]."""
    txt_BTD = self.llm.embed(tokens_BT)
    if mask_input_BT is None:
      mask_input_BT = jnp.ones(tokens_BT.shape, jnp.int32)
    if images_BHWC is None:
      return txt_BTD, mask_ar_BT, mask_input_BT
    img_BPD = self.img(images_BHWC).astype(txt_BTD.dtype)
    b, p = img_BPD.shape[:2]
    ones_BP = jnp.ones((b, p), jnp.int32)
    return (jnp.concatenate([img_BPD, txt_BTD], axis=1),
            jnp.concatenate([0 * ones_BP, mask_ar_BT.astype(jnp.int32)], axis=1),
            jnp.concatenate([ones_BP, mask_input_BT.astype(jnp.int32)], axis=1))

  def __call__(self, images_BHWC, tokens_BT, mask_ar_BT, mask_input_BT=None):
    """Full forward pass: float32 vocab logits [B,T,V] of the text positions only."""
    x_BSD, mask_ar_BS, valid_BS = self.embed(images_BHWC, tokens_BT, mask_ar_BT, mask_input_BT)
    positions_BS = jnp.cumsum(valid_BS, axis=-1) - 1
    h_BSD, _ = self.llm(x_BSD, positions_BS, prefix_lm_mask(mask_ar_BS, valid_BS),
                        same_block_BTS=same_block(mask_ar_BS))
    return self.llm.logits(h_BSD[:, -tokens_BT.shape[1]:])

  def prefill(self, images_BHWC, tokens_BT, mask_ar_BT, mask_input_BT, cache_size):
    """Runs image + prefix through the decoder and fills a fresh cache of `cache_size` slots.

    Returns (logits [B,T,V] of the text positions, cache state). Rows may have different numbers of valid
    tokens: pads stay invalid slots in the cache, and each row's next position continues its own count.
    """
    x_BSD, mask_ar_BS, valid_BS = self.embed(images_BHWC, tokens_BT, mask_ar_BT, mask_input_BT)
    b, s = valid_BS.shape
    cfg = self.cfg.llm
    if cache_size < s:
      raise ValueError(f"cache_size {cache_size} < prefill length {s}.")
    positions_BS = jnp.cumsum(valid_BS, axis=-1) - 1
    kv_shape = (cfg.depth, b, cache_size, cfg.num_kv_heads, cfg.head_dim)
    kv = {"k": jnp.zeros(kv_shape, jnp.dtype(cfg.dtype)), "v": jnp.zeros(kv_shape, jnp.dtype(cfg.dtype))}
    pad = ((0, 0), (0, cache_size - s))
    key_valid_BC = jnp.pad(valid_BS, pad).astype(bool)
    key_pos_BC = jnp.pad(positions_BS, pad)
    pad3 = ((0, 0), (0, 0), (0, cache_size - s))
    mask_BSC = jnp.pad(prefix_lm_mask(mask_ar_BS, valid_BS), pad3)
    h_BSD, kv = self.llm(x_BSD, positions_BS, mask_BSC, kv, 0, key_pos_BC, jnp.pad(same_block(mask_ar_BS), pad3))
    cache = {"kv": kv, "key_valid": key_valid_BC, "key_pos": key_pos_BC,
             "next_pos": jnp.max(jnp.where(valid_BS.astype(bool), positions_BS, -1), axis=-1) + 1,
             "index": jnp.asarray(s, jnp.int32)}
    return self.llm.logits(h_BSD[:, -tokens_BT.shape[1]:]), cache

  def extend(self, tokens_BT, cache):
    """Appends T causal tokens per row at the shared cache index: (logits [B,T,V], new cache)."""
    b, t = tokens_BT.shape
    x_BTD = self.llm.embed(tokens_BT)
    positions_BT = cache["next_pos"][:, None] + jnp.arange(t)[None]
    slots_C = jnp.arange(cache["key_valid"].shape[1])
    new_slot_BC = (slots_C >= cache["index"]) & (slots_C < cache["index"] + t)
    key_valid_BC = cache["key_valid"] | new_slot_BC[None]
    key_pos_BC = jnp.where(new_slot_BC[None], cache["next_pos"][:, None] + slots_C[None] - cache["index"],
                           cache["key_pos"])
    # Causal over the new tokens: query i sees cached keys and new keys up to its own slot.
    mask_BTC = key_valid_BC[:, None, :] & (slots_C[None, None, :] <= cache["index"] + jnp.arange(t)[None, :, None])
    h_BTD, kv = self.llm(x_BTD, positions_BT, mask_BTC, cache["kv"], cache["index"], key_pos_BC)
    cache = {"kv": kv, "key_valid": key_valid_BC, "key_pos": key_pos_BC, "next_pos": cache["next_pos"] + t,
             "index": cache["index"] + t}
    return self.llm.logits(h_BTD), cache


def init_params(cfg: VLMConfig, seed: int = 0):
  """Random params {"params": {"img", "llm"}}; under `jax.eval_shape` the abstract template loaders fill."""
  s = cfg.img.image_size

  @jax.jit  # one compiled program instead of op-by-op dispatch: seconds faster on CPU
  def init(rng):
    return PaliGemma(cfg).init(rng, jnp.zeros((1, s, s, 3)), jnp.zeros((1, 2), jnp.int32),
                               jnp.zeros((1, 2), jnp.int32))
  return init(jax.random.key(seed))
