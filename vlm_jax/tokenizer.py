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
SPECIAL_MAP_FILE = "special_tokens_map.json"


class _Base:
  pad_id: int  # -1 where the tokenizer has none, as SentencePiece says
  eos_id: int
  bos_id: int
  prompt_start: tuple[int, ...]  # what a prompt starts with: the BOS, where the tokenizer adds one (Qwen2's: none)
  # Added special tokens besides BOS / EOS / pad / prompt_start (llava-hf's Qwen2 <image>): no text the data holds
  # becomes one (only their literal spelling would), so a LLaVA image token may be one.
  reserved_ids: frozenset = frozenset()

  def special(self) -> dict[str, int]:
    """{"pad" / "eos" / "bos": id} of the special tokens the tokenizer has."""
    return {k: i for k, i in (("pad", self.pad_id), ("eos", self.eos_id), ("bos", self.bos_id)) if i >= 0}

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
    """prompt_start (the BOS, where the tokenizer adds one) + prompt + separator "\\n", each part tokenised on its
    own as big_vision does."""
    return [*self.prompt_start, *self.encode(prompt), *self.encode("\n")]


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
    if self.eos_id < 0:  # else -1 would be appended as every answer's supervised last token
      raise ValueError(f"{model_path}: the SentencePiece model has no eos piece (eos_id -1); training and decoding "
                       "need one.")
    self.prompt_start = (self.bos_id,) if self.bos_id >= 0 else ()

  @property
  def vocab_size(self) -> int:
    return self.sp.GetPieceSize()

  def encode(self, text: str) -> list[int]:
    return self.sp.EncodeAsIds(text)

  def _decode(self, ids) -> str:
    return self.sp.DecodeIds(ids)

  def files(self) -> dict[str, bytes]:
    return {SENTENCEPIECE_FILE: self._model_bytes}

  def hf_files(self, sentencepiece_class: str) -> dict[str, bytes]:
    """The files of a HF export: the model, declared as the model family's SentencePiece class (GemmaTokenizer,
    LlamaTokenizer), with its special tokens."""
    special = {f"{k}_token": self.sp.IdToPiece(v) for k, v in self.special().items()}
    config = {"tokenizer_class": sentencepiece_class, "add_bos_token": bool(self.prompt_start),
              "add_eos_token": False, **special}
    if sentencepiece_class == "LlamaTokenizer":  # it prepends "▁" to the text unless told this model does not
      config["add_prefix_space"] = self.sp.EncodeAsPieces("a")[0].startswith("\u2581")
    return {**self.files(), JSON_CONFIG_FILE: json.dumps(config, indent=2).encode()}


def special_from_hf_config(hf_config: dict) -> dict[str, int]:
  """{"bos" / "eos" / "pad": id} a HF model config.json names (in text_config, else at the top; the first of a
  list, as Llama 3 lists several EOS ids)."""
  out = {}
  for name in ("bos", "eos", "pad"):
    value = (hf_config.get("text_config") or {}).get(f"{name}_token_id", hf_config.get(f"{name}_token_id"))
    value = value[0] if isinstance(value, list) and value else value
    if isinstance(value, int):
      out[name] = value
  return out


class JSONTokenizer(_Base):
  """A HuggingFace `tokenizer.json`, run by the `tokenizers` library that defines the format. Its special tokens
  are those the `tokenizer_config.json` and `special_tokens_map.json` beside it name (the latter winning), as
  transformers reads them; without either file, `default_special`'s ({"bos" / "eos" / "pad": id}, e.g. kept from
  a model's config.json), else those of the model config.json beside it. encode adds no special tokens: the BOS
  comes from encode_prefix, where the file's post-processor puts one (Llama 3's does, Qwen2's does not)."""

  def __init__(self, json_path: str, default_special: dict | None = None):
    import tokenizers
    self.path = str(json_path)
    self._json = _read(json_path, "tokenizer.json")
    try:
      self.tok = tokenizers.Tokenizer.from_str(self._json.decode())
    except Exception as e:  # tokenizers raises its own Exception type for every parse error
      raise ValueError(f"{json_path} is not a valid tokenizer.json: {e}") from e
    # A file may carry truncation / padding settings; transformers overrides them per call, as encode must.
    self.tok.no_truncation()
    self.tok.no_padding()
    config_path = epath.Path(json_path).parent / JSON_CONFIG_FILE
    model_config_path = epath.Path(json_path).parent / "config.json"
    named = [(path, fileutil.read_json(path)) for path in (config_path, config_path.parent / SPECIAL_MAP_FILE)
             if path.is_file()]
    # One tokenizer_config.json holding what both files say (exports write it alone), where a token written as a
    # dict needs the type tag special_tokens_map.json leaves out.
    self._config = {k: _tag_added_tokens(v) for _, d in named for k, v in d.items()} if named else None
    if self._config is not None:
      source = " + ".join(str(path) for path, _ in named)
      ids = {name: self._named_id(name, source) for name in ("bos", "eos", "pad")}
    elif default_special:
      ids, source = {k: v for k, v in default_special.items() if v is not None}, "the model's config"
    elif model_config_path.is_file():
      ids, source = special_from_hf_config(fileutil.read_json(model_config_path)), model_config_path
    else:
      ids, source = {}, f"{config_path}, {SPECIAL_MAP_FILE} or {model_config_path} (none exists)"
    self.bos_id, self.eos_id, self.pad_id = (ids.get(k, -1) for k in ("bos", "eos", "pad"))
    if bad := {k: i for k, i in ids.items() if not -1 <= i < self.vocab_size}:
      raise ValueError(f"{json_path}: special token ids {bad} from {source} are outside its vocabulary of "
                       f"{self.vocab_size}: a config of another model?")
    if self.eos_id < 0:
      raise ValueError(f"{json_path}: no eos token named by {source}; training and decoding need one.")
    self.prompt_start = self._template_start()
    self.reserved_ids = frozenset(i for i, t in self.tok.get_added_tokens_decoder().items()
                                  if t.special) - set(self.special().values()) - set(self.prompt_start)

  def _template_start(self) -> tuple[int, ...]:
    """What the file's post-processor puts before a text (Llama 3's BOS, BERT's [CLS]), whether or not
    tokenizer_config.json names it the bos_token: transformers starts a prompt with it all the same."""
    for probe in ("a", "0", "the", " "):
      try:
        full, plain = (self.tok.encode(probe, add_special_tokens=add).ids for add in (True, False))
      except Exception:  # the tokenizers library raises plain Exceptions (e.g. a vocabulary without [UNK])
        continue
      if plain:
        start = next((k for k in range(len(full) - len(plain) + 1) if full[k:k + len(plain)] == plain), 0)
        return tuple(full[:start])
    raise ValueError(f"{self.path}: tokenizes none of the plain texts 'a', '0', 'the', ' '.")

  def _named_id(self, name: str, source: str) -> int:
    token = self._config.get(f"{name}_token")  # a string, an AddedToken dict or null
    token = token.get("content") if isinstance(token, dict) else token
    if token is None:
      return -1
    if not isinstance(token, str):
      raise ValueError(f"{source}: {name}_token must be a token string, got {token!r}.")
    if (i := self.tok.token_to_id(token)) is None:
      raise ValueError(f"{source}: {name}_token {token!r} is not a token of {self.path}.")
    return i

  @property
  def vocab_size(self) -> int:
    return self.tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=False).ids

  def _decode(self, ids) -> str:
    # Added special tokens stay in (e.g. <locNNNN> or <|box_start|> answers), as SentencePiece's user-defined
    # pieces do; BOS, EOS and pad never reach here.
    return self.tok.decode(ids, skip_special_tokens=False)

  def files(self) -> dict[str, bytes]:
    """tokenizer.json and a tokenizer_config.json: the original (chat template and all, with what a
    special_tokens_map.json beside it said), else one naming the special tokens."""
    config = self._config or {f"{k}_token": self.tok.id_to_token(i) for k, i in self.special().items()}
    return {JSON_FILE: self._json, JSON_CONFIG_FILE: json.dumps(config, indent=2).encode()}

  def hf_files(self, sentencepiece_class: str) -> dict[str, bytes]:
    """`files()`, the config's class defaulting to transformers' generic fast tokenizer."""
    del sentencepiece_class  # a family's SentencePiece class does not read a tokenizer.json
    files = self.files()
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **json.loads(files[JSON_CONFIG_FILE])}
    return {**files, JSON_CONFIG_FILE: json.dumps(config, indent=2).encode()}


def load(path: str, default_special: dict | None = None) -> "SentencePieceTokenizer | JSONTokenizer":
  """A SentencePiece model file, a `tokenizer.json` (any name ending in .json), or a directory holding either."""
  if epath.Path(path).is_dir():
    if (tok := from_dir(path, default_special)) is None:
      raise FileNotFoundError(f"No {SENTENCEPIECE_FILE} or {JSON_FILE} in {path}.")
    return tok
  if str(path).endswith(".json"):
    return JSONTokenizer(path, default_special)
  return SentencePieceTokenizer(path)


def from_dir(path, default_special: dict | None = None) -> "SentencePieceTokenizer | JSONTokenizer | None":
  """The tokenizer a model directory holds (SentencePiece first, as HF PaliGemma / Llama 2 repos hold both), or
  None. `default_special`: special ids for a tokenizer.json without a tokenizer_config.json naming them."""
  for name in (SENTENCEPIECE_FILE, JSON_FILE):
    if (epath.Path(path) / name).is_file():
      return load(str(epath.Path(path) / name), default_special)
  return None


def _tag_added_tokens(value):
  if isinstance(value, list):
    return [_tag_added_tokens(v) for v in value]
  if isinstance(value, dict) and "content" in value:
    return {"__type": "AddedToken", **value}
  return value


def _read(path, what: str) -> bytes:
  if not epath.Path(path).is_file():
    raise FileNotFoundError(f"No {what} at {path}.")
  return epath.Path(path).read_bytes()
