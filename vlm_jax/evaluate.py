"""Batch evaluators: decode answers with the shared decode loop and score them (`vlm_jax.metrics`), and/or
score the reference answers teacher-forced (`loss`, `perplexity`).

Every batch has one shape (the last one is padded with repeats whose results are dropped) and prompts are
padded to `prefix_len`, so an evaluator compiles once. An evaluator config:

  dict(name="val", data=<source config>, metrics=["vqa_accuracy", "cider", "perplexity"], batch_size=32,
       max_new_tokens=16, prefix_len=32, text_len=64, num_examples=0, sampler="greedy", beam_size=...)

An example is scored against all its reference answers (`example["answers"]`, else the first turn's answer).
"""
import collections
import math

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np

from vlm_jax import decode as decode_lib
from vlm_jax import metrics as metrics_lib
from vlm_jax import sharding
from vlm_jax.data.image import to_rgb_array
from vlm_jax.data.llava_json import CORRUPT_IMAGE
from vlm_jax.data.pipeline import make_source
from vlm_jax.data.text import tokenize_prefix, tokenize_turns
from vlm_jax.models.vlm import teacher_forced_nll

TEACHER_FORCED = ("loss", "perplexity")
KNOWN = sorted({*metrics_lib.PER_EXAMPLE, *metrics_lib.CORPUS, *TEACHER_FORCED})


answer_nll = jax.jit(teacher_forced_nll, static_argnames="cfg")


def answers_of(example) -> list[str]:
  return list(example.get("answers") or [example["turns"][0][1]])


def check_eval_config(eval_cfg):
  """The mistakes an evaluator config can hold that need no data or model: raised before a run starts."""
  name = eval_cfg.get("name", "eval")
  if unknown := [m for m in eval_cfg.get("metrics", ["exact_match"]) if m not in KNOWN]:
    raise ValueError(f"evaluator {name!r}: unknown metrics {unknown}; known: {KNOWN}.")
  for key in ("batch_size", "max_new_tokens"):
    if key in eval_cfg and int(eval_cfg[key]) < 1:
      raise ValueError(f"evaluator {name!r}: {key} must be >= 1, got {eval_cfg[key]}.")
  try:
    sampling_of(eval_cfg)
  except ValueError as e:
    raise ValueError(f"evaluator {name!r}: {e}") from e


def sampling_of(eval_cfg) -> tuple[decode_lib.Sampling, int]:
  kw = {k: eval_cfg[k] for k in decode_lib.SAMPLING_KEYS if k in eval_cfg and k not in ("sampler", "seed")}
  return decode_lib.Sampling.make(eval_cfg.get("sampler", "greedy"), **kw), int(eval_cfg.get("seed", 0))


def _images(examples, size):
  return np.stack([np.zeros((size, size, 3), np.float32) if ex["image"] is None else to_rgb_array(ex["image"], size)
                   for ex in examples])


def _examples(source, n):
  """The first n records, without those a skip_bad source could not read (None: a corrupt image)."""
  return (ex for ex in (source[i] for i in range(n)) if ex is not None)


def _batches(source, n, batch_size):
  """(examples, number of real ones, how many of the first n records are read) per batch of the readable ones.
  The last batch is padded with repeats of its last example and reports all n read."""
  batch = []
  for i in range(n):
    if (ex := source[i]) is None:
      continue
    if len(batch) == batch_size:  # yielded once the next readable record is found: records before it are done
      yield batch, batch_size, i
      batch = []
    batch.append(ex)
  if batch:
    yield batch + batch[-1:] * (batch_size - len(batch)), len(batch), n


def evaluate(model_cfg, params, tokenizer, eval_cfg, progress=None, mesh=None, source=None) -> dict:
  """Runs one evaluator config over its data.

  Returns {"name", "num_examples", metric: mean over examples (corpus-level for cider), f"{metric}/{task}",
  "predictions": one record per example (id, task, prompt, answers, prediction, its score under each metric)}.
  `progress(phase, done, n)` is called after each batch of each pass over the data: phase "decode" for the
  decoded metrics, then "teacher-forced" for loss / perplexity. With a `mesh`, each batch (rounded up to a multiple of
  the data x fsdp size) is split over its data axes; params are placed by the caller (`Model.shard`, or the
  training loop). In a multi-process run every process calls this with the same config and gets every result.
  `source`: `make_source(eval_cfg.data)` built once by a caller that evaluates again and again (training).
  """
  source = make_source(eval_cfg.data) if source is None else source
  n = len(source)
  if eval_cfg.get("num_examples"):
    n = min(n, int(eval_cfg.num_examples))
  if n == 0:
    raise ValueError(f"evaluator {eval_cfg.get('name', 'eval')!r}: its data has no examples.")
  check_eval_config(eval_cfg)
  metric_names = list(eval_cfg.get("metrics", ["exact_match"]))
  decoded = [m for m in metric_names if m not in TEACHER_FORCED]
  batch_size = int(eval_cfg.get("batch_size", 32))
  size = model_cfg.img.image_size
  put, fetch = jnp.asarray, np.asarray
  if mesh is not None:
    ways = sharding.batch_ways(mesh.shape)
    batch_size = -(-batch_size // ways) * ways  # padded rows, like the last batch's, are dropped
    # Every process reads the whole batch and places the rows its devices hold; outputs split over
    # processes are gathered back, so each process scores every example (as in a one-process run).
    put = lambda x: jax.make_array_from_callback(np.shape(x), sharding.batch_sharding(mesh, np.ndim(x)),
                                                 lambda index: np.asarray(x)[index])
    fetch = lambda x: np.asarray(x) if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True)
  records = []
  truncated = collections.Counter()  # prompts cut to prefix_len, texts cut to text_len

  if decoded:
    sampling, seed = sampling_of(eval_cfg)
    prefix_len, max_new = int(eval_cfg.get("prefix_len", 32)), int(eval_cfg.get("max_new_tokens", 16))
    for examples, real, read in _batches(source, n, batch_size):
      prefix = [tokenize_prefix(tokenizer, ex["turns"][0][0], prefix_len) for ex in examples]
      truncated["prompts"] += sum(p[2] for p in prefix[:real])
      # Example i samples with fold_in(key(seed), i): the same predictions whatever the batch size or mesh.
      rows = np.asarray(jax.random.key_data(decode_lib.fold_rows(jax.random.key(seed),
                                                                 len(records) + jnp.arange(batch_size))))
      with sharding.using(mesh):
        ids = decode_lib.decode(model_cfg, params, put(_images(examples, size)),
                                put(np.stack([p[0] for p in prefix])), put(np.stack([p[1] for p in prefix])), put(rows),
                                max_new_tokens=max_new, sampling=sampling, eos_id=tokenizer.eos_id,
                                pad_id=tokenizer.pad_id)
      for ex, row in zip(examples[:real], fetch(ids)[:real]):
        records.append({"id": ex["id"], "task": ex.get("task", ""), "prompt": ex["turns"][0][0],
                        "answers": answers_of(ex), "prediction": tokenizer.decode(row)})
      if progress:
        progress("decode", read, n)
  else:
    records = [{"id": ex["id"], "task": ex.get("task", ""), "prompt": ex["turns"][0][0], "answers": answers_of(ex)}
               for ex in _examples(source, n)]
  # A skip_bad source's records dropped when it was built, and those of the first n it could not read now (a
  # corrupt image: its own count grows with every read, over both passes and every evaluation).
  skipped = {k: v for k, v in getattr(source, "skipped", {}).items() if v and k != CORRUPT_IMAGE}
  if len(records) < n:
    skipped[CORRUPT_IMAGE] = n - len(records)
  if not records:
    raise ValueError(f"evaluator {eval_cfg.get('name', 'eval')!r}: none of its {n} examples could be read "
                     f"({skipped}).")

  for m in decoded:
    if m in metrics_lib.CORPUS:
      scores = metrics_lib.CORPUS[m]([r["prediction"] for r in records], [r["answers"] for r in records])
    else:
      scores = [metrics_lib.PER_EXAMPLE[m](r["prediction"], r["answers"]) for r in records]
    for r, s in zip(records, scores):
      r[m] = float(s)

  if len(decoded) < len(metric_names):
    text_len, i = int(eval_cfg.get("text_len", 64)), 0
    for examples, real, read in _batches(source, n, batch_size):
      tok = [tokenize_turns(tokenizer, ex["turns"], text_len) for ex in examples]
      truncated["texts"] += sum(t.truncated for t in tok[:real])
      arrays = [put(np.stack([getattr(t, f) for t in tok])) for f in ("tokens", "mask_ar", "mask_loss", "mask_input")]
      with sharding.using(mesh):
        nll, count = map(fetch, answer_nll(model_cfg, params, put(_images(examples, size)), *arrays))
      for r, s, c in zip(records[i:i + real], nll[:real], count[:real]):
        r["nll"], r["answer_tokens"] = float(s), int(c)
      i += real
      if progress:
        progress("teacher-forced", read, n)

  out = {"name": eval_cfg.get("name", "eval"), "num_examples": len(records)}
  if skipped:
    out["skipped"] = skipped
  if cut := {k: v for k, v in truncated.items() if v}:  # prompts lost their ends ("\n" too), answers went unscored
    out["truncated"] = {**cut, "prefix_len": prefix_len if decoded else None,
                        "text_len": text_len if len(decoded) < len(metric_names) else None}
  out.update(summarize(records, metric_names))
  out["predictions"] = records
  return out


def summarize(records, metric_names) -> dict:
  """Means over examples, overall and per task; loss / perplexity are per answer token."""
  groups = collections.defaultdict(list)
  for r in records:
    groups[""].append(r)
    if r["task"]:
      groups[r["task"]].append(r)
  out = {}
  for m in metric_names:
    for task, rs in sorted(groups.items()):
      key = m if not task else f"{m}/{task}"
      if m in TEACHER_FORCED:
        loss = sum(r["nll"] for r in rs) / max(sum(r["answer_tokens"] for r in rs), 1)
        out[key] = loss if m == "loss" else math.exp(loss)
      else:
        out[key] = float(np.mean([r[m] for r in rs]))
  return out


def summary(result: dict) -> str:
  keys = [k for k in result if k not in ("predictions", "name", "num_examples", "truncated", "skipped")
          and "/" not in k]
  text = ", ".join(f"{k} {result[k]:.4f}" for k in keys if not math.isnan(result[k]))
  if skipped := result.get("skipped"):
    text += (f"; WARNING: skipped {sum(skipped.values())} unreadable records "
             f"({', '.join(f'{v} {k}' for k, v in skipped.items())})")
  cut = result.get("truncated", {})
  for what, limit in (("prompts", "prefix_len"), ("texts", "text_len")):
    if cut.get(what):
      text += (f"; WARNING: {cut[what]} of {result['num_examples']} {what} longer than {limit} {cut[limit]}, cut"
               f" (raise the evaluator's {limit})")
  return text
