"""vlm_jax against transformers' PaliGemma (an independent implementation) on tiny random models."""
import json

import numpy as np
import pytest
import torch

import vlm_jax
from vlm_jax.convert import hf, hf_files, safetensors_io
from tests import hf_models

TOKENS = np.array([[2, 5, 6, 7, 10, 11, 12, 13, 1], [2, 8, 9, 10, 11, 12, 13, 14, 1]])
MASK_AR = np.array([[0, 0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 1, 1, 1]])


def rel_err(ours, theirs):
  """max |ours - theirs| / max |theirs|: the logits' error relative to their scale."""
  return float(np.max(np.abs(np.asarray(ours) - theirs)) / np.max(np.abs(theirs)))


@pytest.fixture(scope="module")
def pixels():
  return np.random.RandomState(1).uniform(-1, 1, (2, 28, 28, 3)).astype(np.float32)


def test_hf_to_vlm_jax_logits(hf_dir, pixels):
  path, torch_model = hf_dir
  model = vlm_jax.load(path)
  theirs = hf_models.hf_logits(torch_model, pixels, TOKENS, MASK_AR)
  assert rel_err(model.logits(pixels, TOKENS, MASK_AR), theirs) < 1e-4


def test_greedy_continuations_identical(hf_dir, pixels):
  path, torch_model = hf_dir
  model = vlm_jax.load(path)
  prefix = TOKENS[:, :5]
  ours = np.asarray(model.generate_ids(pixels, prefix, max_new_tokens=8, eos_id=-1))
  n = hf_models.N_IMG
  ids = np.concatenate([np.full((2, n), torch_model.config.image_token_index), prefix], axis=1)
  with torch.no_grad():
    out = torch_model.generate(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2),
                               token_type_ids=torch.zeros(ids.shape, dtype=torch.long),
                               attention_mask=torch.ones(ids.shape, dtype=torch.long), max_new_tokens=8,
                               do_sample=False, eos_token_id=None, pad_token_id=0)
  np.testing.assert_array_equal(ours, out[:, ids.shape[1]:].numpy())


def test_export_gives_same_logits(hf_dir, pixels, tmp_path):
  """vlm_jax -> HF: transformers loads our export and computes our logits."""
  from transformers import PaliGemmaForConditionalGeneration
  model = vlm_jax.load(hf_dir[0])
  model.save_hf(str(tmp_path))
  exported = PaliGemmaForConditionalGeneration.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
  theirs = hf_models.hf_logits(exported, pixels, TOKENS, MASK_AR)
  assert rel_err(model.logits(pixels, TOKENS, MASK_AR), theirs) < 1e-4


def test_round_trip_identical_tensors(hf_dir, tmp_path):
  path, torch_model = hf_dir
  vlm_jax.load(path).save_hf(str(tmp_path))
  ours = {hf_files.canonical_name(k): v for k, v in safetensors_io.read(str(tmp_path / "model.safetensors")).items()}
  theirs = {hf_files.canonical_name(k): v.numpy() for k, v in torch_model.state_dict().items()}
  theirs.pop("lm_head.weight")  # tied to the input embedding
  assert sorted(ours) == sorted(theirs)
  for name in theirs:
    np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)


def test_sharded_export_loads(hf_dir, pixels, tmp_path):
  model = vlm_jax.load(hf_dir[0])
  hf.save(str(tmp_path), model.config, model.params, max_shard_bytes=20_000)
  assert (tmp_path / "model.safetensors.index.json").exists()
  reloaded = vlm_jax.load(str(tmp_path))
  np.testing.assert_array_equal(reloaded.logits(pixels, TOKENS, MASK_AR), model.logits(pixels, TOKENS, MASK_AR))


def test_bfloat16_export_and_load(hf_dir, pixels, tmp_path):
  model = vlm_jax.load(hf_dir[0])
  model.save_hf(str(tmp_path), dtype="bfloat16")
  tensors = safetensors_io.read(str(tmp_path / "model.safetensors"))
  assert all(str(v.dtype) == "bfloat16" for v in tensors.values())
  bf16 = vlm_jax.load(str(tmp_path), dtype="bfloat16")
  # float32 pixels into bfloat16 weights: the model casts, and the logits stay close to float32's.
  logits = np.asarray(bf16.logits(pixels, TOKENS, MASK_AR))
  assert logits.dtype == np.float32
  assert rel_err(logits, np.asarray(model.logits(pixels, TOKENS, MASK_AR))) < 0.1


# ---------------------------------------------------------------------------------------------- config fields
# Config fields transformers honours that the converter cannot: refused, naming the file and the field, instead of
# loading a model with other logits. Checked on the dicts transformers' own config classes write.


def hf_config_dict(text: str, vision_kw=None, **text_kw) -> dict:
  return hf_models.tiny_hf_config(text, vision_kw=vision_kw, **text_kw).to_dict()


@pytest.mark.parametrize("text", ["gemma", "gemma2"])
@pytest.mark.parametrize("field, rope", [
    ("rope_parameters", {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}),
    ("rope_parameters", {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}),
    ("rope_scaling", {"type": "linear", "factor": 4.0}),  # transformers 4's field, which 5 still reads
])
def test_rope_scaling_is_refused_not_dropped(text, field, rope):
  c = hf_config_dict(text)
  c["text_config"][field] = rope
  with pytest.raises(ValueError, match=rf"cfg.json: text_config.{field} .* is not supported"):
    hf.config_from_hf(c, source="cfg.json")
  c["text_config"][field] = {"rope_type": "default", "rope_theta": 500.0}
  assert hf.config_from_hf(c).llm.rope_base == 500.0


@pytest.mark.parametrize("act", ["gelu", "quick_gelu"])
def test_a_vision_activation_other_than_tanh_gelu_is_refused(act):
  with pytest.raises(ValueError, match=rf"cfg.json: vision_config.hidden_act '{act}' is not supported"):
    hf.config_from_hf(hf_config_dict("gemma", vision_kw={"hidden_act": act}), source="cfg.json")


def test_text_activation_is_read_from_the_field_transformers_reads():
  """Gemma 2 applies `hidden_activation` (erf GELU for "gelu"), Gemma 1 `hidden_act`, whose legacy "gelu" is
  tanh-GELU (test below); the other family's field is ignored, as transformers ignores it."""
  c = hf_config_dict("gemma2", hidden_activation="gelu")
  with pytest.raises(ValueError, match="cfg.json: text_config.hidden_activation 'gelu' is not supported"):
    hf.config_from_hf(c, source="cfg.json")
  c["text_config"].update(hidden_activation="gelu_pytorch_tanh", hidden_act="relu")
  assert hf.config_from_hf(c).llm.post_norms
  with pytest.raises(ValueError, match="cfg.json: text_config.hidden_act 'relu' is not supported"):
    hf.config_from_hf(hf_config_dict("gemma", hidden_act="relu"), source="cfg.json")


@pytest.mark.parametrize("hf_dir", ["gemma"], indirect=True)
def test_gemma1_legacy_hidden_act_gelu_loads_as_tanh_gelu(hf_dir, pixels, tmp_path):
  """The official Gemma 1 configs say hidden_act "gelu", which transformers' GemmaConfig maps to tanh-GELU."""
  import shutil
  from transformers import PaliGemmaForConditionalGeneration
  path = shutil.copytree(hf_dir[0], tmp_path / "legacy")
  config = json.loads((path / "config.json").read_text())
  config["text_config"]["hidden_act"] = "gelu"
  (path / "config.json").write_text(json.dumps(config))
  theirs = PaliGemmaForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
  assert theirs.config.text_config.hidden_act == "gelu_pytorch_tanh"
  ours = vlm_jax.load(str(path)).logits(pixels, TOKENS, MASK_AR)
  assert rel_err(ours, hf_models.hf_logits(theirs, pixels, TOKENS, MASK_AR)) < 1e-4


@pytest.mark.parametrize("heads", [dict(num_key_value_heads=3), dict(head_dim=15)])
def test_attention_shapes_are_checked_with_the_file_and_fields(heads):
  c = hf_config_dict("gemma")
  c["text_config"].update(heads)
  with pytest.raises(ValueError, match=r"cfg.json: text_config \(num_attention_heads, num_key_value_heads, "
                                       r"head_dim\): (num_heads 4 is not a multiple of num_kv_heads 3|head_dim 15)"):
    hf.config_from_hf(c, source="cfg.json")


@pytest.mark.parametrize("change", [dict(causal=True), dict(final_norm=False)])
def test_export_refuses_what_no_paligemma_config_expresses(change, tmp_path):
  """transformers' PaliGemma always applies the prefix-LM mask and the vision post-layernorm."""
  import dataclasses
  from vlm_jax.models.registry import get_model_config
  cfg = get_model_config("tiny")
  if "final_norm" in change:
    cfg = dataclasses.replace(cfg, img=dataclasses.replace(cfg.img, **change))
  else:
    cfg = dataclasses.replace(cfg, **change)
  with pytest.raises(ValueError, match="a PaliGemma export needs the prefix-LM mask"):
    hf.save(str(tmp_path / "out"), cfg, params=None)  # the config is checked before params are read
  assert not (tmp_path / "out").exists()
