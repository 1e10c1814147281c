"""`Model`: a config, its params and (optionally) a tokenizer, with jitted logits / generation / saving."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax import decode as decode_lib
from vlm_jax.data.image import to_model_input
from vlm_jax.models.registry import with_overrides
from vlm_jax.models.vlm import GEMMA_SPECIAL_IDS, VLMConfig, model_for


@functools.partial(jax.jit, static_argnames="cfg")
def _logits(cfg, params, images, tokens, mask_ar, mask_input):
  return model_for(cfg).apply(params, images, tokens, mask_ar, mask_input)


PREFIX_BUCKET = 16


def _check_batch(name, x, ndim, batch=None):
  x = np.asarray(x)
  if x.ndim != ndim:
    raise ValueError(f"{name} must have rank {ndim}, got shape {x.shape}.")
  if batch is not None and x.shape[0] != batch:
    raise ValueError(f"{name} has batch size {x.shape[0]}, expected {batch}.")
  return x


def _check_fit(config: VLMConfig, tokenizer):
  # Ids past the embedding table would be clamped by the lookup without a word: refuse the pair instead.
  if tokenizer is not None and tokenizer.vocab_size > config.llm.vocab_size:
    raise ValueError(f"the tokenizer's {tokenizer.vocab_size} tokens do not fit the model's vocab_size "
                     f"{config.llm.vocab_size}: a tokenizer of another model?")


class Model:
  """A loaded vision-language model. Params are a pytree {"params": {"img": ..., "llm": ...}}."""

  def __init__(self, config: VLMConfig, params, tokenizer=None, mesh=None):
    self._config, self._tokenizer = config, None
    self.params = params
    self.tokenizer = tokenizer
    self.mesh = mesh

  @property
  def config(self) -> VLMConfig:
    return self._config

  @config.setter
  def config(self, config: VLMConfig):
    _check_fit(config, self._tokenizer)
    self._config = config

  @property
  def tokenizer(self):
    return self._tokenizer

  @tokenizer.setter
  def tokenizer(self, tokenizer):
    _check_fit(self._config, tokenizer)
    self._tokenizer = tokenizer

  def shard(self, mesh) -> "Model":
    """The same model with params sharded over `mesh` (a jax Mesh, or a config dict like {"data": -1,
    "tensor": 2}) by vlm_jax.sharding's rules; its batches are then split over the data axes (a batch that
    does not divide is padded with repeats, which are dropped from the output)."""
    from vlm_jax import sharding, treeutil
    mesh = sharding.make_mesh(mesh)
    flat = treeutil.flatten(self.params["params"])
    shardings = sharding.param_shardings(flat, mesh)
    params = {"params": treeutil.unflatten({k: jax.device_put(v, shardings[k]) for k, v in flat.items()})}
    return Model(self.config, params, self.tokenizer, mesh)

  def _batch_rows(self, b: int) -> int:
    """Rows a batch of b is padded to: a multiple of the mesh's data-parallel size."""
    if self.mesh is None:
      return b
    from vlm_jax import sharding
    n = sharding.batch_ways(self.mesh.shape)
    return -(-b // n) * n

  def _put(self, x, rows: int):
    """A batch array padded to `rows` rows (repeating the last) and placed on the mesh's data axes."""
    if x is None:
      return None
    x = jnp.asarray(x)
    if rows > x.shape[0]:
      x = jnp.concatenate([x, jnp.repeat(x[-1:], rows - x.shape[0], axis=0)])
    if self.mesh is None:
      return x
    from vlm_jax import sharding
    return jax.device_put(x, sharding.batch_sharding(self.mesh, x.ndim))

  @property
  def image_size(self) -> int:
    return self.config.img.image_size

  def with_dtype(self, dtype: str) -> "Model":
    """The same model with params stored and computed in `dtype` (float32 | bfloat16)."""
    params = jax.tree.map(lambda x: jnp.asarray(x, dtype), self.params)
    return Model(with_overrides(self.config, dtype=dtype), params, self.tokenizer, self.mesh)

  def _images(self, images, batch):
    if images is None:
      return None
    if isinstance(images, (str, os.PathLike)):
      images = [images]
    if isinstance(images, (list, tuple)):  # image files are read here, with an error naming a bad one
      from vlm_jax.data.llava_json import load_image
      images = [load_image(x) if isinstance(x, (str, os.PathLike)) else x for x in images]
    if isinstance(images, (np.ndarray, jax.Array)) and np.asarray(images).dtype != np.uint8:
      images = _check_batch("images", images, 4, batch)
      if images.shape[1:] == (self.image_size, self.image_size, 3):
        return jnp.asarray(images, jnp.float32)
    out = to_model_input(images, self.image_size)
    if out.shape[0] != batch:
      raise ValueError(f"images has batch size {out.shape[0]}, expected {batch}.")
    return jnp.asarray(out)

  def logits(self, images, tokens, mask_ar, mask_input=None):
    """float32 [B,T,V] logits of the text positions (image tokens come first and are not returned)."""
    tokens = _check_batch("tokens", tokens, 2)
    b = tokens.shape[0]
    mask_ar = _check_batch("mask_ar", mask_ar, 2, b)
    if mask_ar.shape != tokens.shape:
      raise ValueError(f"mask_ar shape {mask_ar.shape} != tokens shape {tokens.shape}.")
    if mask_input is None:
      mask_input = np.ones_like(tokens)
    return _logits(self.config, self.params, self._images(images, b), jnp.asarray(tokens, jnp.int32),
                   jnp.asarray(mask_ar, jnp.int32), jnp.asarray(mask_input, jnp.int32))

  def generate_ids(self, images, prefix_tokens, max_new_tokens: int = 32, prefix_mask=None, *, sampler="greedy",
                   temperature=None, top_k=0, top_p=1.0, best_of=1, beam_size=None, length_penalty=1.0, seed=0,
                   eos_id=None, pad_id=None, logits_mask=None, return_scores=False, first_row=0):
    """int32 [B, max_new_tokens] continuations of the text prefixes, pad after EOS (with return_scores, also
    float32 [B] scores: summed log-probs / length ** length_penalty).

    prefix_tokens: int32 [B,T] ([BOS], prompt, separator), right-padded; prefix_mask marks the real tokens
    (default: tokens != pad). sampler "greedy" | "sample" (temperature, top_k, top_p, best_of, seed) | "beam"
    (beam_size, length_penalty); see `vlm_jax.decode.Sampling`. Row r samples with fold_in(key(seed), first_row + r),
    so a long list decoded in batches (first_row: the batch's start) samples as if decoded in one.
    eos_id / pad_id default to the tokenizer's, else those kept from an imported HF config, else Gemma's (1 / 0).
    Prefixes are padded to a multiple of PREFIX_BUCKET tokens, so prompts of similar length share one compiled
    program.
    """
    prefix_tokens = _check_batch("prefix_tokens", prefix_tokens, 2)
    pad_id = self._special("pad") if pad_id is None else pad_id
    eos_id = self._special("eos") if eos_id is None else eos_id
    if prefix_mask is None:
      prefix_mask = prefix_tokens != pad_id
    prefix_mask = _check_batch("prefix_mask", prefix_mask, 2, prefix_tokens.shape[0])
    if not np.all(prefix_mask.sum(-1) > 0):
      raise ValueError("every row needs at least one prefix token (e.g. BOS).")
    sampling = decode_lib.Sampling.make(sampler, temperature=temperature, top_k=top_k, top_p=top_p,
                                        best_of=best_of, beam_size=beam_size, length_penalty=length_penalty)
    b = prefix_tokens.shape[0]
    width = -(-prefix_tokens.shape[1] // PREFIX_BUCKET) * PREFIX_BUCKET
    pad = ((0, 0), (0, width - prefix_tokens.shape[1]))
    rows = self._batch_rows(b)
    row_keys = jax.random.key_data(decode_lib.fold_rows(jax.random.key(seed), first_row + jnp.arange(rows)))
    from vlm_jax import sharding
    with sharding.using(self.mesh):
      out = decode_lib.decode(
          self.config, self.params, self._put(self._images(images, b), rows),
          self._put(np.pad(prefix_tokens, pad, constant_values=pad_id).astype(np.int32), rows),
          self._put(np.pad(prefix_mask, pad).astype(np.int32), rows), self._put(row_keys, rows),
          max_new_tokens=max_new_tokens, sampling=sampling, eos_id=eos_id, pad_id=pad_id,
          logits_mask_V=None if logits_mask is None else jnp.asarray(logits_mask, bool), return_scores=True)
    ids, scores = out[0][:b], out[1][:b]
    return (ids, scores) if return_scores else ids

  def generate(self, images, prompts, max_new_tokens: int = 32, return_scores: bool = False, **sampling):
    """Decoded strings for a batch of images (arrays, PIL images or file paths, any size/mode) and prompts (and with
    return_scores, their float scores); `sampling` takes generate_ids' options (sampler, temperature, top_k,
    top_p, best_of, beam_size, length_penalty, seed, logits_mask, first_row)."""
    tok = self._require_tokenizer()
    if isinstance(prompts, str):
      prompts = [prompts]
    rows = [tok.encode_prefix(p) for p in prompts]
    width = max(len(r) for r in rows)
    prefix = np.full((len(rows), width), tok.pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
      prefix[i, :len(r)], mask[i, :len(r)] = r, 1
    out = self.generate_ids(images, prefix, max_new_tokens, prefix_mask=mask, return_scores=return_scores,
                            **sampling)
    texts = [tok.decode(row) for row in np.asarray(out[0] if return_scores else out)]
    return (texts, [float(s) for s in np.asarray(out[1])]) if return_scores else texts

  def _special(self, name):
    if self.tokenizer is not None:
      return getattr(self.tokenizer, f"{name}_id")
    kept = getattr(self.config, f"{name}_id")  # from an imported HF config
    return GEMMA_SPECIAL_IDS[name] if kept is None else kept

  def _require_tokenizer(self):
    if self.tokenizer is None:
      raise ValueError("This model has no tokenizer: load one (a tokenizer.model or tokenizer.json), or use "
                       "generate_ids.")
    return self.tokenizer

  def save(self, out_dir: str):
    """A vlm_jax checkpoint directory (config JSON, Orbax params, tokenizer files if any)."""
    from vlm_jax import checkpoint
    checkpoint.save_model(out_dir, self.config, self.params, self.tokenizer)

  def save_hf(self, out_dir: str, dtype: str | None = None):
    """A HuggingFace directory with the same logits: PaliGemmaForConditionalGeneration (Gemma + linear
    projector) or LlavaForConditionalGeneration (Llama-family + mlp adapter)."""
    from vlm_jax.convert import hf, hf_llava
    if self.config.adapter.posemb != "none":
      raise ValueError(f"no transformers model adds the adapter's {self.config.adapter.posemb} position embedding; "
                       "save a vlm_jax checkpoint with Model.save instead.")
    if hf_llava.is_llava(self.config):
      return hf_llava.save(out_dir, self.config, self.params, self.tokenizer, dtype=dtype)
    if self.config.llm_type != "gemma" or self.config.adapter.kind != "linear":
      raise ValueError(f"no transformers model matches a {self.config.llm_type} language model with a "
                       f"{self.config.adapter.kind} adapter; save a vlm_jax checkpoint with Model.save instead.")
    hf.save(out_dir, self.config, self.params, self.tokenizer, dtype=dtype)
