"""Tiny random transformers PaliGemma models (no download) and a tiny SentencePiece model for tests."""
import os

import numpy as np

IMAGE_SIZE, PATCH = 28, 14
N_IMG = (IMAGE_SIZE // PATCH) ** 2
VOCAB = 400


def tiny_hf_config(text: str, vocab: int = VOCAB):
  from transformers import Gemma2Config, GemmaConfig, PaliGemmaConfig, SiglipVisionConfig
  vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=PATCH, vision_use_head=False)
  common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, head_dim=16,
                vocab_size=vocab, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
  if text == "gemma":
    text_cfg = GemmaConfig(num_key_value_heads=1, **common)
  else:  # GQA, a query scale that is not head_dim, and a sliding window shorter than the sequence.
    text_cfg = Gemma2Config(num_key_value_heads=2, query_pre_attn_scalar=24, sliding_window=4,
                            attn_logit_softcapping=50.0, final_logit_softcapping=30.0, **common)
  return PaliGemmaConfig(vision_config=vision, text_config=text_cfg, projection_dim=64, image_token_index=vocab)


def tiny_paligemma(text: str, seed: int = 0):
  """Every tensor random (norm scales and biases too), so a wrong or zero-initialised mapping shows up."""
  import torch
  from transformers import PaliGemmaForConditionalGeneration
  torch.manual_seed(seed)
  model = PaliGemmaForConditionalGeneration._from_config(tiny_hf_config(text), attn_implementation="eager")
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn_like(p) * 0.3)
  return model.eval()


def hf_logits(model, pixels_BHWC, tokens_BT, mask_ar_BT):
  """transformers' logits of the text positions for our (images, tokens, mask_ar) inputs."""
  import torch
  b = tokens_BT.shape[0]
  ids = np.concatenate([np.full((b, N_IMG), model.config.image_token_index), tokens_BT], axis=1)
  token_type = np.concatenate([np.zeros((b, N_IMG), np.int64), mask_ar_BT], axis=1)
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels_BHWC).permute(0, 3, 1, 2),
                token_type_ids=torch.tensor(token_type))
  return out.logits[:, N_IMG:].float().numpy()


def train_tokenizer(out_dir: str, vocab_size: int = VOCAB, llama: bool = False) -> str:
  """Trains a SentencePiece BPE model like Gemma's: pad 0 / eos 1 / bos 2, no dummy prefix, <locNNNN> pieces;
  with `llama`, like Llama's: unk 0 / bos 1 / eos 2, no pad, a dummy prefix, no <locNNNN>."""
  import sentencepiece as spm
  words = ["a", "red", "blue", "green", "circle", "square", "triangle", "caption", "en", "detect", "how", "many",
           "what", "colour", "is", "the", "shape", "left", "right", "top", "bottom", "answer", "there", "are"]
  rs = np.random.RandomState(0)
  text = "\n".join(" ".join(rs.choice(words, 8)) for _ in range(2000))
  corpus = os.path.join(out_dir, "corpus.txt")
  with open(corpus, "w") as f:
    f.write(text)
  prefix = os.path.join(out_dir, "tok")
  loc = [f"<loc{i:04d}>" for i in range(0, 1024, 64)] + [f"<seg{i:03d}>" for i in range(4)]
  spm.SentencePieceTrainer.Train(
      input=corpus, model_prefix=prefix, vocab_size=vocab_size, model_type="bpe", byte_fallback=True, minloglevel=2,
      hard_vocab_limit=False,
      **(dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True) if llama else
         dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, add_dummy_prefix=False, user_defined_symbols=loc)))
  return prefix + ".model"
