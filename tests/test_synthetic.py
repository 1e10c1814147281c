"""The synthetic shapes dataset: deterministic, every answer read back from the pixels, and its tokenizer."""
import hashlib
import os
import re

import numpy as np
import pytest
from scipy import ndimage

from vlm_jax.data import synthetic
from vlm_jax.data.synthetic import SyntheticSource, synthetic_tokenizer

# Written out here, not imported, so the test checks the module's names rather than repeating them.
PALETTE = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 230), "yellow": (240, 210, 40)}
NAMES = {
    3: ["top left", "top centre", "top right", "middle left", "middle", "middle right", "bottom left",
        "bottom centre", "bottom right"],
    2: ["top left", "top right", "bottom left", "bottom right"],
}
LOC = re.compile(r"^<loc(\d{4})><loc(\d{4})><loc(\d{4})><loc(\d{4})> (circle|square|triangle)$")


def fingerprint(ex):
  return hashlib.sha1(ex["image"].tobytes() + repr(ex["turns"]).encode()).hexdigest()


def objects_in(image, grid):
  """Reads the objects back from the pixels: the background is grey (r == g == b), every object colour is not.
  Each 8-connected non-grey region is one object: its colour is the nearest palette entry to its mean, its
  shape follows from how much of its bounding box it fills (square 1, circle ~0.79, triangle ~0.5)."""
  size = image.shape[0]
  rgb = image.astype(np.int32)
  fg = ~((rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2]))
  labels, n = ndimage.label(fg, structure=np.ones((3, 3)))
  found = []
  for k, (ys, xs) in enumerate(ndimage.find_objects(labels), start=1):
    mask = labels[ys, xs] == k
    mean = rgb[ys, xs][mask].mean(axis=0)
    colour = min(PALETTE, key=lambda c: np.abs(mean - PALETTE[c]).sum())
    assert np.abs(mean - PALETTE[colour]).max() <= 12, mean  # crisp: no blend with the background
    fill = mask.mean()
    shape = "square" if fill > 0.95 else "circle" if 0.7 < fill < 0.85 else "triangle" if 0.4 < fill < 0.6 else None
    assert shape is not None, fill
    cy, cx = (ys.start + ys.stop) / 2, (xs.start + xs.stop) / 2
    cell = int(cy * grid // size) * grid + int(cx * grid // size)
    found.append(dict(colour=colour, shape=shape, cell=cell, box=(ys.start, xs.start, ys.stop, xs.stop)))
  return sorted(found, key=lambda o: o["cell"])


SHAPE_ORDER = ["circle", "square", "triangle"]  # the order captions list objects in


def check_example(ex, src):
  """Asserts the example's answer is the one its pixels give, and that its question names one object."""
  assert ex["image"].dtype == np.uint8 and ex["image"].shape == (src.image_size, src.image_size, 3)
  assert len(ex["turns"]) == 1
  (prompt, answer), task = ex["turns"][0], ex["task"]
  objs = objects_in(ex["image"], src.grid)
  assert 1 <= len(objs) <= src.max_objects
  assert len({o["shape"] for o in objs}) == len(objs)  # distinct shapes
  assert len({o["cell"] for o in objs}) == len(objs)  # one object per cell
  by_shape = {o["shape"]: o for o in objs}
  if task == "caption":
    assert prompt == "caption en"
    parts = [f"a {o['colour']} {o['shape']}" for o in sorted(objs, key=lambda o: SHAPE_ORDER.index(o["shape"]))]
    assert answer == (parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1])
  elif task == "count":
    assert (prompt, answer) == ("how many shapes", str(len(objs)))
  elif task == "colour":
    shape = prompt.removeprefix("what colour is the ")
    assert answer == by_shape[shape]["colour"]
  elif task == "shape":
    colour = prompt.removeprefix("what shape is ")
    named = [o for o in objs if o["colour"] == colour]
    assert len(named) == 1, (prompt, objs)  # unambiguous: no other object has that colour
    assert answer == named[0]["shape"]
  elif task == "position":
    shape = prompt.removeprefix("where is the ")
    assert answer == NAMES[src.grid][by_shape[shape]["cell"]]
  elif task == "detect":
    shape = prompt.removeprefix("detect ")
    m = LOC.match(answer)
    assert m and m.group(5) == shape, answer
    decoded = [int(v) / 1023 * src.image_size for v in m.groups()[:4]]
    # The decoded box is the object's pixel box (y1 x1 y2 x2, far edges exclusive) to within 1 px (in fact 0.03 px).
    np.testing.assert_allclose(decoded, by_shape[shape]["box"], atol=1)
  else:
    raise AssertionError(f"unknown task {task}")
  return task


def test_examples_are_deterministic_and_splits_differ():
  src = SyntheticSource(200, seed=3)
  again = SyntheticSource(200, seed=3)
  for i in (0, 7, 199):
    a, b = src[i], again[i]
    assert a["id"] == f"train-{i}" and a["image"].tobytes() == b["image"].tobytes()
    assert (a["id"], a["turns"], a["task"]) == (b["id"], b["turns"], b["task"])
  assert src[-1]["id"] == "train-199"
  train = [fingerprint(src[i]) for i in range(200)]
  val = [fingerprint(SyntheticSource(200, seed=3, split="val")[i]) for i in range(200)]
  other_seed = [fingerprint(SyntheticSource(200, seed=4)[i]) for i in range(200)]
  # Backgrounds and colours carry small random variations, so an exact (image, text) repeat between streams
  # is possible but improbable; scenes and questions themselves do repeat (the task space is small by design).
  assert len(set(train) & set(val)) <= 2 and len(set(train) & set(other_seed)) <= 2
  assert sum(t == v for t, v in zip(train, val)) <= 2  # not the same stream index for index


def test_answers_match_the_pixels():
  tasks = set()
  for kw in [{}, dict(image_size=96, grid=2), dict(image_size=224, max_objects=2)]:
    src = SyntheticSource(150, seed=1, split="val", **kw)
    tasks.update(check_example(src[i], src) for i in range(len(src)))
  assert tasks == set(synthetic.TASKS)


def test_every_question_is_unambiguous():
  # Shape questions alone force the fallbacks: another subject, then (no unique colour) another scene.
  src = SyntheticSource(120, tasks=("shape",))
  assert all(check_example(src[i], src) == "shape" for i in range(len(src)))
  src = SyntheticSource(400, tasks=("shape", "count"))
  texts = [src.text(i) for i in range(len(src))]
  assert {t for t, _, _ in texts} == {"shape", "count"}
  assert all(check_example(src[i], src) for i in range(0, 400, 10))
  assert all(src.text(i) == (src[i]["task"], *src[i]["turns"][0]) for i in range(5))


def test_boxes_take_few_values():
  src = SyntheticSource(300, tasks=("detect",))
  answers = {src[i]["turns"][0][1].rsplit(" ", 1)[0] for i in range(len(src))}
  assert len(answers) == 9  # one box per grid cell
  assert len({v for a in answers for v in re.findall(r"<loc\d{4}>", a)}) == 6  # 3 starts and 3 ends per axis


def test_bad_arguments():
  src = SyntheticSource(5)
  for i in (5, -6):
    with pytest.raises(IndexError):
      src[i]
  for kw in [dict(split="dev"), dict(tasks=("count", "vqa")), dict(tasks=()), dict(max_objects=4),
             dict(grid=4), dict(grid=1), dict(image_size=16)]:
    with pytest.raises(ValueError):
      SyntheticSource(5, **kw)
  one = SyntheticSource(20, image_size=32, grid=1, max_objects=1, tasks=("count", "colour", "detect"))
  assert all(check_example(one[i], one) for i in range(len(one)))
  assert "split='train'" in repr(src) and "num_examples=5" in repr(src)


def test_grain_pipeline():
  import grain
  src = SyntheticSource(10)
  ds = grain.MapDataset.source(src)
  assert ds[3]["id"] == "train-3" and len(ds) == 10
  order = [ex["id"] for ex in ds.shuffle(seed=0)]
  assert sorted(order) == sorted(f"train-{i}" for i in range(10)) and order != sorted(order)
  batches = list(ds.shuffle(seed=0).batch(4))
  assert [len(b["id"]) for b in batches] == [4, 4, 2]
  b = batches[0]
  assert b["image"].shape == (4, 64, 64, 3) and b["image"].dtype == np.uint8
  assert list(b["id"]) == order[:4]
  # One turn per example: grain stacks the turns to [(prompts[4], answers[4])].
  (prompts, answers), = b["turns"]
  assert [(p, a) for p, a in zip(prompts, answers)] == [src[int(i.split("-")[1])]["turns"][0] for i in b["id"]]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("synthetic_tok"))


def test_tokenizer(tok_dir):
  tok = synthetic_tokenizer(tok_dir)
  assert tok.vocab_size == synthetic.TOKENIZER_VOCAB
  assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.sp.unk_id()) == (0, 1, 2, 3)
  assert [tok.sp.IdToPiece(i) for i in range(4)] == ["<pad>", "<eos>", "<bos>", "<unk>"]
  specials = [f"<loc{i:04d}>" for i in range(1024)] + [f"<seg{i:03d}>" for i in range(128)]
  ids = [tok.encode(s) for s in specials]
  assert all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == len(specials)
  assert len(tok.encode("\n")) == 1  # the prefix separator is one token
  answer = "<loc0032><loc0719><loc0304><loc0991> triangle"
  assert tok.decode(tok.encode(answer)) == answer and len(tok.encode(answer)) == 5
  assert tok.decode(tok.encode(answer) + [tok.eos_id, 7]) == answer
  for line in set(synthetic.corpus(200, seed=5)):
    ids = tok.encode(line)
    assert tok.sp.unk_id() not in ids and not any(tok.sp.IsByte(i) for i in ids), line  # known words only
    assert tok.decode(ids) == line


def test_tokenizer_cache_and_determinism(tok_dir, tmp_path, monkeypatch):
  path = synthetic_tokenizer(tok_dir).path
  assert os.path.dirname(path) == tok_dir and "synthetic_tokenizer_v" in os.path.basename(path)
  mtime, data = os.stat(path).st_mtime_ns, open(path, "rb").read()

  def no_training():
    raise AssertionError("retrained although a cached model exists")

  with monkeypatch.context() as m:
    m.setattr(synthetic, "_train_tokenizer_bytes", no_training)
    assert synthetic_tokenizer(tok_dir).path == path
  assert os.stat(path).st_mtime_ns == mtime
  assert os.listdir(tok_dir) == [os.path.basename(path)]  # no temporary files left behind
  # A fresh training elsewhere (found through $VLM_JAX_CACHE) gives the same bytes.
  monkeypatch.setenv("VLM_JAX_CACHE", str(tmp_path / "env_cache"))
  fresh = synthetic_tokenizer()
  assert os.path.dirname(fresh.path) == str(tmp_path / "env_cache")
  assert fresh.files() == {"tokenizer.model": data}
  # A corrupt cached file is replaced, not trusted.
  with open(fresh.path, "wb") as f:
    f.write(b"not a model")
  assert synthetic_tokenizer().files() == {"tokenizer.model": data}
