"""The glue: vision tower -> adapter -> language model, for decoder-only and encoder-decoder backbones.

`DecoderVLM` (Gemma: PaliGemma; Llama-family: LLaVA-style): one sequence [image tokens][BOS prefix "\\n"]
[suffix EOS][pad] through one decoder. `mask_ar` (big_vision's convention) is 0 for tokens of the bidirectional
prefix block and 1 for causal ones; key k is visible to query q iff cumsum(mask_ar)[k] <= cumsum(mask_ar)[q] and
both are valid input. Image tokens are prefix (mask_ar 0) and are not scaled by sqrt(width) like Gemma's text
embeddings. With `causal=True` (LLaVA) every token, image tokens included, attends causally.

`EncoderDecoderVLM` (T5 / UL2: PaLI-3-style): image tokens and the prefix (mask_ar 0) go through the encoder,
the suffix (mask_ar 1) through the decoder, which starts from T5's decoder start token.

Both take the same inputs and give the same outputs, so training, the decode loop and the evaluators use either:
`__call__(images, tokens, mask_ar, mask_input)` -> float32 logits [B,T,V] where logits[:, t] predicts
tokens[:, t + 1]; `start(images, prefix, prefix_mask, max_new_tokens)` -> (logits [B,V] of the first new token,
cache); `extend(tokens, cache)` -> (logits [B,T,V], cache).
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlm_jax.models.adapters import AdapterConfig, add_position_embedding, make_adapter
from vlm_jax.models.gemma import Gemma, GemmaConfig
from vlm_jax.models.layers import kv_cache_shape, unstack_layers
from vlm_jax.models.llama import Llama, LlamaConfig
from vlm_jax.models.t5 import T5, T5Config
from vlm_jax.models.vit import ViT, ViTConfig

LLM_TYPES = {"gemma": GemmaConfig, "llama": LlamaConfig, "t5": T5Config}


@dataclasses.dataclass(frozen=True)
class VLMConfig:
  img: ViTConfig
  llm: GemmaConfig | LlamaConfig | T5Config
  name: str = ""
  adapter: AdapterConfig = AdapterConfig()  # "linear": the ViT's own `head` (PaliGemma)
  causal: bool = False  # every token attends causally (LLaVA), instead of a bidirectional image + prefix block
  # The vocabulary id transformers' LLaVA marks image positions with (it must lie inside the vocabulary): kept from
  # an imported checkpoint, needed to export one.
  image_token_id: int | None = None
  # Special token ids kept from an imported HF config, for a model loaded without tokenizer files (a LLaVA
  # checkpoint of weights only): generate_ids and the HF export use them.
  bos_id: int | None = None
  eos_id: int | None = None
  pad_id: int | None = None

  @property
  def llm_type(self) -> str:
    return next(k for k, cls in LLM_TYPES.items() if isinstance(self.llm, cls))

  @property
  def num_image_tokens(self) -> int:
    return self.adapter.num_tokens(self.img.num_patches)


# Gemma's ids: what a model without a tokenizer or kept ids decodes with, and what its HF export names.
GEMMA_SPECIAL_IDS = {"pad": 0, "eos": 1, "bos": 2}


def special_ids(cfg: VLMConfig, tokenizer=None) -> dict:
  """{"pad" / "eos" / "bos": id} of the tokenizer, else those the config kept; one a tokenizer lacks (id -1,
  Llama's pad) or the config did not keep is left out."""
  if tokenizer is not None:
    return tokenizer.special()
  ids = {k: getattr(cfg, f"{k}_id") for k in ("pad", "eos", "bos")}
  return {k: v for k, v in ids.items() if v is not None and v >= 0}


def check_image_token_id(cfg: VLMConfig, tokenizer=None, where: str = "config.image_token_id", hint: str = ""):
  """transformers' LLaVA finds image positions by this id, so it must lie in the model's vocabulary and be no
  token of the text: >= the tokenizer's vocabulary size, or one of its `reserved_ids` (special added tokens
  besides BOS / EOS / pad: llava-hf's Qwen2 tokenizer.json holds `<image>`)."""
  low = tokenizer.vocab_size if tokenizer is not None else 0
  reserved = tokenizer.reserved_ids if tokenizer is not None else ()
  i = cfg.image_token_id
  if i is None or not 0 <= i < cfg.llm.vocab_size or not (i >= low or i in reserved):
    raise ValueError(f"{where} {'is not set' if i is None else i}: it must lie in [{low}, {cfg.llm.vocab_size}) "
                     "(or be a special added token of the tokenizer): an id the text never uses, inside the "
                     f"model's vocab_size, which transformers' LLaVA marks image positions with.{hint}")


def prefix_lm_mask(mask_ar_BT, valid_BT):
  """[B,T,T] boolean: query t sees key s iff cumsum(mask_ar)[s] <= cumsum(mask_ar)[t], both valid."""
  cum_BT = jnp.cumsum(mask_ar_BT, axis=-1)
  mask_BTS = cum_BT[:, None, :] <= cum_BT[:, :, None]
  return mask_BTS & valid_BT[:, None, :].astype(bool) & valid_BT[:, :, None].astype(bool)


def same_block(mask_ar_BT):
  """[B,T,T] boolean: t and s are in one bidirectional block (equal cumsum(mask_ar))."""
  cum_BT = jnp.cumsum(mask_ar_BT, axis=-1)
  return cum_BT[:, None, :] == cum_BT[:, :, None]


def _setup_vision(module):
  """The vision tower `img` and, unless it is the ViT's own linear head, the `adapter` of a glue module."""
  cfg = module.cfg
  linear = cfg.adapter.kind == "linear"
  if linear and cfg.img.head_dim_out != cfg.llm.width:
    raise ValueError(f"projector width {cfg.img.head_dim_out} != LLM width {cfg.llm.width}.")
  if not linear and cfg.img.head_dim_out:
    raise ValueError(f"adapter {cfg.adapter.kind!r} replaces the ViT head: build the ViT with head_dim_out=None.")
  module.img = ViT(cfg.img)
  module.adapter = make_adapter(cfg.adapter, cfg.llm.width)


def _image_tokens(module, images_BHWC):
  """ViT (+ adapter) -> image tokens [B,Q,D] at the language model's width."""
  x_BPD = module.img(images_BHWC)
  return add_position_embedding(module.cfg.adapter, x_BPD if module.adapter is None else module.adapter(x_BPD))


class DecoderVLM(nn.Module):
  cfg: VLMConfig

  def setup(self):
    _setup_vision(self)
    self.llm = (Llama if isinstance(self.cfg.llm, LlamaConfig) else Gemma)(self.cfg.llm)

  def embed(self, images_BHWC, tokens_BT, mask_ar_BT, mask_input_BT=None):
    """Embeddings, full-sequence mask_ar and validity of [image tokens][text]."""
    txt_BTD = self.llm.embed(tokens_BT)
    if mask_input_BT is None:
      mask_input_BT = jnp.ones(tokens_BT.shape, jnp.int32)
    mask_ar_BT = jnp.ones_like(mask_ar_BT) if self.cfg.causal else mask_ar_BT
    if images_BHWC is None:
      return txt_BTD, mask_ar_BT, mask_input_BT
    img_BPD = _image_tokens(self, images_BHWC).astype(txt_BTD.dtype)
    b, p = img_BPD.shape[:2]
    ones_BP = jnp.ones((b, p), jnp.int32)
    return (jnp.concatenate([img_BPD, txt_BTD], axis=1),
            jnp.concatenate([ones_BP if self.cfg.causal else 0 * ones_BP, mask_ar_BT.astype(jnp.int32)], axis=1),
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
    h_BSD, cache = self._fill_cache(images_BHWC, tokens_BT, mask_ar_BT, mask_input_BT, cache_size)
    return self.llm.logits(h_BSD[:, -tokens_BT.shape[1]:]), cache

  def _fill_cache(self, images_BHWC, tokens_BT, mask_ar_BT, mask_input_BT, cache_size):
    """`prefill` up to the final-normed hidden states [B,S,D] of every position (image tokens first)."""
    x_BSD, mask_ar_BS, valid_BS = self.embed(images_BHWC, tokens_BT, mask_ar_BT, mask_input_BT)
    b, s = valid_BS.shape
    cfg = self.cfg.llm
    if cache_size < s:
      raise ValueError(f"cache_size {cache_size} < prefill length {s}.")
    positions_BS = jnp.cumsum(valid_BS, axis=-1) - 1
    kv_shape = (cfg.depth, *kv_cache_shape(b, cfg.num_kv_heads, cache_size, cfg.head_dim))
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
    return h_BSD, cache

  def start(self, images_BHWC, prefix_BT, prefix_mask_BT, max_new_tokens: int):
    """Prefill of image + (right-padded) prefix: (logits [B,V] for the first new token, cache). The vocabulary
    projection runs on each row's last prefix token only."""
    n_img = 0 if images_BHWC is None else self.cfg.num_image_tokens
    h_BSD, cache = self._fill_cache(images_BHWC, prefix_BT, jnp.zeros_like(prefix_BT), prefix_mask_BT,
                                    n_img + prefix_BT.shape[1] + max_new_tokens)
    last_B = n_img + jnp.sum(prefix_mask_BT, axis=-1) - 1
    return self.llm.logits(jnp.take_along_axis(h_BSD, last_B[:, None, None], axis=1))[:, 0], cache

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


class EncoderDecoderVLM(nn.Module):
  cfg: VLMConfig

  def setup(self):
    _setup_vision(self)
    self.llm = T5(self.cfg.llm)

  def encode(self, images_BHWC, tokens_BT, valid_BT):
    """Encoder output and validity of [image tokens][valid text tokens]."""
    x_BSD = self.llm.embed(tokens_BT)
    valid_BS = valid_BT.astype(jnp.int32)
    if images_BHWC is not None:
      img_BPD = _image_tokens(self, images_BHWC).astype(x_BSD.dtype)
      x_BSD = jnp.concatenate([img_BPD, x_BSD], axis=1)
      valid_BS = jnp.concatenate([jnp.ones(img_BPD.shape[:2], jnp.int32), valid_BS], axis=1)
    positions_BS = jnp.maximum(jnp.cumsum(valid_BS, axis=-1) - 1, 0)  # pads inside the sequence take no slot
    return self.llm.encode(x_BSD, valid_BS, positions_BS=positions_BS), valid_BS

  def __call__(self, images_BHWC, tokens_BT, mask_ar_BT, mask_input_BT=None):
    """logits[:, t] predicts tokens[:, t + 1], as the decoder-only glue's: the prefix (mask_ar 0) is encoded, the
    suffix is decoded teacher-forced from the start token, and its logits are put back at the positions of the
    tokens before each target (positions before the prefix's last token get the first decoder step's logits;
    nothing is ever supervised there)."""
    if mask_input_BT is None:
      mask_input_BT = jnp.ones(tokens_BT.shape, jnp.int32)
    b, t = tokens_BT.shape
    is_prefix_BT = (mask_ar_BT == 0) & (mask_input_BT > 0)
    enc_BSD, enc_valid_BS = self.encode(images_BHWC, tokens_BT, is_prefix_BT)
    n_prefix_B = jnp.sum(is_prefix_BT, axis=-1)
    # Decoder inputs, left-aligned: [start, suffix[0], suffix[1], ...] (the suffix starts at n_prefix).
    idx_BT = jnp.clip(n_prefix_B[:, None] + jnp.arange(t)[None] - 1, 0, t - 1)
    dec_BT = jnp.where(jnp.arange(t)[None] == 0, self.cfg.llm.decoder_start_id,
                       jnp.take_along_axis(tokens_BT, idx_BT, axis=1))
    logits_BTV = self.llm.decode(self.llm.embed(dec_BT), enc_BSD, enc_valid_BS)
    back_BT = jnp.clip(jnp.arange(t)[None] + 1 - n_prefix_B[:, None], 0, t - 1)
    return jnp.take_along_axis(logits_BTV, back_BT[:, :, None], axis=1)

  def start(self, images_BHWC, prefix_BT, prefix_mask_BT, max_new_tokens: int):
    enc_BSD, enc_valid_BS = self.encode(images_BHWC, prefix_BT, prefix_mask_BT)
    cache = self.llm.init_cache(enc_BSD, enc_valid_BS, max_new_tokens + 1)
    start_B1 = jnp.full((prefix_BT.shape[0], 1), self.cfg.llm.decoder_start_id, jnp.int32)
    logits_B1V, cache = self.llm.extend(start_B1, cache)
    return logits_B1V[:, 0], cache

  def extend(self, tokens_BT, cache):
    return self.llm.extend(tokens_BT, cache)


def model_for(cfg: VLMConfig) -> nn.Module:
  return (EncoderDecoderVLM if isinstance(cfg.llm, T5Config) else DecoderVLM)(cfg)


def per_layer(cfg: VLMConfig, params):
  """(cfg, params) with the language model's layers as separate arrays (`layers.layer_stack`), for the decode
  loop (its prefill and steps; the KV cache then is a list of per-layer caches too); for T5 / UL2, its
  decoder's layers. Same function, same results."""
  if not cfg.llm.stacked_layers:
    return cfg, params
  llm = params["params"]["llm"]
  if isinstance(cfg.llm, T5Config):  # the decoder's layers: the encoder runs once per batch
    llm = {**llm, "decoder": unstack_layers(llm["decoder"], cfg.llm.decoder_depth)}
  else:
    llm = unstack_layers(llm, cfg.llm.depth)
  return (dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, stacked_layers=False)),
          {**params, "params": {**params["params"], "llm": llm}})


def teacher_forced_nll(cfg: VLMConfig, params, images, tokens, mask_ar, mask_loss, mask_input):
  """Per-example (summed NLL of the tokens `mask_loss` supervises, their count), each token predicted from the
  ones before it: the training loss and the evaluators' loss / perplexity."""
  logits_BTV = model_for(cfg).apply(params, images, tokens[:, :-1], mask_ar[:, :-1], mask_input[:, :-1])
  logits_BTV = logits_BTV.astype(jnp.float32)
  # -log_softmax at the target = logsumexp - target logit. The target logit is picked with an iota compare, not
  # a gather: the gradient is then one fused pass (softmax - one-hot) over [B,T,V], with no scatter into a zero
  # [B,T,V] buffer and no full-vocab log-probabilities materialised.
  target_BTV = jax.lax.broadcasted_iota(jnp.int32, logits_BTV.shape, 2) == tokens[:, 1:, None]
  nll_BT = jax.nn.logsumexp(logits_BTV, axis=-1) - jnp.sum(jnp.where(target_BTV, logits_BTV, 0.0), axis=-1)
  weights_BT = mask_loss[:, 1:].astype(jnp.float32)
  return jnp.sum(nll_BT * weights_BT, axis=-1), jnp.sum(weights_BT, axis=-1)


def abstract_params(cfg: VLMConfig) -> dict:
  """The params' shapes and dtypes (jax.ShapeDtypeStruct leaves, nested as init_params' "params"), traced
  without computing or allocating anything."""
  return jax.eval_shape(lambda: init_params(cfg))["params"]


def init_params(cfg: VLMConfig, seed: int = 0):
  """Random params {"params": {"img", ["adapter",] "llm"}}; under `jax.eval_shape` the abstract template."""
  s = cfg.img.image_size

  @jax.jit  # one compiled program instead of op-by-op dispatch: seconds faster on CPU
  def init(rng):
    return model_for(cfg).init(rng, jnp.zeros((1, s, s, 3)), jnp.zeros((1, 2), jnp.int32),
                               jnp.array([[0, 1]], jnp.int32))
  return init(jax.random.key(seed))
