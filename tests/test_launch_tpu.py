"""tools/launch_tpu.py: the exact gcloud command lines (dry run), running them with a stand-in gcloud, errors."""
import importlib.util
import os
import stat
import subprocess
import sys

from tests.train_helpers import REPO

SCRIPT = os.path.join(REPO, "tools", "launch_tpu.py")

EXPECTED = [
    'gcloud compute tpus tpu-vm ssh pg-v5e-64 --zone=us-west4-a --project=my-proj --worker=all '
    '--command="rm -rf vlm_jax && mkdir -p vlm_jax"',
    'gcloud compute tpus tpu-vm scp --recurse setup.py requirements.txt vlm_jax configs tools pg-v5e-64:vlm_jax '
    '--zone=us-west4-a --project=my-proj --worker=all',
    'gcloud compute tpus tpu-vm ssh pg-v5e-64 --zone=us-west4-a --project=my-proj --worker=all '
    '--command="cd vlm_jax && python3 -m pip install -q -e . \'jax[tpu]\' gcsfs"',
    'gcloud compute tpus tpu-vm ssh pg-v5e-64 --zone=us-west4-a --project=my-proj --worker=all '
    '--command="cd vlm_jax && python3 tools/train.py --config configs/paligemma_stages.py:model=paligemma2_10b_224,'
    'batch=512 --workdir gs://my-bucket/runs/pg10b --config.mesh.fsdp=16 \'--config.stages[0].lr=3e-5\'"',
]
ARGS = ["--tpu", "pg-v5e-64", "--zone", "us-west4-a", "--project", "my-proj",
        "--config", "configs/paligemma_stages.py:model=paligemma2_10b_224,batch=512",
        "--workdir", "gs://my-bucket/runs/pg10b", "--config.mesh.fsdp=16", "--config.stages[0].lr=3e-5"]


def run(*args, cwd=REPO, env=None):
  return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=60)


def test_dry_run_prints_the_exact_gcloud_commands():
  p = run(*ARGS)
  assert p.returncode == 0, p.stderr
  assert p.stdout.splitlines() == EXPECTED
  assert run(*ARGS, "--dry_run").stdout.splitlines() == EXPECTED


def test_commands_without_project_and_with_a_config_file_outside_the_repo(tmp_path):
  spec = importlib.util.spec_from_file_location("launch_tpu", SCRIPT)
  launch_tpu = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(launch_tpu)
  own = tmp_path / "my_config.py"
  own.write_text("def get_config(arg=None):\n  pass\n")
  lines = [launch_tpu.render(c) for c in launch_tpu.build_commands(
      "t1", "europe-west4-b", None, f"{own}:steps=3", "gs://b/r")]
  assert lines[1] == ("gcloud compute tpus tpu-vm scp --recurse setup.py requirements.txt vlm_jax configs tools "
                      f"{own} t1:vlm_jax --zone=europe-west4-b --worker=all")
  assert lines[3] == ('gcloud compute tpus tpu-vm ssh t1 --zone=europe-west4-b --worker=all --command="cd vlm_jax '
                      '&& python3 tools/train.py --config my_config.py:steps=3 --workdir gs://b/r"')


def test_run_stops_at_the_first_failing_command(tmp_path):
  """A stand-in gcloud records its arguments and fails the copy step: nothing after it runs."""
  calls = tmp_path / "calls.txt"
  fake = tmp_path / "gcloud"
  fake.write_text(f'#!/bin/sh\necho "$*" >> {calls}\ncase "$*" in *" scp "*) exit 7;; esac\n')
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
  p = run(*ARGS, "--run", env=env)
  assert p.returncode == 7
  assert "error: command 2 of 4 failed with exit status 7" in p.stderr and "Traceback" not in p.stderr
  recorded = calls.read_text().splitlines()
  assert len(recorded) == 2 and recorded[0].endswith("--command=rm -rf vlm_jax && mkdir -p vlm_jax")
  fake.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
  calls.unlink()
  p = run(*ARGS, "--run", env=env)
  assert p.returncode == 0, p.stderr
  assert len(calls.read_text().splitlines()) == 4


def test_help_and_flag_errors():
  p = run("--help")
  assert p.returncode == 0
  for flag in ("--tpu", "--zone", "--project", "--config", "--workdir", "--dry_run", "--run"):
    assert flag in p.stdout
  for args, message in ((ARGS + ["--run", "--dry_run"], "not allowed with"),
                        (["--tpu", "t", "--zone", "z", "--config", "missing.py", "--workdir", "gs://b"],
                         "error: no config file missing.py"),
                        (ARGS + ["--seed=3"], "unrecognised argument '--seed=3'"),
                        (ARGS + ["--config.mesh.fsdpp=32"], "Unknown config.mesh axes ['fsdpp']"),
                        (ARGS + ["--config.stages[0].lrr=1"], "Unknown config key config.stages[0].lrr"),
                        (["--zone", "z"], "the following arguments are required")):
    p = run(*args)
    assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr, (args, p.stderr)
