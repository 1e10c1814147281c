"""The grain input pipeline: sources -> shuffle/repeat -> weighted mixture -> this process's rows of each global
batch -> preprocess -> batch. Each process reads and preprocesses only its rows; the iterator's state goes into
the checkpoint.

A source is any random-access object (`__len__`, `__getitem__`) returning examples
{"id", "image": uint8 [H,W,3] or None, "turns": [(prompt, answer), ...], "task"} (or None for a bad example
that a `skip_bad` source already counted).
"""
import collections
import inspect

import grain
import numpy as np

from vlm_jax.data.image import to_rgb_array
from vlm_jax.data.text import tokenize_turns


def make_source(src_cfg, skip_bad: bool = False):
  """A source from its config dict: kind = synthetic | llava_json | tfds, the other keys the kind's arguments
  (a key it does not take, or a missing one, is an error naming it). `skip_bad` (here or in the source's own
  config) makes sources that read files skip and count bad records instead of raising."""
  kind = src_cfg.get("kind")
  kw = {k: v for k, v in dict(src_cfg).items() if k not in ("kind", "weight", "skip_bad")}
  if kind == "synthetic":
    from vlm_jax.data.synthetic import SyntheticSource as source_class
  elif kind == "llava_json":
    from vlm_jax.data.llava_json import LlavaJsonSource as source_class
    kw["skip_bad"] = bool(src_cfg.get("skip_bad", skip_bad))
  elif kind == "tfds":
    from vlm_jax.data.tfds_source import TfdsSource as source_class
  else:
    raise ValueError(f"Unknown data source kind {kind!r}; use synthetic | llava_json | tfds.")
  params = inspect.signature(source_class).parameters
  if unknown := sorted(set(kw) - set(params)):
    raise ValueError(f"a {kind} data source takes no {', '.join(unknown)} (its keys: kind, weight, skip_bad, "
                     f"{', '.join(k for k in params if k != 'skip_bad')}).")
  if missing := [k for k, p in params.items() if p.default is p.empty and k not in kw]:
    raise ValueError(f"a {kind} data source needs {', '.join(missing)}.")
  return source_class(**kw)


def source_configs(data_cfg):
  """`data` is one source config, or {"sources": [...]} for a weighted mixture."""
  data_cfg = dict(data_cfg)
  if "sources" not in data_cfg:
    return [data_cfg]
  sources = data_cfg["sources"]
  if not isinstance(sources, (list, tuple)) or not sources or not all(hasattr(s, "keys") for s in sources):
    raise ValueError(f"sources must be a non-empty list of source configs (dicts), got {sources!r:.200}.")
  for i, src in enumerate(sources):
    weight = dict(src).get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < float("inf"):
      raise ValueError(f"sources[{i}].weight must be a finite number > 0, got {weight!r}.")
  return [dict(s) for s in sources]


def make_sources(data_cfg) -> list:
  """The sources of a training `data` config (`source_configs`), each checked to hold examples."""
  skip_bad = bool(dict(data_cfg).get("skip_bad", False))
  sources = []
  for src_cfg in source_configs(data_cfg):
    sources.append(make_source(src_cfg, skip_bad))
    if len(sources[-1]) == 0:
      raise ValueError(f"data source {src_cfg} has no examples.")
  return sources


class Preprocess:
  """Example -> fixed-shape arrays. Counts truncated texts and unusable images (in this process); grain
  drops the None a skip_bad source returns for a bad record before it gets here, so `stats` adds the
  sources' own `skipped` counters."""

  def __init__(self, tokenizer, image_size: int, text_len: int, skip_bad: bool = False, sources=()):
    self.tokenizer, self.image_size, self.text_len, self.skip_bad = tokenizer, image_size, text_len, skip_bad
    self.counts = collections.Counter()
    self.sources = list(sources)

  def stats(self) -> dict:
    out = collections.Counter(self.counts)
    for src in self.sources:
      for reason, n in getattr(src, "skipped", {}).items():
        out[f"skipped {reason}"] += n
    return {k: v for k, v in out.items() if v}

  def skip_reports(self) -> list[str]:
    """The sources' `skip_report`s (those that can skip records name which), where not empty."""
    return [r for r in (src.skip_report() for src in self.sources if hasattr(src, "skip_report")) if r]

  def __call__(self, example):
    try:
      if example["image"] is None:  # text-only example: a blank (mid-grey) image keeps shapes static
        image = np.zeros((self.image_size, self.image_size, 3), np.float32)
      else:
        image = to_rgb_array(example["image"], self.image_size)
    except ValueError as e:
      if not self.skip_bad:
        raise ValueError(f"example {example.get('id')}: {e}") from e
      self.counts["skipped bad image"] += 1
      return None
    tok = tokenize_turns(self.tokenizer, example["turns"], self.text_len)
    self.counts["truncated"] += int(tok.truncated)
    return {"image": image, "tokens": tok.tokens, "mask_ar": tok.mask_ar, "mask_loss": tok.mask_loss,
            "mask_input": tok.mask_input}


class _BatchRows(grain.MapDataset):
  """Rows [start, start + rows) of every global batch of `batch_size` consecutive elements of `parent`:
  element k is row `start + k % rows` of global batch `k // rows`."""

  def __init__(self, parent, batch_size: int, start: int, rows: int):
    super().__init__(parent)
    self._batch_size, self._start, self._rows = batch_size, start, rows

  def __len__(self):
    return len(self._parent) // self._batch_size * self._rows

  def __getitem__(self, index):
    if isinstance(index, slice):
      raise TypeError("_BatchRows does not support slicing.")
    batch, row = divmod(index, self._rows)
    return self._parent[batch * self._batch_size + self._start + row]


def make_train_iterator(data_cfg, tokenizer, image_size: int, text_len: int, batch_size: int, seed: int,
                        num_threads: int = 4, rows=None, sources=None):
  """(grain iterator of this process's host-local batches, Preprocess with its counts).

  Every process walks the same shuffled, mixed stream of examples, cut into global batches of `batch_size`,
  and reads only its own rows of each: `rows` = (first row, number of rows; `sharding.process_batch_rows`),
  by default all of them. So the global batch of step s holds the same
  examples in the same order whatever the number of processes (examples a `skip_bad` source drops are
  replaced from the process's next rows, which makes that exact only when none are dropped).
  `sources`: `make_sources(data_cfg)`, where the caller built them already.
  """
  rows = rows or (0, batch_size)
  sources = make_sources(data_cfg) if sources is None else sources
  parts = [grain.MapDataset.source(src).shuffle(seed=seed + 7919 * i).repeat(None) for i, src in enumerate(sources)]
  weights = [float(src_cfg.get("weight", 1.0)) for src_cfg in source_configs(data_cfg)]
  ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
  ds = _BatchRows(ds, batch_size, *rows)
  preprocess = Preprocess(tokenizer, image_size, text_len, bool(dict(data_cfg).get("skip_bad", False)), sources)
  it_ds = ds.map(preprocess).to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=8))
  it_ds = it_ds.filter(lambda x: x is not None).batch(rows[1], drop_remainder=True)
  return iter(it_ds), preprocess


def seek(iterator, batch_index: int, rows: int):
  """Puts a fresh `make_train_iterator` iterator (reading `rows` rows of each global batch) at global batch
  `batch_index`: how a run resumed on a different number of processes, whose saved iterator states do not
  fit it, continues where the data was."""
  iterator.set_state({"next_index": batch_index * rows})
