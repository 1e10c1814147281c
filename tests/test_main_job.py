"""The README's main job, exactly as a user runs it: two stages on the synthetic data, then evaluation."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_readme_main_job_reaches_the_accuracy_bar(tmp_path):
  workdir = tmp_path / "tiny"
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  out = subprocess.run([sys.executable, "tools/train.py", "--config", "configs/tiny_synthetic.py",
                        "--workdir", str(workdir)], cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
  assert out.returncode == 0, out.stderr[-3000:]
  results = json.loads((workdir / "eval.json").read_text())["val"]
  assert results["num_examples"] == 300 and len(results["predictions"]) == 300
  assert results["exact_match"] >= 0.9, {k: v for k, v in results.items() if k != "predictions"}
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert {r["stage"] for r in records if "loss" in r} == {0, 1}
  assert {"step", "stage", "loss", "lr"} <= set(records[0])
  assert (workdir / "loss.png").stat().st_size > 0
  import vlm_jax
  model = vlm_jax.load(str(workdir))  # the workdir: the model it exported
  assert model.config.img.image_size == 48  # the second stage's resolution
  ex = results["predictions"][0]
  from vlm_jax.data.synthetic import SyntheticSource
  src = SyntheticSource(300, split="val", seed=0, grid=2, image_size=48)
  idx = int(ex["id"].split("-")[1])
  assert model.generate([src[idx]["image"]], [ex["prompt"]], max_new_tokens=12) == [ex["prediction"]]
