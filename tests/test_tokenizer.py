"""HF tokenizer.json tokenizers (Llama 3 / Qwen2 byte-level BPE) against transformers' reading of the same files."""
import json
import os

import numpy as np
import pytest

from tests.hf_models import train_json_tokenizer
from vlm_jax import tokenizer
from vlm_jax.data.text import tokenize_turns
from vlm_jax.train_setup import make_tokenizer

TEXTS = ["what colour is the circle", " a  red square\n", "café naïve 12345 日本", "the caption en!?"]


@pytest.fixture(scope="module", params=["llama3", "qwen2"])
def json_tokenizer(request, tmp_path_factory):
  return train_json_tokenizer(str(tmp_path_factory.mktemp(request.param)), style=request.param), request.param


def test_encodes_and_decodes_as_transformers(json_tokenizer):
  from transformers import AutoTokenizer
  path, style = json_tokenizer
  ours, theirs = tokenizer.load(path), AutoTokenizer.from_pretrained(os.path.dirname(path))
  assert isinstance(ours, tokenizer.JSONTokenizer) and ours.vocab_size == len(theirs)
  assert (ours.bos_id, ours.eos_id) == (theirs.bos_token_id if style == "llama3" else -1, theirs.eos_token_id)
  assert ours.pad_id == (-1 if theirs.pad_token_id is None else theirs.pad_token_id)
  for text in TEXTS:
    ids = ours.encode(text)
    assert ids == theirs(text, add_special_tokens=False)["input_ids"], text
    assert ours.decode(ids) == theirs.decode(ids) == text
    # Llama 3's template adds the BOS, as encode_prefix does; Qwen2's prompts start without one.
    assert ours.encode_prefix(text) == theirs(text)["input_ids"] + ours.encode("\n")
  eos = ours.eos_id
  assert ours.decode(ours.encode("a red") + [eos] + ours.encode("square")) == "a red"  # stops at EOS


def test_training_data_from_a_tokenizer_json(json_tokenizer):
  """config.tokenizer may name a tokenizer.json: the data pipeline's tokens end in its EOS, padded with its pad
  (-1 where it has none, as for Llama 2's SentencePiece model)."""
  path, _ = json_tokenizer
  tok = make_tokenizer({"tokenizer": path})
  out = tokenize_turns(tok, [("caption en", "a red circle")], 24)
  prefix, answer = tok.encode_prefix("caption en"), tok.encode("a red circle") + [tok.eos_id]
  n = len(prefix) + len(answer)
  assert list(out.tokens[:n]) == prefix + answer and np.all(out.tokens[n:] == tok.pad_id)
  assert list(out.mask_loss[:n]) == [0] * len(prefix) + [1] * len(answer)


def test_files_reproduce_the_tokenizer(json_tokenizer, tmp_path):
  path, _ = json_tokenizer
  tok = tokenizer.load(path)
  for name, data in tok.files().items():
    (tmp_path / name).write_bytes(data)
  again = tokenizer.from_dir(str(tmp_path))
  assert (again.bos_id, again.eos_id, again.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
  assert all(again.encode(t) == tok.encode(t) for t in TEXTS)


def test_from_dir_prefers_sentencepiece(json_tokenizer, tmp_path):
  """HF PaliGemma / Llama 2 repos hold tokenizer.model and tokenizer.json: the SentencePiece model is read."""
  from tests.hf_models import train_tokenizer
  path, _ = json_tokenizer
  assert tokenizer.from_dir(str(tmp_path)) is None
  (tmp_path / "tokenizer.json").write_bytes(open(path, "rb").read())
  (tmp_path / "tokenizer_config.json").write_bytes(open(os.path.join(os.path.dirname(path),
                                                                     "tokenizer_config.json"), "rb").read())
  assert isinstance(tokenizer.from_dir(str(tmp_path)), tokenizer.JSONTokenizer)
  os.rename(train_tokenizer(str(tmp_path)), tmp_path / "tokenizer.model")
  assert isinstance(tokenizer.from_dir(str(tmp_path)), tokenizer.SentencePieceTokenizer)


@pytest.mark.parametrize("bad,match", [
    ("json", r"tokenizer.json is not a valid tokenizer.json"),
    ("config_json", r"tokenizer_config.json: malformed JSON"),
    ("unknown_token", r"eos_token '<\|eot\|>' is not a token of .*tokenizer.json"),
    ("no_eos", r"no eos_token named in .*tokenizer_config.json"),
    ("missing", r"No tokenizer.json at .*missing.json")])
def test_bad_tokenizer_files_are_named(json_tokenizer, tmp_path, bad, match):
  path, style = json_tokenizer
  (tmp_path / "tokenizer.json").write_bytes(open(path, "rb").read())
  config = {"bos_token": None, "eos_token": "<|endoftext|>" if style == "qwen2" else "<|end_of_text|>"}
  if bad == "json":
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": [1, 2]}}')
  config_text = json.dumps({**config, "eos_token": "<|eot|>"} if bad == "unknown_token" else
                           {"bos_token": None} if bad == "no_eos" else config)
  (tmp_path / "tokenizer_config.json").write_text("{" if bad == "config_json" else config_text)
  with pytest.raises((ValueError, FileNotFoundError), match=match):
    tokenizer.load(str(tmp_path / ("missing.json" if bad == "missing" else "tokenizer.json")))


def test_bad_sentencepiece_files_are_named(tmp_path):
  (tmp_path / "tokenizer.model").write_bytes(b"not a model")
  with pytest.raises(ValueError, match=r"tokenizer.model is not a valid SentencePiece model"):
    tokenizer.load(str(tmp_path / "tokenizer.model"))
  with pytest.raises(FileNotFoundError, match=r"No tokenizer model at .*gone.model"):
    make_tokenizer({"tokenizer": str(tmp_path / "gone.model")})
