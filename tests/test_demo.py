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


def test_demo_help_and_usage_errors_before_any_work(tmp_path):
  def demo(*args):
    return subprocess.run([sys.executable, "tools/demo.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
  out = demo("--help")
  assert out.returncode == 0 and "--workdir" in out.stdout
  out = demo("--workdir", str(tmp_path / "new"), "--config", "tinny")
  assert out.returncode == 2 and "--config 'tinny' is not a model config; known:" in out.stderr
  (tmp_path / "used" / "x").mkdir(parents=True)
  out = demo("--workdir", str(tmp_path / "used"))
  assert out.returncode == 2 and "exists and is not an empty directory" in out.stderr and "Traceback" not in out.stderr
