"""HF tokenizer.json tokenizers (byte-level BPE as Llama 3's, Qwen2's, GPT-NeoX's) against transformers' reading of
the same files."""
import json
import os
import types

import numpy as np
import pytest

from tests.hf_models import train_json_tokenizer
from vlm_jax import tokenizer
from vlm_jax.data.text import tokenize_turns
from vlm_jax.models.vlm import check_image_token_id
from vlm_jax.train_setup import make_tokenizer

TEXTS = ["what colour is the circle", " a  red square\n", "café naïve 12345 日本", "the caption en!?"]


@pytest.fixture(scope="module", params=["llama3", "qwen2", "gpt_neox", "template_bos"])
def json_tokenizer(request, tmp_path_factory):
  return train_json_tokenizer(str(tmp_path_factory.mktemp(request.param)), style=request.param), request.param


def test_encodes_and_decodes_as_transformers(json_tokenizer):
  from transformers import AutoTokenizer
  path, style = json_tokenizer
  ours, theirs = tokenizer.load(path), AutoTokenizer.from_pretrained(os.path.dirname(path))
  assert isinstance(ours, tokenizer.JSONTokenizer) and ours.vocab_size == len(theirs)
  for name in ("bos", "eos", "pad"):
    assert getattr(ours, f"{name}_id") == {None: -1}.get(getattr(theirs, f"{name}_token_id"),
                                                         getattr(theirs, f"{name}_token_id")), name
  # GPT-NeoX names a BOS (its EOS) that its tokenizer never adds; "template_bos" adds one it does not name.
  begin = ours.tok.token_to_id("<|begin_of_text|>")
  assert ours.prompt_start == ((begin,) if style in ("llama3", "template_bos") else ())
  assert ours.reserved_ids == {i for i, t in theirs.added_tokens_decoder.items() if t.special} - {
      theirs.bos_token_id, theirs.eos_token_id, theirs.pad_token_id, *ours.prompt_start}
  for text in TEXTS:
    ids = ours.encode(text)
    assert ids == theirs(text, add_special_tokens=False)["input_ids"], text
    assert ours.decode(ids) == theirs.decode(ids) == text
    # A prompt starts as transformers starts it: with the BOS where the tokenizer.json's template adds one.
    assert ours.encode_prefix(text) == theirs(text)["input_ids"] + ours.encode("\n")
  eos, special = ours.eos_id, max(ours.reserved_ids - {ours.bos_id, ours.eos_id, ours.pad_id}, default=None)
  assert ours.decode(ours.encode("a red") + [eos] + ours.encode("square")) == "a red"  # stops at EOS
  if special is not None:  # Qwen2's <|im_start|>: kept, as transformers and SentencePiece's user pieces keep them
    ids = ours.encode("a") + [special] + ours.encode("red")
    assert ours.decode(ids) == theirs.decode(ids) and theirs.convert_ids_to_tokens(special) in ours.decode(ids)


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
  """The original tokenizer_config.json travels whole (a chat template too), or one naming the special tokens."""
  path, _ = json_tokenizer
  original = json.loads(open(os.path.join(os.path.dirname(path), "tokenizer_config.json")).read())
  (tmp_path / "alone").mkdir()
  (tmp_path / "alone" / "tokenizer.json").write_bytes(open(path, "rb").read())
  for default in (None, {"bos": -1, "eos": 5, "pad": 7}):
    tok = tokenizer.load(path if default is None else str(tmp_path / "alone" / "tokenizer.json"), default)
    out = tmp_path / ("copy" if default is None else "copy_alone")
    out.mkdir()
    for name, data in tok.files().items():
      (out / name).write_bytes(data)
    again = tokenizer.load(str(out))
    assert (again.bos_id, again.eos_id, again.pad_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert again.prompt_start == tok.prompt_start and all(again.encode(t) == tok.encode(t) for t in TEXTS)
    if default is None:
      assert json.loads((out / "tokenizer_config.json").read_text()) == original
    else:  # no tokenizer_config.json beside it: the ids given, e.g. kept from the model's config.json
      assert (tok.bos_id, tok.eos_id, tok.pad_id) == (-1, 5, 7)


def test_special_ids_from_the_model_config_beside_it(json_tokenizer, tmp_path):
  """A model directory with a tokenizer.json but no tokenizer_config.json (config.tokenizer may name the LLM's HF
  directory): the special ids come from its config.json, as a HF import takes them (Llama 3 lists several EOS
  ids: the first counts); ids a caller read from the model's config come first, a tokenizer_config.json before
  both."""
  path, _ = json_tokenizer
  reference = tokenizer.load(path)
  (tmp_path / "tokenizer.json").write_bytes(open(path, "rb").read())
  with pytest.raises(ValueError, match=r"no eos token named by .*tokenizer_config.json, special_tokens_map.json or "
                                      r".*config.json \(none exists"):
    make_tokenizer({"tokenizer": str(tmp_path)})
  (tmp_path / "config.json").write_text(json.dumps({"text_config": None, "bos_token_id": 1}))
  with pytest.raises(ValueError, match=r"no eos token named by .*config.json;"):
    make_tokenizer({"tokenizer": str(tmp_path)})
  ids = {f"{k}_token_id": v for k, v in reference.special().items()}
  (tmp_path / "config.json").write_text(json.dumps({**ids, "eos_token_id": [ids["eos_token_id"], 1]}))
  tok = make_tokenizer({"tokenizer": str(tmp_path)})
  assert tok.special() == reference.special() and tok.encode_prefix(TEXTS[0]) == reference.encode_prefix(TEXTS[0])
  assert tokenizer.load(str(tmp_path / "tokenizer.json"), {"eos": 1}).special() == {"eos": 1}
  (tmp_path / "config.json").write_text(json.dumps({**ids, "pad_token_id": reference.vocab_size}))
  with pytest.raises(ValueError, match=rf"special token ids {{'pad': {reference.vocab_size}}} from .*config.json are "
                                       rf"outside its vocabulary of {reference.vocab_size}"):
    make_tokenizer({"tokenizer": str(tmp_path)})
  (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 1, "pad_token_id": 2}))
  (tmp_path / "tokenizer_config.json").write_bytes(open(os.path.join(os.path.dirname(path), "tokenizer_config.json"),
                                                        "rb").read())
  assert tokenizer.load(str(tmp_path), {"eos": 1}).special() == reference.special()


@pytest.mark.parametrize("config, token_map", [
    ({}, {"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|end_of_text|>", "special": True}}),
    ({"bos_token": None, "eos_token": "<|end_of_text|>"}, {"bos_token": "<|begin_of_text|>"}),
    ({"eos_token": "<|end_of_text|>"}, {"eos_token": "<|begin_of_text|>"}),
    (None, {"eos_token": "<|end_of_text|>", "pad_token": "<|end_of_text|>"})])
def test_special_tokens_map_names_special_tokens_as_in_transformers(tmp_path, config, token_map):
  """Older HF repos name their special tokens in special_tokens_map.json, which transformers reads over
  tokenizer_config.json; an export writes one tokenizer_config.json that transformers reads the same way."""
  from transformers import AutoTokenizer
  path = train_json_tokenizer(str(tmp_path / "src"))
  os.makedirs(tmp_path / "tok")
  (tmp_path / "tok" / "tokenizer.json").write_bytes(open(path, "rb").read())
  if config is not None:
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                                        **config}))
  (tmp_path / "tok" / "special_tokens_map.json").write_text(json.dumps(token_map))
  ours = tokenizer.load(str(tmp_path / "tok"))
  expected = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
  expected = {k: v for k in ("bos", "eos", "pad") if (v := getattr(expected, f"{k}_token_id")) is not None}
  assert ours.special() == expected
  os.makedirs(tmp_path / "out")
  for name, data in ours.hf_files("LlamaTokenizer").items():
    (tmp_path / "out" / name).write_bytes(data)
  exported = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
  assert {k: getattr(exported, f"{k}_token_id") for k in expected} == expected


def test_prompt_start_is_the_template_s_whatever_the_vocabulary(tmp_path):
  """The tokens a template puts before a text are found with a probe text the vocabulary holds: here a word-level
  vocabulary without "a" and without an unknown token (encoding "a" fails), and BERT's [CLS] ... [SEP]."""
  from tokenizers import Tokenizer, models, pre_tokenizers, processors
  from transformers import AutoTokenizer
  vocab = {"[CLS]": 0, "[SEP]": 1, "0": 2, "red": 3, "circle": 4}
  tok = Tokenizer(models.WordLevel(vocab))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 0),
                                                                                              ("[SEP]", 1)])
  tok.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                              "eos_token": "[SEP]"}))
  ours, theirs = tokenizer.load(str(tmp_path)), AutoTokenizer.from_pretrained(str(tmp_path))
  assert ours.prompt_start == (0,) and ours.encode_prefix("red circle")[:3] == theirs("red circle")["input_ids"][:3]


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
    ("no_eos", r"no eos token named by .*tokenizer_config.json;"),
    ("eos_list", r"eos_token must be a token string, got \['<\|eot\|>'\]"),
    ("missing", r"No tokenizer.json at .*missing.json"),
    ("empty_dir", r"No tokenizer.model or tokenizer.json in .*empty")])
def test_bad_tokenizer_files_are_named(json_tokenizer, tmp_path, bad, match):
  path, style = json_tokenizer
  (tmp_path / "tokenizer.json").write_bytes(open(path, "rb").read())
  config = {"bos_token": None, "eos_token": "<|endoftext|>" if style == "qwen2" else "<|end_of_text|>"}
  if bad == "json":
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": [1, 2]}}')
  config_text = json.dumps({**config, "eos_token": "<|eot|>"} if bad == "unknown_token" else
                           {**config, "eos_token": ["<|eot|>"]} if bad == "eos_list" else
                           {"bos_token": None} if bad == "no_eos" else config)
  (tmp_path / "tokenizer_config.json").write_text("{" if bad == "config_json" else config_text)
  with pytest.raises((ValueError, FileNotFoundError), match=match):
    (tmp_path / "empty").mkdir()
    tokenizer.load(str(tmp_path / {"missing": "missing.json", "empty_dir": "empty"}.get(bad, "tokenizer.json")))


def test_bad_sentencepiece_files_are_named(tmp_path):
  (tmp_path / "tokenizer.model").write_bytes(b"not a model")
  with pytest.raises(ValueError, match=r"tokenizer.model is not a valid SentencePiece model"):
    tokenizer.load(str(tmp_path / "tokenizer.model"))
  with pytest.raises(FileNotFoundError, match=r"No tokenizer model at .*gone.model"):
    make_tokenizer({"tokenizer": str(tmp_path / "gone.model")})


def test_a_sentencepiece_model_without_eos_is_refused(tmp_path):
  """Every answer ends with the EOS, and decoding stops at it: a model with none is named, not trained on id -1."""
  import io

  import sentencepiece as spm
  model = io.BytesIO()
  spm.SentencePieceTrainer.Train(sentence_iterator=iter(["a red circle", "two blue squares"] * 50), model_writer=model,
                                 vocab_size=30, eos_id=-1, minloglevel=2, hard_vocab_limit=False)
  (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
  with pytest.raises(ValueError, match=r"tokenizer.model: the SentencePiece model has no eos piece"):
    tokenizer.load(str(tmp_path / "tokenizer.model"))


def test_image_token_may_be_a_special_added_token(json_tokenizer):
  """llava-hf's Qwen2 tokenizer.json holds its <image> as a special added token: a valid image id, as is one past
  the tokenizer; an ordinary text token, BOS, EOS or pad (special tokens too, but in every sequence) are not."""
  path, style = json_tokenizer
  tok = tokenizer.load(path)
  cfg = lambda i: types.SimpleNamespace(image_token_id=i, llm=types.SimpleNamespace(vocab_size=tok.vocab_size + 8))
  image = tok.tok.token_to_id("<image>")
  assert (image is not None) == (style == "qwen2") and tok.reserved_ids >= {image} - {None}
  for ok in ([image] if image is not None else []) + [tok.vocab_size]:
    check_image_token_id(cfg(ok), tok)
  for bad in (tok.encode("a")[0], tok.vocab_size + 8, -1, *tok.special().values(), *tok.prompt_start):
    with pytest.raises(ValueError, match=f"config.image_token_id {bad}: it must lie in"):
      check_image_token_id(cfg(bad), tok)


def test_truncation_and_padding_in_the_file_do_not_apply(json_tokenizer, tmp_path):
  """Some published tokenizer.json files carry truncation / padding settings, which transformers overrides per
  call: encode returns every token, and the prompt_start test is not fooled by padding."""
  from tokenizers import Tokenizer
  path, _ = json_tokenizer
  raw = Tokenizer.from_file(path)
  raw.enable_truncation(3)
  raw.enable_padding(length=64)
  raw.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_bytes(open(os.path.join(os.path.dirname(path), "tokenizer_config.json"),
                                                        "rb").read())
  tok, reference = tokenizer.load(str(tmp_path / "tokenizer.json")), tokenizer.load(path)
  assert all(tok.encode(t) == reference.encode(t) and len(tok.encode(t)) > 3 for t in TEXTS)
  assert tok.encode_prefix(TEXTS[0]) == reference.encode_prefix(TEXTS[0])
