"""Tiny random transformers PaliGemma models (no download) and a tiny SentencePiece model for tests."""
import os

import numpy as np

IMAGE_SIZE, PATCH = 28, 14
N_IMG = (IMAGE_SIZE // PATCH) ** 2
VOCAB = 400


def tiny_hf_config(text: str, vocab: int = VOCAB, vision_kw: dict | None = None, **text_kw):
  """`text_kw` / `vision_kw` override the text / vision config's fields."""
  from transformers import Gemma2Config, GemmaConfig, PaliGemmaConfig, SiglipVisionConfig
  vision = SiglipVisionConfig(**{**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH,
                                        vision_use_head=False), **(vision_kw or {})})
  common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, head_dim=16,
                vocab_size=vocab, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
  if text == "gemma":
    text_cfg = GemmaConfig(**{**common, "num_key_value_heads": 1, **text_kw})
  else:  # GQA, a query scale that is not head_dim, and a sliding window shorter than the sequence.
    text_cfg = Gemma2Config(**{**common, **dict(num_key_value_heads=2, query_pre_attn_scalar=24, sliding_window=4,
                                                attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
                               **text_kw})
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


def train_tokenizer(out_dir: str, vocab_size: int = VOCAB, llama: bool = False, dummy_prefix: bool = True) -> str:
  """Trains a SentencePiece BPE model like Gemma's: pad 0 / eos 1 / bos 2, no dummy prefix, <locNNNN> pieces;
  with `llama`, like Llama's: unk 0 / bos 1 / eos 2, no pad, a dummy prefix (unless not `dummy_prefix`), no
  <locNNNN>."""
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
      **(dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=dummy_prefix) if llama else
         dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, add_dummy_prefix=False, user_defined_symbols=loc)))
  return prefix + ".model"


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")  # Llama 3's pre-tokenizer split, as in its tokenizer.json


def train_json_tokenizer(out_dir: str, vocab_size: int = 290, style: str = "llama3") -> str:
  """A byte-level BPE tokenizer.json (+ tokenizer_config.json) shaped like Llama 3's (regex split, BOS added by
  a template, special tokens after the merges, a chat template), with style "qwen2" like Qwen2's (NFC, no BOS,
  pad = eos, llava-hf's <image>), with "gpt_neox" like GPT-NeoX's / OLMo's (a bos_token named, equal to the EOS,
  that no template adds), with "template_bos" like Llama 3's but no bos_token named for the token its template
  adds."""
  import json
  from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  if style == "qwen2":
    tok.normalizer = normalizers.NFC()
  words = ["a", "red", "blue", "green", "circle", "square", "caption", "en", "what", "colour", "is", "the", "café",
           "naïve", "12", "345", "日本"]
  rs = np.random.RandomState(0)
  lines = [" ".join(rs.choice(words, 8)) for _ in range(500)]
  tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  if style == "qwen2":
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"])  # llava-hf's <image>
    config = {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
  elif style == "gpt_neox":
    tok.add_special_tokens(["<|endoftext|>"])
    config = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
  else:
    tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    config = {"bos_token": None if style == "template_bos" else bos,
              "eos_token": {"__type": "AddedToken", "content": "<|end_of_text|>", "special": True},
              "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}
  os.makedirs(out_dir, exist_ok=True)
  tok.save(os.path.join(out_dir, "tokenizer.json"))
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", **config}, f)
  return os.path.join(out_dir, "tokenizer.json")
