"""Run a config's evaluators on a checkpoint: batched, jitted decoding through the shared decode loop.

  python tools/eval.py --config configs/tiny_synthetic.py --checkpoint runs/tiny/model
  python tools/eval.py --config configs/tiny_synthetic.py --checkpoint runs/tiny --evals val --out val.json
  python tools/eval.py --config configs/transfer_paligemma.py:init=/ckpt/pg --checkpoint /ckpt/pg \\
      --config.evals[0].num_examples=100 --config.evals[0].sampler=beam

The evaluators are the config's `evals` (each: name, data, metrics, batch_size, max_new_tokens, prefix_len,
text_len, sampler options); --evals picks some by name. Metrics: exact_match, vqa_accuracy, anls,
relaxed_accuracy, cider (decoded answers against every reference answer) and loss / perplexity
(teacher-forced on the reference answers). --checkpoint takes what tools/predict.py takes. The results JSON
(default: eval_results.json next to the checkpoint) holds, per evaluator, the metrics (overall and per
task) and every prediction with its per-metric scores. With several devices, params are sharded and batches
split over the config's `mesh` (batch sizes rounded up to a multiple of its data x fsdp size).
"""
import argparse
import json
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

from tools.predict import add_load_flags, load_model  # noqa: E402


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, metavar="FILE.py[:ARGS]", help="config whose `evals` to run")
  add_load_flags(parser)
  parser.add_argument("--evals", help="comma-separated evaluator names (default: all of the config's)")
  parser.add_argument("--out", help="results JSON (default: eval_results.json beside the checkpoint)")
  args, rest = parser.parse_known_args(argv)
  from vlm_jax.config_util import override_pairs
  return args, override_pairs(parser, rest)


def select_evals(config, names: str | None):
  evals = list(config.get("evals") or [])
  if not evals:
    raise ValueError("the config has no evals.")
  if not names:
    return evals
  by_name = {e.get("name", "eval"): e for e in evals}
  wanted = list(dict.fromkeys(n.strip() for n in names.split(",") if n.strip()))  # each once, in order
  if unknown := [n for n in wanted if n not in by_name]:
    raise ValueError(f"unknown evaluators {unknown}; the config has {sorted(by_name)}.")
  return [by_name[n] for n in wanted]


def default_out(path: str) -> str:
  """Inside a training workdir, else beside the checkpoint (either may be remote: gs://...)."""
  from vlm_jax import checkpoint, fileutil
  path = path.rstrip("/") if fileutil.is_remote(path) else os.path.abspath(path.rstrip("/"))
  return os.path.join(path if checkpoint.is_workdir(path) else os.path.dirname(path), "eval_results.json")


def main(argv=None) -> int:
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  from vlm_jax import config_util
  from vlm_jax.train_setup import ALLOWED_KEYS, check_config, make_tokenizer, normalize
  try:
    config = config_util.load_with_overrides(args.config, overrides, ALLOWED_KEYS)
    check_config(config)
    evals = select_evals(normalize(config), args.evals)
    from vlm_jax import fileutil
    out_path = args.out or default_out(args.checkpoint)
    out_dir = os.path.dirname(os.path.abspath(out_path))
    if not fileutil.is_remote(out_path) and not os.path.isdir(out_dir):  # known now, not after the evaluation
      raise FileNotFoundError(f"--out {out_path}: there is no directory {out_dir} to write it in.")
    if not fileutil.is_remote(out_path) and os.path.isdir(out_path):  # else IsADirectoryError after the evaluation
      raise ValueError(f"--out {out_path}: is a directory (name the results file, e.g. {out_path}/eval.json).")
    import jax
    mesh = None
    if jax.device_count() > 1:  # params read straight into their shards: no device holds them all
      from vlm_jax import sharding
      mesh = sharding.make_mesh(config.get("mesh") or {"data": -1})
      print(f"evaluating on a mesh {dict(mesh.shape)} of {jax.device_count()} devices", file=sys.stderr)
    model = load_model(args, default_tokenizer=lambda: make_tokenizer(config), mesh=mesh)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2

  from tqdm import tqdm
  from vlm_jax import evaluate
  results = {}
  try:
    for eval_cfg in evals:
      name = eval_cfg.get("name", "eval")
      bars = {}

      def progress(phase, done, total):  # a bar for each pass over the examples
        if phase not in bars:
          for bar in bars.values():
            bar.close()
          bars[phase] = tqdm(desc=f"eval {name} ({phase})", total=total, unit="ex", file=sys.stderr,
                             dynamic_ncols=True)
        bars[phase].update(done - bars[phase].n)
      res = evaluate.evaluate(model.config, model.params, model.tokenizer, eval_cfg, progress=progress,
                              mesh=model.mesh)
      for bar in bars.values():
        bar.close()
      print(f"{name}: {evaluate.summary(res)} ({res['num_examples']} examples)")
      results[name] = res
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  fileutil.write_file(out_path, json.dumps(results, indent=1))
  print(f"wrote {out_path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
