"""big_vision `.npz` checkpoints: flat "/"-joined keys (`params/img/...` or `img/...`), layers stacked on axis 0.

Our param names mirror big_vision's, so import is a rename-free load plus three fixes: bfloat16 arrays come
back from numpy as void (itemsize 2) and are viewed as bfloat16 again, the `params/` prefix is optional, and
position embeddings of another resolution are resampled.
"""
import os
import zipfile

import ml_dtypes
import numpy as np

from vlm_jax import treeutil
from vlm_jax.progress import progress

POSEMB = "img/pos_embedding"


def recover_dtype(a: np.ndarray) -> np.ndarray:
  """numpy saves bfloat16 as void of itemsize 2: view it back as bfloat16."""
  if a.dtype.type is np.void and a.dtype.itemsize == 2:
    return a.view(ml_dtypes.bfloat16)
  return a


def read_npz(path: str) -> dict:
  """{name without 'params/': array} from a big_vision .npz, with a clear error for a broken file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No such checkpoint file: {path}")
  try:
    with np.load(path, allow_pickle=False) as npz:
      names = list(npz.files)
      out = {}
      for name in progress(names, desc=f"reading {os.path.basename(path)}", total_bytes=os.path.getsize(path)):
        out[name.removeprefix("params/")] = recover_dtype(npz[name])
  except (zipfile.BadZipFile, EOFError, ValueError, OSError) as e:
    raise ValueError(f"{path} is not a readable .npz checkpoint (truncated or corrupt?): {e}") from e
  return out


def load(path: str, config):
  """Params {"params": {...}} for `config` from a big_vision .npz, checked key by key against the model (the
  position embeddings of another image resolution resampled to the model's)."""
  from vlm_jax.models.vit import resample_posemb
  from vlm_jax.models.vlm import abstract_params
  flat = read_npz(path)
  expected = treeutil.flatten(abstract_params(config))
  posemb, want = flat.get(POSEMB), expected.get(POSEMB)
  if posemb is not None and want is not None and posemb.ndim == 3 and posemb.shape[::2] == want.shape[::2]:
    # Another resolution's checkpoint (a 224 px one for a 448 px model): resampled to the model's grid, as
    # big_vision's own loader does.
    try:
      flat[POSEMB] = np.asarray(resample_posemb(posemb, config.img.grid))
    except ValueError as e:
      raise ValueError(f"big_vision checkpoint {path}: {POSEMB} of shape {posemb.shape}: {e}") from None
  treeutil.check_shapes(expected, flat, f"big_vision checkpoint {path}")
  if bad := {k: str(v.dtype) for k, v in flat.items() if v.dtype.kind in "iub"}:  # bfloat16's kind is "V"
    # e.g. bfloat16 bits some dumpers store as uint16: read as numbers, they would be garbage weights
    raise ValueError(f"big_vision checkpoint {path}: weights must be floating point, got {bad}.")
  flat = {k: np.asarray(v, expected[k].dtype) for k, v in flat.items()}
  return {"params": treeutil.unflatten(flat)}

