"""Every model family on the README main job's task: trains each tiny family config from scratch on the
shipped synthetic data (two stages, 32 then 48 px) and reports held-out greedy exact match and wall time.

  python benchmarks/families.py                       # all families, sequentially (~8 min each on 2 cores)
  python benchmarks/families.py --only siglip_ul2 --json out.json

The bar is the main job's: held-out exact match >= 0.9.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = {
    "gemma + linear (PaliGemma)": "configs/tiny_synthetic.py",
    "llama + mlp (LLaVA)": "configs/siglip_llama.py",
    "llama + resampler": "configs/siglip_llama.py:adapter=resampler",
    "ul2 encoder-decoder + linear (PaLI-3)": "configs/siglip_ul2.py",
}
BAR = 0.9


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--only", help="comma-separated config names to run (e.g. siglip_ul2)")
  parser.add_argument("--json", help="write the results here")
  parser.add_argument("--workdir", help="keep the runs here (default: a temporary directory)")
  args = parser.parse_args(argv)
  wanted = [w.strip() for w in args.only.split(",")] if args.only else None
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    root = args.workdir or tmp
    for name, config in FAMILIES.items():
      if wanted and not any(w in config for w in wanted):
        continue
      workdir = os.path.join(root, config.replace("configs/", "").replace(".py", "").replace(":", "_"))
      t0 = time.time()
      proc = subprocess.run([sys.executable, "tools/train.py", "--config", config, "--workdir", workdir],
                            cwd=REPO_ROOT, capture_output=True, text=True)
      minutes = (time.time() - t0) / 60
      if proc.returncode:
        print(f"{name}: training failed\n{proc.stderr[-2000:]}", file=sys.stderr)
        return 1
      with open(os.path.join(workdir, "eval.json")) as f:
        val = json.load(f)["val"]
      acc = val["exact_match"]
      per_task = {k.split("/", 1)[1]: round(v, 3) for k, v in sorted(val.items()) if k.startswith("exact_match/")}
      results.append({"family": name, "config": config, "exact_match": acc, "per_task": per_task,
                      "minutes": round(minutes, 1)})
      print(f"{name:40s} {config:45s} exact match {acc:.3f} ({'MET' if acc >= BAR else 'NOT MET'}) "
            f"in {minutes:.1f} min; per task: {', '.join(f'{k} {v:.2f}' for k, v in per_task.items())}",
            flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)
  return 0 if all(r["exact_match"] >= BAR for r in results) else 3


if __name__ == "__main__":
  sys.exit(main())
