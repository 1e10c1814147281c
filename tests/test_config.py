"""Training configs: file:arg loading, --config.KEY overrides, and unknown keys rejected with a clear error."""
import os
import subprocess
import sys

import pytest

from vlm_jax import config_util
from vlm_jax.train_setup import ALLOWED_KEYS, check_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny_synthetic.py")


def test_arg_after_colon_reaches_get_config():
  c = config_util.load_config(f"{TINY}:steps1=30,steps2=10,res=16,res2=32")
  assert c.stages[0]["image_size"] == 16 and c.stages[1]["image_size"] == 32
  assert c.stages[0]["steps"] + c.stages[1]["steps"] == 40


def test_unknown_config_argument():
  with pytest.raises(ValueError, match="Unknown config argument 'stepz'"):
    config_util.load_config(f"{TINY}:stepz=4")


def test_a_bare_config_argument_is_only_a_bool_switch():
  """`:lr` used to set lr=True (a learning rate of 1.0): a bare key is True only where the default is a bool."""
  with pytest.raises(ValueError, match=r"Config argument 'lr' needs a value \(lr=\.\.\.\)"):
    config_util.load_config(f"{TINY}:steps1=3,lr")
  with pytest.raises(ValueError, match=r"Config argument 'init' needs a value"):
    config_util.parse_arg("init", init="checkpoints/pg")
  assert config_util.parse_arg("tiny,steps=3", tiny=False, steps=1).to_dict() == dict(tiny=True, steps=3)


@pytest.mark.parametrize("name, arg, bad", [
    ("siglip_llama", "llm=/ckpt/llama,steps1=3", "llm"),
    ("siglip_llama", "tiny=False,llm=/ckpt/llama,steps1=3,steps2=2", "steps1, steps2"),
    ("siglip_ul2", "data=/d.json,images=/img", "data, images"),
    ("siglip_ul2", "tiny=False,llm=/ckpt/ul2,q_lr=0.1", "q_lr")])
def test_a_config_refuses_arguments_its_variant_ignores(name, arg, bad):
  """The LLaVA- and PaLI-3-style configs are a tiny synthetic recipe or a real one; an argument of the other is
  refused rather than dropped (a tiny run with llm= used to train on the synthetic data without a word)."""
  path = os.path.join(REPO, "configs", f"{name}.py")
  with pytest.raises(ValueError, match=rf"config arguments? {bad}: only with tiny="):
    config_util.load_config(f"{path}:{arg}")
  used = ",".join(item for item in arg.split(",") if item.partition("=")[0] not in bad.split(", "))
  assert config_util.load_config(f"{path}:{used}").stages


def test_overrides_are_typed_and_reach_nested_fields():
  c = config_util.load_config(TINY)
  config_util.apply_override(c, "seed", "7")
  config_util.apply_override(c, "stages[1].lr", "1e-4")
  config_util.apply_override(c, "optim.b2", "0.95")
  assert c.seed == 7 and c.stages[1]["lr"] == 1e-4 and c.optim.b2 == 0.95
  # A value of the wrong type names the flag as written.
  for key, text, match in (("seed", "abc", "--config.seed: 'abc' is not an int"),
                           ("stages[1].lr", "fast", r"--config.stages\[1\].lr: 'fast' is not a float"),
                           ("stages[0]", "oops", r"--config.stages\[0\]: cannot parse 'oops'")):
    with pytest.raises(ValueError, match=match):
      config_util.apply_override(c, key, text)
  with pytest.raises(ValueError, match="config argument res: 'big' is not an int"):
    config_util.load_config(f"{TINY}:res=big")


def test_an_override_of_the_wrong_type_and_a_config_file_returning_nothing_are_named(tmp_path):
  c = config_util.load_config(TINY)
  with pytest.raises(ValueError, match=r"--config.stages=3: .*cannot be casted to type <class 'list'>"):
    config_util.apply_override(c, "stages", "3", ALLOWED_KEYS)
  (tmp_path / "empty.py").write_text("def get_config(arg=None):\n  pass\n")
  with pytest.raises(ValueError, match=r"empty.py: get_config returned NoneType, not an ml_collections.ConfigDict"):
    config_util.load_config(str(tmp_path / "empty.py"))


@pytest.mark.parametrize("key,match", [("sed", "Unknown config key config.sed \\(did you mean 'seed'\\?\\)"),
                                       ("optim.bb1", "Unknown config key config.optim.bb1"),
                                       ("stages[5].lr", "does not exist")])
def test_unknown_override_key(key, match):
  c = config_util.load_config(TINY)
  with pytest.raises(ValueError, match=match):
    config_util.apply_override(c, key, "1")


def test_unknown_key_in_config_file():
  c = config_util.load_config(TINY)
  with c.unlocked():
    c.stages[0]["lr_mult"] = []  # typo of lr_mults
  with pytest.raises(ValueError, match=r"config.stages\[0\].lr_mult \(did you mean 'lr_mults'\?\)"):
    check_config(c)


def test_check_config_refuses_evaluators_sharing_a_name():
  """Results (eval.json, tools/eval.py's JSON) and metrics.jsonl keys are per evaluator name: a second one of
  the same name (two unnamed ones are both 'eval') would overwrite the first's results."""
  c = config_util.load_config(TINY)
  with c.unlocked():
    c.evals = [dict(c.evals[0]), dict(c.evals[0], batch_size=50)]
  with pytest.raises(ValueError, match=r"config.evals: the name\(s\) \['val'\] are used by more than one"):
    check_config(c)
  with c.unlocked():
    c.evals = [{k: v for k, v in dict(e).items() if k != "name"} for e in c.evals]
  with pytest.raises(ValueError, match=r"\['eval'\] are used by more than one evaluator \(an unnamed one is 'eval'\)"):
    check_config(c)
  with c.unlocked():
    c.evals[1]["name"] = "val2"
  check_config(c)


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 2.5, "8"])
def test_check_config_names_a_stage_size_that_is_no_integer(value):
  """Set in a config file (the CLI's overrides are typed already): a ValueError naming the key, never another
  exception from the int conversion (inf gave an OverflowError)."""
  c = config_util.load_config(TINY)
  with c.unlocked():
    c.stages[1]["steps"] = value
  with pytest.raises(ValueError, match=r"config.stages\[1\].steps must be an integer >= 1, got "):
    check_config(c)


@pytest.mark.parametrize("key,sizes,match", [
    ("mesh", {"fsdpp": 2}, r"Unknown config.mesh axes \['fsdpp'\]"),
    ("mesh", {"data": 0}, r"config.mesh axis sizes must be positive or -1, got \{'data': 0\}"),
    ("dcn_mesh", {"data": -1, "fsdp": -1}, r"Only one config.dcn_mesh axis may be -1"),
    ("dcn_mesh", "dict(data=2)", r"config.dcn_mesh must be a dict of axis sizes .*, got 'dict\(data=2\)'"),
    ("mesh", {"data": "two"}, r"config.mesh axis sizes must be integers, got \{'data': 'two'\}")])
def test_check_config_rejects_bad_mesh_before_devices(key, sizes, match):
  """The mesh is checked with the config, not when the devices are laid out after the data loads."""
  c = config_util.load_config(TINY)
  with c.unlocked():
    c[key] = sizes
  with pytest.raises(ValueError, match=match):
    check_config(c)


def test_train_cli_rejects_unknown_key_cleanly(tmp_path):
  out = subprocess.run([sys.executable, "tools/train.py", "--config", "configs/tiny_synthetic.py",
                        "--workdir", str(tmp_path / "w"), "--config.learning_rate=1"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 2
  assert "error: Unknown config key config.learning_rate" in out.stderr and "Traceback" not in out.stderr
  assert not (tmp_path / "w").exists()


def test_train_cli_help():
  out = subprocess.run([sys.executable, "tools/train.py", "--help"], cwd=REPO, capture_output=True, text=True)
  assert out.returncode == 0 and "--workdir" in out.stdout and "--config.KEY=VALUE" in out.stdout


def test_override_may_add_a_key_the_schema_knows_but_not_a_typo():
  c = config_util.load_config(TINY)
  config_util.apply_override(c, "evals[0].sampler", "beam", ALLOWED_KEYS)
  config_util.apply_override(c, "dcn_mesh", "{'data': 2}", ALLOWED_KEYS)
  assert c.evals[0]["sampler"] == "beam" and dict(c.dcn_mesh) == {"data": 2}
  with pytest.raises(ValueError, match="did you mean 'dcn_mesh'"):
    config_util.apply_override(c, "dcn_mesj", "1", ALLOWED_KEYS)
  # Inside a key whose content the schema leaves free (the model's sizes), new keys are the model's to check.
  config_util.apply_override(c, "model.llm.vocab_size", "1537", ALLOWED_KEYS)
  assert c.model.llm["vocab_size"] == 1537
  with pytest.raises(ValueError, match="Unknown config key config.seed.x"):
    config_util.apply_override(c, "seed.x", "1", ALLOWED_KEYS)
  with pytest.raises(ValueError, match="Unknown config key config.optim.bb1"):
    config_util.apply_override(c, "optim.bb1", "1", ALLOWED_KEYS)


def test_changes_lists_every_leaf_that_moved():
  old = {"seed": 0, "stages": [{"steps": 3, "lr": 1e-3}], "model": {"dtype": "float32"}}
  new = {"seed": 0, "stages": [{"steps": 6, "lr": 1e-3}], "model": {}, "evals": [1]}
  assert config_util.changes(old, new) == ["evals: (unset) -> [1]", "model.dtype: 'float32' -> (unset)",
                                           "stages[0].steps: 3 -> 6"]
  assert config_util.changes(old, old) == []
