"""The README's current main job, as a new user runs it."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_runs_and_round_trips(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  out = subprocess.run([sys.executable, "tools/demo.py", "--workdir", str(tmp_path / "demo")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert "same tokens: True" in out.stdout and out.stdout.rstrip().splitlines()[-1].startswith("ok")
  assert (tmp_path / "demo" / "hf" / "model.safetensors").exists()


def test_demo_without_an_hf_export_still_round_trips_its_checkpoint(tmp_path):
  """tiny_t5: transformers has no model for a SigLIP + T5 VLM, so the demo says so and checks the checkpoint."""
  out = subprocess.run([sys.executable, "tools/demo.py", "--workdir", str(tmp_path / "demo"), "--config", "tiny_t5"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert "no HuggingFace export for tiny_t5" in out.stdout and "same tokens: True" in out.stdout
  assert not (tmp_path / "demo" / "hf").exists()


def test_demo_help():
  out = subprocess.run([sys.executable, "tools/demo.py", "--help"], cwd=REPO, capture_output=True, text=True)
  assert out.returncode == 0 and "--workdir" in out.stdout
