"""Batch evaluation through the shared decode loop: greedy answers to each example's first prompt, scored
against its first answer. The last batch is padded with copies whose predictions are dropped, so every batch
has one shape and one compilation.
"""
import collections
import math

import jax
import jax.numpy as jnp
import numpy as np

from vlm_jax import decode as decode_lib
from vlm_jax.data.image import to_rgb_array
from vlm_jax.data.pipeline import make_source
from vlm_jax.data.text import tokenize_prefix


def normalize(text: str) -> str:
  return " ".join(text.strip().lower().split())


def exact_match(prediction: str, answer: str) -> float:
  return float(normalize(prediction) == normalize(answer))


METRICS = {"exact_match": exact_match}


def evaluate(model_cfg, params, tokenizer, eval_cfg, progress=None) -> dict:
  """Runs one evaluator config ({name, data, metrics, batch_size, max_new_tokens, prefix_len}).

  Returns {"name", metric: mean, f"{metric}/{task}": per-task mean, "num_examples", "predictions": [...]}.
  """
  source = make_source(eval_cfg.data)
  n = len(source)
  if eval_cfg.get("num_examples"):
    n = min(n, int(eval_cfg.num_examples))
  metrics = list(eval_cfg.get("metrics", ["exact_match"]))
  if unknown := [m for m in metrics if m not in METRICS]:
    raise ValueError(f"Unknown metrics {unknown}; known: {sorted(METRICS)}.")
  batch_size = int(eval_cfg.get("batch_size", 32))
  size, prefix_len = model_cfg.img.image_size, int(eval_cfg.get("prefix_len", 32))
  predictions, scores = [], collections.defaultdict(list)
  for start in range(0, n, batch_size):
    idx = [min(i, n - 1) for i in range(start, start + batch_size)]  # pad the last batch with repeats
    examples = [source[i] for i in idx]
    images = np.stack([np.zeros((size, size, 3), np.float32) if ex["image"] is None
                       else to_rgb_array(ex["image"], size) for ex in examples])
    prefix = [tokenize_prefix(tokenizer, ex["turns"][0][0], prefix_len) for ex in examples]
    ids = decode_lib.decode(model_cfg, params, jnp.asarray(images), jnp.asarray(np.stack([p[0] for p in prefix])),
                            jnp.asarray(np.stack([p[1] for p in prefix])), jax.random.key(0),
                            max_new_tokens=int(eval_cfg.get("max_new_tokens", 16)), eos_id=tokenizer.eos_id,
                            pad_id=tokenizer.pad_id)
    for k, row in enumerate(np.asarray(ids)[:max(0, min(batch_size, n - start))]):
      ex = examples[k]
      pred, answer = tokenizer.decode(row), ex["turns"][0][1]
      record = {"id": ex["id"], "task": ex.get("task", ""), "prompt": ex["turns"][0][0], "answer": answer,
                "prediction": pred}
      for m in metrics:
        record[m] = METRICS[m](pred, answer)
        scores[m].append(record[m])
        scores[f"{m}/{record['task']}"].append(record[m])
      predictions.append(record)
    if progress:
      progress(min(start + batch_size, n), n)
  out = {"name": eval_cfg.get("name", "eval"), "num_examples": n}
  out.update({k: float(np.mean(v)) for k, v in sorted(scores.items())})
  out["predictions"] = predictions
  return out


def summary(result: dict) -> str:
  keys = [k for k in result if k not in ("predictions", "name", "num_examples") and "/" not in k]
  return ", ".join(f"{k} {result[k]:.4f}" for k in keys if not math.isnan(result[k]))
