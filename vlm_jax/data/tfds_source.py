"""A TensorFlow Datasets dataset in ArrayRecord format as a source, read with `tfds.data_source` (no
TensorFlow needed), with a field mapping onto the (prompt, answer) turn every source yields.

`fields` maps "image", "prompt" and "answer" to feature names; a value starting with "=" is literal text, e.g.
fields=dict(image="image", prompt="=caption en", answer="caption"). A list-valued answer (several reference
answers, as in VQA) trains on its first entry; evaluators score against all of them (`answers`).
"""
import numpy as np

DEFAULT_FIELDS = {"image": "image", "prompt": "question", "answer": "answer"}


def _text(value) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray) and value.dtype == object or isinstance(value, (list, tuple)):
    return _text(value[0]) if len(value) else ""
  return str(value)


class TfdsSource:

  def __init__(self, name: str, data_dir: str | None = None, split: str = "train", fields=None):
    try:
      import tensorflow_datasets as tfds
    except ImportError as e:
      raise ImportError("the tfds source needs tensorflow-datasets: pip install -e '.[tfds]'") from e
    self.name, self.split, self.fields = name, split, {**DEFAULT_FIELDS, **dict(fields or {})}
    try:
      # download=False: nothing is fetched at run time; a dataset not prepared in data_dir is an error here.
      self._src = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises several types (DatasetNotFoundError, FileNotFoundError, ...)
      raise ValueError(f"cannot open TFDS dataset {name!r} split {split!r} in {data_dir}: {e}") from e
    features = set(self._src.dataset_info.features.keys())
    for role, feature in self.fields.items():
      if role not in DEFAULT_FIELDS:
        raise ValueError(f"tfds fields: unknown role {role!r}; use image, prompt, answer.")
      if not str(feature).startswith("=") and feature not in features:
        raise ValueError(f"TFDS dataset {name!r} has no feature {feature!r} (for {role}); "
                         f"features: {sorted(features)}.")

  def __len__(self):
    return len(self._src)

  def __getitem__(self, i):
    record = self._src[int(i)]
    get = lambda role: self.fields[role][1:] if self.fields[role].startswith("=") else record[self.fields[role]]
    image, answer = get("image"), get("answer")
    many = isinstance(answer, (list, tuple)) or isinstance(answer, np.ndarray) and answer.ndim == 1
    return {"id": f"{self.name}/{self.split}/{int(i)}", "image": None if isinstance(image, str) else np.asarray(image),
            "turns": [(_text(get("prompt")), _text(answer))], "task": self.name,
            "answers": [_text(a) for a in answer] if many else [_text(answer)]}

  def __repr__(self):
    return f"TfdsSource({self.name!r}, split={self.split!r}, {len(self)} examples, fields={self.fields})"
