"""LLaVA-format conversation files: records to turns, turns to masks, and bad data named by file and line."""
import json
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from vlm_jax.data.llava_json import DataError, LlavaJsonSource, load_image
from vlm_jax.data.text import tokenize_turns
from vlm_jax.tokenizer import SentencePieceTokenizer

GOOD = [
    {"id": "two_turns", "image": "a/red.png", "conversations": [
        {"from": "human", "value": "<image>\nwhat colour is the shape"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "how many are there"},
        {"from": "gpt", "value": "there are a circle and a square"}]},
    {"id": 7, "image": "blue.jpg", "conversations": [  # placeholder after the text; trailing unanswered turn
        {"from": "human", "value": "caption en\n<image>"},
        {"from": "gpt", "value": "a blue square"},
        {"from": "human", "value": "and the left"}]},
    {"id": "text_only", "conversations": [
        {"from": "human", "value": "what is the shape"}, {"from": "gpt", "value": "a triangle"}]},
]
EXPECTED_TURNS = {
    "two_turns": [("what colour is the shape", "red"), ("how many are there", "there are a circle and a square")],
    "7": [("caption en", "a blue square")],
    "text_only": [("what is the shape", "a triangle")],
}


@pytest.fixture
def image_dir(tmp_path):
  d = tmp_path / "images"
  (d / "a").mkdir(parents=True)
  Image.new("RGB", (20, 12), (255, 0, 0)).save(d / "a" / "red.png")
  Image.new("L", (9, 14), 80).save(d / "blue.jpg")  # greyscale: must come back RGB
  with open(d / "corrupt.jpg", "wb") as f:
    f.write(b"\xff\xd8\xff\xe0 this is not a jpeg" * 10)
  return str(d)


def write_jsonl(path, lines):
  """Lines are records (dumped) or raw strings (written as they are)."""
  with open(path, "w") as f:
    for line in lines:
      f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
  return str(path)


def check_good(source):
  assert len(source) == 3
  by_id = {source[i]["id"]: source[i] for i in range(len(source))}
  assert {k: v["turns"] for k, v in by_id.items()} == EXPECTED_TURNS
  assert by_id["two_turns"]["image"].shape == (12, 20, 3) and by_id["two_turns"]["image"].dtype == np.uint8
  assert (by_id["two_turns"]["image"] == [255, 0, 0]).all()
  assert by_id["7"]["image"].shape == (14, 9, 3)  # native size, greyscale converted to RGB
  assert by_id["text_only"]["image"] is None
  assert all(ex["task"] == "llava" for ex in by_id.values())


def test_jsonl_records_to_turns(tmp_path, image_dir):
  check_good(LlavaJsonSource(write_jsonl(tmp_path / "data.jsonl", GOOD), image_dir))


def test_json_list_records_to_turns(tmp_path, image_dir):
  path = tmp_path / "data.json"
  path.write_text(json.dumps(GOOD, indent=1))
  source = LlavaJsonSource(str(path), image_dir)
  check_good(source)
  assert "3 records" in repr(source)


def test_masks_from_turns(tmp_path, image_dir, tokenizer_file):
  tok = SentencePieceTokenizer(tokenizer_file)
  source = LlavaJsonSource(write_jsonl(tmp_path / "data.jsonl", GOOD), image_dir)
  turns = source[0]["turns"]
  (p1, a1), (p2, a2) = turns
  out = tokenize_turns(tok, turns, 64)
  n = int(out.mask_input.sum())
  assert not out.truncated and out.tokens.shape == (64,) and out.mask_input[:n].all()
  # mask_ar is 0 exactly on the first prefix (BOS + prompt + "\n"), 1 after it, padding included.
  n_prefix = len(tok.encode_prefix(p1))
  assert (out.mask_ar[:n_prefix] == 0).all() and (out.mask_ar[n_prefix:] == 1).all()
  # The loss covers the answers and their EOS: two runs, each ending in EOS, decoding to the answers.
  starts = np.flatnonzero(np.diff(np.concatenate([[0], out.mask_loss])) == 1)
  ends = np.flatnonzero(np.diff(np.concatenate([out.mask_loss, [0]])) == -1) + 1
  assert len(starts) == 2
  for s, e, answer in zip(starts, ends, (a1, a2)):
    assert out.tokens[e - 1] == tok.eos_id
    assert tok.decode(out.tokens[s:e]) == answer
  # Nothing outside the answers is supervised: the human turns (BOS first) and padding. (The test tokenizer
  # normalises "\n" away, hence the strip.)
  assert out.tokens[0] == tok.bos_id
  human = [out.tokens[:starts[0]], out.tokens[ends[0]:starts[1]]]
  assert [tok.decode(h).strip() for h in human] == [p1, p2]
  assert not out.mask_loss[n:].any() and (out.tokens[n:] == tok.pad_id).all()
  # Too long: cut to the length and reported.
  short = tokenize_turns(tok, turns, n - 3)
  assert short.truncated and short.tokens.shape == (n - 3,) and short.mask_input.all()
  np.testing.assert_array_equal(short.mask_loss, out.mask_loss[:n - 3])


def test_missing_image(tmp_path, image_dir):
  bad = dict(GOOD[0], id="lost", image="nowhere/gone.jpg")
  path = write_jsonl(tmp_path / "file.jsonl", [GOOD[2], bad])
  with pytest.raises(DataError, match=r"file\.jsonl:2 \(id 'lost'\): image .*nowhere/gone\.jpg not found"):
    LlavaJsonSource(path, image_dir)


def test_corrupt_image_fails_on_read(tmp_path, image_dir):
  bad = dict(GOOD[0], id="broken", image="corrupt.jpg")
  source = LlavaJsonSource(write_jsonl(tmp_path / "file.jsonl", [GOOD[2], GOOD[2], bad]), image_dir)
  assert len(source) == 3  # images are decoded lazily
  with pytest.raises(DataError, match=r"file\.jsonl:3 \(id 'broken'\): cannot load image .*corrupt\.jpg"):
    source[2]


def test_truncated_image(tmp_path):
  path = tmp_path / "cut.jpg"
  Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), np.uint8)).save(path)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(DataError, match=r"cannot load image .*cut\.jpg"):
    load_image(str(path))


def test_malformed_json_line(tmp_path, image_dir):
  path = write_jsonl(tmp_path / "file.jsonl", [GOOD[2], GOOD[2], '{"id": "x", "conversations": [', GOOD[2]])
  with pytest.raises(DataError, match=r"file\.jsonl:3: malformed JSON"):
    LlavaJsonSource(path, image_dir)


def test_malformed_json_list(tmp_path, image_dir):
  path = tmp_path / "file.json"
  path.write_text('[\n  {"id": "a"},\n  {"id": "b" "conversations": []}\n]')
  with pytest.raises(DataError, match=r"file\.json:3:14: malformed JSON"):
    LlavaJsonSource(str(path), image_dir)


def test_conversation_starting_with_gpt(tmp_path, image_dir):
  bad = {"id": "backwards", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]}
  with pytest.raises(DataError, match=r"file\.jsonl:2 \(id 'backwards'\): conversations\[0\] is from 'gpt'"):
    LlavaJsonSource(write_jsonl(tmp_path / "file.jsonl", [GOOD[2], bad]), image_dir)
  path = tmp_path / "file.json"
  path.write_text(json.dumps([GOOD[2], GOOD[2], bad]))
  with pytest.raises(DataError, match=r"file\.json\[record 2\] \(id 'backwards'\)"):
    LlavaJsonSource(str(path), image_dir)


@pytest.mark.parametrize("bad", [
    {"id": "empty", "conversations": []},
    {"id": "no_answer", "conversations": [{"from": "human", "value": "a"}]},
    {"id": "two_humans", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]},
    {"id": "no_value", "conversations": [{"from": "human"}, {"from": "gpt", "value": "b"}]},
    {"id": "many", "image": ["a/red.png"], "conversations": GOOD[2]["conversations"]},
    {"id": "list_sender", "conversations": [{"from": ["human"], "value": "a"}, {"from": "gpt", "value": "b"}]},
])
def test_bad_structure(tmp_path, image_dir, bad):
  with pytest.raises(DataError, match=rf"file\.jsonl:1 \(id '{bad['id']}'\)"):
    LlavaJsonSource(write_jsonl(tmp_path / "file.jsonl", [bad]), image_dir)


def test_skip_bad(tmp_path, image_dir):
  lines = [GOOD[0], dict(GOOD[0], id="lost", image="gone.jpg"), "{not json", GOOD[1],
           dict(GOOD[0], id="broken", image="corrupt.jpg"), dict(GOOD[0], id="lost2", image="gone2.png"), GOOD[2]]
  source = LlavaJsonSource(write_jsonl(tmp_path / "file.jsonl", lines), image_dir, skip_bad=True)
  assert len(source) == 4  # the corrupt image is only found when read
  assert source.skipped == {"missing image": 2, "malformed JSON": 1}
  assert source.skipped_summary() == "skipped 3 records (2 missing image, 1 malformed JSON)"
  assert "file.jsonl:2 (id 'lost')" in source.skipped_examples[0]
  assert "file.jsonl:3: malformed JSON" in source.skipped_examples[1]
  report = source.skip_report()
  assert report.startswith(f"{tmp_path / 'file.jsonl'}: skipped 3 records (2 missing image, 1 malformed JSON); first: ")
  assert "file.jsonl:2 (id 'lost')" in report and "file.jsonl:3: malformed JSON" in report
  examples = [source[i] for i in range(len(source))]
  assert examples[2] is None
  assert [ex["id"] for ex in examples if ex is not None] == ["two_turns", "7", "text_only"]
  assert source.skipped["corrupt image"] == 1
  assert "file.jsonl:5 (id 'broken')" in source.skipped_examples[-1]
  assert "skipped 4 records" in repr(source)


def test_grain_drops_skipped_and_pickles(tmp_path, image_dir):
  import grain
  lines = [GOOD[0], dict(GOOD[0], id="broken", image="corrupt.jpg"), GOOD[2]]
  source = LlavaJsonSource(write_jsonl(tmp_path / "file.jsonl", lines), image_dir, skip_bad=True)
  source = pickle.loads(pickle.dumps(source))  # as sent to grain's worker processes
  ids = [ex["id"] for ex in grain.MapDataset.source(source).map(lambda ex: ex).to_iter_dataset()]
  assert ids == ["two_turns", "text_only"]


def test_all_bad_is_an_error(tmp_path, image_dir):
  path = write_jsonl(tmp_path / "file.jsonl", ["{oops", dict(GOOD[0], image="gone.jpg")])
  with pytest.raises(DataError, match=r"no usable records \(skipped 2 records"):
    LlavaJsonSource(path, image_dir, skip_bad=True)


def test_missing_files(tmp_path, image_dir):
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    LlavaJsonSource(str(tmp_path / "nope.jsonl"), image_dir)
  path = write_jsonl(tmp_path / "file.jsonl", [GOOD[2]])
  with pytest.raises(FileNotFoundError, match="no_images"):
    LlavaJsonSource(path, os.path.join(image_dir, "no_images"))
