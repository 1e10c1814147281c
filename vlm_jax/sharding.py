"""Device mesh from the config, and param shardings from one ordered regex table of logical axes.

Logical axes (per param dim) map to mesh axes `data`, `fsdp`, `tensor` through `LOGICAL_TO_MESH`. A param
that no rule matches is an error, not a silent replicate. A dim whose size the mesh axis does not divide
stays replicated (tiny test models), so the same config runs on any device count. Specs depend on the mesh's
axis sizes only, so layouts (and memory plans) can be computed without devices.
"""
import contextlib
import math
import re

import jax
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
    # Llama family (models/llama.py).
    (r"llm/layers/attn/(q|k|v)_proj/w", ("layers", "heads", "embed", "kv")),
    (r"llm/layers/attn/(q|k|v)_proj/b", ("layers", "heads", "kv")),
    (r"llm/layers/attn/o_proj/w", ("layers", "heads", "kv", "embed")),
    (r"llm/layers/mlp/(gate|up)/w", ("layers", "embed", "mlp")),
    (r"llm/layers/mlp/down/w", ("layers", "mlp", "embed")),
    (r"llm/lm_head/w", ("embed", "vocab")),
    # T5 / UL2 encoder-decoder (models/t5.py).
    (r"llm/(encoder|decoder)/layers/(attn|cross_attn)/q_einsum/w", ("layers", "heads", "embed", "kv")),
    (r"llm/(encoder|decoder)/layers/attn/kv_einsum/w", ("layers", None, "heads", "embed", "kv")),
    (r"llm/decoder/cross_kv_einsum/w", ("layers", None, "heads", "embed", "kv")),
    (r"llm/(encoder|decoder)/layers/(attn|cross_attn)/attn_vec_einsum/w", ("layers", "heads", "kv", "embed")),
    (r"llm/(encoder|decoder)/layers/mlp/gating_einsum", ("layers", None, "embed", "mlp")),
    (r"llm/(encoder|decoder)/layers/mlp/wi", ("layers", "embed", "mlp")),
    (r"llm/(encoder|decoder)/layers/mlp/linear", ("layers", "mlp", "embed")),
    (r"llm/(encoder|decoder)/layers/.*norm/scale", ("layers", "embed")),
    (r"llm/(encoder|decoder)/final_norm/scale", ("embed",)),
    (r"llm/(encoder|decoder)/relpos_bias", (None, "heads")),
    (r"llm/lm_head", ("vocab", "embed")),
    # Adapters (models/adapters.py): the MLP projector, the resampler's queries, projections and norms.
    (r"adapter/linear_1/kernel", ("embed", "mlp")),
    (r"adapter/linear_2/kernel", ("mlp", "embed")),
    (r"adapter/(linear_1|linear_2)/bias", ("embed",)),
    (r"adapter/queries", (None, "embed")),
    (r"adapter/(kv_proj|proj)/kernel", (None, "embed")),
    (r"adapter/attn/(query|key|value)/kernel", ("embed", "heads", "kv")),
    (r"adapter/attn/(query|key|value)/bias", ("heads", "kv")),
    (r"adapter/attn/out/kernel", ("heads", "kv", "embed")),
    (r"adapter/.*(bias|scale)", ("embed",)),
)

# FSDP shards the embed dim of every weight; tensor parallelism splits heads, mlp and vocab. Batches are split
# over fsdp x data with fsdp major. The data-major order ("data", "fsdp") is miscompiled by XLA's SPMD partitioner
# (jaxlib 0.10.2, Shardy and GSPMD alike) on meshes whose data, fsdp and tensor axes all exceed 1: for some
# shapes a collective-permute swaps rows between (data, fsdp) blocks and every example's result comes from
# another one's activations (tests/test_distributed.py::test_the_batch_order_avoids_an_xla_miscompile).
LOGICAL_TO_MESH = {"embed": "fsdp", "heads": "tensor", "mlp": "tensor", "vocab": "tensor", "kv": None,
                   "layers": None, "batch": ("fsdp", "data")}


def check_axes(sizes_cfg, what: str = "mesh") -> dict:
  """{axis: size} over `MESH_AXES` (missing axes are 1), checked without devices: known names, sizes positive
  or -1, at most one -1. Raises ValueError naming `what` and the offending axes."""
  if sizes_cfg is not None and not hasattr(sizes_cfg, "keys"):
    raise ValueError(f"{what} must be a dict of axis sizes such as {{'data': 2, 'fsdp': -1}}, got {sizes_cfg!r}.")
  try:
    sizes = {k: int(v) for k, v in dict(sizes_cfg or {}).items()}
  except (TypeError, ValueError) as e:
    raise ValueError(f"{what} axis sizes must be integers, got {dict(sizes_cfg)}.") from e
  if unknown := sorted(set(sizes) - set(MESH_AXES)):
    raise ValueError(f"Unknown {what} axes {unknown}; use {', '.join(MESH_AXES)}.")
  sizes = {a: sizes.get(a, 1) for a in MESH_AXES}
  if bad := {a: s for a, s in sizes.items() if s == 0 or s < -1}:
    raise ValueError(f"{what} axis sizes must be positive or -1, got {bad}.")
  if len(fill := [a for a, s in sizes.items() if s == -1]) > 1:
    raise ValueError(f"Only one {what} axis may be -1, got {fill}.")
  return sizes


def resolve_axes(sizes_cfg, num_devices: int, what: str = "mesh") -> dict:
  """`check_axes`' sizes with the -1 axis filled, whose product is `num_devices`. Raises ValueError naming the
  sizes when they do not fit."""
  sizes = check_axes(sizes_cfg, what)
  fill = [a for a, s in sizes.items() if s == -1]
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if num_devices % fixed:
      raise ValueError(f"{what} {_spell(sizes)}: {num_devices} devices are not divisible by the fixed axes' "
                       f"product {fixed}.")
    sizes[fill[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f"{what} {_spell(sizes)} needs {math.prod(sizes.values())} devices, have {num_devices}.")
  return sizes


def _spell(sizes: dict) -> str:
  return ",".join(f"{a}={s}" for a, s in sizes.items())


def make_mesh(mesh_cfg, dcn_mesh_cfg=None) -> Mesh:
  """The (data, fsdp, tensor) mesh.

  `mesh_cfg` sizes the axes within one granule (a TPU slice; on GPUs and CPUs, a process), `dcn_mesh_cfg`
  (optional) how many granules each axis spans over the data-centre network; a mesh axis is the product of
  both. Without `dcn_mesh_cfg` the mesh covers all devices with `mesh_cfg` alone. Either may use -1 once.
  A `mesh_cfg` that already is a Mesh is taken as it is, over (data, fsdp, tensor) in that order (an axis it
  lacks has size 1) with Auto axis types (the param and batch rules place arrays themselves).
  """
  if isinstance(mesh_cfg, Mesh):
    return _as_vlm_mesh(mesh_cfg)
  devices = jax.devices()
  from jax.experimental import mesh_utils
  dcn = dict(dcn_mesh_cfg or {})
  if all(int(v) == 1 for v in dcn.values()):  # one granule's worth of axes: a mesh over all devices
    sizes = resolve_axes(mesh_cfg, len(devices))
    grid = mesh_utils.create_device_mesh([sizes[a] for a in MESH_AXES], devices=devices,
                                         allow_split_physical_axes=True)
  else:
    granules = _num_granules(devices)
    dcn_sizes = resolve_axes(dcn, granules, "dcn_mesh")
    ici_sizes = resolve_axes(mesh_cfg, len(devices) // granules, "mesh (per granule)")
    grid = mesh_utils.create_hybrid_device_mesh(
        [ici_sizes[a] for a in MESH_AXES], [dcn_sizes[a] for a in MESH_AXES], devices=devices,
        process_is_granule=not _is_multislice_tpu(devices), allow_split_physical_axes=True)
  return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def _as_vlm_mesh(mesh: Mesh) -> Mesh:
  names = tuple(mesh.axis_names)
  if unknown := [a for a in names if a not in MESH_AXES]:
    raise ValueError(f"mesh axes {list(names)}: {unknown} are not vlm_jax axes; name them from {', '.join(MESH_AXES)} "
                     "(or give a dict of axis sizes).")
  devices = mesh.devices.reshape(mesh.devices.shape + (1,) * (len(MESH_AXES) - len(names)))
  names += tuple(a for a in MESH_AXES if a not in names)
  devices = devices.transpose([names.index(a) for a in MESH_AXES])
  return Mesh(devices, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def _is_multislice_tpu(devices) -> bool:
  return devices[0].platform == "tpu" and hasattr(devices[0], "slice_index")


def _num_granules(devices) -> int:
  """TPU slices, else processes (hosts): the units the data-centre network connects."""
  if _is_multislice_tpu(devices):
    return len({d.slice_index for d in devices})
  return len({d.process_index for d in devices})


def logical_axes(name: str, ndim: int):
  for pattern, axes in PARAM_RULES:
    if len(axes) == ndim and re.fullmatch(pattern, name):
      return axes
  raise ValueError(f"No sharding rule matches param {name!r} of rank {ndim}: add one to "
                   "vlm_jax.sharding.PARAM_RULES.")


def spec_for(name: str, shape, mesh_shape) -> P:
  """PartitionSpec of one param, replicating any dim its mesh axis does not divide. `mesh_shape`: a Mesh's
  `.shape` or any {axis: size} mapping (no devices needed); a Mesh itself also works."""
  mesh_shape = mesh_shape.shape if isinstance(mesh_shape, Mesh) else mesh_shape
  out = []
  for dim, logical in zip(shape, logical_axes(name, len(shape))):
    axis = LOGICAL_TO_MESH.get(logical) if logical else None
    size = axis_size(axis, mesh_shape)
    out.append(axis if size > 1 and dim % size == 0 else None)
  return P(*out)


def axis_size(axis, mesh_shape) -> int:
  """Devices along one mesh axis name, a tuple of names, or None."""
  if axis is None:
    return 1
  return math.prod(mesh_shape[a] for a in (axis if isinstance(axis, tuple) else (axis,)))


def shard_shape(shape, spec: P, mesh_shape) -> tuple:
  """The per-device block of an array of `shape` laid out by `spec`."""
  return tuple(dim // axis_size(axis, mesh_shape) for dim, axis in zip(shape, tuple(spec) + (None,) * len(shape)))


def param_specs(flat_shapes: dict, mesh_shape) -> dict:
  """{name: PartitionSpec} for a flat {name: array-or-ShapeDtypeStruct} dict."""
  return {k: spec_for(k, v.shape, mesh_shape) for k, v in flat_shapes.items()}


def param_shardings(flat_shapes: dict, mesh: Mesh) -> dict:
  """{name: NamedSharding} for a flat {name: array-or-ShapeDtypeStruct} dict."""
  return {k: NamedSharding(mesh, spec) for k, spec in param_specs(flat_shapes, mesh.shape).items()}


def opt_state_specs(abstract_opt_state, flat_params: dict, mesh_shape):
  """PartitionSpecs for an optimizer state: a leaf that mirrors a param (Adam's moments: its key path ends in
  the param's name and it has the param's shape) is laid out like that param; anything else (step counts,
  factored second moments) is replicated."""
  def spec(path, leaf):
    keys = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
    for i in range(len(keys)):
      name = "/".join(keys[i:])
      if name in flat_params and tuple(flat_params[name].shape) == tuple(leaf.shape):
        return spec_for(name, leaf.shape, mesh_shape)
    return P()
  return jax.tree_util.tree_map_with_path(spec, abstract_opt_state)


def process_batch_rows(mesh: Mesh, batch_size: int) -> tuple[int, int]:
  """(first, count): this process reads rows [first, first + count) of every global batch of the example
  stream. Its devices hold `count` rows of each global batch under `batch_sharding` (not always contiguous
  ones: with data across processes they are strided, and `jax.make_array_from_process_local_data` places
  them); processes whose devices hold the same rows (a replicated axis across processes) read the same ones.
  Every row of a batch is read by some process, so a global batch holds the same examples whatever the
  number of processes (their order over the devices may differ, which the batch-mean loss does not see)."""
  rows_of = {}
  for device, index in batch_sharding(mesh, 1).devices_indices_map((batch_size,)).items():
    block = (index[0].start or 0, batch_size if index[0].stop is None else index[0].stop)
    rows_of.setdefault(device.process_index, set()).add(block)
  groups = sorted({tuple(sorted(blocks)) for blocks in rows_of.values()})
  counts = {sum(b - a for a, b in blocks) for blocks in groups}
  every = sorted(block for blocks in groups for block in blocks)
  if (len(counts) != 1 or sum(b - a for a, b in every) != batch_size
      or any(stop > start for (_, stop), (start, _) in zip(every, every[1:]))):
    raise ValueError(f"the processes' devices hold batch rows {groups}: not an equal, disjoint share each. "
                     "Build the mesh from the config (make_mesh), or order a hand-built Mesh's devices by process.")
  mine = tuple(sorted(rows_of[jax.process_index()]))
  return groups.index(mine) * counts.pop(), sum(b - a for a, b in mine)


def batch_ways(mesh_shape) -> int:
  """How many ways a batch is split: the product of the mesh axes (a Mesh's `.shape` or a dict) it spans."""
  return axis_size(LOGICAL_TO_MESH["batch"], mesh_shape)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  """Leading (batch) dim split over fsdp x data (`LOGICAL_TO_MESH["batch"]`), the rest replicated."""
  return NamedSharding(mesh, P(LOGICAL_TO_MESH["batch"], *([None] * (ndim - 1))))


def using(mesh: Mesh | None):
  """The context to run jitted model code in: `jax.set_mesh(mesh)`, under which each block's input keeps the
  batch split over the mesh (`layers.constrain_batch`); no mesh, no context."""
  return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
