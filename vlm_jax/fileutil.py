"""File helpers every writer and reader shares: JSON with errors naming the file, atomic files and directories."""
import contextlib
import json
import os
import shutil
import tempfile

from etils import epath

_UMASK = os.umask(0)  # read by setting it, so put back at once: new files get 0o666 & ~umask, as open() gives
os.umask(_UMASK)


def is_remote(path) -> bool:
  """An object-store path (gs://..., read and written through etils.epath)."""
  return "://" in str(path)


def write_file(path, data: str | bytes):
  """Writes `data` whole or not at all: a local file goes to a sibling that is renamed over `path` once synced (a
  crash leaves the previous contents, or nothing); an object store only ever shows whole objects."""
  data = data.encode() if isinstance(data, str) else data
  if is_remote(path):
    epath.Path(path).write_bytes(data)
    return
  path = os.path.abspath(path)
  # A unique sibling: processes on hosts sharing the directory (NFS) may have the same pid.
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path))
  try:
    os.fchmod(fd, 0o666 & ~_UMASK)  # as open() would create it, not mkstemp's 0600
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def read_json(file: str) -> dict:
  """The JSON object in `file` (a local path or a remote one such as gs://..., read through etils.epath). Every
  caller reads a config (config.json, vlm_config.json, tokenizer_config.json): another top-level value, or text
  that is not UTF-8, is a ValueError naming the file, not an AttributeError or UnicodeDecodeError later."""
  try:
    value = json.loads(epath.Path(file).read_bytes().decode("utf-8"))
  except UnicodeDecodeError as e:
    raise ValueError(f"{file}: not UTF-8 text ({e}).") from e
  except json.JSONDecodeError as e:
    raise ValueError(f"{file}: malformed JSON ({e}).") from e
  if not isinstance(value, dict):
    raise ValueError(f"{file}: expected a JSON object, got {value!r:.80}.")
  return value


def check_new_dir(path: str, what: str = ""):
  """A directory to create must not exist, or be empty: checked before slow work (a load, a training run)."""
  if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
    raise FileExistsError(f"{what}{path} exists and is not an empty directory; choose a new one.")


@contextlib.contextmanager
def atomic_dir(out_dir: str, replace: bool = False):
  """Yields a temporary sibling of `out_dir` to fill; renames it to `out_dir` only if the block succeeds, so a
  crash never leaves a half-written directory. `out_dir` must not exist or be empty, unless `replace`: then
  the old directory is swapped out once the new one is complete (a kill between the two renames leaves the old
  one whole in a `.old-` sibling)."""
  out_dir = os.path.abspath(out_dir)
  if not replace:
    check_new_dir(out_dir)
  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(out_dir), dir=parent)
  old = None
  try:
    os.chmod(tmp, 0o777 & ~_UMASK)  # as os.mkdir would create it, not mkdtemp's 0700
    yield tmp
    if os.path.exists(out_dir):
      old = tempfile.mkdtemp(prefix=".old-" + os.path.basename(out_dir), dir=parent)
      os.replace(out_dir, old)  # onto an empty directory: one rename
      try:
        os.replace(tmp, out_dir)
      except BaseException:
        os.replace(old, out_dir)
        old = None
        raise
    else:
      os.replace(tmp, out_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
    if old:
      shutil.rmtree(old, ignore_errors=True)
