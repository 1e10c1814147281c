"""File helpers every writer and reader shares: JSON with errors naming the file, atomic directories."""
import contextlib
import json
import os
import shutil
import tempfile

from etils import epath


def read_json(file: str):
  """The JSON object in `file` (a local path or a remote one such as gs://..., read through etils.epath)."""
  try:
    return json.loads(epath.Path(file).read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"{file}: malformed JSON ({e}).") from e


@contextlib.contextmanager
def atomic_dir(out_dir: str):
  """Yields a temporary sibling of `out_dir` to fill; renames it to `out_dir` only if the block succeeds, so a
  crash never leaves a half-written directory. `out_dir` must not exist or be empty: nothing is overwritten."""
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(out_dir) and os.listdir(out_dir):
    raise FileExistsError(f"{out_dir} exists and is not empty; choose a new directory.")
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(out_dir), dir=parent)
  try:
    yield tmp
    if os.path.exists(out_dir):
      os.rmdir(out_dir)
    os.replace(tmp, out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
