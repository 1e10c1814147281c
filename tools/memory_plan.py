"""Bytes per device of a training config on a mesh, before launch: params, gradients, optimizer state and an
activation estimate for every stage, from abstract shapes only (no device, nothing allocated; seconds on a CPU
even for PaliGemma 2 28B).

  python tools/memory_plan.py --config configs/paligemma_stages.py:model=paligemma2_28b_224 \\
      --mesh data=1,fsdp=32,tensor=2 --device_memory 16G
  python tools/memory_plan.py --config configs/tiny_synthetic.py --mesh data=-1 --num_devices 8
  python tools/memory_plan.py --config ... --mesh fsdp=8 --config.grad_accum=4 --config.model.remat=full

Config arguments and --config.KEY=VALUE overrides work as in tools/train.py; without --mesh the config's own
mesh is planned. Params, gradients and optimizer
state follow the same sharding rules as training, exactly; activations are an estimate (formula in
vlm_jax/memory_plan.py and docs/scaling.md). The last column says whether the total fits --device_memory
(v5e: 16G, v5p: 95G, H100: 80G); keep 10-20% headroom for XLA's temporaries.
"""
import argparse
import math
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, metavar="FILE.py[:ARGS]",
                      help="training config file, as for tools/train.py")
  parser.add_argument("--mesh", metavar="data=N,fsdp=N,tensor=N",
                      help="mesh axis sizes (missing axes are 1; one may be -1 with --num_devices); default: the "
                      "config's mesh, as tools/train.py takes it (with any --config.mesh.AXIS=N)")
  parser.add_argument("--num_devices", type=int, metavar="N", help="total devices, to resolve a -1 mesh axis")
  parser.add_argument("--device_memory", metavar="SIZE", help="memory of one device (16G, 95G, 80G): adds a "
                      "column saying whether each stage fits")
  args, rest = parser.parse_known_args(argv)
  from vlm_jax.config_util import override_pairs
  return args, override_pairs(parser, rest)


def main(argv=None) -> int:
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")  # shapes only: never claim an accelerator
  from vlm_jax import config_util, memory_plan, sharding
  from vlm_jax.train_setup import ALLOWED_KEYS, check_config
  try:
    device_memory = memory_plan.parse_bytes(args.device_memory) if args.device_memory else None
    config = config_util.load_with_overrides(args.config, overrides, ALLOWED_KEYS)
    check_config(config)
    if args.mesh is None:
      sizes = sharding.check_axes(config.get("mesh") or {"data": -1}, "config.mesh")
      where = f"config.mesh {sizes}"
    elif set_keys := [k for k, _ in overrides if k.split(".")[0] == "mesh"]:
      raise ValueError(f"--mesh and --config.{set_keys[0]} both set the mesh: give one of them.")
    else:
      sizes, where = memory_plan.parse_mesh(args.mesh), f"--mesh {args.mesh}"
    if -1 in sizes.values() and not args.num_devices:
      raise ValueError(f"{where} has a -1 axis: give --num_devices to resolve it.")
    num_devices = args.num_devices or math.prod(sizes.values())
    mesh_shape = sharding.resolve_axes(sizes, num_devices)
    result = memory_plan.plan(config, mesh_shape)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(memory_plan.format_table(result, mesh_shape, device_memory))
  return 0


if __name__ == "__main__":
  sys.exit(main())
