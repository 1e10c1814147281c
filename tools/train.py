"""Train a vision-language model from one config file: every stage in order, resumable.

  python tools/train.py --config configs/tiny_synthetic.py --workdir runs/tiny
  python tools/train.py --config configs/paligemma_stages.py:data=/data/llava.json,steps=5000 --workdir runs/pg \\
      --config.seed=3

Config arguments follow the colon (`file.py:a=1,b=2`, read by the file's get_config(arg)); `--config.KEY=VALUE`
overrides any field after loading (`--config.stages[0].lr=1e-4`); an unknown key is an error. Re-running
with the same --workdir resumes from its latest checkpoint. The workdir receives checkpoints/, metrics.jsonl,
loss.png, eval.json (held-out results with every prediction) and model/ (the final model for vlm_jax.load).
SIGTERM (preemption) saves a checkpoint and exits with status 143.

Multi-host (one process per host, or per GPU under SLURM): start the same command on every host. On a Cloud
TPU VM (see tools/launch_tpu.py) and inside a SLURM job step (`srun`) the processes find each other by
themselves; elsewhere give every process --coordinator_address (host:port of process 0, reachable by all),
--num_processes and its own --process_id. The workdir must be one path every host can reach (gs://bucket/...
or a shared file system).
"""
import argparse
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, metavar="FILE.py[:ARGS]",
                      help="config file defining get_config(arg); ARGS after the colon are passed as arg")
  parser.add_argument("--workdir", required=True, help="directory for checkpoints, metrics and results "
                      "(local or gs://...); an existing one is resumed")
  dist = parser.add_argument_group("multi-host (jax.distributed); detected on TPU VMs and under SLURM")
  dist.add_argument("--coordinator_address", metavar="HOST:PORT",
                    help="address of process 0's coordinator, the same for every process")
  dist.add_argument("--num_processes", type=int, metavar="N",
                    help="number of processes in the run (1 alone: a single-process run, no detection)")
  dist.add_argument("--process_id", type=int, metavar="I", help="this process's index, 0..N-1")
  args, rest = parser.parse_known_args(argv)
  from vlm_jax.config_util import override_pairs
  return args, override_pairs(parser, rest)


def check_workdir(path: str):
  """A local workdir must be a directory or creatable as one: a file there (or in the way of its parents) is a
  usage error now, not an OSError traceback after start-up."""
  from vlm_jax import fileutil
  if fileutil.is_remote(path):
    return
  here = os.path.abspath(path)
  while not os.path.exists(here):
    here = os.path.dirname(here)
  if not os.path.isdir(here):
    raise ValueError(f"--workdir {path}: {here} is a file, not a directory.")


def main(argv=None) -> int:
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  from vlm_jax import config_util, distributed
  from vlm_jax.train import Preempted, TrainingError, train
  from vlm_jax.train_setup import ALLOWED_KEYS, check_config
  try:
    config = config_util.load_with_overrides(args.config, overrides, ALLOWED_KEYS)
    check_config(config)
    check_workdir(args.workdir)
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    train(config, args.workdir)
  except Preempted as e:
    print(str(e), file=sys.stderr)
    return 143
  except (TrainingError, ValueError, FileNotFoundError, ImportError) as e:  # ImportError: an optional extra missing
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
