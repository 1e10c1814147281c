"""What a training config turns into before the loop: validated keys, tokenizer, model config, first params."""
import dataclasses
import difflib
import os

import jax
import ml_collections
import numpy as np

from vlm_jax import config_util, treeutil
from vlm_jax.decode import SAMPLING_KEYS
from vlm_jax.models.adapters import AdapterConfig
from vlm_jax.models.gemma import gemma_config
from vlm_jax.models.registry import get_model_config, with_overrides
from vlm_jax.models.vit import ViTConfig, resample_posemb, vit_config
from vlm_jax.models.vlm import LLM_TYPES, VLMConfig, check_image_token_id

_SOURCE = {k: None for k in ("kind", "weight", "num_examples", "seed", "split", "image_size", "tasks",
                             "max_objects", "grid", "json_path", "image_dir", "skip_bad", "name", "data_dir",
                             "fields")}
_DATA = dict(_SOURCE, sources=_SOURCE)
# Every key a training config may set; anything else is a typo, reported with the closest known key.
ALLOWED_KEYS = {
    "seed": None, "mesh": None, "dcn_mesh": None, "checkpoint_every": None, "keep_checkpoints": None,
    "log_every": None, "eval_every": None, "grad_accum": None, "export_model": None, "tokenizer": None,
    "model": {"name": None, "img": None, "llm": None, "adapter": None, "causal": None, "dtype": None, "remat": None,
              "scan_unroll": None, "init": None, "image_token_id": None},
    "optim": {"name": None, "b1": None, "b2": None, "eps": None, "momentum": None, "clip_norm": None,
              "weight_decay": None, "wd_mults": None},
    "stages": {"name": None, "steps": None, "image_size": None, "text_len": None, "batch_size": None,
               "data": _DATA, "lr": None, "schedule": {"decay": None, "warmup_steps": None, "end_frac": None},
               "frozen": None, "lr_mults": None},
    "evals": {"name": None, "data": _DATA, "metrics": None, "batch_size": None, "max_new_tokens": None,
              "prefix_len": None, "text_len": None, "num_examples": None, **dict.fromkeys(SAMPLING_KEYS)},
}
REQUIRED_STAGE_KEYS = ("steps", "image_size", "text_len", "batch_size", "data", "lr")


def _positive_int(value, key: str) -> int:
  if (isinstance(value, bool) or not isinstance(value, (int, float, np.integer)) or not np.isfinite(value)
      or value != int(value) or value < 1):
    raise ValueError(f"config.{key} must be an integer >= 1, got {value!r}.")
  return int(value)


def check_config(config):
  config_util.check_keys(config, ALLOWED_KEYS)
  if not config.get("stages"):
    raise ValueError("config.stages is empty: a run needs at least one stage.")
  grad_accum = _positive_int(config.get("grad_accum", 1), "grad_accum")
  for i, stage in enumerate(config.stages):
    if missing := [k for k in REQUIRED_STAGE_KEYS if k not in stage]:
      raise ValueError(f"config.stages[{i}] is missing {missing}.")
    for key in ("steps", "image_size", "text_len", "batch_size"):
      _positive_int(stage[key], f"stages[{i}].{key}")
    if int(stage["batch_size"]) % grad_accum:
      raise ValueError(f"config.stages[{i}].batch_size {stage['batch_size']} is not divisible by config.grad_accum "
                       f"{grad_accum} (the number of micro-batches it is split into).")
    if not isinstance(stage["lr"], (int, float)) or not 0 <= stage["lr"] < float("inf"):
      raise ValueError(f"config.stages[{i}].lr must be a finite number >= 0, got {stage['lr']!r}.")
  from vlm_jax import evaluate, sharding  # a bad evaluator or mesh is reported now, not after hours of training
  for key in ("mesh", "dcn_mesh"):
    sharding.check_axes(config.get(key), f"config.{key}")
  for eval_cfg in config.get("evals") or []:
    evaluate.check_eval_config(eval_cfg)
  names = [str(e.get("name", "eval")) for e in config.get("evals") or []]
  if repeated := sorted({n for n in names if names.count(n) > 1}):
    raise ValueError(f"config.evals: the name(s) {repeated} are used by more than one evaluator (an unnamed one is "
                     "'eval'); results and metrics are keyed by name, so one would overwrite another: name each.")


def normalize(config):
  """A copy whose stages and evals are ConfigDicts too (config files may write them as plain dicts)."""
  config = ml_collections.ConfigDict(config.to_dict())
  with config.unlocked():
    config.stages = [ml_collections.ConfigDict(dict(s)) for s in config.stages]
    config.evals = [ml_collections.ConfigDict(dict(e)) for e in (config.get("evals") or [])]
  return config


def make_tokenizer(config):
  """`config.tokenizer`: a SentencePiece model, a HF tokenizer.json (its tokenizer_config.json beside it names
  the special tokens), a directory holding either, or "synthetic" for the small SentencePiece model the package
  trains."""
  from vlm_jax import tokenizer
  spec = config.get("tokenizer", "synthetic")
  if not spec:
    raise ValueError("config.tokenizer is empty: give a SentencePiece model, a tokenizer.json, a directory holding "
                     "one, or 'synthetic'.")
  if spec == "synthetic":
    from vlm_jax.data.synthetic import synthetic_tokenizer
    return synthetic_tokenizer()
  return tokenizer.load(spec)


def build_model_config(model_cfg, tokenizer=None) -> VLMConfig:
  """The model: named (`model.name`), spelled out (`model.img` = ViT variant + options, `model.llm` = Gemma
  variant or explicit sizes; `vocab_size` defaults to the tokenizer's), or read from the checkpoint that
  `model.init` points at (a HF or vlm_jax directory). Without a tokenizer (memory planning) its vocabulary
  is not checked against the model's. `model.image_token_id` sets the id a LLaVA export marks image positions
  with (see `vlm.check_image_token_id`). Keys the chosen route would ignore (img / llm beside a name, one of
  img / llm alone) are refused."""
  overrides = {k: model_cfg[k] for k in ("dtype", "remat", "scan_unroll") if model_cfg.get(k)}
  spelled = [k for k in ("img", "llm", "adapter", "causal") if model_cfg.get(k) is not None]
  if model_cfg.get("name") and spelled:
    raise ValueError(f"config.model.name {model_cfg.name!r} fixes the architecture, so config.model."
                     f"{'/'.join(spelled)} would be ignored: drop them, or spell the model out with img + llm "
                     "instead of a name.")
  if spelled and not (model_cfg.get("img") and model_cfg.get("llm")):
    raise ValueError(f"config.model sets {'/'.join(spelled)} but a spelled-out model needs both img and llm "
                     "(or drop them to take the whole config from model.init).")
  if model_cfg.get("name"):
    cfg = get_model_config(model_cfg.name)
  elif model_cfg.get("img") and model_cfg.get("llm"):
    llm = _llm_config(dict(model_cfg.llm), tokenizer)
    adapter = _construct("config.model.adapter", AdapterConfig, **dict(model_cfg.get("adapter") or {}))
    img_kw = {k: v for k, v in dict(model_cfg.img).items() if k != "init"}
    if "variant" not in img_kw:
      raise ValueError("config.model.img needs a variant (e.g. 'So400m/14', 'B/16', 'Ti/8').")
    img = _construct("config.model.img", ViTConfig, img_kw.pop("variant"), make=vit_config,
                     head_dim_out=llm.width if adapter.kind == "linear" else None, **img_kw)
    cfg = VLMConfig(img=img, llm=llm, name="custom", adapter=adapter, causal=bool(model_cfg.get("causal", False)))
  elif model_cfg.get("init"):
    cfg = _checkpoint_config(model_cfg.init)
  else:
    raise ValueError("config.model needs a name, img + llm, or an init checkpoint to take the config from.")
  if tokenizer is not None and cfg.llm.vocab_size < tokenizer.vocab_size:
    raise ValueError(f"model vocab_size {cfg.llm.vocab_size} < tokenizer vocab size {tokenizer.vocab_size}.")
  if tokenizer is not None:  # kept for the model loaded later without its tokenizer files (generate_ids, exports)
    special = tokenizer.special()
    cfg = dataclasses.replace(cfg, **{f"{k}_id": special.get(k) for k in ("bos", "eos", "pad")})
  if (image_token := model_cfg.get("image_token_id")) is not None:
    cfg = dataclasses.replace(cfg, image_token_id=int(image_token))
    check_image_token_id(cfg, tokenizer, "config.model.image_token_id",
                         " Raise model.llm.vocab_size to make room.")
  return with_overrides(cfg, **overrides) if overrides else cfg


def _llm_config(kw: dict, tokenizer):
  """The language model from `model.llm`: `type` gemma (default; a `variant` or explicit sizes) | llama | t5, or
  `init`: a local HF Llama / Qwen2 / T5 directory whose config (and, in initial_params, weights) it takes; with
  `init`, `vocab_size` may grow the vocabulary (room for an image token), the new rows randomly initialised."""
  if "init" in kw:
    if not kw["init"]:
      raise ValueError("config.model.llm.init is empty: point it at a HF Llama / Qwen2 / T5 directory.")
    cfg = _text_checkpoint(kw["init"])[0]
    if kw.get("type") in LLM_TYPES and isinstance(cfg, LLM_TYPES[kw["type"]]):
      kw.pop("type")  # says what the checkpoint is: nothing to override
    if extra := sorted(set(kw) - {"init", "vocab_size"}):
      raise ValueError(f"config.model.llm.init takes the language model's config from {kw['init']}; "
                       f"config.model.llm.{'/'.join(extra)} cannot change it (only vocab_size may, to grow the "
                       "vocabulary).")
    if (vocab := kw.get("vocab_size", cfg.vocab_size)) < cfg.vocab_size:
      raise ValueError(f"config.model.llm.vocab_size {vocab} < {cfg.vocab_size}, the vocabulary of "
                       f"config.model.llm.init {kw['init']}: it can only grow.")
    return dataclasses.replace(cfg, vocab_size=int(vocab))
  kind = kw.pop("type", "gemma")
  if kind not in LLM_TYPES:
    raise ValueError(f"config.model.llm.type {kind!r} is not one of {sorted(LLM_TYPES)}.")
  if "vocab_size" not in kw:
    if tokenizer is None:
      raise ValueError("config.model.llm needs a vocab_size when there is no tokenizer to take it from.")
    kw["vocab_size"] = tokenizer.vocab_size
  variant = kw.pop("variant", None)
  if variant:
    if kind != "gemma":
      raise ValueError(f"config.model.llm.variant is for Gemma; give a {kind} model's sizes instead.")
    return _construct("config.model.llm", LLM_TYPES[kind], variant, make=gemma_config, **kw)
  return _construct("config.model.llm", LLM_TYPES[kind], **kw)


def _construct(where: str, cls, *args, make=None, **kw):
  """(make or cls)(*args, **kw) for the config dataclass `cls`; a key it has no field for is reported as the
  config key it came from, with the closest field."""
  fields = [f.name for f in dataclasses.fields(cls)]
  if unknown := [k for k in kw if k not in fields]:
    hint = difflib.get_close_matches(unknown[0], fields, n=1)
    raise ValueError(f"Unknown config key {where}.{unknown[0]}: not a field of {cls.__name__}"
                     + (f" (did you mean {hint[0]!r}?)" if hint else "") + ".")
  try:
    return (make or cls)(*args, **kw)
  except TypeError as e:  # a required field left out
    raise ValueError(f"{where}: {e}") from e


def _grow_vocab(found, random, old_vocab: int, new_vocab: int):
  """`found` with the rows (or columns) of the tokens a larger `model.llm.vocab_size` adds taken from the random
  init `random`, when the two differ only in a vocabulary axis (old_vocab -> new_vocab); else `found` unchanged
  (for check_shapes to report)."""
  if random is None or old_vocab == new_vocab or found.ndim != random.ndim:
    return found
  diff = [i for i, (a, b) in enumerate(zip(found.shape, random.shape)) if a != b]
  if len(diff) != 1 or (found.shape[diff[0]], random.shape[diff[0]]) != (old_vocab, new_vocab):
    return found
  extra = np.take(np.asarray(random, np.float32), range(old_vocab, new_vocab), axis=diff[0])
  return np.concatenate([np.asarray(found, np.float32), extra], axis=diff[0])


def _text_checkpoint(path: str, with_params: bool = False):
  """(config, flat params or None) of a HF text model directory: Llama / Qwen2 or T5 / UL2."""
  from vlm_jax import fileutil
  from vlm_jax.convert import hf_llama, hf_t5
  file = os.path.join(path, "config.json")
  if not os.path.isfile(file):
    raise FileNotFoundError(f"config.model.llm.init {path}: no config.json (expected a HF Llama/Qwen2/T5 directory).")
  if fileutil.read_json(file).get("model_type") in ("t5", "mt5"):
    if not with_params:
      return hf_t5.read_config(path), None
    cfg, params = hf_t5.load(path)
    return cfg, treeutil.flatten(params["params"])
  if not with_params:
    return hf_llama.read_config(path), None
  cfg, params = hf_llama.load_text_model(path)
  return cfg, treeutil.flatten(params)


def _checkpoint_config(path: str) -> VLMConfig:
  from vlm_jax import checkpoint
  from vlm_jax.convert import hf
  path = checkpoint.model_dir(path)
  if checkpoint.is_model_dir(path):
    return checkpoint.load_config(path)
  if os.path.isfile(os.path.join(path, "config.json")):
    return hf.read_config(path)
  raise ValueError(f"config.model.init {path}: no model config there (a big_vision .npz needs config.model.name).")


def model_for_stage(base: VLMConfig, stage_cfg) -> VLMConfig:
  return dataclasses.replace(base, img=dataclasses.replace(base.img, image_size=int(stage_cfg.image_size)))


def initial_params(config, model_cfg, log):
  """Random init (seeded), or `config.model.init`: a HF directory, big_vision .npz or vlm_jax checkpoint. With a
  random init, `model.llm.init` (a HF text model) and `model.img.init` (any checkpoint vlm_jax.load reads) supply
  the language model's or the vision tower's weights."""
  from vlm_jax.models.vlm import abstract_params, init_params
  init = config.model.get("init")
  if not init:
    params = treeutil.flatten(init_params(model_cfg, int(config.seed))["params"])
    if llm_init := dict(config.model.get("llm") or {}).get("init"):
      log(f"loading language-model weights from {llm_init}")
      src_cfg, found = _text_checkpoint(llm_init, with_params=True)
      want = {k.removeprefix("llm/"): v for k, v in params.items() if k.startswith("llm/")}
      vocab = (src_cfg.vocab_size, model_cfg.llm.vocab_size)
      found = {k: _grow_vocab(v, want.get(k), *vocab) for k, v in found.items()}
      treeutil.check_shapes(want, found, f"config.model.llm.init {llm_init}")
      params.update({f"llm/{k}": np.asarray(v, np.float32) for k, v in found.items()})
    if img_init := dict(config.model.get("img") or {}).get("init"):
      import vlm_jax
      log(f"loading vision-tower weights from {img_init}")
      loaded = treeutil.flatten(vlm_jax.load(img_init).params["params"])
      want = {k: v for k, v in params.items() if k.startswith("img/") and not k.startswith("img/head/")
              and k != "img/pos_embedding"}
      treeutil.check_shapes(want, {k: v for k, v in loaded.items() if k in want}, f"config.model.img.init {img_init}")
      params.update({k: np.asarray(loaded[k], np.float32) for k in want})
      grid = model_cfg.img.grid
      params["img/pos_embedding"] = np.asarray(resample_posemb(loaded["img/pos_embedding"], grid), np.float32)
    return treeutil.unflatten(params)
  import vlm_jax
  log(f"loading initial params from {init}")
  loaded = vlm_jax.load(init, config=config.model.get("name") if init.endswith(".npz") else None)
  src_res = loaded.config.img.image_size
  expected = dataclasses.replace(model_cfg, img=dataclasses.replace(model_cfg.img, image_size=src_res))
  found = treeutil.flatten(loaded.params["params"])
  want = treeutil.flatten(abstract_params(expected))
  treeutil.check_shapes(want, found, f"config.model.init {init}")
  return jax.tree.map(lambda x: np.asarray(x, np.float32), loaded.params["params"])
