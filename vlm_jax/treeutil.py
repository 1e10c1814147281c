"""Param pytrees as flat {"a/b/c": array} dicts, and the one shape check every loader uses."""
import jax
import numpy as np


def flatten(tree, sep="/") -> dict:
  """{"img/embedding/kernel": array, ...} for a nested dict."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out[sep.join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)] = leaf
  return out


def unflatten(flat: dict, sep="/") -> dict:
  tree = {}
  for name, leaf in flat.items():
    node = tree
    *parents, last = name.split(sep)
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = leaf
  return tree


def check_shapes(expected: dict, found: dict, source: str):
  """Raises ValueError naming each missing, unexpected or mis-shaped key (expected vs found shapes)."""
  problems = []
  for key in sorted(set(expected) | set(found)):
    if key not in found:
      problems.append(f"missing {key} (expected shape {tuple(np.shape(expected[key]))})")
    elif key not in expected:
      problems.append(f"unexpected {key} (shape {tuple(np.shape(found[key]))})")
    elif tuple(np.shape(expected[key])) != tuple(np.shape(found[key])):
      problems.append(f"{key}: expected shape {tuple(np.shape(expected[key]))}, found {tuple(np.shape(found[key]))}")
  if problems:
    shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
    raise ValueError(f"{source} does not fit the model:\n  {shown}")
