"""Reading and writing safetensors files with numpy, bfloat16 included, and errors that name the file.

The format: 8-byte little-endian header size, a JSON header {name: {dtype, shape, data_offsets}}, then the
raw bytes. Reading it directly keeps bfloat16 (which numpy lacks; ml_dtypes has it) and lets a truncated
file be reported as exactly that.
"""
import json
import os
import struct

import ml_dtypes
import numpy as np

from vlm_jax.progress import progress

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


def read(path: str) -> dict:
  """{name: numpy array} for every tensor in one .safetensors file."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise ValueError(f"{path}: truncated safetensors file ({size} bytes, no header).")
    (n,) = struct.unpack("<Q", raw)
    if 8 + n > size:
      raise ValueError(f"{path}: truncated safetensors file (header of {n} bytes, file is {size} bytes).")
    try:
      header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{path}: corrupt safetensors header ({e}).") from e
  header.pop("__metadata__", None)
  data = np.memmap(path, dtype=np.uint8, mode="r")
  out = {}
  for name in progress(sorted(header), desc=f"reading {os.path.basename(path)}", total_bytes=size):
    info = header[name]
    if info["dtype"] not in DTYPES:
      raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}.")
    begin, end = (8 + n + o for o in info["data_offsets"])
    if end > size:
      raise ValueError(f"{path}: truncated safetensors file: tensor {name} needs bytes up to {end}, "
                       f"the file has {size}.")
    dtype = np.dtype(DTYPES[info["dtype"]])
    if (end - begin) != dtype.itemsize * int(np.prod(info["shape"], dtype=np.int64)):
      raise ValueError(f"{path}: tensor {name}: {end - begin} bytes do not hold {info['dtype']} {info['shape']}.")
    out[name] = np.frombuffer(data[begin:end], dtype=dtype).reshape(info["shape"])
  return out


def write(path: str, tensors: dict, metadata: dict | None = None):
  """Writes `tensors` ({name: array}) to `path` via a temporary file and a rename."""
  header, offset = {}, 0
  arrays = {}
  for name in sorted(tensors):
    a = np.ascontiguousarray(tensors[name])
    if a.dtype not in NAMES:
      raise ValueError(f"cannot store {name} of dtype {a.dtype} in safetensors.")
    header[name] = {"dtype": NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
    arrays[name] = a
    offset += a.nbytes
  if metadata:
    header["__metadata__"] = metadata
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # align the data to 8 bytes
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name in progress(arrays, desc=f"writing {os.path.basename(path)}", total_bytes=offset):
      f.write(arrays[name].tobytes())
  os.replace(tmp, path)
