"""Progress bars for long host-side work (reading and writing large checkpoint files)."""
import os
import sys

from tqdm.auto import tqdm


def progress(items, desc: str, total_bytes: int = 0):
  """Wraps an iterable in a tqdm bar on stderr when the work is large: at least VLM_JAX_PROGRESS_MIN_BYTES
  (default 256 MiB; below that a bar is noise)."""
  items = list(items)
  if total_bytes < int(os.environ.get("VLM_JAX_PROGRESS_MIN_BYTES", 256 << 20)):
    return items
  return tqdm(items, desc=desc, unit="tensor", file=sys.stderr, dynamic_ncols=True)
