"""What this machine can do, measured in the same run as a benchmark: a matmul FLOP/s peak, a memory-bandwidth
probe, the L3 size; and timing helpers that report how much of the CPU other processes took meanwhile."""
import os
import time

import jax
import jax.numpy as jnp
import numpy as np


def matmul_peak(dtype: str, n: int = 2048, reps: int = 5) -> float:
  """Best FLOP/s of a jitted n x n @ n x n matmul."""
  a, b = (jax.random.normal(jax.random.key(i), (n, n), jnp.dtype(dtype)) for i in (1, 2))
  f = jax.jit(jnp.dot)
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best


def cpu_seconds():
  """(CPU seconds the whole machine was busy, CPU seconds of this process) so far (Linux; zeros elsewhere)."""
  try:
    with open("/proc/stat") as f:
      v = [int(x) for x in f.readline().split()[1:9]]
  except OSError:
    return 0.0, 0.0
  t = os.times()
  return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK"), t.user + t.system


def timed(fn):
  """(seconds fn() took, share of the machine's cores other processes kept busy meanwhile)."""
  busy0, own0 = cpu_seconds()
  t0 = time.perf_counter()
  fn()
  dt = time.perf_counter() - t0
  busy1, own1 = cpu_seconds()
  return dt, max(0.0, (busy1 - busy0) - (own1 - own0)) / (dt * (os.cpu_count() or 1))


def best_of(fn, reps: int):
  """(best seconds, median seconds) of `reps` calls of fn (which must block until its result is ready)."""
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return min(times), float(np.median(times))


def l3_cache_bytes() -> int | None:
  try:
    with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
      text = f.read().strip()
    return int(text[:-1]) * {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}[text[-1]] if text[-1] in "KMG" else int(text)
  except (OSError, ValueError, KeyError):
    return None


def memory_bandwidth(mbytes: int, reps: int = 5):
  """Best bytes/s over one float32 array of `mbytes` MiB (bigger than the caches), three ways: a jitted in-place
  `x + 1` (reads and writes every byte; the input is donated, so no fresh pages), a jitted sum (reads every
  byte) and a matrix-vector product over the array (reads every byte, as a decode step reads its weights).
  Returns (the better of the two read-only probes, {probe: bytes/s}): a decode step only reads its weights,
  and the copy's read+write rate can overstate what reads alone reach (by ~1.5x on this project's machine)."""
  n = mbytes * 2 ** 20 // 4 // 1024 * 1024
  nbytes = 4 * n
  x = jnp.zeros((n,), jnp.float32).block_until_ready()
  v = jnp.ones((1, 1024), jnp.float32)
  add = jax.jit(lambda x: x + 1.0, donate_argnums=0)
  total = jax.jit(jnp.sum)
  gemv = jax.jit(lambda v, x: v @ x.reshape(1024, -1))
  x = add(x).block_until_ready()
  total(x).block_until_ready()
  gemv(v, x).block_until_ready()
  best = {"copy_rw": float("inf"), "sum_read": float("inf"), "gemv_read": float("inf")}
  for _ in range(reps):
    t0 = time.perf_counter()
    x = add(x).block_until_ready()
    best["copy_rw"] = min(best["copy_rw"], time.perf_counter() - t0)
    for name, fn in (("sum_read", total), ("gemv_read", lambda x: gemv(v, x))):
      t0 = time.perf_counter()
      fn(x).block_until_ready()
      best[name] = min(best[name], time.perf_counter() - t0)
  rates = {name: (2 if name == "copy_rw" else 1) * nbytes / t for name, t in best.items()}
  del x
  return max(rates["sum_read"], rates["gemv_read"]), rates


def gemm_weight_rate(rows: int, width: int = 512, out: int = 4096, n_weights: int = 20, reps: int = 20):
  """Bytes/s at which XLA's GEMM kernels read weights in a jitted chain of `rows` x `width` products to `out`
  columns over `n_weights` distinct float32 matrices (more bytes than the caches keep between calls), each input
  depending on the previous output, as in a decode step. Two weight layouts: "x @ W" with W [width, out] (the
  params' layout) and "W x^T" with W [out, width]. rows=1 is a matrix-vector product (memory-bound); with 8
  rows the 16 FLOPs per weight are still far below the matmul peak's rate per byte, so a kernel that streamed
  its weights would read them as fast. Returns (the better rate, {layout: rate}). Where the last-level cache is
  larger than the n_weights matrices (the project's machine has 480 MiB), part of them is read from it."""
  rs = np.random.RandomState(0)
  x = jnp.asarray(rs.standard_normal((rows, width)).astype(np.float32))
  layouts = {"x @ W": ((width, out), lambda h, w: h @ w),
             "W x^T": ((out, width), lambda h, w: jnp.einsum("FD,MD->FM", w, h).T)}
  rates = {}
  for name, (shape, product) in layouts.items():
    weights = [jnp.asarray(rs.standard_normal(shape).astype(np.float32) * width ** -0.5) for _ in range(n_weights)]

    @jax.jit
    def chain(x, weights):
      h = x
      for w in weights:
        h = product(h, w)[:, :width] + x
      return h
    chain(x, weights).block_until_ready()
    t, _ = best_of(lambda: chain(x, weights).block_until_ready(), reps)
    rates[name] = n_weights * width * out * 4 / t
    del weights
  return max(rates.values()), rates
