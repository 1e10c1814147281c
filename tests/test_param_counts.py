"""Parameter counts of every named config against transformers' PaliGemma, without allocating a weight.

Ours: `jax.eval_shape(init_params)` (abstract shapes only). Theirs: `PaliGemmaForConditionalGeneration` built on
torch's meta device from HF configs written here from the published model sizes, not from our registry, so a
wrong entry in the registry's tables shows up as a count mismatch. Counts are compared per part (vision tower,
projector, language model) so a failure names the part that differs. The tied lm_head counts once.
"""
import functools
import math

import jax
import pytest

from vlm_jax.convert.hf import config_to_hf
from vlm_jax.models.registry import CONFIGS, PALIGEMMA_VOCAB
from vlm_jax.models.vlm import init_params

# Published sizes (model cards / HF config.json of google/paligemma-3b-* and google/paligemma2-*).
VOCAB = 257152  # 256000 Gemma + 1024 <locNNNN> + 128 <segNNN>
SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, patch_size=14)
GEMMA = {
    "gemma_2b": dict(hidden_size=2048, num_hidden_layers=18, intermediate_size=16384, num_attention_heads=8,
                     num_key_value_heads=1, head_dim=256),
    "gemma2_2b": dict(hidden_size=2304, num_hidden_layers=26, intermediate_size=9216, num_attention_heads=8,
                      num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256),
    "gemma2_9b": dict(hidden_size=3584, num_hidden_layers=42, intermediate_size=14336, num_attention_heads=16,
                      num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256),
    "gemma2_27b": dict(hidden_size=4608, num_hidden_layers=46, intermediate_size=36864, num_attention_heads=32,
                       num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=144),
}
LLM_OF = {"paligemma_3b": "gemma_2b", "paligemma2_3b": "gemma2_2b", "paligemma2_10b": "gemma2_9b",
          "paligemma2_28b": "gemma2_27b"}
REAL = [f"{model}_{res}" for model in LLM_OF for res in (224, 448, 896)]
TINY = ["tiny", "tiny_gemma2"]
PALIGEMMA_3B_224_PARAMS = 2_923_335_408  # what transformers reports for google/paligemma-3b-pt-224


def reference_hf_config(name: str):
  """The HF config of a named model, from the sizes above (the tiny ones: the sizes tests use)."""
  from transformers import Gemma2Config, GemmaConfig, PaliGemmaConfig, SiglipVisionConfig
  if name in TINY:
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                patch_size=14, image_size=28, vision_use_head=False)
    common = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4, head_dim=16,
                  vocab_size=512)
    if name == "tiny":
      text = GemmaConfig(num_key_value_heads=1, **common)
    else:
      text = Gemma2Config(num_key_value_heads=2, query_pre_attn_scalar=24, attn_logit_softcapping=50.0,
                          final_logit_softcapping=30.0, **common)
    return PaliGemmaConfig(vision_config=vision, text_config=text, projection_dim=64, image_token_index=512)
  model, res = name.rsplit("_", 1)
  llm = LLM_OF[model]
  vision = SiglipVisionConfig(**SO400M, image_size=int(res), vision_use_head=False)
  text_cls = Gemma2Config if llm.startswith("gemma2") else GemmaConfig
  text = text_cls(**GEMMA[llm], vocab_size=VOCAB)
  return PaliGemmaConfig(vision_config=vision, text_config=text, projection_dim=GEMMA[llm]["hidden_size"],
                         image_token_index=VOCAB, vocab_size=VOCAB)


def hf_counts(hf_config) -> dict:
  """{part: parameter count} of transformers' model built on the meta device (no memory)."""
  import torch
  from transformers import PaliGemmaForConditionalGeneration
  with torch.device("meta"):
    m = PaliGemmaForConditionalGeneration(hf_config)
  assert m.get_output_embeddings().weight is m.get_input_embeddings().weight, "lm_head is not tied"
  count = lambda module: sum(p.numel() for p in module.parameters())
  parts = {"vision": count(m.model.vision_tower), "projector": count(m.model.multi_modal_projector),
           "text": count(m.model.language_model)}
  # Nothing outside the three parts (lm_head is the tied embedding, deduplicated by `parameters()`).
  assert sum(parts.values()) == count(m), f"parameters outside vision/projector/text: {count(m)} vs {parts}"
  return parts


@functools.lru_cache(maxsize=None)
def our_counts(name: str) -> tuple:
  """Sorted ((part, count), ...) of our abstract params (a tuple, so it caches); nothing is allocated."""
  shapes = jax.eval_shape(lambda: init_params(CONFIGS[name]()))["params"]
  size = lambda tree: sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
  img = dict(shapes["img"])
  head = img.pop("head")
  parts = {"vision": size(img), "projector": size(head), "text": size(shapes["llm"])}
  assert sum(parts.values()) == size(shapes), f"params outside img/llm: {sorted(shapes)}"
  return tuple(sorted(parts.items()))


# Named configs of the other families: no PaliGemma reference; their layouts are checked against transformers'
# Llama / T5 / LLaVA models in tests/test_llama.py, tests/test_t5.py and tests/test_llava.py.
OTHER_FAMILIES = ["tiny_llama_mlp", "tiny_llama_resampler", "tiny_t5"]


def test_every_named_config_has_a_reference():
  paligemma = [n for n in CONFIGS if CONFIGS[n]().llm_type == "gemma" and CONFIGS[n]().adapter.kind == "linear"]
  assert sorted(paligemma) == sorted(REAL + TINY)
  assert sorted(set(CONFIGS) - set(paligemma)) == sorted(OTHER_FAMILIES)
  assert PALIGEMMA_VOCAB == VOCAB


@pytest.mark.parametrize("name", REAL + TINY)
def test_count_matches_transformers(name):
  assert dict(our_counts(name)) == hf_counts(reference_hf_config(name))


def test_paligemma_3b_224_absolute_count():
  assert sum(dict(our_counts("paligemma_3b_224")).values()) == PALIGEMMA_3B_224_PARAMS
  assert sum(hf_counts(reference_hf_config("paligemma_3b_224")).values()) == PALIGEMMA_3B_224_PARAMS


@pytest.mark.parametrize("name", REAL + TINY)
def test_config_to_hf_builds_same_count(name):
  """Our exported config.json, read by transformers, builds a model of our size, part by part."""
  from transformers import PaliGemmaConfig
  counts = hf_counts(PaliGemmaConfig.from_dict(config_to_hf(CONFIGS[name]())))
  assert dict(our_counts(name)) == counts
