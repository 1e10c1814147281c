"""Training-step throughput of vlm_jax against transformers + PyTorch on one PaliGemma-shaped model.

  python benchmarks/train_step.py                 # ~50M params, 224px (196 image tokens) + 64 text tokens
  python benchmarks/train_step.py --quick         # a small model: a smoke run in ~1 min
  python benchmarks/train_step.py --batch 8 --steps 10 --dtype bfloat16 --json out.json

Both sides train the SAME weights (ours from init_params, exported with convert.hf.save, loaded by
transformers) on the same batch: images, a bidirectional text prefix and a causal suffix with the loss on the
suffix, AdamW with global-norm clipping at 1.0. Their step-0 losses are printed as a check that they compute
the same thing. The timing alternates rounds of (matmul peak, JAX steps, PyTorch steps) and keeps each side's
best round; each round reports how much of the CPU other processes used meanwhile. FLOP utilisation is a side's
achieved FLOP/s (XLA's count of our step; torch's FlopCounterMode count of its step) over the best matmul peak.
Our layer loops are unrolled (`scan_unroll=True`, the fastest on XLA CPU); `--scan-layers` keeps nn.scan.
"""
import argparse
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

from machine import matmul_peak, timed  # noqa: E402

TARGET_RATIO, TARGET_UTIL = 1.5, 0.40


def model_config(quick: bool, dtype: str, scan_unroll=True):
  """scan_unroll=True: the layer loops unrolled (the fastest on XLA CPU); 1: one nn.scan iteration per layer."""
  from vlm_jax.models.gemma import GemmaConfig
  from vlm_jax.models.vit import ViTConfig
  from vlm_jax.models.vlm import VLMConfig
  kw = dict(dtype=dtype, scan_unroll=scan_unroll)
  if quick:
    img = ViTConfig(width=128, depth=2, mlp_dim=512, num_heads=2, patch_size=16, image_size=64, head_dim_out=128,
                    **kw)
    llm = GemmaConfig(width=128, depth=2, mlp_dim=512, num_heads=4, num_kv_heads=1, head_dim=32, vocab_size=4096,
                      **kw)
  else:  # SigLIP-S/16-like tower (6 of its 12 layers) + a 6-layer MQA Gemma with a 32k vocab: ~50M params.
    img = ViTConfig(width=384, depth=6, mlp_dim=1536, num_heads=6, patch_size=16, image_size=224, head_dim_out=512,
                    **kw)
    llm = GemmaConfig(width=512, depth=6, mlp_dim=2048, num_heads=8, num_kv_heads=1, head_dim=64,
                      vocab_size=32768, **kw)
  return VLMConfig(img=img, llm=llm, name="bench_quick" if quick else "bench_50m")


def make_batch(cfg, batch: int, text_len: int, seed: int = 0):
  """text_len input tokens (+1 for the shifted targets): the first half prefix, the rest suffix (supervised)."""
  rs = np.random.RandomState(seed)
  s = cfg.img.image_size
  tokens = rs.randint(3, cfg.llm.vocab_size, (batch, text_len + 1)).astype(np.int32)
  mask_ar = np.zeros_like(tokens)
  mask_ar[:, text_len // 2:] = 1
  return {"image": rs.uniform(-1, 1, (batch, s, s, 3)).astype(np.float32), "tokens": tokens, "mask_ar": mask_ar,
          "mask_input": np.ones_like(tokens), "mask_loss": mask_ar.copy()}


def analytic_flops(cfg, flat, batch: int, text_len: int) -> float:
  """6 x matmul params x tokens they touch (forward + backward) + 12 x layers x seq^2 x width for attention."""
  p, s = cfg.img.num_patches, cfg.img.num_patches + text_len
  total = 0.0
  for name, v in flat.items():
    if name.split("/")[-1] not in ("kernel", "w", "gating_einsum", "linear", "input_embedding"):
      continue  # biases, norms, position embeddings: no matmul
    tokens = text_len if name.endswith("input_embedding") else (p if name.startswith("img/") else s)
    total += 6 * v.size * tokens  # input_embedding: only the tied output projection is a matmul
  total += 12 * cfg.img.depth * p * p * cfg.img.width
  total += 12 * cfg.llm.depth * s * s * cfg.llm.num_heads * cfg.llm.head_dim
  return total * batch


def xla_step_flops(cfg, optimizer, schedule, *args):
  """XLA's FLOP count of one step, or None. XLA's cost analysis counts a while-loop body once, so the
  layer scans are lowered fully unrolled for this count only (flax.linen.scan patched while tracing)."""
  import flax.linen as nn
  from vlm_jax import train
  scan = nn.scan
  nn.scan = lambda *a, **kw: scan(*a, **{**kw, "unroll": True})
  try:
    step_fn = train.make_train_step(cfg, optimizer, schedule, grad_accum=1)
    cost = jax.jit(step_fn).lower(*args, jnp.asarray(0)).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"]) if cost and cost.get("flops", -1) > 0 else None
  except Exception as e:  # an unexpected flax / jax API: fall back to the analytic count
    print(f"XLA FLOP count unavailable ({type(e).__name__}: {e})")
    return None
  finally:
    nn.scan = scan


def bench_jax(cfg, params, batch):
  """(run, info): run(steps) times `steps` train steps and returns seconds; info: XLA's FLOPs per step (or None),
  step-0 loss, compile seconds."""
  import ml_collections
  from vlm_jax import optim, train, treeutil
  stage = ml_collections.ConfigDict(dict(steps=1000, lr=1e-4, schedule=dict(decay="constant")))
  names = set(treeutil.flatten(params["params"]))
  optimizer, schedule = optim.make_optimizer(ml_collections.ConfigDict(dict(name="adamw", clip_norm=1.0)), stage,
                                             names)
  trainable, frozen = train.split_params(params["params"], set())
  opt_state = optimizer.init(trainable)
  step_fn = jax.jit(train.make_train_step(cfg, optimizer, schedule, grad_accum=1), donate_argnums=(0, 2))
  batch = jax.device_put(batch)
  t0 = time.perf_counter()
  compiled = step_fn.lower(trainable, frozen, opt_state, batch, jnp.asarray(0)).compile()
  compile_s = time.perf_counter() - t0
  xla_flops = xla_step_flops(cfg, optimizer, schedule, trainable, frozen, opt_state, batch)
  state = {"params": trainable, "opt": opt_state, "step": 0}

  def run(steps):
    for _ in range(steps):
      state["params"], state["opt"], metrics = compiled(state["params"], frozen, state["opt"], batch,
                                                        jnp.asarray(state["step"]))
      state["step"] += 1
    jax.block_until_ready((state["params"], state["opt"], metrics))
    return metrics

  loss0 = float(run(1)["loss"])  # warm-up
  run(1)
  return (lambda steps: timed(lambda: run(steps))), {"xla_flops": xla_flops, "loss0": loss0, "compile_s": compile_s}


def bench_torch(hf_dir: str, cfg, batch, dtype: str, attn: str):
  """(run, info) for transformers' PaliGemma: forward, masked suffix CE, backward, clip, AdamW. run(steps) as
  bench_jax's; info: step-0 loss and the FLOPs per step torch's FlopCounterMode counts (or None)."""
  import contextlib
  import torch
  from transformers import PaliGemmaForConditionalGeneration
  torch.set_num_threads(os.cpu_count())
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  model = PaliGemmaForConditionalGeneration.from_pretrained(hf_dir, attn_implementation=attn,
                                                            dtype=torch.float32).to(dev).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, foreach=True)
  b, n_img, text_len = batch["tokens"].shape[0], cfg.img.num_patches, batch["tokens"].shape[1] - 1
  img_ids = np.full((b, n_img), model.config.image_token_id)
  ids = torch.tensor(np.concatenate([img_ids, batch["tokens"][:, :-1]], 1), dtype=torch.long, device=dev)
  token_type = torch.tensor(np.concatenate([np.zeros((b, n_img), np.int64), batch["mask_ar"][:, :-1]], 1),
                            device=dev)
  pixels = torch.tensor(batch["image"], device=dev).permute(0, 3, 1, 2).contiguous()
  targets = torch.tensor(batch["tokens"][:, 1:], dtype=torch.long, device=dev)
  weights = torch.tensor(batch["mask_loss"][:, 1:], dtype=torch.float32, device=dev)
  amp = (lambda: torch.autocast(dev, dtype=torch.bfloat16)) if dtype == "bfloat16" else contextlib.nullcontext
  sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

  def step():
    opt.zero_grad(set_to_none=True)
    with amp():
      # logits_to_keep: the lm_head runs on the text positions only, as ours does.
      logits = model(input_ids=ids, pixel_values=pixels, token_type_ids=token_type, logits_to_keep=text_len).logits
    nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    loss = ((nll * weights).sum(1) / weights.sum(1).clamp(min=1.0)).mean()  # as vlm_jax.train.loss_fn
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss

  def run(steps):
    for _ in range(steps):
      step()
    sync()

  loss0 = float(step().detach())
  step()
  sync()
  try:  # the FLOPs PyTorch's step runs (matmuls, convolutions, attention; forward + backward), counted with eager
    # attention: FlopCounterMode does not count the CPU SDPA kernel, whose FLOPs are the same as eager's.
    from torch.utils.flop_counter import FlopCounterMode
    model.set_attn_implementation("eager")
    try:
      with FlopCounterMode(display=False) as counter:
        step()
    finally:
      model.set_attn_implementation(attn)
    flops = float(counter.get_total_flops()) or None
  except Exception as e:  # an unexpected torch / transformers API: no PyTorch utilisation figure
    print(f"PyTorch FLOP count unavailable ({type(e).__name__}: {e})")
    flops = None
  return (lambda steps: timed(lambda: run(steps))), {"loss0": loss0, "flops": flops}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--batch", type=int, default=None, help="examples per step (default 4)")
  ap.add_argument("--steps", type=int, default=None, help="timed steps per round and side (default 4; --quick 10)")
  ap.add_argument("--rounds", type=int, default=3,
                  help="rounds of (matmul peak, JAX steps, PyTorch steps); each figure is the best round's")
  ap.add_argument("--text-len", type=int, default=None, help="text tokens per example (default 64; quick 16)")
  ap.add_argument("--quick", action="store_true", help="a small model for a fast smoke run")
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                  help="compute dtype (params stay float32); PyTorch then runs under bfloat16 autocast")
  ap.add_argument("--scan-layers", action="store_true",
                  help="keep the layer loops as nn.scan (scan_unroll=1) instead of unrolling them")
  ap.add_argument("--torch-attn", default="sdpa", choices=("sdpa", "eager"), help="transformers attention")
  ap.add_argument("--no-torch", action="store_true", help="skip the PyTorch run (no ratio)")
  ap.add_argument("--json", metavar="OUT", help="write the figures to this JSON file")
  args = ap.parse_args(argv)
  batch_size, steps = args.batch or 4, args.steps or (10 if args.quick else 4)
  text_len = args.text_len or (16 if args.quick else 64)

  from vlm_jax import treeutil
  from vlm_jax.convert import hf
  from vlm_jax.models.vlm import init_params
  t_start = time.perf_counter()
  cfg = model_config(args.quick, args.dtype, scan_unroll=1 if args.scan_layers else True)
  params = jax.device_get(init_params(cfg))  # float32 whatever the compute dtype
  flat = treeutil.flatten(params["params"])
  n_params = sum(v.size for v in flat.values())
  seq = cfg.img.num_patches + text_len
  print(f"model {cfg.name}: {n_params:,} params (ViT {cfg.img.width}x{cfg.img.depth} at {cfg.img.image_size}px/"
        f"{cfg.img.patch_size}, Gemma {cfg.llm.width}x{cfg.llm.depth}, vocab {cfg.llm.vocab_size}); batch "
        f"{batch_size}, seq {seq} = {cfg.img.num_patches} image + {text_len} text; {args.dtype}; layers "
        f"{'scanned' if args.scan_layers else 'unrolled'}; jax {jax.__version__} on {jax.devices()[0].platform}",
        flush=True)
  batch = make_batch(cfg, batch_size, text_len)

  run_jax, jax_info = bench_jax(cfg, params, batch)
  print(f"jax: compiled in {jax_info['compile_s']:.1f} s", flush=True)
  run_torch = torch_info = None
  tmp = None
  if not args.no_torch:
    tmp = tempfile.TemporaryDirectory()
    hf_dir = os.path.join(tmp.name, "hf")
    hf.save(hf_dir, cfg, params, dtype="float32")
    run_torch, torch_info = bench_torch(hf_dir, cfg, batch, args.dtype, args.torch_attn)
    print(f"step-0 loss jax {jax_info['loss0']:.5f} torch {torch_info['loss0']:.5f}", flush=True)

  # Rounds alternate the two sides (and the peak) so that a competing process hits both alike; each side's
  # figure is its best round. `other` is the share of the cores other processes used during a block.
  peaks, jax_s, torch_s, log = [], [], [], []
  for r in range(args.rounds):
    peaks.append(matmul_peak(args.dtype, reps=3))
    time.sleep(0.5)  # let the other side's worker threads stop spinning
    dt, other = run_jax(steps)
    jax_s.append(dt)
    entry = {"round": r, "peak_gflops": peaks[-1] / 1e9, "jax_s_per_step": dt / steps, "jax_other": other}
    if run_torch:
      time.sleep(0.5)
      dt, other = run_torch(steps)
      torch_s.append(dt)
      entry.update(torch_s_per_step=dt / steps, torch_other=other)
    log.append(entry)
    print("round {round}: peak {peak_gflops:.0f} GFLOP/s; jax {jax_s_per_step:.3f} s/step (others {jax_other:.0%})"
          .format(**entry) + ("" if not run_torch else "; torch {torch_s_per_step:.3f} s/step (others "
                                                       "{torch_other:.0%})".format(**entry)), flush=True)
  if tmp:
    tmp.cleanup()
  peak = max(peaks)
  jax_eps = steps * batch_size / min(jax_s)
  torch_eps = steps * batch_size / min(torch_s) if torch_s else None
  xla_flops, torch_flops = jax_info["xla_flops"], torch_info and torch_info["flops"]
  est_flops = analytic_flops(cfg, flat, batch_size, text_len)
  flops = xla_flops or est_flops
  achieved = flops * jax_eps / batch_size
  util = achieved / peak
  torch_util = torch_flops * torch_eps / batch_size / peak if torch_flops and torch_eps else None
  ratio = torch_eps and jax_eps / torch_eps
  max_other = max([e["jax_other"] for e in log] + [e.get("torch_other", 0.0) for e in log])
  fig = {"model": cfg.name, "params": int(n_params), "batch": batch_size, "seq": seq, "image_tokens":
         cfg.img.num_patches, "text_tokens": text_len, "dtype": args.dtype, "steps": steps, "rounds": args.rounds,
         "layers": "scanned" if args.scan_layers else "unrolled",
         "jax_examples_per_s": jax_eps, "torch_examples_per_s": torch_eps, "ratio": ratio,
         "flops_per_step_xla": xla_flops, "flops_per_step_analytic": est_flops, "flops_source":
         "xla" if xla_flops else "analytic", "flops_per_step_torch": torch_flops,
         "achieved_gflops": achieved / 1e9, "peak_gflops": peak / 1e9, "utilisation": util,
         "torch_utilisation": torch_util, "jax_loss0": jax_info["loss0"],
         "torch_loss0": torch_info and torch_info["loss0"], "torch_attn": args.torch_attn,
         "compile_s": jax_info["compile_s"], "rounds_log": log, "max_other_load": max_other,
         "pass_ratio": None if ratio is None else bool(ratio >= TARGET_RATIO), "pass_util": bool(util >= TARGET_UTIL),
         "platform": jax.devices()[0].platform, "cpu_count": os.cpu_count(),
         "wall_s": time.perf_counter() - t_start}
  verdict = lambda ok: "n/a" if ok is None else ("PASS" if ok else "FAIL")
  rows = [("model size", f"{n_params / 1e6:.1f}M params"), ("batch", batch_size),
          ("seq", f"{seq} ({cfg.img.num_patches} image + {text_len} text)"),
          ("JAX examples/s", f"{jax_eps:.2f}"),
          ("PyTorch examples/s", "skipped" if torch_eps is None else f"{torch_eps:.2f}"),
          ("ratio JAX/PyTorch", "n/a" if ratio is None else f"{ratio:.2f}x  (target >= {TARGET_RATIO}x: "
           f"{verdict(fig['pass_ratio'])})"),
          ("FLOPs/step", f"{flops / 1e9:.1f} G ({fig['flops_source']}; XLA "
           f"{'n/a' if xla_flops is None else f'{xla_flops / 1e9:.1f} G'}, analytic {est_flops / 1e9:.1f} G, "
           f"PyTorch counted {'n/a' if not torch_flops else f'{torch_flops / 1e9:.1f} G'})"),
          ("achieved GFLOP/s", f"{achieved / 1e9:.1f}"), ("matmul peak GFLOP/s", f"{peak / 1e9:.1f}"),
          ("utilisation", f"{100 * util:.1f}%  (target >= {100 * TARGET_UTIL:.0f}%: {verdict(fig['pass_util'])})"),
          ("PyTorch utilisation", "n/a" if torch_util is None else f"{100 * torch_util:.1f}%")]
  width = max(len(k) for k, _ in rows)
  print("\n" + "\n".join(f"{k:<{width}}  {v}" for k, v in rows))
  if max_other > 0.1:
    print(f"WARNING: other processes used up to {max_other:.0%} of the CPU during timed blocks: provisional figures.")
  print(f"(wall {fig['wall_s']:.0f} s)")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(fig, f, indent=2)
  return fig


if __name__ == "__main__":
  main()
