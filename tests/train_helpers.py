"""Small training configs and checkpoint readers shared by the training tests (and their subprocesses)."""
import os

import numpy as np
import orbax.checkpoint as ocp

from vlm_jax import config_util, treeutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny_synthetic.py")


def small_config(steps=(3, 2), batch=8, res=16, **top):
  """The README config shrunk: 16px then 32px, a 2-layer model, a few steps per stage, no evals."""
  c = config_util.load_config(f"{TINY}:res={res},res2={2 * res},batch={batch},examples=256")
  with c.unlocked():
    c.model.img.depth, c.model.llm.depth = 1, 1
    for stage, n in zip(c.stages, steps):
      stage["steps"] = n
      stage["schedule"] = dict(decay="cosine", warmup_steps=1)
      stage["text_len"] = 16
    c.evals = []
    c.log_every = 1
    c.checkpoint_every = 0
    c.keep_checkpoints = 10
    for k, v in top.items():
      c[k] = v
  return c


def read_item(workdir, step, item="params"):
  path = os.path.join(workdir, "checkpoints", str(step), item)
  with ocp.StandardCheckpointer() as ckptr:
    return treeutil.flatten(ckptr.restore(path))


def item_names(workdir, step, item):
  path = os.path.join(workdir, "checkpoints", str(step), item)
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(path)
  return list(treeutil.flatten(getattr(meta, "item_metadata", meta)))


def losses(workdir):
  import json
  return [json.loads(line)["loss"] for line in open(os.path.join(workdir, "metrics.jsonl"))
          if '"loss"' in line]


def max_abs_diff(a: dict, b: dict) -> float:
  assert sorted(a) == sorted(b)
  return max(float(np.max(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)))) for k in a)
