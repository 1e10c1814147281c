"""Conversations to fixed-length `tokens / mask_ar / mask_loss / mask_input` arrays.

An example's text is a list of turns [(prompt, answer), ...]. The first prompt is the bidirectional prefix
([BOS] + prompt + "\\n", mask_ar 0); everything after it is causal (mask_ar 1), padding included. Only answers
(each followed by EOS) are supervised. Each piece is tokenised on its own, never by re-splitting a joined
string, so the loss mask is exact.
"""
import dataclasses

import numpy as np


@dataclasses.dataclass
class Tokenized:
  tokens: np.ndarray  # int32 [T]
  mask_ar: np.ndarray  # int32 [T]
  mask_loss: np.ndarray  # int32 [T]
  mask_input: np.ndarray  # int32 [T], 1 on real tokens
  truncated: bool


def tokenize_turns(tokenizer, turns, length: int) -> Tokenized:
  """Tokenises [(prompt, answer), ...] to `length` tokens; over-long text is cut (and reported)."""
  if not turns:
    raise ValueError("an example needs at least one (prompt, answer) turn.")
  ids, ar, loss = [], [], []

  def add(piece, mask_ar, mask_loss):
    ids.extend(piece)
    ar.extend([mask_ar] * len(piece))
    loss.extend([mask_loss] * len(piece))

  for i, (prompt, answer) in enumerate(turns):
    if i == 0:
      add(tokenizer.encode_prefix(prompt), 0, 0)
    else:
      add(tokenizer.encode(prompt) + tokenizer.encode("\n"), 1, 0)
    add(tokenizer.encode(answer) + [tokenizer.eos_id], 1, 1)
  truncated = len(ids) > length
  n = min(len(ids), length)
  out = Tokenized(tokens=np.full(length, tokenizer.pad_id, np.int32), mask_ar=np.ones(length, np.int32),
                  mask_loss=np.zeros(length, np.int32), mask_input=np.zeros(length, np.int32), truncated=truncated)
  out.tokens[:n], out.mask_ar[:n], out.mask_loss[:n], out.mask_input[:n] = ids[:n], ar[:n], loss[:n], 1
  return out


def tokenize_prefix(tokenizer, prompt: str, length: int):
  """(tokens, mask, truncated): int32 [length] [BOS] + prompt + "\\n" (`encode_prefix`), right-padded, for
  decoding; whether it was cut to fit."""
  ids = tokenizer.encode_prefix(prompt)
  truncated, ids = len(ids) > length, ids[:length]
  tokens = np.full(length, tokenizer.pad_id, np.int32)
  mask = np.zeros(length, np.int32)
  tokens[:len(ids)], mask[:len(ids)] = ids, 1
  return tokens, mask, truncated
