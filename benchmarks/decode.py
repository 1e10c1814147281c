"""Greedy decode throughput and latency of vlm_jax against transformers' `generate` on one PaliGemma-shaped model.

  python benchmarks/decode.py                     # ~50M params, 224px (196 image tokens) + a 16-token prefix
  python benchmarks/decode.py --quick             # a small model, float32 only: a smoke run in ~30 s
  python benchmarks/decode.py --quick --dtypes float32,bfloat16   # the smoke run of both dtypes (~1 min)
  python benchmarks/decode.py --dtypes float32 --reps 5 --json out.json
  python benchmarks/decode.py --dtypes float32 --kv-heads 2      # a GQA decoder (MQA by default)
  python benchmarks/decode.py --dtypes float32 --no-torch --sampled   # our step sampling top-k / top-p vs greedy

One HF directory, written once by `vlm_jax.convert.hf.save` from random weights, is loaded by `vlm_jax.load`
and by transformers' `PaliGemmaForConditionalGeneration` (its default attention, sdpa), so both sides decode
the SAME weights. Two shapes: (a) batch 8, 32 new tokens (prefill-dominated throughput) and (b) batch 1, 128 new
tokens (per-token latency). For each dtype (float32, then bfloat16 weights) it reports:
- tokens/s of `vlm_jax.decode.decode` (params put on the device once, as transformers' live in its model) and
  of transformers' greedy `generate`, and their ratio;
- our prefill FLOP/s (XLA's count, cross-checked by an analytic one) as a fraction of a 2048^3 (quick: 1024^3)
  matmul peak timed in this run (bfloat16 work: the better of the bfloat16 and float32 peaks);
- our per-token latency at batch 1, (t(128 tokens) - t(1 token)) / 127, against the memory-bandwidth bound:
  LLM parameter bytes (embedding = tied lm-head included, vision tower not) / the better of two read-only
  bandwidth probes (a sum and a matrix-vector product over an array bigger than the caches) timed in this run,
  and, for information, against the same probes over an array of the weights' size (partly read from the L3);
- pieces that locate the cost: the lm-head alone, prefill's share of shape (a),
  and the rate at which XLA's GEMM kernels read weights with 1 and with 8 rows, in two weight layouts
  (`machine.gemm_weight_rate`);
- with --sampled, our decode step at both shapes, (t(n) - t(1)) / (n - 1), greedy and sampling with top_k 40
  or top_p 0.9 (temperature 1): what sampling adds to a step.
In float32 the greedy tokens of both sides must be identical (exit status 1 otherwise); in bfloat16 their
agreement is printed for information. Times are the best of --reps runs after a warm-up (medians are in the
JSON). Targets (the table marks each MET / NOT MET): >= 1.5x transformers on both shapes (float32), prefill >= 60%
of the matmul peak, per-token latency <= 1.3x the bandwidth bound.
"""
import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (REPO_ROOT, os.path.join(REPO_ROOT, "benchmarks")):
  if _p not in sys.path:
    sys.path.insert(0, _p)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import train_step  # noqa: E402  (the same model as the training benchmark)
from machine import best_of, gemm_weight_rate, l3_cache_bytes, matmul_peak, memory_bandwidth  # noqa: E402
from transformers_decode import bench_torch  # noqa: E402

TARGET_RATIO, TARGET_UTIL, TARGET_LATENCY = 1.5, 0.60, 1.3
PREFIX_LEN = 16
BOS, NEWLINE = 2, 108  # Gemma's BOS and "\n" ids (any ids work with random weights)
SHAPES = {"a": (8, 32), "b": (1, 128)}  # name: (batch, new tokens)
QUICK_SHAPES = {"a": (4, 8), "b": (1, 16)}


# ---------------------------------------------------------------------------------------------- set-up


def model_config(quick: bool, vit_depth: int | None, kv_heads: int | None = None):
  """train_step's configs: the full model is a SigLIP-S/16-like tower (width 384, 6 of S/16's 12 layers, 224px
  -> 196 image tokens) + a 6-layer MQA Gemma 512 wide with a 32k vocab: 50.4M params (61.1M with all 12
  tower layers, --vit-depth 12). kv_heads: the decoder's key / value heads instead of 1 (MQA, as PaliGemma's
  Gemma 2B): grouped (GQA, as Gemma 2) or one per query head (as Gemma 7B)."""
  cfg = train_step.model_config(quick, "float32")
  if vit_depth:
    cfg = dataclasses.replace(cfg, img=dataclasses.replace(cfg.img, depth=vit_depth))
  if kv_heads:
    if cfg.llm.num_heads % kv_heads:
      raise ValueError(f"--kv-heads {kv_heads} does not divide the decoder's {cfg.llm.num_heads} query heads.")
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, num_kv_heads=kv_heads))
  return cfg


def random_params(cfg, seed: int = 0, llm_scale: float = 2.0):
  """init_params, with every constant leaf (norm scales, biases: zeros at init) given random values too, and the
  decoder's layer matrices scaled by `llm_scale`. At init scale the residual stream is dominated by the input
  token's (tied) embedding, so greedy decoding just repeats the last prefix token forever and the token check
  would compare two constant sequences; at 2x, greedy outputs are diverse (~120 distinct tokens in 128) and
  depend on the image."""
  from vlm_jax import treeutil
  from vlm_jax.models.vlm import init_params
  flat = treeutil.flatten(jax.device_get(init_params(cfg, seed))["params"])
  rs = np.random.RandomState(seed)
  for name, v in flat.items():
    if np.all(v == v.flat[0]):
      v = (v + 0.1 * rs.standard_normal(v.shape)).astype(v.dtype)
    elif name.startswith("llm/layers/"):
      v = (v * llm_scale).astype(v.dtype)
    flat[name] = v
  return {"params": treeutil.unflatten(flat)}


def make_inputs(cfg, batch: int, seed: int = 0):
  """images float32 [B,S,S,3] in [-1,1]; prefix int32 [B,16] = BOS, 14 random tokens, "\\n"; mask all ones."""
  rs = np.random.RandomState(seed)
  s = cfg.img.image_size
  prefix = rs.randint(3, cfg.llm.vocab_size, (batch, PREFIX_LEN)).astype(np.int32)
  prefix[:, 0], prefix[:, -1] = BOS, NEWLINE % cfg.llm.vocab_size
  return {"images": rs.uniform(-1, 1, (batch, s, s, 3)).astype(np.float32), "prefix": prefix,
          "mask": np.ones_like(prefix)}


# ---------------------------------------------------------------------------------------------- ours


def our_decode(model, inputs, n: int, sampling=None):
  from vlm_jax import decode as decode_lib
  return decode_lib.decode(model.config, model.params, inputs["images"], inputs["prefix"], inputs["mask"],
                           jax.random.key(0), max_new_tokens=n, sampling=sampling or decode_lib.Sampling(),
                           eos_id=-1, pad_id=0)


def prefill_fn(cfg, max_new_tokens: int):
  """The decode loop's prefill alone (`decode.prefill`: image tower + decoder over image + prefix, filling a
  cache of room for `max_new_tokens`, logits of each row's last prefix token): (logits, cache)."""
  from vlm_jax import decode as decode_lib
  return lambda params, *inputs: decode_lib.prefill(cfg, params, *inputs, max_new_tokens)[:2]


def xla_prefill_flops(cfg, max_new_tokens: int, *args):
  """XLA's FLOP count of the prefill, or None. XLA's cost analysis counts a while-loop body once, so, as in
  train_step.py, the layer scans (ViT and Gemma) are built fully unrolled for this count only. The count is
  taken on the lowered program: the compiled one's agrees to within 1% (checked on the 50M model, float32 and
  bfloat16) and would cost seconds more of compiling."""
  import flax.linen as nn
  scan = nn.scan
  nn.scan = lambda *a, **kw: scan(*a, **{**kw, "unroll": True})
  try:
    cost = jax.jit(prefill_fn(cfg, max_new_tokens)).lower(*args).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) if cost and cost.get("flops", -1) > 0 else None
  except Exception as e:  # an unexpected flax / jax API: fall back to the analytic count
    print(f"XLA FLOP count unavailable ({type(e).__name__}: {e})")
    return None
  finally:
    nn.scan = scan


def analytic_prefill_flops(cfg, flat, batch: int, text_len: int) -> float:
  """2 x matmul params x tokens through them + 4 x layers x queries x keys x attention width; the tied output
  projection over each row's last prefix token only."""
  p, s = cfg.img.num_patches, cfg.img.num_patches + text_len
  total = 0.0
  for name, v in flat.items():
    if name.split("/")[-1] not in ("kernel", "w", "gating_einsum", "linear", "input_embedding"):
      continue  # biases, norms, position embeddings: no matmul
    tokens = 1 if name.endswith("input_embedding") else (p if name.startswith("img/") else s)
    total += 2 * v.size * tokens
  total += 4 * cfg.img.depth * p * p * cfg.img.width
  total += 4 * cfg.llm.depth * s * s * cfg.llm.num_heads * cfg.llm.head_dim
  return total * batch


def lm_head_time(model, batch: int, reps: int):
  """Seconds of the tied lm-head alone (one token per row, logits over the whole vocab) at this batch. (One
  extend step jitted alone is no measure of a loop step: outside the loop, each call would also split and
  concatenate every weight, which the decode program does once, before its loop.)"""
  cfg = model.config
  emb = model.params["params"]["llm"]["embedder"]["input_embedding"]
  head = jax.jit(lambda x, e: jnp.einsum("BTD,VD->BTV", x, e.astype(x.dtype), preferred_element_type=jnp.float32))
  x = jnp.ones((batch, 1, cfg.llm.width), jnp.dtype(cfg.llm.dtype))
  head(x, emb).block_until_ready()
  return best_of(lambda: head(x, emb).block_until_ready(), reps)[0]


def bench_ours(model, shapes, inputs, reps: int, peak: float, bandwidth: float):
  """All our figures for one dtype."""
  from vlm_jax import treeutil
  cfg, params = model.config, model.params
  flat = treeutil.flatten(params["params"])
  out = {}
  for name, (b, n) in shapes.items():
    t0 = time.perf_counter()
    tokens = np.asarray(our_decode(model, inputs[name], n))
    compile_s = time.perf_counter() - t0
    best, med = best_of(lambda: our_decode(model, inputs[name], n).block_until_ready(), reps)
    out[name] = {"tokens": tokens, "seconds": best, "median_seconds": med, "tokens_per_s": b * n / best,
                 "first_call_seconds": compile_s}

  # Prefill alone at shape (a): FLOP/s against the matmul peak; and its share of shape (a)'s decode.
  b_a, n_a = shapes["a"]
  x = inputs["a"]
  args = (params, x["images"], x["prefix"], x["mask"])
  prefill = jax.jit(prefill_fn(cfg, n_a))
  jax.block_until_ready(prefill(*args))
  t_prefill, t_prefill_med = best_of(lambda: jax.block_until_ready(prefill(*args)), reps)
  xla_flops = xla_prefill_flops(cfg, n_a, *args)
  est_flops = analytic_prefill_flops(cfg, flat, b_a, PREFIX_LEN)
  flops = xla_flops or est_flops
  out["prefill"] = {"batch": b_a, "seconds": t_prefill, "median_seconds": t_prefill_med,
                    "flops_xla": xla_flops, "flops_analytic": est_flops,
                    "flops_source": "xla" if xla_flops else "analytic",
                    "achieved_gflops": flops / t_prefill / 1e9, "utilisation": flops / t_prefill / peak,
                    "share_of_decode_a": t_prefill / out["a"]["seconds"],
                    "loop_per_step_a_ms": 1e3 * (out["a"]["seconds"] - t_prefill) / n_a}

  # Per-token latency at batch 1: (t(N) - t(1)) / (N - 1) from whole decodes, against the bandwidth bound.
  b_b, n_b = shapes["b"]
  x = inputs["b"]
  our_decode(model, x, 1).block_until_ready()
  t1, _ = best_of(lambda: our_decode(model, x, 1).block_until_ready(), reps)
  per_token = (out["b"]["seconds"] - t1) / (n_b - 1)
  llm_bytes = sum(v.size * v.dtype.itemsize for k, v in flat.items() if k.startswith("llm/"))
  bound = llm_bytes / bandwidth
  # The weights are re-read every token, and a cache as large as this machine's L3 (480 MiB) keeps part of them:
  # the same read probes over an array of their size give a tighter figure (information; the target is the bound).
  working_set_rate, _ = memory_bandwidth(max(1, round(llm_bytes / 2 ** 20)))
  t_head = lm_head_time(model, b_b, max(reps, 5) * 4)
  out["latency"] = {"batch": b_b, "decode_1_seconds": t1, "per_token_ms": 1e3 * per_token,
                    "llm_param_bytes": int(llm_bytes), "bound_ms": 1e3 * bound, "ratio_to_bound": per_token / bound,
                    "working_set_gbs": working_set_rate / 1e9, "working_set_ms": 1e3 * llm_bytes / working_set_rate,
                    "lm_head_alone_ms": 1e3 * t_head}
  return out


def bench_sampled(model, shapes, inputs, reps: int):
  """{shape: {sampler: ms per step}}: our decode loop's step, (t(n) - t(1)) / (n - 1), greedy and sampling with a
  top-k or top-p cut (temperature 1), for what sampling adds to a step."""
  from vlm_jax.decode import Sampling
  samplers = {"greedy": Sampling(), "top_k 40": Sampling(temperature=1.0, top_k=40),
              "top_p 0.9": Sampling(temperature=1.0, top_p=0.9)}
  out = {}
  for name, (_, n) in shapes.items():
    out[name] = {}
    for label, sampling in samplers.items():
      t = {}
      for steps in (1, n):
        our_decode(model, inputs[name], steps, sampling).block_until_ready()
        t[steps] = best_of(lambda: our_decode(model, inputs[name], steps, sampling).block_until_ready(), reps)[0]
      out[name][label] = 1e3 * (t[n] - t[1]) / (n - 1)
  return out


def first_mismatch(model, inputs, ours, theirs):
  """Where the two greedy sequences first differ, with our teacher-forced logit margin there (a near-tie
  between the two picks means float noise; a large margin means the implementations differ)."""
  rows, cols = np.nonzero(ours != theirs)
  r = rows[np.argmin(cols)]
  t = cols[rows == r].min()
  tokens = np.concatenate([inputs["prefix"][r:r + 1], theirs[r:r + 1, :t]], axis=1)
  mask_ar = np.concatenate([np.zeros((1, PREFIX_LEN), np.int32), np.ones((1, t), np.int32)], axis=1)
  logits = np.asarray(model.logits(inputs["images"][r:r + 1], tokens, mask_ar))[0, -1]
  return {"row": int(r), "step": int(t), "ours": int(ours[r, t]), "theirs": int(theirs[r, t]),
          "our_logit_margin": float(logits[ours[r, t]] - logits[theirs[r, t]]),
          "our_logit_scale": float(np.std(logits))}


# ---------------------------------------------------------------------------------------------- main


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--quick", action="store_true", help="a small model and short shapes for a fast smoke run")
  ap.add_argument("--dtypes", default=None,
                  help="comma-separated: float32 and/or bfloat16 (default both; --quick: float32 only)")
  ap.add_argument("--reps", type=int, default=None, help="timed repetitions after a warm-up (default 3; quick 2)")
  ap.add_argument("--vit-depth", type=int, default=None,
                  help="vision tower layers (default: train_step's 6; 12 is the full SigLIP-S/16, 61M params)")
  ap.add_argument("--kv-heads", type=int, default=None,
                  help="the decoder's key/value heads (default 1, MQA; 2: GQA; 8: one per query head)")
  ap.add_argument("--bandwidth-mb", type=int, default=None,
                  help="MiB for the bandwidth probe (default max(512, 2 x the L3 cache); quick 64)")
  ap.add_argument("--no-torch", action="store_true", help="skip transformers (no ratio, no token check)")
  ap.add_argument("--sampled", action="store_true",
                  help="also time our decode step sampling with top_k 40 / top_p 0.9 against greedy's (both shapes)")
  ap.add_argument("--json", metavar="OUT", help="write the figures to this JSON file")
  args = ap.parse_args(argv)
  dtypes = [d.strip() for d in (args.dtypes or ("float32" if args.quick else "float32,bfloat16")).split(",")
            if d.strip()]
  if not dtypes or len(set(dtypes)) != len(dtypes) or any(d not in ("float32", "bfloat16") for d in dtypes):
    ap.error(f"--dtypes takes float32 and/or bfloat16, got {args.dtypes!r}")
  reps = args.reps or (2 if args.quick else 3)
  shapes = QUICK_SHAPES if args.quick else SHAPES

  import vlm_jax
  from vlm_jax import treeutil
  from vlm_jax.convert import hf
  from vlm_jax.models.vlm import abstract_params
  t_start = time.perf_counter()
  try:
    cfg = model_config(args.quick, args.vit_depth, args.kv_heads)
  except ValueError as e:
    ap.error(str(e))
  flat = treeutil.flatten(abstract_params(cfg))
  n_params = sum(v.size for v in flat.values())
  n_llm = sum(v.size for k, v in flat.items() if k.startswith("llm/"))
  print(f"model {cfg.name}: {n_params:,} params ({n_llm:,} in the LLM; ViT {cfg.img.width}x{cfg.img.depth} at "
        f"{cfg.img.image_size}px/{cfg.img.patch_size} = {cfg.img.num_patches} image tokens, Gemma "
        f"{cfg.llm.width}x{cfg.llm.depth} with {cfg.llm.num_kv_heads} kv heads, vocab {cfg.llm.vocab_size}); "
        f"prefix {PREFIX_LEN} tokens; shapes "
        + ", ".join(f"({k}) batch {b} x {n} new" for k, (b, n) in shapes.items())
        + f"; greedy; best of {reps}; jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs",
        flush=True)

  l3 = l3_cache_bytes()
  bw_mb = args.bandwidth_mb or (64 if args.quick else max(512, 2 * (l3 or 0) // 2 ** 20))
  bandwidth, bw_rates = memory_bandwidth(bw_mb)
  print(f"memory bandwidth ({bw_mb} MiB array; L3 {'unknown' if l3 is None else f'{l3 // 2 ** 20} MiB'}): "
        + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in bw_rates.items()) + f" -> {bandwidth / 1e9:.1f} GB/s",
        flush=True)
  gemm_probe = {rows: gemm_weight_rate(rows, n_weights=4 if args.quick else 20)
                for rows in sorted({1, shapes["a"][0]})}
  print("weight-read rate of XLA's float32 GEMM kernels, a chain of [rows, 512] x 512 -> 4096 products: "
        + "; ".join(f"{r} rows " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in by_layout.items()) + " GB/s"
                    for r, (_, by_layout) in gemm_probe.items()), flush=True)
  peak_n = 1024 if args.quick else 2048
  peaks = {d: matmul_peak(d, n=peak_n) for d in sorted(set(dtypes) | {"float32"})}
  print(f"matmul peak ({peak_n}^3): " + ", ".join(f"{d} {p / 1e9:.1f} GFLOP/s" for d, p in peaks.items()), flush=True)
  inputs = {name: make_inputs(cfg, b, seed=i) for i, (name, (b, _)) in enumerate(shapes.items())}
  fig = {"model": cfg.name, "params": int(n_params), "llm_params": int(n_llm), "vit_depth": cfg.img.depth,
         "kv_heads": cfg.llm.num_kv_heads, "image_tokens": cfg.img.num_patches, "prefix_tokens": PREFIX_LEN,
         "shapes": {k: {"batch": b, "new_tokens": n} for k, (b, n) in shapes.items()}, "reps": reps,
         "timing": "best of reps after a warm-up (medians alongside)", "bandwidth_gbs": bandwidth / 1e9,
         "bandwidth_probe_gbs": {k: v / 1e9 for k, v in bw_rates.items()}, "bandwidth_probe_mib": bw_mb,
         "l3_cache_mib": None if l3 is None else l3 / 2 ** 20,
         "matmul_peak_gflops": {d: p / 1e9 for d, p in peaks.items()},
         "gemm_weight_rate_gbs": {str(r): {k: v / 1e9 for k, v in by_layout.items()}
                                  for r, (_, by_layout) in gemm_probe.items()},
         "platform": jax.devices()[0].platform, "cpu_count": os.cpu_count(), "jax": jax.__version__, "results": {}}
  token_check_ok = True
  with tempfile.TemporaryDirectory() as tmp:
    hf_dir = os.path.join(tmp, "hf")
    hf.save(hf_dir, cfg, random_params(cfg), dtype="float32")  # the one directory both sides load
    base = vlm_jax.load(hf_dir)  # host (numpy) params: put them on the device once, as transformers' are
    base = vlm_jax.Model(base.config, jax.device_put(base.params), base.tokenizer)
    for dtype in dtypes:
      model = base if dtype == "float32" else base.with_dtype(dtype)
      # bfloat16 prefill against the better of the two peaks: XLA's CPU bfloat16 dot can be slower than float32's.
      peak = peaks["float32"] if dtype == "float32" else max(peaks[dtype], peaks["float32"])
      ours = bench_ours(model, shapes, inputs, reps, peak, bandwidth)
      if args.sampled:
        ours["sampled_step_ms"] = bench_sampled(model, shapes, inputs, reps)
      res = {"peak_gflops": peak / 1e9, "ours": ours}
      print(f"[{dtype}] vlm_jax: " + ", ".join(f"({k}) {ours[k]['tokens_per_s']:.1f} tok/s" for k in shapes)
            + f"; prefill {ours['prefill']['seconds'] * 1e3:.0f} ms, per token {ours['latency']['per_token_ms']:.2f}"
            " ms", flush=True)
      if not args.no_torch:
        theirs = bench_torch(hf_dir, dtype, shapes, inputs, reps)
        res["torch"] = theirs
        print(f"[{dtype}] transformers ({theirs['attn_implementation']}): "
              + ", ".join(f"({k}) {theirs[k]['tokens_per_s']:.1f} tok/s" for k in shapes), flush=True)
        res["ratio"] = {k: ours[k]["tokens_per_s"] / theirs[k]["tokens_per_s"] for k in shapes}
        check = {}
        for k in shapes:
          a, b = ours[k]["tokens"], theirs[k]["tokens"]
          check[k] = {"agreement": float(np.mean(a == b)), "identical": bool(np.array_equal(a, b)),
                      "distinct_tokens_per_row": float(np.mean([len(set(r)) for r in a]))}
          if not check[k]["identical"]:
            check[k]["first_mismatch"] = first_mismatch(model, inputs[k], a, b)
        res["token_check"] = check
        same = all(c["identical"] for c in check.values())
        if dtype == "float32":
          token_check_ok = same
        print(f"[{dtype}] token check (greedy, ours vs transformers): "
              + ", ".join(f"({k}) {100 * c['agreement']:.1f}% equal ({c['distinct_tokens_per_row']:.0f} distinct "
                          f"tokens per row of {shapes[k][1]})" for k, c in check.items())
              + (" -> IDENTICAL" if same else (" -> DIFFER: FAIL" if dtype == "float32" else " (information only)")),
              flush=True)
        for k, c in check.items():
          if "first_mismatch" in c:
            print(f"  ({k}) first mismatch: {c['first_mismatch']}")
      for side in ("ours", "torch"):
        for k in shapes:
          if side in res:
            res[side][k].pop("tokens")
      fig["results"][dtype] = res
  fig["token_check_float32"] = None if args.no_torch or "float32" not in dtypes else token_check_ok
  fig["wall_s"] = time.perf_counter() - t_start
  fig["verdicts"] = verdicts(fig, shapes)
  print_table(fig, shapes)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(fig, f, indent=2)
  return fig


def verdicts(fig, shapes):
  """{dtype: {target: True/False/None}}; the ratio target is stated for float32 (bfloat16's is informative)."""
  out = {}
  for dtype, res in fig["results"].items():
    ours = res["ours"]
    v = {"prefill_util": bool(ours["prefill"]["utilisation"] >= TARGET_UTIL),
         "latency_bound": bool(ours["latency"]["ratio_to_bound"] <= TARGET_LATENCY)}
    for k in shapes:
      v[f"ratio_{k}"] = None if "ratio" not in res else bool(res["ratio"][k] >= TARGET_RATIO)
    out[dtype] = v
  return out


def print_table(fig, shapes):
  mark = lambda ok: "n/a" if ok is None else ("MET" if ok else "NOT MET")
  rows = []
  for dtype, res in fig["results"].items():
    ours, v = res["ours"], fig["verdicts"][dtype]
    rows.append((f"--- {dtype}", ""))
    for k, (b, n) in shapes.items():
      theirs = res.get("torch", {}).get(k)
      line = f"ours {ours[k]['tokens_per_s']:8.1f} tok/s ({ours[k]['seconds']:.3f} s)"
      if theirs:
        line += (f" | transformers {theirs['tokens_per_s']:8.1f} tok/s ({theirs['seconds']:.3f} s) | ratio "
                 f"{res['ratio'][k]:.2f}x (target >= {TARGET_RATIO}x"
                 + (f": {mark(v[f'ratio_{k}'])})" if dtype == "float32" else ", float32 only: info)"))
      rows.append((f"({k}) batch {b}, {n} new", line))
    p, lat = ours["prefill"], ours["latency"]
    xla = "n/a" if p["flops_xla"] is None else f"{p['flops_xla'] / 1e9:.1f}"
    rows.append((f"prefill (batch {p['batch']})",
                 f"{p['seconds'] * 1e3:.1f} ms, {p['achieved_gflops']:.1f} GFLOP/s of {res['peak_gflops']:.1f} peak = "
                 f"{100 * p['utilisation']:.1f}% (target >= {100 * TARGET_UTIL:.0f}%: {mark(v['prefill_util'])}); "
                 f"GFLOPs {p['flops_source']} (XLA {xla}, analytic {p['flops_analytic'] / 1e9:.1f})"))
    split = (f"prefill {100 * p['share_of_decode_a']:.0f}% of the decode, loop {p['loop_per_step_a_ms']:.2f} ms/step")
    if "torch" in res:
      split += (f"; transformers' prefill alone {res['torch']['prefill_a_seconds'] * 1e3:.0f} ms = "
                f"{100 * res['torch']['prefill_a_seconds'] / res['torch']['a']['seconds']:.0f}% of its (a)")
    rows.append(("  shape (a) split", split))
    b_a = shapes["a"][0]
    rate = {r: max(by_layout.values()) for r, by_layout in fig["gemm_weight_rate_gbs"].items()}
    rows.append((f"  batch-{b_a} steps", f"{p['loop_per_step_a_ms']:.2f} ms/step; XLA's GEMMs read weights at "
                 f"{rate[str(b_a)]:.1f} GB/s with {b_a} rows vs {rate['1']:.1f} GB/s with 1 row (the better weight "
                 f"layout), so reading the {lat['llm_param_bytes'] / 1e6:.0f} MB of LLM weights alone takes "
                 f"{lat['llm_param_bytes'] / rate[str(b_a)] / 1e6:.2f} ms per batch-{b_a} step"))
    rows.append((f"per token (batch {lat['batch']})",
                 f"{lat['per_token_ms']:.2f} ms vs bound {lat['bound_ms']:.2f} ms "
                 f"({lat['llm_param_bytes'] / 1e6:.0f} MB / {fig['bandwidth_gbs']:.1f} GB/s) = "
                 f"{lat['ratio_to_bound']:.2f}x (target <= {TARGET_LATENCY}x: {mark(v['latency_bound'])})"))
    rows.append(("  working-set read", f"the same read probes over a {lat['llm_param_bytes'] / 2 ** 20:.0f} MiB array "
                 f"(re-read, partly from the L3): {lat['working_set_gbs']:.1f} GB/s -> {lat['working_set_ms']:.2f} ms;"
                 f" per token = {lat['per_token_ms'] / lat['working_set_ms']:.2f}x that (information)"))
    rows.append(("  per-token pieces", f"lm-head alone {lat['lm_head_alone_ms']:.2f} ms"))
    for k, steps in ours.get("sampled_step_ms", {}).items():
      rows.append((f"  sampled ({k}) step", ", ".join(
          f"{label} {ms:.2f} ms" + ("" if label == "greedy" else f" ({ms / steps['greedy']:.2f}x)")
          for label, ms in steps.items())))
    if "token_check" in res:
      rows.append(("token check", ", ".join(f"({k}) {100 * c['agreement']:.1f}% equal"
                                            for k, c in res["token_check"].items())
                   + ("" if dtype != "float32" else (" -> PASS" if fig["token_check_float32"] else " -> FAIL"))))
  width = max(len(k) for k, _ in rows)
  print("\n" + "\n".join(f"{k:<{width}}  {v}" for k, v in rows))
  print(f"(wall {fig['wall_s']:.0f} s; timings on a shared machine are noisy: compare on an idle one)")


if __name__ == "__main__":
  result = main()
  sys.exit(1 if result["token_check_float32"] is False else 0)
