"""Multi-host start-up: whether and how to call `jax.distributed.initialize`, from flags or the environment.

One process runs per host (per GPU under SLURM); JAX's own runtime connects them. The decision, in order:

1. `--coordinator_address HOST:PORT --num_processes N --process_id I` (all three): exactly that.
   `--num_processes 1` alone: a plain single-process run.
2. Inside a SLURM job step with more than one task (`srun`): JAX's SLURM detection (coordinator on the first
   node, one process per task, each seeing the GPU of its `SLURM_LOCALID`).
3. On a Cloud TPU VM (TPU chips on the PCI bus, or the TPU worker variables GKE sets): JAX's TPU detection
   (`jax.distributed.initialize()` with no arguments; it asks the TPU metadata for the workers).
4. Otherwise: nothing, one process on one machine.

Flags given under SLURM or on a TPU VM override what is detected; the rest is detected.
"""
import glob
import os

import jax

_GOOGLE_PCI_VENDOR = "0x1ae0"
_SLURM_STEP = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
_TPU_WORKER_VARS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS")


def detect_cluster(environ=None, tpu_chips=None) -> str | None:
  """"slurm", "tpu" or None. `environ` defaults to os.environ, `tpu_chips` to the count on the PCI bus."""
  environ = os.environ if environ is None else environ
  if all(k in environ for k in _SLURM_STEP) and int(environ["SLURM_NTASKS"]) > 1:
    return "slurm"
  if any(k in environ for k in _TPU_WORKER_VARS):
    return "tpu"
  if (local_tpu_chips() if tpu_chips is None else tpu_chips) > 0:
    return "tpu"
  return None


def local_tpu_chips() -> int:
  """Google TPU chips attached to this machine (read from /sys, no TPU runtime needed)."""
  count = 0
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor) as f:
        count += f.read().strip() == _GOOGLE_PCI_VENDOR
    except OSError:
      pass
  return count


def plan(coordinator_address=None, num_processes=None, process_id=None, environ=None, tpu_chips=None):
  """The keyword arguments for `jax.distributed.initialize`, or None for a single-process run (see the module
  docstring for the rules). Raises ValueError for an incomplete or inconsistent set of flags."""
  given = {k: v for k, v in (("coordinator_address", coordinator_address), ("num_processes", num_processes),
                             ("process_id", process_id)) if v is not None}
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"--num_processes must be at least 1, got {num_processes}.")
  if process_id is not None and not 0 <= process_id < (num_processes or process_id + 1):
    raise ValueError(f"--process_id must be in [0, {num_processes}), got {process_id}.")
  if given == {"num_processes": 1}:
    return None
  cluster = detect_cluster(environ, tpu_chips)
  if missing := [f"--{k}" for k in ("coordinator_address", "num_processes", "process_id") if k not in given]:
    if cluster is None:
      if not given:
        return None
      raise ValueError(f"{', '.join(f'--{k}' for k in given)} also need{'s' * (len(given) == 1)} "
                       f"{' and '.join(missing)} (they are only detected under SLURM or on a TPU VM).")
    if cluster == "slurm":
      given["cluster_detection_method"] = "slurm"
  return given


def initialize(coordinator_address=None, num_processes=None, process_id=None, log=print) -> bool:
  """Connects this process to the others when `plan` says so; returns whether it did."""
  kwargs = plan(coordinator_address, num_processes, process_id)
  if kwargs is None:
    return False
  jax.distributed.initialize(**kwargs)
  if jax.process_index() == 0:
    log(f"distributed: {jax.process_count()} processes, {jax.device_count()} devices "
        f"({jax.local_device_count()} on this host)")
  return True
