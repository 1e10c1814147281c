"""Tokenizers: SentencePiece models (Gemma, Llama 2 / Vicuna, T5, the synthetic data's) and HuggingFace
`tokenizer.json` files (Llama 3's and Qwen2's byte-level BPE), behind one interface: encode, decode,
encode_prefix, vocab_size, bos/eos/pad ids, and the files that reproduce the tokenizer.

`<locNNNN>` and `<segNNN>` are user-defined pieces in PaliGemma's vocabulary: SentencePiece keeps them as
single ids in encode and decode.
"""
import json

import sentencepiece as spm
from etils import epath

from vlm_jax import fileutil

SENTENCEPIECE_FILE, JSON_FILE, JSON_CONFIG_FILE = "tokenizer.model", "tokenizer.json", "tokenizer_config.json"


class _Base:
  pad_id: int  # -1 where the tokenizer has none, as SentencePiece says
  eos_id: int
  bos_id: int  # -1: prompts start without one (Qwen2)

  def decode(self, ids) -> str:
    """Decodes up to the first EOS; pads, the BOS and ids past the vocabulary (models often pad their
    embedding table beyond the tokenizer's size) are dropped."""
    out = []
    for i in (int(i) for i in ids):
      if i == self.eos_id:
        break
      if i not in (self.pad_id, self.bos_id) and 0 <= i < self.vocab_size:
        out.append(i)
    return self._decode(out)

  def encode_prefix(self, prompt: str) -> list[int]:
    """BOS (if the tokenizer has one) + prompt + separator "\\n", each part tokenised on its own as big_vision
    does."""
    return [self.bos_id] * (self.bos_id >= 0) + self.encode(prompt) + self.encode("\n")


class SentencePieceTokenizer(_Base):

  def __init__(self, model_path: str):
    self.path = str(model_path)
    self._model_bytes = _read(model_path, "tokenizer model")  # local or remote (gs://...)
    self.sp = spm.SentencePieceProcessor()
    try:
      self.sp.LoadFromSerializedProto(self._model_bytes)
    except (OSError, RuntimeError) as e:
      raise ValueError(f"{model_path} is not a valid SentencePiece model: {e}") from e
    self.pad_id, self.eos_id, self.bos_id = self.sp.pad_id(), self.sp.eos_id(), self.sp.bos_id()

  @property
  def vocab_size(self) -> int:
    return self.sp.GetPieceSize()

  def encode(self, text: str) -> list[int]:
    return self.sp.EncodeAsIds(text)

  def _decode(self, ids) -> str:
    return self.sp.DecodeIds(ids)

  def piece(self, i: int) -> str:
    return self.sp.IdToPiece(i)

  def files(self) -> dict[str, bytes]:
    return {SENTENCEPIECE_FILE: self._model_bytes}


class JSONTokenizer(_Base):
  """A HuggingFace `tokenizer.json` (run by the `tokenizers` library that defines the format), with its special
  tokens named by the `tokenizer_config.json` beside it, as transformers reads them. encode adds no special
  tokens: the BOS comes from encode_prefix, as for SentencePiece."""

  def __init__(self, json_path: str):
    import tokenizers
    self.path = str(json_path)
    self._json = _read(json_path, "tokenizer.json")
    try:
      self.tok = tokenizers.Tokenizer.from_str(self._json.decode())
    except Exception as e:  # tokenizers raises its own Exception type for every parse error
      raise ValueError(f"{json_path} is not a valid tokenizer.json: {e}") from e
    config_path = epath.Path(json_path).parent / JSON_CONFIG_FILE
    config = fileutil.read_json(config_path) if config_path.is_file() else {}
    ids = {}
    for name in ("bos", "eos", "pad"):
      token = config.get(f"{name}_token")
      token = token.get("content") if isinstance(token, dict) else token
      ids[name] = -1 if token is None else self.tok.token_to_id(token)
      if ids[name] is None:
        raise ValueError(f"{config_path}: {name}_token {token!r} is not a token of {json_path}.")
    if ids["eos"] < 0:
      raise ValueError(f"{json_path}: no eos_token named in {config_path}; training and decoding need one.")
    self.bos_id, self.eos_id, self.pad_id = ids["bos"], ids["eos"], ids["pad"]

  @property
  def vocab_size(self) -> int:
    return self.tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=False).ids

  def _decode(self, ids) -> str:
    return self.tok.decode(ids, skip_special_tokens=True)

  def piece(self, i: int) -> str:
    return self.tok.id_to_token(i)

  def files(self) -> dict[str, bytes]:
    special = {f"{k}_token": self.piece(i) for k, i in (("bos", self.bos_id), ("eos", self.eos_id),
                                                         ("pad", self.pad_id)) if i >= 0}
    return {JSON_FILE: self._json, JSON_CONFIG_FILE: json.dumps(special, indent=2).encode()}


Tokenizer = SentencePieceTokenizer | JSONTokenizer


def load(path: str) -> Tokenizer:
  """A SentencePiece model file, or a `tokenizer.json` (any name ending in .json)."""
  return JSONTokenizer(path) if str(path).endswith(".json") else SentencePieceTokenizer(path)


def from_dir(path) -> Tokenizer | None:
  """The tokenizer a model directory holds (SentencePiece first, as HF PaliGemma / Llama 2 repos hold both), or
  None."""
  for name in (SENTENCEPIECE_FILE, JSON_FILE):
    if (epath.Path(path) / name).is_file():
      return load(str(epath.Path(path) / name))
  return None


def _read(path, what: str) -> bytes:
  if not epath.Path(path).is_file():
    raise FileNotFoundError(f"No {what} at {path}.")
  return epath.Path(path).read_bytes()
