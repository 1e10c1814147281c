"""The train loop: stage transitions, freezing, NaN handling, kill-and-resume, sharded = unsharded."""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import ml_collections
import numpy as np
import pytest

from tests import train_helpers as th
from vlm_jax import train as train_lib
from vlm_jax.models.vit import resample_posemb
from vlm_jax.models.vlm import init_params
from vlm_jax.train_setup import build_model_config, make_tokenizer, model_for_stage, normalize

QUIET = lambda *a, **k: None  # noqa: E731


def test_stage_transition_freezing_and_resampling(tmp_path):
  """Stage 0 freezes the vision tower, stage 1 keeps only the position embeddings frozen."""
  c = th.small_config(steps=(3, 2))
  c.stages[0]["frozen"] = ["img"]
  c.stages[1]["frozen"] = ["img/pos_embedding"]
  workdir, lines = str(tmp_path), []
  train_lib.train(c, workdir, log=lambda *a, **k: lines.append(" ".join(map(str, a))))
  assert [x for x in lines if "resampling" in x] == [
      "stage 1 (high_res): resampling position embeddings from 2x2 to 4x4"]

  cfg = normalize(c)
  model0 = model_for_stage(build_model_config(cfg.model, make_tokenizer(cfg)), cfg.stages[0])
  init = {k: np.asarray(v) for k, v in
          th.treeutil.flatten(init_params(model0, int(c.seed))["params"]).items()}
  end0, end1 = th.read_item(workdir, 3), th.read_item(workdir, 5)
  for name, value in init.items():
    if name.startswith("img/"):
      np.testing.assert_array_equal(end0[name], value, err_msg=f"frozen {name} moved")  # bit-identical
  assert all(np.abs(end0[n] - init[n]).max() > 0 for n in init if n.startswith("llm/"))
  # Optimizer state only for the trainable params of each stage.
  opt0 = th.item_names(workdir, 3, "opt_state")
  assert opt0 and not any("img/" in n for n in opt0) and any("llm/embedder" in n for n in opt0)
  opt1 = th.item_names(workdir, 5, "opt_state")
  assert any("img/Transformer" in n for n in opt1) and not any("pos_embedding" in n for n in opt1)
  # Position embeddings resampled 2x2 -> 4x4 grid (16px / 32px at patch 8), then left frozen.
  assert end0["img/pos_embedding"].shape[1] == 4 and end1["img/pos_embedding"].shape[1] == 16
  np.testing.assert_allclose(end1["img/pos_embedding"], resample_posemb(end0["img/pos_embedding"], 4), atol=0)
  assert os.path.exists(tmp_path / "metrics.jsonl") and os.path.exists(tmp_path / "loss.png")
  stages = [r["stage"] for r in map(__import__("json").loads, open(tmp_path / "metrics.jsonl")) if "loss" in r]
  assert stages == [0, 0, 0, 1, 1]


def test_keeps_the_last_checkpoints_and_evaluates_every_eval_every_steps(tmp_path, monkeypatch):
  """checkpoint_every=1 with keep_checkpoints=2: only the last two survive; eval_every=2 logs the evaluator at
  global steps 2 and 4 (stage 0, the latter its last step), and once at the end (step 6, the final evaluation,
  also into eval.json), each time on the training mesh."""
  import jax
  c = th.small_config(steps=(4, 2), checkpoint_every=1, keep_checkpoints=2, eval_every=2)
  c.evals = [dict(name="val", data=dict(kind="synthetic", split="val", num_examples=6, seed=0, image_size=32),
                  metrics=["exact_match"], batch_size=4, max_new_tokens=4, prefix_len=12)]
  meshes, evaluate = [], train_lib.evaluate.evaluate
  monkeypatch.setattr(train_lib.evaluate, "evaluate",
                      lambda *a, mesh=None, **k: meshes.append(mesh) or evaluate(*a, mesh=mesh, **k))
  train_lib.train(c, str(tmp_path), log=QUIET)
  assert len(meshes) == 3 and all(isinstance(m, jax.sharding.Mesh) and m.axis_names == ("data", "fsdp", "tensor")
                                  for m in meshes)
  assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [5, 6]
  records = [__import__("json").loads(line) for line in open(tmp_path / "metrics.jsonl")]
  evals = [(r["step"], r["stage"]) for r in records if "eval/val/exact_match" in r]
  assert evals == [(2, 0), (4, 0), (6, 1)]
  assert os.path.exists(tmp_path / "eval.json")


def test_extending_a_finished_run_replaces_its_exported_model(tmp_path):
  """model/ is the final params: re-running a finished run leaves it alone, a longer config trains on and
  exports again."""
  from vlm_jax import checkpoint, treeutil

  def exported():
    return treeutil.flatten(checkpoint.load_model(str(tmp_path / "model"))[1]["params"])

  c = th.small_config(steps=(1, 1), checkpoint_every=1)
  train_lib.train(c, str(tmp_path), log=QUIET)
  first, mtime = exported(), os.stat(tmp_path / "model" / "vlm_config.json").st_mtime_ns
  train_lib.train(c, str(tmp_path), log=QUIET)  # nothing left to train
  assert os.stat(tmp_path / "model" / "vlm_config.json").st_mtime_ns == mtime
  c.stages[1]["steps"] = 3
  train_lib.train(c, str(tmp_path), log=QUIET)
  final = th.read_item(str(tmp_path), 4)
  assert th.max_abs_diff(exported(), final) == 0 and th.max_abs_diff(first, final) > 0
  assert not [d for d in os.listdir(tmp_path) if d.startswith(".")]  # no temporaries left behind


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(tmp_path):
  c = th.small_config(steps=(6, 1), checkpoint_every=1)
  c.stages[0]["lr"] = 1e30  # the first update blows the params up: the next loss is not finite
  with pytest.raises(train_lib.TrainingError,
                     match=r"(loss|param_norm) is (nan|inf) at step \d+ .*last good checkpoint"):
    train_lib.train(c, str(tmp_path), log=QUIET)
  steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert steps, "the last good checkpoint was not kept"
  for step in steps:  # no checkpoint holds the state that produced the bad loss
    params = th.read_item(str(tmp_path), step)
    assert all(np.all(np.isfinite(v)) for v in params.values())
  c.checkpoint_every = 0
  with pytest.raises(train_lib.TrainingError, match=r"No checkpoint was saved before it \(checkpoint_every"):
    train_lib.train(c, str(tmp_path / "none"), log=QUIET)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_params_an_update_made_non_finite_are_never_checkpointed(tmp_path):
  """The loss is computed before the update: an update that overflows the params leaves that step's loss
  finite, and its param_norm (of the updated params) stops the run before they are saved."""
  c = th.small_config(steps=(3, 1), checkpoint_every=1)
  c.stages[0]["lr"] = 1e39  # inf in float32: the first update's params are not finite
  c.stages[0]["schedule"] = dict(decay="constant")
  with pytest.raises(train_lib.TrainingError, match=r"param_norm is (nan|inf) at step 1 .*No checkpoint was saved"):
    train_lib.train(c, str(tmp_path), log=QUIET)
  assert not [d for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]


def test_sigterm_where_a_checkpoint_exists_stops_without_saving_it_again(tmp_path, monkeypatch):
  """SIGTERM seen at a step that has a checkpoint (a checkpoint step, a resumed run before its first step, the
  start of the next stage) stops the run without saving that step again (Orbax refuses to); seen elsewhere it
  saves, after checking and logging the last step's record. Resumed each time, the run logs every step once."""
  stop_at = set()
  monkeypatch.setattr(train_lib._PreemptionWatch, "should_stop", lambda self, step: step in stop_at)
  c = th.small_config(steps=(5, 1), checkpoint_every=2)
  saved = lambda: sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  logged = lambda: [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
  for stop, checkpoints in (({2}, [2]), ({2}, [2]), ({3}, [2, 3]), ({5}, [2, 3, 4, 5])):
    stop_at.clear()
    stop_at.update(stop)
    with pytest.raises(train_lib.Preempted):
      train_lib.train(c, str(tmp_path), log=QUIET)
    assert saved() == checkpoints and logged() == list(range(1, max(stop) + 1))
  stop_at.clear()
  train_lib.train(c, str(tmp_path), log=QUIET)
  assert logged() == [1, 2, 3, 4, 5, 6]


def test_the_data_of_every_stage_still_to_run_is_read_before_anything_is_written(tmp_path):
  """A later stage's missing file fails at start-up, not once the earlier stages have trained; a resumed run
  does not read the data of the stages it has finished."""
  c = th.small_config(steps=(2, 1))
  good = dict(c.stages[0]["data"])
  c.stages[1]["data"] = dict(kind="llava_json", json_path=str(tmp_path / "gone.json"), image_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="gone.json"):
    train_lib.train(c, str(tmp_path / "run"), log=QUIET)
  assert not (tmp_path / "run").exists()
  c.stages[1]["data"] = good
  train_lib.train(c, str(tmp_path / "run"), log=QUIET)
  c.stages[0]["data"] = dict(good, json_path="x")  # no longer a valid synthetic source: stage 0 is done
  c.stages[1]["steps"] = 2
  train_lib.train(c, str(tmp_path / "run"), log=QUIET)
  assert th.losses(str(tmp_path / "run"))[-1] > 0 and len(th.losses(str(tmp_path / "run"))) == 4


def test_resuming_a_workdir_of_another_config_names_what_does_not_fit(tmp_path):
  c = th.small_config(steps=(2, 1), checkpoint_every=1, export_model=False)
  c.stages = c.stages[:1]
  train_lib.train(c, str(tmp_path), log=QUIET)
  c.stages[0]["steps"] = 3
  wider = ml_collections.ConfigDict(c.to_dict())
  wider.model.llm.width = 96
  logged = []
  with pytest.raises(ValueError, match=r"(?s)step 2 checkpoint in .*new workdir\) does not fit the model:\n"
                                       r".*llm/final_norm/scale: expected shape \(96,\), found \(128,\)"):
    train_lib.train(wider, str(tmp_path), log=lambda *a, **k: logged.append(" ".join(map(str, a))))
  assert f"the config differs from the one {tmp_path} last ran with: model.llm.width: 128 -> 96; " \
         "stages[0].steps: 2 -> 3" in logged
  # The workdir still names the config its checkpoints come from.
  assert json.loads((tmp_path / "config.json").read_text())["model"]["llm"]["width"] == 128
  c.stages[0]["frozen"] = "img/.*"
  with pytest.raises(ValueError, match=r"optimizer state of the step 2 checkpoint .*\(another optim or frozen set"):
    train_lib.train(c, str(tmp_path), log=QUIET)


@pytest.mark.parametrize("override, match", [
    ("--config.evals[0].metrics=['exact_mach']", r"unknown metrics \['exact_mach'\]"),
    ("--config.evals[0].sampler=beem", "Unknown sampler 'beem'"),
    ("--config.evals[0].max_new_tokens=0", "max_new_tokens must be >= 1"),
    ("--config.model.llm.widht=64", r"config.model.llm.widht: .*did you mean 'width'"),
    ("--config.optim.name=adam", "Unknown optimizer 'adam'"),
    ("--config.stages[1].schedule.decay=cosin", "Unknown schedule decay 'cosin'"),
    ("--config.grad_accum=3", r"stages\[0\].batch_size 64 is not divisible by config.grad_accum 3"),
    ("--config.grad_accum=0", r"config.grad_accum must be an integer >= 1, got 0"),
    ("--config.stages[1].steps=0", r"config.stages\[1\].steps must be an integer >= 1, got 0"),
    ("--config.stages[0].lr=-0.1", r"config.stages\[0\].lr must be a finite number >= 0, got -0.1"),
    ("--config.stages[1].data.fields=x", r"config.stages\[1\].data: a synthetic data source takes no fields"),
    ("--config.evals[0].data.json_path=x", r"config.evals\[0\].data: a synthetic data source takes no json_path"),
    ("--config.stages[1].frozen=['img/Transfomer']",
     r"config.stages\[1\].frozen\[0\]: 'img/Transfomer' matches no param name \(closest: img/Transformer/"),
    ("--config.stages[0].lr_mults=[('(img', 0.1)]", r"config.stages\[0\].lr_mults\[0\]: '\(img' is not a regex"),
    ("--config.optim.wd_mults=[('vision/.*', 0.0)]", r"config.optim.wd_mults\[0\]: 'vision/\.\*' matches no param"),
    ("--config.stages[0].frozen=[1]", r"config.stages\[0\].frozen\[0\]: 1 is not a regex string"),
    ("--config.stages[0].lr_mults=[('img/.*',)]",
     r"config.stages\[0\].lr_mults\[0\]: \('img/\.\*',\) is not a \(regex, multiplier\) pair"),
    ("--config.stages[0].lr_mults=[('img/.*', -1.0)]", r"the multiplier of 'img/\.\*' must be a finite number >= 0"),
    ("--config.stages[1].data={'sources': []}", r"config.stages\[1\].data: sources must be a non-empty list"),
    ("--config.stages[1].data={'sources': [{'kind': 'synthetic', 'split': 'train', 'weight': -1.0}]}",
     r"config.stages\[1\].data: sources\[0\].weight must be a finite number > 0, got -1.0")])
def test_train_cli_refuses_a_bad_config_before_training_or_writing(tmp_path, capsys, override, match):
  """An evaluator, optimizer or model key that cannot work fails at start-up (not after the stages), leaving no
  workdir."""
  from tools import train as train_cli
  workdir = tmp_path / "run"
  assert train_cli.main(["--config", th.TINY, "--workdir", str(workdir), override]) != 0
  assert re.search(match, capsys.readouterr().err)
  assert not workdir.exists()


def test_train_cli_reports_a_missing_optional_extra_without_a_traceback(tmp_path, capsys, monkeypatch):
  """The tfds source without tensorflow-datasets raises an ImportError that says what to install: the CLI
  prints it as an error (exit status 1) instead of a traceback."""
  from tools import train as train_cli
  from vlm_jax import train as train_mod

  def needs_tfds(*a, **k):
    raise ImportError("the tfds source needs tensorflow-datasets: pip install -e '.[tfds]'")
  monkeypatch.setattr(train_mod, "train", needs_tfds)
  assert train_cli.main(["--config", th.TINY, "--workdir", str(tmp_path / "w")]) == 1
  assert capsys.readouterr().err == "error: the tfds source needs tensorflow-datasets: pip install -e '.[tfds]'\n"


def test_train_cli_refuses_a_workdir_that_is_a_file(tmp_path, capsys):
  from tools import train as train_cli
  (tmp_path / "taken").write_text("")
  for workdir in (tmp_path / "taken", tmp_path / "taken" / "run"):
    assert train_cli.main(["--config", th.TINY, "--workdir", str(workdir)]) == 2
    assert f"error: --workdir {workdir}: {tmp_path / 'taken'} is a file, not a directory." in capsys.readouterr().err


def test_log_names_the_records_a_skip_bad_source_dropped(tmp_path):
  from PIL import Image
  Image.new("RGB", (12, 12), (255, 0, 0)).save(tmp_path / "red.png")
  good = {"image": "red.png", "conversations": [{"from": "human", "value": "<image>\ncolour"},
                                                {"from": "gpt", "value": "red"}]}
  (tmp_path / "bad.png").write_bytes((tmp_path / "red.png").read_bytes()[:40])  # truncated: found when read
  (tmp_path / "d.jsonl").write_text("\n".join([json.dumps(good), "{oops", json.dumps(dict(good, image="gone.png")),
                                               json.dumps(dict(good, image="bad.png"))]))
  c = th.small_config(steps=(2,))
  c.stages = c.stages[:1]
  c.stages[0]["name"] = ""  # unnamed: the logs say "stage 0"
  c.stages[0]["data"] = dict(kind="llava_json", json_path=str(tmp_path / "d.jsonl"), image_dir=str(tmp_path),
                             skip_bad=True)
  lines = []
  train_lib.train(c, str(tmp_path / "run"), log=lambda *a, **k: lines.append(" ".join(map(str, a))))
  (report,) = [line for line in lines if line.startswith("stage 0 data: ")]  # at the start, beside the end's counts
  assert report.startswith(f"stage 0 data: {tmp_path / 'd.jsonl'}: skipped 2 records (1 malformed JSON, 1 missing "
                           "image); first: ")
  assert "d.jsonl:2: malformed JSON" in report and "d.jsonl:3" in report and "gone.png" in report
  # The corrupt image, read many times over 2 steps of 8 rows from 2 usable records: one record, named at the end.
  (end,) = [line for line in lines if line.startswith("stage 0 data (this process): ") and "first:" in line]
  assert "skipped 3 records (" in end and "1 corrupt image" in end and "d.jsonl:4" in end and "bad.png" in end
  # An evaluator reading the same file without skip_bad fails at start-up, before any training or writing.
  c.evals = [dict(name="val", data=dict(c.stages[0]["data"], skip_bad=False))]
  with pytest.raises(ValueError, match=r"d.jsonl:2: malformed JSON"):
    train_lib.train(c, str(tmp_path / "run2"), log=QUIET)
  assert not (tmp_path / "run2").exists()


RUN = textwrap.dedent("""
  import sys
  sys.path.insert(0, {repo!r})
  from tests import train_helpers as th
  from vlm_jax.train import train
  c = th.small_config(steps=(6, 4), checkpoint_every=2)
  train(c, sys.argv[1], log=lambda *a, **k: print(*a, flush=True))
""")


def _start(script, workdir, env=None):
  return subprocess.Popen([sys.executable, "-c", script, workdir], cwd=th.REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigkill_and_restart_ends_like_an_uninterrupted_run(tmp_path):
  script = RUN.format(repo=th.REPO)
  ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
  p = _start(script, ref)
  assert p.wait(timeout=300) == 0, p.stdout.read()
  p = _start(script, killed)
  deadline = time.time() + 300
  while not os.path.isdir(os.path.join(killed, "checkpoints", "4")):  # mid-stage-0, after a few saves
    assert p.poll() is None and time.time() < deadline, "run ended before it could be killed"
    time.sleep(0.05)
  p.send_signal(signal.SIGKILL)
  p.wait()
  assert not os.path.exists(os.path.join(killed, "model"))
  p = _start(script, killed)
  out = p.communicate(timeout=300)[0]
  assert p.returncode == 0, out
  assert "resuming from step" in out
  assert th.max_abs_diff(th.read_item(ref, 10), th.read_item(killed, 10)) < 1e-6
  np.testing.assert_allclose(th.losses(killed), th.losses(ref), rtol=1e-6)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_then_exits_143(tmp_path):
  workdir = str(tmp_path / "w")
  env = dict(os.environ, PYTHONPATH=th.REPO)
  cmd = [sys.executable, "tools/train.py", "--config", f"{th.TINY}:res=16,res2=32,batch=8,examples=256,steps1=400",
         "--workdir", workdir, "--config.model.img.depth=1", "--config.model.llm.depth=1", "--config.evals=[]",
         "--config.checkpoint_every=0", "--config.log_every=1"]
  p = subprocess.Popen(cmd, cwd=th.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 300
  while not (os.path.exists(os.path.join(workdir, "metrics.jsonl")) and len(th.losses(workdir)) >= 3):
    assert p.poll() is None and time.time() < deadline
    time.sleep(0.05)
  p.send_signal(signal.SIGTERM)
  out = p.communicate(timeout=120)[0]
  assert p.returncode == 143, out
  steps = [int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()]
  assert len(steps) == 1 and 3 <= steps[0] < 400


SHARDED = textwrap.dedent("""
  import json, sys
  sys.path.insert(0, {repo!r})
  from tests import train_helpers as th
  from vlm_jax.train import train
  out = {{}}
  for name, mesh in {meshes!r}.items():
    c = th.small_config(steps=(5, 1), mesh=mesh)
    train(c, sys.argv[1] + "/" + name, log=lambda *a, **k: None)
    out[name] = th.losses(sys.argv[1] + "/" + name)
  print("LOSSES" + json.dumps(out))
""")


def _losses_on(devices, meshes, workdir):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-c", SHARDED.format(repo=th.REPO, meshes=meshes), workdir], cwd=th.REPO,
                     env=env, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  import json
  return json.loads(p.stdout.split("LOSSES")[-1])


@pytest.mark.slow
def test_sharded_losses_equal_unsharded(tmp_path):
  single = _losses_on(1, {"one": {"data": 1}}, str(tmp_path / "a"))["one"][:5]
  sharded = _losses_on(8, {"data": {"data": 8}, "fsdp": {"data": 2, "fsdp": 4},
                           "mixed": {"data": 2, "fsdp": 2, "tensor": 2}}, str(tmp_path / "b"))
  for name, values in sharded.items():
    rel = np.abs(np.asarray(values[:5]) - single) / np.abs(single)
    assert rel.max() < 1e-5, (name, values[:5], single)


@pytest.mark.parametrize("name", ["tiny_synthetic", "paligemma_stages", "transfer_paligemma"])
def test_shipped_configs_validate(name):
  from vlm_jax import config_util
  from vlm_jax.train_setup import check_config
  c = config_util.load_config(os.path.join(th.REPO, "configs", f"{name}.py"))
  check_config(c)
  sizes = [s["image_size"] for s in c.stages]
  assert sizes == sorted(sizes)
  if name == "paligemma_stages":
    assert sizes == [224, 448, 896] and c.stages[0]["frozen"] and not c.stages[1]["frozen"]


@pytest.mark.parametrize("spec", ["tiny_synthetic", "paligemma_stages", "siglip_ul2.py:tiny=True,q_lr=0.5"])
def test_shipped_configs_freeze_and_scale_params_that_exist(spec):
  """Their frozen / lr_mults / wd_mults patterns each match some param of the model they build."""
  from vlm_jax import config_util, optim, treeutil
  from vlm_jax.models.vlm import abstract_params
  name, _, arg = spec.partition(":")
  c = normalize(config_util.load_config(os.path.join(th.REPO, "configs", name.removesuffix(".py") + ".py")
                                        + (f":{arg}" if arg else "")))
  if c.model.get("llm") is not None:
    c.model.llm["vocab_size"] = 1024  # the tokenizer's, which these tests do not have
  names = list(treeutil.flatten(abstract_params(build_model_config(c.model))))
  for i, stage in enumerate(c.stages):
    optim.check_patterns(names, stage, c.get("optim", {}), f"config.stages[{i}]")
  assert any(stage.get("frozen") or stage.get("lr_mults") for stage in c.stages) or c.optim.get("wd_mults")


def test_transfer_config_fine_tunes_a_local_hf_checkpoint(tmp_path, tokenizer_file):
  """The transfer config, pointed at a (tiny, random) HF PaliGemma directory and a LLaVA JSON file."""
  import json
  from PIL import Image
  from tests import hf_models
  from vlm_jax import config_util
  hf_dir = tmp_path / "hf"
  hf_models.tiny_paligemma("gemma", seed=5).save_pretrained(hf_dir)
  (tmp_path / "images").mkdir()
  records = []
  for i in range(6):
    Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(tmp_path / "images" / f"{i}.png")
    records.append({"id": str(i), "image": f"{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat colour"}, {"from": "gpt", "value": f"shade {i}"}]})
  records.insert(1, dict(records[0], id="gone", image="gone.png"))  # skipped (and counted) by training and eval
  (tmp_path / "train.json").write_text(json.dumps(records))
  arg = (f"init={hf_dir},tokenizer={tokenizer_file},data={tmp_path / 'train.json'},images={tmp_path / 'images'},"
         "res=28,batch=2,steps=2")
  c = config_util.load_config(os.path.join(th.REPO, "configs", "transfer_paligemma.py") + ":" + arg)
  with c.unlocked():
    c.model.dtype = "float32"
    c.evals[0]["batch_size"] = 4
    c.evals[0]["num_examples"] = 4
  results = train_lib.train(c, str(tmp_path / "run"), log=QUIET)
  assert results["val"]["num_examples"] == 4 and results["val"]["skipped"] == {"missing image": 1}
  start = th.treeutil.flatten(__import__("vlm_jax").load(str(hf_dir)).params["params"])
  end = th.read_item(str(tmp_path / "run"), 2)
  np.testing.assert_array_equal(end["img/Transformer/encoder_norm/scale"],
                                start["img/Transformer/encoder_norm/scale"])  # frozen vision tower
  assert np.abs(end["llm/final_norm/scale"] - start["llm/final_norm/scale"]).max() > 0
