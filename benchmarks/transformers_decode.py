"""The transformers side of `decode.py`: PaliGemmaForConditionalGeneration's greedy `generate` on the benchmark's
HF directory and inputs, timed the same way as ours."""
import os

import numpy as np

from machine import best_of


def load_torch(hf_dir: str, dtype: str):
  import torch
  from transformers import PaliGemmaForConditionalGeneration
  torch.set_num_threads(os.cpu_count())
  model = PaliGemmaForConditionalGeneration.from_pretrained(
      hf_dir, dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32).eval()
  model.generation_config.eos_token_id = None  # never stop early: exactly max_new_tokens, like eos_id=-1
  model.generation_config.pad_token_id = 0
  return model


def torch_generate(model, inputs, n: int):
  """transformers' greedy `generate`: input_ids = image tokens then our prefix; token_type_ids 0 over the whole
  prompt, which makes the prefix bidirectional as in our PaliGemma (without it HF's prefix is causal)."""
  import torch
  b, n_img = inputs["prefix"].shape[0], model.config.vision_config.num_image_tokens
  ids = np.concatenate([np.full((b, n_img), model.config.image_token_index), inputs["prefix"]], axis=1)
  pixels = torch.tensor(inputs["images"]).permute(0, 3, 1, 2).contiguous().to(model.dtype)
  with torch.inference_mode():
    out = model.generate(pixel_values=pixels, input_ids=torch.tensor(ids), attention_mask=torch.ones(ids.shape,
                         dtype=torch.long), token_type_ids=torch.zeros(ids.shape, dtype=torch.long),
                         max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
  return out[:, ids.shape[1]:].numpy()


def bench_torch(hf_dir: str, dtype: str, shapes, inputs, reps: int):
  model = load_torch(hf_dir, dtype)
  out = {"attn_implementation": model.config._attn_implementation}
  for name, (b, n) in shapes.items():
    tokens = torch_generate(model, inputs[name], n)  # warm-up
    if tokens.shape != (b, n):
      raise RuntimeError(f"transformers generated {tokens.shape} tokens for shape ({b}, {n}).")
    best, med = best_of(lambda: torch_generate(model, inputs[name], n), reps)
    out[name] = {"tokens": tokens, "seconds": best, "median_seconds": med, "tokens_per_s": b * n / best}
  # Its prefill (generate with one new token) at shape (a)'s batch: what no faster decode loop can remove.
  out["prefill_a_seconds"] = best_of(lambda: torch_generate(model, inputs["a"], 1), reps)[0]
  return out
