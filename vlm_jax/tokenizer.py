"""SentencePiece tokenizer wrapper (Gemma's, or the small one shipped for the synthetic data).

`<locNNNN>` and `<segNNN>` are user-defined pieces in PaliGemma's vocabulary: SentencePiece keeps them as
single ids in encode and decode.
"""
import sentencepiece as spm
from etils import epath


class Tokenizer:

  def __init__(self, model_path: str):
    if not epath.Path(model_path).is_file():
      raise FileNotFoundError(f"No tokenizer model at {model_path}.")
    self.path = model_path
    self._model_bytes = epath.Path(model_path).read_bytes()  # local or remote (gs://...)
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

  def decode(self, ids) -> str:
    """Decodes up to the first EOS; pads, the BOS and ids past the vocabulary (models often pad their
    embedding table beyond the tokenizer's size) are dropped."""
    out = []
    for i in (int(i) for i in ids):
      if i == self.eos_id:
        break
      if i not in (self.pad_id, self.bos_id) and 0 <= i < self.vocab_size:
        out.append(i)
    return self.sp.DecodeIds(out)

  def encode_prefix(self, prompt: str) -> list[int]:
    """BOS + prompt + separator "\\n", each part tokenised on its own as big_vision does."""
    return [self.bos_id] + self.encode(prompt) + self.encode("\n")

  def model_bytes(self) -> bytes:
    return self._model_bytes
