"""The benchmark scripts run (their --quick smoke configurations) and their cross-checks hold: both sides of
the training benchmark compute the same first loss; the decode benchmark's greedy tokens equal transformers'."""
import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(tmp_path, script, *args):
  out = tmp_path / "out.json"
  proc = subprocess.run([sys.executable, f"benchmarks/{script}", "--quick", "--json", str(out), *args], cwd=REPO,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return json.loads(out.read_text()), proc.stdout


@pytest.mark.slow
def test_train_step_benchmark_runs_and_both_sides_agree(tmp_path):
  fig, out = run(tmp_path, "train_step.py", "--rounds", "1", "--steps", "2")
  assert fig["jax_examples_per_s"] > 0 and fig["torch_examples_per_s"] > 0 and fig["peak_gflops"] > 0
  assert abs(fig["jax_loss0"] - fig["torch_loss0"]) < 1e-3 * abs(fig["torch_loss0"]), out
  assert "utilisation" in out


@pytest.mark.slow
def test_decode_benchmark_runs_and_tokens_match_transformers(tmp_path):
  fig, out = run(tmp_path, "decode.py", "--reps", "1", "--kv-heads", "2", "--sampled")  # GQA: heads-major cache
  assert fig["kv_heads"] == 2 and "with 2 kv heads" in out
  res = fig["results"]["float32"]
  assert fig["token_check_float32"] is True, out
  assert all(c["identical"] for c in res["token_check"].values())
  assert res["ours"]["a"]["tokens_per_s"] > 0 and res["torch"]["b"]["tokens_per_s"] > 0
  # XLA's GEMM weight-read rates, measured at both shapes' batches in both weight layouts.
  rates = fig["gemm_weight_rate_gbs"]
  assert set(rates) == {str(b) for b in (1, fig["shapes"]["a"]["batch"])}
  assert all(set(r) == {"x @ W", "W x^T"} and min(r.values()) > 0 for r in rates.values())
  assert "XLA's GEMMs read weights at" in out
  # --sampled: our step greedy and sampling with a top-k / top-p cut, at both shapes.
  sampled = res["ours"]["sampled_step_ms"]
  assert set(sampled) == {"a", "b"} and all(set(v) == {"greedy", "top_k 40", "top_p 0.9"} for v in sampled.values())
  assert all(math.isfinite(ms) for v in sampled.values() for ms in v.values()) and "sampled (a) step" in out
