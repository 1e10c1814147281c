"""The grain input pipeline: masks, per-process shards, mixtures, exact resume, bad data."""
import json

import numpy as np
import pytest
from PIL import Image

from vlm_jax.data.pipeline import make_train_iterator
from vlm_jax.tokenizer import SentencePieceTokenizer


@pytest.fixture(scope="module")
def tok(tokenizer_file):
  return SentencePieceTokenizer(tokenizer_file)


@pytest.fixture
def llava(tmp_path):
  (tmp_path / "img").mkdir()
  records = []
  for i in range(8):
    Image.fromarray(np.full((10, 12, 3), 30 * i, np.uint8)).save(tmp_path / "img" / f"{i}.png")
    records.append({"id": f"r{i}", "image": f"{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat colour"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "and the shape"}, {"from": "gpt", "value": "circle"}]})
  (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records))
  return dict(kind="llava_json", json_path=str(tmp_path / "d.jsonl"), image_dir=str(tmp_path / "img"))


SYN = dict(kind="synthetic", num_examples=64, seed=0, grid=2)


def first_batches(data, tok, n=3, **kw):
  it, _ = make_train_iterator(data, tok, 16, 24, 4, seed=0, **kw)
  return [next(it) for _ in range(n)]


def test_batches_have_fixed_shapes_and_loss_on_answers_only(tok, llava):
  b = first_batches(llava, tok, 1)[0]
  assert b["image"].shape == (4, 16, 16, 3) and b["image"].dtype == np.float32
  assert -1.0 <= b["image"].min() and b["image"].max() <= 1.0
  for row in range(4):
    supervised = tok.decode(b["tokens"][row][b["mask_loss"][row] == 1])
    assert supervised == "red"  # decode stops at the first answer's EOS; both answers are supervised:
    pieces = b["tokens"][row][b["mask_loss"][row] == 1]
    assert list(pieces).count(tok.eos_id) == 2
    assert b["mask_ar"][row][0] == 0 and np.all(b["mask_ar"][row][b["mask_loss"][row] == 1] == 1)


def test_each_process_reads_its_own_rows_of_the_global_batch(tok):
  """Two processes reading rows 0-1 and 2-3 of each global batch of 4 read what one process reads."""
  def batches(rows):
    it, _ = make_train_iterator(dict(SYN, num_examples=16), tok, 16, 24, 4, seed=0, rows=rows)
    return [next(it)["image"] for _ in range(4)]
  parts = [batches((0, 2)), batches((2, 2))]
  for whole, first, second in zip(batches(None), *parts):
    np.testing.assert_array_equal(whole, np.concatenate([first, second]))


def test_mixture_follows_weights(tok, llava):
  data = dict(sources=[dict(SYN, weight=3.0), dict(llava, weight=1.0)])
  it, _ = make_train_iterator(data, tok, 16, 24, 4, seed=0)
  answers = [tok.decode(row[m == 1]) for _ in range(25) for b in [next(it)] for row, m in zip(b["tokens"],
                                                                                             b["mask_loss"])]
  share = np.mean([a == "red" for a in answers])
  assert 0.1 < share < 0.4  # ~1/4 from the LLaVA source


def test_iterator_state_resumes_exactly(tok):
  it, _ = make_train_iterator(SYN, tok, 16, 24, 4, seed=0)
  next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  fresh, _ = make_train_iterator(SYN, tok, 16, 24, 4, seed=0)
  fresh.set_state(state)
  for a, b in zip(expected, [next(fresh) for _ in range(3)]):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_bad_image_stops_or_is_skipped_and_counted(tok, llava, tmp_path):
  (tmp_path / "img" / "3.png").write_bytes(b"not a png")
  with pytest.raises(ValueError, match=r"3\.png"):
    first_batches(llava, tok, 2)
  it, pre = make_train_iterator(dict(llava, skip_bad=True), tok, 16, 24, 4, seed=0, num_threads=0)
  for _ in range(2):
    assert next(it)["image"].shape[0] == 4
  assert pre.stats()["skipped corrupt image"] >= 1


def test_over_long_text_is_truncated_and_counted(tok):
  it, pre = make_train_iterator(SYN, tok, 16, 6, 4, seed=0, num_threads=0)
  b = next(it)
  assert b["tokens"].shape == (4, 6)
  assert pre.counts["truncated"] >= 1


@pytest.mark.parametrize("cfg, match", [
    (dict(SYN, json_path="d.jsonl"), r"a synthetic data source takes no json_path \(its keys: kind, weight, "
                                     r"skip_bad, num_examples, seed"),
    (dict(kind="llava_json", image_dir="."), "a llava_json data source needs json_path"),
    (dict(kind="tfds", split="train"), "a tfds data source needs name"),
    (dict(kind="webdataset"), "Unknown data source kind 'webdataset'")])
def test_a_source_config_names_the_key_its_kind_does_not_take_or_needs(cfg, match):
  from vlm_jax.data.pipeline import make_source
  with pytest.raises(ValueError, match=match):
    make_source(cfg)
