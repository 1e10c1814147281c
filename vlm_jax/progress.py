"""Progress bars for long host-side work (reading and writing large checkpoint files)."""
import sys

from tqdm.auto import tqdm

LARGE_BYTES = 256 << 20  # below this a bar is noise


def progress(items, desc: str, total_bytes: int = 0, force: bool = False):
  """Wraps an iterable in a tqdm bar on stderr when the work is large (or `force`)."""
  items = list(items)
  if not force and total_bytes < LARGE_BYTES:
    return items
  return tqdm(items, desc=desc, unit="tensor", file=sys.stderr, dynamic_ncols=True)
