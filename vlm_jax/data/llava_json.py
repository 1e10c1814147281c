"""LLaVA / ShareGPT conversation JSON plus an image folder (LLaVA-558K, llava_v1_5_mix665k, FUSION-12M) as a
grain random-access source.

A record is {"id": ..., "image": "relative/path.jpg" (absent or null: text-only),
"conversations": [{"from": "human", "value": "<image>\\nWhat is ...?"}, {"from": "gpt", "value": "..."}, ...]}.
The file is a JSON list (`.json`) or JSON Lines (one record per line). Everything is parsed and validated
when the source is built, so bad data fails at start-up with the file and line, not hours into training;
only image decoding is left to `__getitem__` (reading every image up front would cost as much as an epoch).

Examples are {"id": str, "image": uint8 [H,W,3] at native size or None, "turns": [(prompt, answer), ...],
"task": "llava"}; `vlm_jax.data.text.tokenize_turns` turns `turns` into model inputs.

With skip_bad=True, bad records are dropped and counted in `skipped` (reason -> count) instead of raising.
A corrupt image is only found in `__getitem__`, which then returns None: grain's MapDataset passes None
through `.map` and `to_iter_dataset()` drops it; other pipelines must filter None out themselves. That
count is kept by whichever process called `__getitem__`, so with multiprocess grain workers it lives in the
worker, and the parent's `skipped["corrupt image"]` stays 0.
"""
import array
import json
import operator
import os
import re
import threading

import numpy as np
from PIL import Image

from vlm_jax.data.image import pil_to_rgb

# Reasons a record is skipped, the keys of `LlavaJsonSource.skipped`.
MALFORMED_JSON = "malformed JSON"
BAD_RECORD = "bad record"
MISSING_IMAGE = "missing image"
CORRUPT_IMAGE = "corrupt image"

# ShareGPT dumps also use user/assistant; both spellings mean the same two roles.
_ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}
# The placeholder and the newline that LLaVA puts after (or before) it; PaliGemma puts the image in front
# of the text anyway, so the marker carries nothing.
_PLACEHOLDER = re.compile(r"<image>\n|\n<image>|<image>")
_MAX_EXAMPLES = 5  # skip messages kept in `skipped_examples`


class DataError(ValueError):
  """Bad training data. The message names the file and line (JSONL) or record index (JSON list), the
  record's id if it has one, and the image file where that is the problem."""

  def __init__(self, message: str, reason: str = BAD_RECORD):
    super().__init__(message)
    self.reason = reason  # a key of LlavaJsonSource.skipped


def load_image(path: str) -> np.ndarray:
  """Decodes an image file fully (truncated files fail here, not later) -> uint8 [H,W,3] RGB, native size,
  upright (`image.pil_to_rgb`)."""
  try:
    with Image.open(path) as im:
      im.load()
      return pil_to_rgb(im)
  except Exception as e:  # PIL's plugins raise many types for bad bytes (OSError, SyntaxError, struct.error...)
    raise DataError(f"cannot load image {path} ({type(e).__name__}: {e})") from e


def _strip_placeholder(text: str) -> str:
  return _PLACEHOLDER.sub("", text).strip()


class LlavaJsonSource:
  """grain random-access source over a LLaVA-format conversation file and its image folder.

  Records are kept as one compact UTF-8 blob plus offsets (no per-record Python objects), so a
  multi-million-record file stays small in memory and cheap to pickle into grain workers.
  """

  def __init__(self, json_path: str, image_dir: str, skip_bad: bool = False):
    if not os.path.isfile(json_path):
      raise FileNotFoundError(f"No conversation file at {json_path}.")
    if not os.path.isdir(image_dir):
      raise FileNotFoundError(f"No image folder at {image_dir} (for {json_path}).")
    self.json_path, self.image_dir, self.skip_bad = json_path, image_dir, skip_bad
    self.skipped: dict[str, int] = {}
    self.skipped_examples: list[str] = []
    self._bad_images: set[int] = set()  # records whose image failed to decode: skipped, counted once
    self._lock = threading.Lock()  # grain's reader threads may fail on one record at once
    self._is_list = self._sniff_list()
    blob, offsets, positions = bytearray(), array.array("q", [0]), array.array("q")
    for pos, record in (self._read_list() if self._is_list else self._read_lines()):
      try:
        if isinstance(record, DataError):
          raise record
        blob += json.dumps(self._normalise(pos, record), ensure_ascii=False).encode("utf-8")
      except DataError as e:
        self._skip(e)
        continue
      offsets.append(len(blob))
      positions.append(pos)
    self._blob = bytes(blob)
    self._offsets = np.asarray(offsets, np.int64)
    self._positions = np.asarray(positions, np.int64)  # line number (JSONL) or record index (list)
    if not len(self):
      raise DataError(f"{json_path}: no usable records" + (f" ({self.skipped_summary()})" if self.skipped else ""))

  # --- parsing -------------------------------------------------------------------------------------------

  def _sniff_list(self) -> bool:
    """A JSON list starts with '['; JSONL with '{' (some JSONL files are named .json)."""
    if self.json_path.endswith(".jsonl"):
      return False
    with open(self.json_path, "rb") as f:
      head = f.read(4096).lstrip(b"\xef\xbb\xbf").lstrip()
    if not head:
      raise DataError(f"{self.json_path}: empty file")
    return head.startswith(b"[")

  def _read_lines(self):
    """(line number, record or DataError) for each non-blank line; a bad line does not stop the others."""
    with open(self.json_path, "rb") as f:
      for lineno, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          yield lineno, json.loads(line)
        except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
          yield lineno, DataError(f"{self.json_path}:{lineno}: malformed JSON ({e})", MALFORMED_JSON)

  def _read_list(self):
    """(index, record) for a JSON list; a syntax error spoils the whole file, so it raises even with skip_bad."""
    try:
      with open(self.json_path, encoding="utf-8-sig") as f:
        records = json.load(f)
    except json.JSONDecodeError as e:
      raise DataError(f"{self.json_path}:{e.lineno}:{e.colno}: malformed JSON ({e.msg})", MALFORMED_JSON) from e
    except UnicodeDecodeError as e:
      raise DataError(f"{self.json_path}: not UTF-8 text ({e})", MALFORMED_JSON) from e
    if not isinstance(records, list):
      raise DataError(f"{self.json_path}: expected a JSON list of records, got a {type(records).__name__}")
    yield from enumerate(records)

  def _where(self, pos: int, rid=None) -> str:
    where = f"{self.json_path}[record {pos}]" if self._is_list else f"{self.json_path}:{pos}"
    return where if rid is None else f"{where} (id {rid!r})"

  def _normalise(self, pos: int, record) -> list:
    """A checked record -> [id, image path relative to image_dir or None, [[prompt, answer], ...]]."""
    if not isinstance(record, dict):
      raise DataError(f"{self._where(pos)}: a record must be a JSON object, got {type(record).__name__}")
    rid = record.get("id")
    where = self._where(pos, rid)
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
      raise DataError(f"{where}: 'conversations' must be a non-empty list, got {conversations!r:.80}")
    turns, prompt = [], None
    for j, message in enumerate(conversations):
      if not isinstance(message, dict) or not isinstance(message.get("value"), str):
        raise DataError(f"{where}: conversations[{j}] must be an object with a string 'value'")
      sender = message.get("from")
      role, expected = _ROLES.get(sender) if isinstance(sender, str) else None, ("human" if j % 2 == 0 else "gpt")
      if role != expected:
        raise DataError(f"{where}: conversations[{j}] is from {sender!r:.80} where {expected!r} was "
                        "expected (turns must alternate human/gpt, starting with human)")
      if role == "human":
        prompt = _strip_placeholder(message["value"])
      else:
        turns.append([prompt, message["value"]])
    # A trailing human turn has no answer to learn from; it is dropped above by never being paired.
    if not turns:
      raise DataError(f"{where}: no answered turn (a human message with no gpt reply)")
    image = record.get("image")
    if image is not None:
      if isinstance(image, list):
        raise DataError(f"{where}: multi-image records are not supported (image: {image!r:.80})")
      if not isinstance(image, str) or not image:
        raise DataError(f"{where}: 'image' must be a path relative to the image folder, got {image!r:.80}")
      path = os.path.join(self.image_dir, image)
      if not os.path.isfile(path):
        raise DataError(f"{where}: image {path} not found", MISSING_IMAGE)
    return [None if rid is None else str(rid), image, turns]

  def _skip(self, error: DataError):
    if not self.skip_bad:
      raise error
    self.skipped[error.reason] = self.skipped.get(error.reason, 0) + 1
    if len(self.skipped_examples) < _MAX_EXAMPLES:
      self.skipped_examples.append(str(error))

  def skipped_summary(self) -> str:
    """E.g. "skipped 3 records (2 missing image, 1 malformed JSON)"."""
    total = sum(self.skipped.values())
    if not total:
      return "skipped 0 records"
    parts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items(), key=lambda kv: -kv[1]))
    return f"skipped {total} record{'s' if total != 1 else ''} ({parts})"

  def skip_report(self) -> str:
    """What was skipped and where, for the training log: "" if nothing, else the file, `skipped_summary` and
    the first few records' errors (file:line, id, reason)."""
    if not self.skipped:
      return ""
    return f"{self.json_path}: {self.skipped_summary()}; first: " + "; ".join(self.skipped_examples)

  # --- grain's random-access interface --------------------------------------------------------------------

  def __len__(self) -> int:
    return len(self._positions)

  def __getitem__(self, index):
    """The example dict; None for a corrupt image when skip_bad (see the module docstring)."""
    i = operator.index(index)
    if not -len(self) <= i < len(self):
      raise IndexError(f"index {i} out of range for {len(self)} records of {self.json_path}")
    i %= len(self)
    if i in self._bad_images:  # found corrupt on an earlier read (another epoch, or the evaluator's other pass)
      return None
    rid, image, turns = json.loads(self._blob[self._offsets[i]:self._offsets[i + 1]])
    pos = int(self._positions[i])
    if image is not None:
      try:
        image = load_image(os.path.join(self.image_dir, image))
      except DataError as e:
        # Missing here means deleted since the source was built.
        reason = MISSING_IMAGE if isinstance(e.__cause__, FileNotFoundError) else CORRUPT_IMAGE
        error = DataError(f"{self._where(pos, rid)}: {e}", reason)
        if not self.skip_bad:
          raise error from e
        with self._lock:
          if i not in self._bad_images:
            self._bad_images.add(i)
            self._skip(error)
        return None
    return {"id": rid if rid is not None else self._where(pos), "image": image,
            "turns": [tuple(t) for t in turns], "task": "llava"}

  def __getstate__(self):  # pickled into grain worker processes: a lock does not pickle
    return {k: v for k, v in self.__dict__.items() if k != "_lock"}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __repr__(self) -> str:
    extra = f", {self.skipped_summary()}" if self.skipped else ""
    return f"LlavaJsonSource({self.json_path!r}, image_dir={self.image_dir!r}, {len(self)} records{extra})"
