"""A procedurally generated dataset of coloured shapes with questions, and its small tokenizer.

Every example is a pure function of (seed, split, index): no files, no download. Each image holds 1..3
objects of distinct shapes (so "the circle" names one object) with crisp, saturated colours, each centred in
its own cell of a grid and of one fixed size, so answers are exact and detection boxes take a small finite set
of values: a tiny model can learn the tasks to near-perfect held-out accuracy on a CPU in minutes.

Tasks (prompt -> answer):
  caption   "caption en"                -> "a red circle, a blue square and a green triangle" (shape order)
  count     "how many shapes"           -> "2"
  colour    "what colour is the circle" -> "red"
  shape     "what shape is red"         -> "circle" (only asked of a colour no other object has)
  position  "where is the circle"       -> "top left" | "top centre" | ... | "middle" | ... | "bottom right"
  detect    "detect circle"             -> "<loc0032><loc0032><loc0304><loc0304> circle" (PaliGemma's y1 x1 y2 x2)
"""
import io
import os

import numpy as np

from vlm_jax import fileutil

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow")
# Saturated, far from grey (the background is grey) and from each other, so the colour is never in doubt.
PALETTE = np.array([(220, 40, 40), (40, 180, 60), (40, 80, 230), (240, 210, 40)], np.int32)
TASKS = ("caption", "count", "colour", "shape", "position", "detect")
SPLITS = {"train": 0, "val": 1, "test": 2}  # distinct seed streams per split
MAX_OBJECTS = len(SHAPES)  # one object per shape, so a shape names a single object
_ROWS = {2: ("top", "bottom"), 3: ("top", "middle", "bottom")}
_COLS = {2: ("left", "right"), 3: ("left", "centre", "right")}
_COLOUR_JITTER = 10  # per channel; small next to the distance between palette colours (> 100)
_FILL = 0.8  # an object's side as a fraction of its cell


def position_name(cell: int, grid: int) -> str:
  """The name of a cell (row-major index) of a 2x2 or 3x3 grid: "top left", ..., "middle", ..."""
  if grid not in _ROWS:
    raise ValueError(f"position names exist for grid 2 or 3, not {grid}.")
  row, col = _ROWS[grid][cell // grid], _COLS[grid][cell % grid]
  return "middle" if (row, col) == ("middle", "centre") else f"{row} {col}"


def loc_tokens(box, image_size: int) -> str:
  """(y1, x1, y2, x2) in pixels -> PaliGemma's "<locY1><locX1><locY2><locX2>" (each round(v / size * 1023))."""
  return "".join(f"<loc{int(round(v / image_size * 1023)):04d}>" for v in box)


class SyntheticSource:
  """A random-access (grain-compatible) source of {"id", "image", "turns", "task"} examples.

  `image` is uint8 [image_size, image_size, 3]; `turns` is [(prompt, answer)]; `task` names the question.
  Example i is a pure function of (seed, split, i); "train", "val" and "test" draw from disjoint seed streams.
  """

  def __init__(self, num_examples: int, seed: int = 0, split: str = "train", image_size: int = 64,
               tasks=TASKS, max_objects: int = 3, grid: int = 3):
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}.")
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if not tasks or unknown:
      raise ValueError(f"unknown task(s) {unknown or tasks!r}; expected a non-empty subset of {TASKS}.")
    if num_examples < 0 or seed < 0:
      raise ValueError(f"num_examples and seed must be >= 0; got {num_examples}, {seed}.")
    if grid < 1 or not 1 <= max_objects <= min(MAX_OBJECTS, grid * grid):
      raise ValueError(f"max_objects must be in 1..{MAX_OBJECTS} and fit in a {grid}x{grid} grid; got {max_objects}.")
    if "position" in tasks and grid not in _ROWS:
      raise ValueError(f"the position task needs grid 2 or 3 (cells with names); got grid {grid}.")
    if image_size // grid < 8:
      raise ValueError(f"image_size {image_size} is too small for a {grid}x{grid} grid (cells under 8 px).")
    self.num_examples, self.seed, self.split = int(num_examples), int(seed), split
    self.image_size, self.tasks, self.max_objects, self.grid = int(image_size), tasks, int(max_objects), int(grid)
    # Integer cell edges; every object is the same size, centred in its cell, so boxes repeat exactly.
    edges = [round(k * image_size / grid) for k in range(grid + 1)]
    self.obj_size = int(round(_FILL * image_size / grid))
    starts = [edges[k] + (edges[k + 1] - edges[k] - self.obj_size) // 2 for k in range(grid)]
    # (y1, x1, y2, x2) in pixels, y2/x2 exclusive: the object's pixels fill exactly this box.
    self.boxes = [(starts[c // grid], starts[c % grid], starts[c // grid] + self.obj_size,
                   starts[c % grid] + self.obj_size) for c in range(grid * grid)]

  def __len__(self) -> int:
    return self.num_examples

  def __repr__(self) -> str:
    return (f"SyntheticSource(num_examples={self.num_examples}, seed={self.seed}, split={self.split!r}, "
            f"image_size={self.image_size}, tasks={self.tasks}, max_objects={self.max_objects}, grid={self.grid})")

  def __getitem__(self, i):
    i = self._index(i)
    scene, (task, prompt, answer) = self._sample(np.random.default_rng([self.seed, SPLITS[self.split], i]))
    return {"id": f"{self.split}-{i}", "image": self._draw(scene), "turns": [(prompt, answer)], "task": task}

  def text(self, i) -> tuple[str, str, str]:
    """(task, prompt, answer) of example i without drawing its image (cheap: used for tokenizer corpora)."""
    i = self._index(i)
    return self._sample(np.random.default_rng([self.seed, SPLITS[self.split], i]))[1]

  def _index(self, i) -> int:
    i = int(i)  # grain hands numpy integers
    if i < 0:
      i += self.num_examples
    if not 0 <= i < self.num_examples:
      raise IndexError(f"index {i} out of range for {self.num_examples} examples.")
    return i

  def _sample(self, rng):
    """Draws a scene and one unambiguous question about it; the image is drawn from the scene later."""
    while True:  # only repeats when every allowed task is "shape" and no colour is unique
      n = int(rng.integers(1, self.max_objects + 1))
      shapes = rng.permutation(len(SHAPES))[:n]
      colours = rng.integers(0, len(COLOURS), size=n)
      cells = rng.choice(self.grid * self.grid, size=n, replace=False)
      order = np.argsort(cells)  # reading order (row-major): a canonical object order
      objects = [dict(shape=int(shapes[k]), colour=int(colours[k]), cell=int(cells[k])) for k in order]
      dark = bool(rng.random() < 0.5)
      level = int(rng.integers(15, 61) if dark else rng.integers(200, 246))
      jitter = rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, size=(n, 3))
      scene = dict(objects=objects, background=level, jitter=jitter)
      tasks = list(self.tasks)
      while tasks:
        task = tasks[int(rng.integers(len(tasks)))]
        subjects = objects
        if task == "shape":  # "what shape is red" must name one object: only colours no other object has
          counts = np.bincount([o["colour"] for o in objects], minlength=len(COLOURS))
          subjects = [o for o in objects if counts[o["colour"]] == 1]
        if subjects:
          subject = subjects[int(rng.integers(len(subjects)))]
          return scene, self._question(task, objects, subject)
        tasks = [t for t in tasks if t != task]

  def _question(self, task, objects, o):
    shape, colour = SHAPES[o["shape"]], COLOURS[o["colour"]]
    if task == "caption":
      # Listed in a fixed shape order (circle, square, triangle): one right caption per scene.
      parts = [f"a {COLOURS[p['colour']]} {SHAPES[p['shape']]}" for p in sorted(objects, key=lambda p: p["shape"])]
      answer = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
      return task, "caption en", answer
    if task == "count":
      return task, "how many shapes", str(len(objects))
    if task == "colour":
      return task, f"what colour is the {shape}", colour
    if task == "shape":
      return task, f"what shape is {colour}", shape
    if task == "position":
      return task, f"where is the {shape}", position_name(o["cell"], self.grid)
    return task, f"detect {shape}", f"{loc_tokens(self.boxes[o['cell']], self.image_size)} {shape}"

  def _draw(self, scene) -> np.ndarray:
    s = self.obj_size
    image = np.full((self.image_size, self.image_size, 3), scene["background"], np.uint8)
    # Pixel centres relative to the box's top-left corner; each shape's pixels span the whole box.
    yy, xx = np.mgrid[0:s, 0:s] + 0.5
    half = s / 2
    masks = {
        "circle": (yy - half) ** 2 + (xx - half) ** 2 <= half ** 2,
        "square": np.ones((s, s), bool),
        # Apex at the top centre, base on the bottom edge; the apex row keeps 1-2 pixels even for even sizes.
        "triangle": np.abs(xx - half) <= np.maximum(yy / 2, 0.5),
    }
    for o, jitter in zip(scene["objects"], scene["jitter"]):
      y1, x1, y2, x2 = self.boxes[o["cell"]]
      colour = np.clip(PALETTE[o["colour"]] + jitter, 0, 255).astype(np.uint8)
      image[y1:y2, x1:x2][masks[SHAPES[o["shape"]]]] = colour
    return image


def corpus(n: int = 2000, seed: int = 0) -> list[str]:
  """Prompts and answers (one per line) covering every word the tasks can produce, for tokenizer training:
  every prompt and every short answer once, then the text of n sampled examples (captions, detections)."""
  lines = ["caption en", "how many shapes"]
  lines += [f"{p} {shape}" for p in ("what colour is the", "where is the", "detect") for shape in SHAPES]
  lines += [f"what shape is {colour}" for colour in COLOURS]
  lines += list(COLOURS) + list(SHAPES) + [str(k) for k in range(1, MAX_OBJECTS + 1)]
  lines += [position_name(c, g) for g in sorted(_ROWS) for c in range(g * g)]
  src = SyntheticSource(n, seed=seed)
  for i in range(n):
    lines += src.text(i)[1:]
  return lines


TOKENIZER_VERSION = "v2"  # bump when the corpus or training options change: a new file, never a stale cache
# 4 specials + 1024 <loc> + 128 <seg> + 256 bytes + 26 characters = 1438, + 98 merges: enough that every
# word of the corpus is one piece (1520 is not), and a multiple of 64 for the embedding table.
TOKENIZER_VOCAB = 1536


def _train_tokenizer_bytes() -> bytes:
  """Trains the BPE model in memory. No file paths end up in the model proto (trainer_spec would record an
  input file and model prefix), so the bytes depend only on the corpus and options: deterministic."""
  import sentencepiece as spm
  specials = [f"<loc{i:04d}>" for i in range(1024)] + [f"<seg{i:03d}>" for i in range(128)]
  model = io.BytesIO()
  spm.SentencePieceTrainer.Train(
      sentence_iterator=iter(corpus()), model_writer=model, model_type="bpe", vocab_size=TOKENIZER_VOCAB,
      pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
      bos_piece="<bos>", unk_piece="<unk>", user_defined_symbols=specials, byte_fallback=True,
      character_coverage=1.0, split_digits=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
      normalization_rule_name="identity", num_threads=1, minloglevel=2)  # as Gemma's; 1 thread: reproducible
  return model.getvalue()


def synthetic_tokenizer(cache_dir: str | None = None):
  """The SentencePiece tokenizer for this dataset (Gemma's special ids, every <locNNNN> and <segNNN> piece).
  Trained on first use (about a second) and cached in `cache_dir`, $VLM_JAX_CACHE or ~/.cache/vlm_jax."""
  from vlm_jax.tokenizer import SentencePieceTokenizer
  cache_dir = cache_dir or os.environ.get("VLM_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "vlm_jax")
  path = os.path.join(cache_dir, f"synthetic_tokenizer_{TOKENIZER_VERSION}.model")
  if os.path.isfile(path):
    try:
      return SentencePieceTokenizer(path)
    except ValueError:
      pass  # unreadable (e.g. written by hand): train again and replace it
  os.makedirs(cache_dir, exist_ok=True)
  # A crash or a concurrent process never sees a half-written model (concurrent trainings write identical
  # bytes, so the last rename wins harmlessly).
  fileutil.write_file(path, _train_tokenizer_bytes())
  return SentencePieceTokenizer(path)
