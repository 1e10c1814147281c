"""Device mesh from the config, and param shardings from one ordered regex table of logical axes.

Logical axes (per param dim) map to mesh axes `data`, `fsdp`, `tensor` through `LOGICAL_TO_MESH`. A param
that no rule matches is an error, not a silent replicate. A dim whose size the mesh axis does not divide
stays replicated (tiny test models), so the same config runs on any device count.
"""
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Ordered (regex over "/"-joined param names, logical axes per dim). The first rule that matches the name and
# has the param's rank wins.
PARAM_RULES = (
    (r"img/embedding/kernel", (None, None, None, "embed")),
    (r"img/embedding/bias", ("embed",)),
    (r"img/pos_embedding", (None, None, "embed")),
    (r"img/.*/(query|key|value)/kernel", ("layers", "embed", "heads", "kv")),
    (r"img/.*/(query|key|value)/bias", ("layers", "heads", "kv")),
    (r"img/.*/out/kernel", ("layers", "heads", "kv", "embed")),
    (r"img/.*/Dense_0/kernel", ("layers", "embed", "mlp")),
    (r"img/.*/Dense_0/bias", ("layers", "mlp")),
    (r"img/.*/Dense_1/kernel", ("layers", "mlp", "embed")),
    (r"img/.*/(bias|scale)", ("layers", "embed")),
    # Unstacked copies of the above (final norm, MAP head): same names, no layer dim.
    (r"img/.*/(query|key|value)/kernel", ("embed", "heads", "kv")),
    (r"img/.*/(query|key|value)/bias", ("heads", "kv")),
    (r"img/.*/out/kernel", ("heads", "kv", "embed")),
    (r"img/.*/Dense_0/kernel", ("embed", "mlp")),
    (r"img/.*/Dense_0/bias", ("mlp",)),
    (r"img/.*/Dense_1/kernel", ("mlp", "embed")),
    (r"img/.*/(bias|scale)", ("embed",)),
    (r"img/MAPHead_0/probe", (None, None, "embed")),
    (r"img/head/kernel", ("embed", "mlp")),
    (r"img/head/bias", ("mlp",)),
    (r"llm/embedder/input_embedding", ("vocab", "embed")),
    (r"llm/layers/attn/q_einsum/w", ("layers", "heads", "embed", "kv")),
    (r"llm/layers/attn/kv_einsum/w", ("layers", None, "heads", "embed", "kv")),
    (r"llm/layers/attn/qkv_einsum/w", ("layers", None, "heads", "embed", "kv")),
    (r"llm/layers/attn/attn_vec_einsum/w", ("layers", "heads", "kv", "embed")),
    (r"llm/layers/mlp/gating_einsum", ("layers", None, "embed", "mlp")),
    (r"llm/layers/mlp/linear", ("layers", "mlp", "embed")),
    (r"llm/layers/.*norm/scale", ("layers", "embed")),
    (r"llm/final_norm/scale", ("embed",)),
)

# FSDP shards the embed dim of every weight; tensor parallelism splits heads, mlp and vocab.
LOGICAL_TO_MESH = {"embed": "fsdp", "heads": "tensor", "mlp": "tensor", "vocab": "tensor", "kv": None,
                   "layers": None, "batch": ("data", "fsdp")}


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one axis may be -1 to take the remaining devices."""
  devices = jax.devices() if devices is None else devices
  sizes = {k: int(v) for k, v in dict(mesh_cfg or {}).items()}
  if unknown := set(sizes) - set(MESH_AXES):
    raise ValueError(f"Unknown mesh axes {sorted(unknown)}; use {MESH_AXES}.")
  sizes = {a: sizes.get(a, 1) for a in MESH_AXES}
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise ValueError(f"Only one mesh axis may be -1, got {fill}.")
  known = int(np.prod([s for s in sizes.values() if s != -1]))
  if fill:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices are not divisible by the fixed mesh axes {sizes}.")
    sizes[fill[0]] = len(devices) // known
  if int(np.prod(list(sizes.values()))) != len(devices):
    raise ValueError(f"mesh {sizes} needs {int(np.prod(list(sizes.values())))} devices, have {len(devices)}.")
  from jax.experimental import mesh_utils
  shape = tuple(sizes[a] for a in MESH_AXES)
  grid = mesh_utils.create_device_mesh(shape, devices=devices)
  return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_axes(name: str, ndim: int):
  for pattern, axes in PARAM_RULES:
    if len(axes) == ndim and re.fullmatch(pattern, name):
      return axes
  raise ValueError(f"No sharding rule matches param {name!r} of rank {ndim}: add one to "
                   "vlm_jax.sharding.PARAM_RULES.")


def spec_for(name: str, shape, mesh: Mesh) -> P:
  """PartitionSpec of one param, replicating any dim its mesh axis does not divide."""
  out = []
  for dim, logical in zip(shape, logical_axes(name, len(shape))):
    axis = LOGICAL_TO_MESH.get(logical) if logical else None
    size = int(np.prod([mesh.shape[a] for a in (axis if isinstance(axis, tuple) else (axis,))])) if axis else 1
    out.append(axis if axis and size > 1 and dim % size == 0 else None)
  return P(*out)


def param_shardings(flat_shapes: dict, mesh: Mesh) -> dict:
  """{name: NamedSharding} for a flat {name: array-or-ShapeDtypeStruct} dict."""
  return {k: NamedSharding(mesh, spec_for(k, v.shape, mesh)) for k, v in flat_shapes.items()}


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) dim split over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
