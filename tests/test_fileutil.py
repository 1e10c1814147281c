"""Atomic writes: a failed write leaves the previous file, whole, and no temporary behind."""
import os

import pytest

from vlm_jax import fileutil
from vlm_jax.run_log import MetricsLog


def crash(*args):
  raise OSError("killed")


@pytest.mark.parametrize("data", ["text\n", b"\x89PNG bytes"])
def test_write_file_is_whole_or_nothing(tmp_path, monkeypatch, data):
  target = tmp_path / "eval.json"
  fileutil.write_file(target, data)
  assert (target.read_bytes() if isinstance(data, bytes) else target.read_text()) == data
  (tmp_path / "plain").write_text("")
  assert os.stat(target).st_mode == os.stat(tmp_path / "plain").st_mode  # not a temporary file's 0600
  os.remove(tmp_path / "plain")
  monkeypatch.setattr(os, "replace", crash)
  with pytest.raises(OSError, match="killed"):
    fileutil.write_file(target, data * 3)
  assert (target.read_bytes() if isinstance(data, bytes) else target.read_text()) == data
  assert os.listdir(tmp_path) == ["eval.json"]


def test_resumed_metrics_log_keeps_its_records_if_the_rewrite_fails(tmp_path, monkeypatch):
  """A resumed run rewrites metrics.jsonl without the records past its checkpoint; a crash in that rewrite
  must not lose the records before it."""
  log = MetricsLog(str(tmp_path))
  for step in (1, 2, 3):
    log.write({"step": step, "loss": 1.0 / step})
  before = (tmp_path / "metrics.jsonl").read_text()
  monkeypatch.setattr(os, "replace", crash)
  with pytest.raises(OSError):
    MetricsLog(str(tmp_path), resume_step=2)
  assert (tmp_path / "metrics.jsonl").read_text() == before
  monkeypatch.undo()
  assert [r["step"] for r in MetricsLog(str(tmp_path), resume_step=2).records()] == [1, 2]


def test_atomic_dir_makes_a_readable_directory_and_replaces_only_a_complete_one(tmp_path, monkeypatch):
  out = tmp_path / "model"
  with fileutil.atomic_dir(out) as tmp:
    (tmp_path / "plain").mkdir()
    open(os.path.join(tmp, "a"), "w").write("old")
  assert os.stat(out).st_mode == os.stat(tmp_path / "plain").st_mode  # as mkdir makes it, not mkdtemp's 0700
  with pytest.raises(FileExistsError, match="exists and is not an empty directory"):
    with fileutil.atomic_dir(out):
      pass
  with pytest.raises(OSError, match="killed"):  # the block fails: the old directory stays
    with fileutil.atomic_dir(out, replace=True) as tmp:
      open(os.path.join(tmp, "a"), "w").write("new")
      crash()
  assert (out / "a").read_text() == "old"
  replace = os.replace
  monkeypatch.setattr(os, "replace", lambda a, b: crash() if b == str(out) and "tmp-" in a else replace(a, b))
  with pytest.raises(OSError, match="killed"):  # the rename of the new one fails: the old one is put back
    with fileutil.atomic_dir(out, replace=True) as tmp:
      open(os.path.join(tmp, "a"), "w").write("new")
  assert (out / "a").read_text() == "old"
  monkeypatch.setattr(os, "replace", replace)
  with fileutil.atomic_dir(out, replace=True) as tmp:
    open(os.path.join(tmp, "a"), "w").write("new")
  assert (out / "a").read_text() == "new" and sorted(os.listdir(tmp_path)) == ["model", "plain"]


def test_metrics_log_replaces_a_repeated_last_record(tmp_path):
  """A finished run started again evaluates its last step once more: the record replaces the one it repeats,
  also across a restart (resume_step); a record with other keys at the same step is appended."""
  log = MetricsLog(str(tmp_path))
  log.write({"step": 1, "loss": 2.0})
  log.write({"step": 2, "loss": 1.0})
  log.write({"step": 2, "eval/val/exact_match": 0.5})
  log = MetricsLog(str(tmp_path), resume_step=2)
  log.write({"step": 2, "eval/val/exact_match": 0.75})
  assert log.records() == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0},
                           {"step": 2, "eval/val/exact_match": 0.75}]


def test_metrics_log_resumes_past_a_torn_last_line_and_names_a_bad_one(tmp_path):
  """A kill while appending can cut the last record short: a resumed run drops it. A malformed line elsewhere
  is an error naming the file and line."""
  log = MetricsLog(str(tmp_path))
  for step in (1, 2):
    log.write({"step": step, "loss": 1.0 / step})
  path = tmp_path / "metrics.jsonl"
  path.write_text(path.read_text() + '{"step": 3, "lo')
  log = MetricsLog(str(tmp_path), resume_step=3)
  log.write({"step": 3, "loss": 0.25})
  assert [r["step"] for r in log.records()] == [1, 2, 3]
  path.write_text("garbage\n" + path.read_text())
  with pytest.raises(ValueError, match=r"metrics\.jsonl:1: not a JSON record"):
    MetricsLog(str(tmp_path), resume_step=3)


@pytest.mark.parametrize("data, error", [
    (b"[]", r"expected a JSON object, got \[\]"),
    (b'{"model_type": "gemma\xff"}', r"not UTF-8 text"),
    (b'{"a": ', r"malformed JSON")])
def test_read_json_names_the_file_whatever_is_wrong_in_it(tmp_path, data, error):
  """A config that is not a JSON object, or not UTF-8, used to fail later and elsewhere: an AttributeError in
  the caller's .get, or a UnicodeDecodeError naming no file."""
  file = tmp_path / "config.json"
  file.write_bytes(data)
  with pytest.raises(ValueError, match=rf"^{file}: {error}"):
    fileutil.read_json(str(file))
  file.write_text('{"model_type": "gemma"}')
  assert fileutil.read_json(str(file)) == {"model_type": "gemma"}


def test_a_checkpoint_config_that_is_not_an_object_is_named(tmp_path):
  from vlm_jax import checkpoint
  (tmp_path / checkpoint.CONFIG_FILE).write_text("[1, 2]")
  with pytest.raises(ValueError, match=rf"{checkpoint.CONFIG_FILE}: expected a JSON object"):
    checkpoint.load_config(str(tmp_path))
