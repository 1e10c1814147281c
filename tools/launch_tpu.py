"""Train on a Cloud TPU VM slice, one host or a whole pod: copy the code to every worker, install it with
jax[tpu], and start tools/train.py on all workers at once.

  python tools/launch_tpu.py --tpu my-v5e-64 --zone us-west4-a --project my-project \\
      --config configs/paligemma_stages.py:model=paligemma2_10b_224 --workdir gs://my-bucket/runs/pg10b
  python tools/launch_tpu.py ... --run                          # execute them instead of printing
  python tools/launch_tpu.py ... --config.mesh.fsdp=16          # overrides go to tools/train.py unchanged

Without --run (or with --dry_run) it only prints the gcloud commands, one per line, to be run from the
repository root:
  1. empty ~/vlm_jax on every worker,
  2. copy setup.py, requirements.txt, vlm_jax/, configs/ and tools/ (and the config file, if it lives
     elsewhere) there,
  3. pip install the package with jax[tpu] (the TPU runtime) and gcsfs (gs:// paths),
  4. run tools/train.py with the same --config, --workdir and overrides on all workers at once; each
     process finds the others through the TPU metadata (vlm_jax.distributed).
--run executes them in order and stops at the first that fails. The workdir should be gs://...: it is the
one place every worker reads and writes (checkpoints, metrics). The TPU VM must already exist
(`gcloud compute tpus tpu-vm create`).
"""
import argparse
import os
import shlex
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # the config is checked here with this checkout's package
  sys.path.insert(0, REPO_ROOT)
REMOTE_DIR = "vlm_jax"  # in each worker's home directory
COPIED = ("setup.py", "requirements.txt", "vlm_jax", "configs", "tools")
PIP_PACKAGES = ("jax[tpu]", "gcsfs")


def build_commands(tpu: str, zone: str, project: str | None, config: str, workdir: str, overrides=(),
                   repo_root: str = REPO_ROOT) -> list[list[str]]:
  """The gcloud command lines (argv lists), in order. Local paths are relative to `repo_root`, except a
  config file outside it, which is copied too and given by its absolute path."""
  where = [f"--zone={zone}"] + ([f"--project={project}"] if project else []) + ["--worker=all"]
  ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu, *where]
  path, colon, arg = config.partition(":")
  rel = os.path.relpath(os.path.abspath(path), repo_root)
  sources = list(COPIED)
  if rel.split(os.sep)[0] in COPIED:
    remote_config = rel + colon + arg
  else:  # a config file of the user's own: copied beside the code
    sources.append(os.path.abspath(path))
    remote_config = os.path.basename(path) + colon + arg
  train = ["python3", "tools/train.py", "--config", remote_config, "--workdir", workdir, *overrides]
  return [
      ssh + [f"--command=rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR}"],
      ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", *sources, f"{tpu}:{REMOTE_DIR}", *where],
      ssh + [f"--command=cd {REMOTE_DIR} && python3 -m pip install -q -e . " + shlex.join(PIP_PACKAGES)],
      ssh + [f"--command=cd {REMOTE_DIR} && " + shlex.join(train)],
  ]


def render(cmd: list[str]) -> str:
  """One shell line for an argv list; a remote `--command=...` goes in double quotes so that the quoting
  inside it stays readable."""
  def quote(arg):
    if arg.startswith("--command="):
      body = arg[len("--command="):]
      return '--command="' + "".join("\\" + c if c in '\\"$`' else c for c in body) + '"'
    return shlex.quote(arg)
  return " ".join(quote(a) for a in cmd)


def run_commands(commands, log=print) -> int:
  """Runs the commands in order from the repository root; the exit status of the first that fails, else 0."""
  for i, cmd in enumerate(commands, 1):
    log(f"[{i}/{len(commands)}] {render(cmd)}")
    try:
      status = subprocess.run(cmd, cwd=REPO_ROOT).returncode
    except FileNotFoundError:
      print(f"error: {cmd[0]} not found; install the Google Cloud SDK (gcloud).", file=sys.stderr)
      return 2
    if status:
      print(f"error: command {i} of {len(commands)} failed with exit status {status}; the ones after it were "
            f"not run: {render(cmd)}", file=sys.stderr)
      return status
  return 0


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--tpu", required=True, metavar="NAME", help="name of the TPU VM (the slice) to train on")
  parser.add_argument("--zone", required=True, help="its zone, e.g. us-west4-a")
  parser.add_argument("--project", help="its Google Cloud project (default: gcloud's configured project)")
  parser.add_argument("--config", required=True, metavar="FILE.py[:ARGS]",
                      help="training config, as for tools/train.py (a file outside the repository is copied)")
  parser.add_argument("--workdir", required=True, metavar="gs://BUCKET/PATH",
                      help="where every worker writes checkpoints and metrics; an existing one is resumed")
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument("--dry_run", action="store_true", help="print the commands without running them (default)")
  mode.add_argument("--run", action="store_true", help="run the commands, stopping at the first failure")
  args, rest = parser.parse_known_args(argv)
  from vlm_jax import config_util
  from vlm_jax.train_setup import ALLOWED_KEYS, check_config
  pairs = config_util.override_pairs(parser, rest)
  if not os.path.isfile(args.config.partition(":")[0]):
    parser.error(f"no config file {args.config.partition(':')[0]}")
  try:  # here, not on every worker after copying and installing
    check_config(config_util.load_with_overrides(args.config, pairs, ALLOWED_KEYS))
  except ValueError as e:
    parser.error(str(e))
  return args, rest


def main(argv=None) -> int:
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  if not args.workdir.startswith("gs://"):
    print(f"warning: --workdir {args.workdir} is not a gs:// path: on a multi-host slice each worker would "
          "write its own copy, and checkpoints need one place all of them share.", file=sys.stderr)
  commands = build_commands(args.tpu, args.zone, args.project, args.config, args.workdir, overrides)
  if not args.run:
    print("\n".join(render(cmd) for cmd in commands))
    return 0
  return run_commands(commands)


if __name__ == "__main__":
  sys.exit(main())
