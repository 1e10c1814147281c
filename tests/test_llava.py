"""LLaVA-style models (SigLIP + MLP projector + Llama) against transformers' LlavaForConditionalGeneration."""
import json

import numpy as np
import pytest
import torch

import vlm_jax
from vlm_jax.convert import hf_files, hf_llava, safetensors_io

IMAGE, PATCH, VOCAB = 28, 14, 300
N_IMG = (IMAGE // PATCH) ** 2
TOKENS = np.array([[2, 5, 6, 7, 10, 11, 12, 13], [2, 8, 9, 10, 11, 12, 13, 14]])


def tiny_llava(seed=0, tie=False):
  """With `tie`, only the top-level tie_word_embeddings is set, as LlavaConfig(tie_word_embeddings=True) saves it."""
  from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig
  vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=IMAGE, patch_size=PATCH, vision_use_head=False)
  text = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, vocab_size=VOCAB + 1, tie_word_embeddings=False,
                     rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
  text.bos_token_id, text.eos_token_id, text.pad_token_id = 3, 4, 0  # not transformers' Llama defaults (1, 2)
  cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=VOCAB, vision_feature_layer=-1,
                    vision_feature_select_strategy="full", projector_hidden_act="gelu", image_seq_length=N_IMG,
                    tie_word_embeddings=tie)
  torch.manual_seed(seed)
  model = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="eager")
  with torch.no_grad():
    for p in model.parameters():  # every tensor random, norms and biases too
      p.copy_(torch.randn_like(p) * 0.3)
  return model.eval()


def hf_inputs(model, pixels, tokens):
  ids = np.concatenate([np.full((len(tokens), N_IMG), model.config.image_token_index), tokens], axis=1)
  return torch.tensor(ids), torch.tensor(pixels).permute(0, 3, 1, 2)


def hf_logits(model, pixels, tokens):
  ids, px = hf_inputs(model, pixels, tokens)
  with torch.no_grad():
    return model(input_ids=ids, pixel_values=px).logits[:, N_IMG:].float().numpy()


def rel_err(ours, theirs):
  return float(np.max(np.abs(np.asarray(ours) - theirs)) / np.max(np.abs(theirs)))


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("llava") / "hf")
  model = tiny_llava()
  model.save_pretrained(path)
  return path, model


@pytest.fixture(scope="module")
def pixels():
  return np.random.RandomState(1).uniform(-1, 1, (2, IMAGE, IMAGE, 3)).astype(np.float32)


def test_llava_logits_and_greedy_match_transformers(llava_dir, pixels):
  path, torch_model = llava_dir
  model = vlm_jax.load(path)
  assert model.config.causal and model.config.adapter.kind == "mlp" and not model.config.img.final_norm
  mask_ar = np.ones_like(TOKENS)  # ignored: the LLaVA glue is causal everywhere
  assert rel_err(model.logits(pixels, TOKENS, mask_ar), hf_logits(torch_model, pixels, TOKENS)) < 1e-4
  prefix = TOKENS[:, :5]
  ours = np.asarray(model.generate_ids(pixels, prefix, max_new_tokens=8, eos_id=-1))
  ids, px = hf_inputs(torch_model, pixels, prefix)
  with torch.no_grad():
    out = torch_model.generate(input_ids=ids, pixel_values=px, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
  np.testing.assert_array_equal(ours, out[:, ids.shape[1]:].numpy())


def test_llava_export_round_trip_and_loads_in_transformers(llava_dir, pixels, tmp_path):
  import dataclasses
  from vlm_jax.api import Model
  from transformers import LlavaForConditionalGeneration
  path, torch_model = llava_dir
  model = vlm_jax.load(path)
  out = str(tmp_path / "export")
  model.save_hf(out)
  theirs = {hf_files.canonical_name(k): v for k, v in safetensors_io.read(f"{path}/model.safetensors").items()}
  ours = {hf_files.canonical_name(k): v for k, v in safetensors_io.read(f"{out}/model.safetensors").items()}
  assert sorted(ours) == sorted(theirs)
  for k in theirs:
    np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
  reloaded = LlavaForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
  assert rel_err(model.logits(pixels, TOKENS, np.ones_like(TOKENS)), hf_logits(reloaded, pixels, TOKENS)) < 1e-4
  # Without a tokenizer, the source's special ids come through the config: into the export, a vlm_jax
  # checkpoint and generate_ids' defaults.
  assert model.tokenizer is None and (model.config.bos_id, model.config.eos_id, model.config.pad_id) == (3, 4, 0)
  for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
    assert getattr(reloaded.config.text_config, name) == getattr(torch_model.config.text_config, name), name
  model.save(str(tmp_path / "ours"))
  assert vlm_jax.load(str(tmp_path / "ours")).config == model.config
  first = int(np.asarray(model.generate_ids(pixels[:1], TOKENS[:1, :4], max_new_tokens=4, eos_id=-1))[0, 0])
  kept = Model(dataclasses.replace(model.config, eos_id=first, pad_id=VOCAB - 1), model.params)
  out = np.asarray(kept.generate_ids(pixels[:1], TOKENS[:1, :4], max_new_tokens=4))
  assert out[0, 0] == first and np.all(out[0, 1:] == VOCAB - 1)  # stopped at the kept EOS, padded with the kept pad


def test_llava_export_carries_a_llama_tokenizer_transformers_reads(llava_dir, tmp_path):
  """A Llama SentencePiece model has no pad piece (id -1): the export leaves pad out instead of failing, and
  transformers' tokenizer of the export encodes as ours."""
  import shutil
  from transformers import AutoTokenizer
  from tests.hf_models import train_tokenizer
  path, _ = llava_dir
  src = tmp_path / "src"
  shutil.copytree(path, src)
  shutil.copy(train_tokenizer(str(tmp_path), VOCAB, llama=True), src / "tokenizer.model")
  model = vlm_jax.load(str(src))
  assert model.tokenizer.pad_id == -1
  model.save_hf(str(tmp_path / "out"))
  with open(tmp_path / "out" / "config.json") as f:
    text_config = json.load(f)["text_config"]
  assert (text_config["bos_token_id"], text_config["eos_token_id"]) == (1, 2) and "pad_token_id" not in text_config
  with open(tmp_path / "out" / "tokenizer_config.json") as f:
    assert json.load(f)["tokenizer_class"] == "LlamaTokenizer"
  hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
  for text in ("what colour is the circle", " a  red square"):
    assert hf_tok(text)["input_ids"] == [1] + model.tokenizer.encode(text)
  assert vlm_jax.load(str(tmp_path / "out")).tokenizer.encode(text) == model.tokenizer.encode(text)


@pytest.mark.parametrize("dummy_prefix", [True, False])
def test_llava_export_says_whether_its_sentencepiece_model_adds_a_prefix_space(llava_dir, tmp_path, dummy_prefix):
  """LlamaTokenizer prepends "▁" unless add_prefix_space is false: the export says which its model does (Llama's
  does, the synthetic data's Gemma-style one does not), so the class it names encodes as ours."""
  import shutil
  from transformers import AutoTokenizer, LlamaTokenizer
  from tests.hf_models import train_tokenizer
  path, _ = llava_dir
  src = tmp_path / "src"
  shutil.copytree(path, src)
  shutil.copy(train_tokenizer(str(tmp_path), VOCAB, llama=True, dummy_prefix=dummy_prefix), src / "tokenizer.model")
  model = vlm_jax.load(str(src))
  model.save_hf(str(tmp_path / "out"))
  with open(tmp_path / "out" / "tokenizer_config.json") as f:
    assert json.load(f)["add_prefix_space"] is dummy_prefix
  for cls in (AutoTokenizer, LlamaTokenizer):
    hf_tok = cls.from_pretrained(str(tmp_path / "out"))
    for text in ("what colour is the circle", "a red square"):
      assert hf_tok(text)["input_ids"] == [model.tokenizer.bos_id] + model.tokenizer.encode(text), (cls, text)


def test_a_llama3_tokenizer_json_is_loaded_kept_and_exported(llava_dir, pixels, tmp_path):
  """A LLaVA directory with a Llama 3-style tokenizer.json (no tokenizer.model): vlm_jax.load reads it (ids from
  its tokenizer_config.json), generate decodes text with it, and both the vlm_jax checkpoint and the HF export
  carry it, the export as a tokenizer transformers reads with the same ids."""
  import shutil
  from transformers import AutoTokenizer
  from tests.hf_models import train_json_tokenizer
  path, _ = llava_dir
  src = tmp_path / "src"
  shutil.copytree(path, src)
  train_json_tokenizer(str(src), VOCAB - 10)
  model = vlm_jax.load(str(src))
  tok = model.tokenizer
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (VOCAB - 10, VOCAB - 9, -1)
  prefix = np.array([tok.encode_prefix("what colour")])
  ids = np.asarray(model.generate_ids(pixels[:1], prefix, max_new_tokens=6))[0]
  assert model.generate(pixels[:1], "what colour", max_new_tokens=6) == [tok.decode(ids)]
  model.save(str(tmp_path / "ckpt"))
  again = vlm_jax.load(str(tmp_path / "ckpt")).tokenizer
  assert (again.bos_id, again.eos_id) == (tok.bos_id, tok.eos_id) and again.encode("café 12") == tok.encode("café 12")
  model.save_hf(str(tmp_path / "out"))
  with open(tmp_path / "out" / "config.json") as f:
    text_config = json.load(f)["text_config"]
  assert (text_config["bos_token_id"], text_config["eos_token_id"]) == (tok.bos_id, tok.eos_id)
  hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
  assert (hf_tok.bos_token_id, hf_tok.eos_token_id) == (tok.bos_id, tok.eos_id)
  assert hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi"  # kept whole
  for text in ("what colour is the circle", " a  red café"):
    assert hf_tok(text)["input_ids"] == [tok.bos_id] + tok.encode(text)
  (src / "tokenizer_config.json").unlink()  # then the special ids are those config.json names
  tok = vlm_jax.load(str(src)).tokenizer
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (3, 4, 0)


def test_the_llava_config_with_an_image_token_id_exports_to_transformers(tmp_path):
  """configs/siglip_llama.py with model.image_token_id (the vocabulary one above the tokenizer's) builds a model
  that `save_hf` writes and transformers' LLaVA reads with the same logits; an id the tokenizer can produce, or
  one outside the vocabulary, is refused with the key's name, in training and at export."""
  import dataclasses
  import os
  from transformers import LlavaForConditionalGeneration
  from vlm_jax import config_util
  from vlm_jax.api import Model
  from vlm_jax.models.vlm import init_params
  from vlm_jax.train_setup import ALLOWED_KEYS, build_model_config, make_tokenizer, model_for_stage, normalize
  spec = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "siglip_llama.py")
  tok = make_tokenizer(config_util.load_config(spec))
  # as the README's command line gives them
  c = normalize(config_util.load_with_overrides(spec, [("model.llm.vocab_size", str(tok.vocab_size + 1)),
                                                       ("model.image_token_id", str(tok.vocab_size))], ALLOWED_KEYS))
  cfg = model_for_stage(build_model_config(c.model, tok), c.stages[0])
  assert cfg.image_token_id == tok.vocab_size
  model = Model(cfg, init_params(cfg, seed=3), tok)
  model.save_hf(str(tmp_path / "hf"))
  theirs = LlavaForConditionalGeneration.from_pretrained(str(tmp_path / "hf"), attn_implementation="eager").eval()
  size = cfg.img.image_size
  pixels = np.random.RandomState(0).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
  ids = np.concatenate([np.full((2, cfg.num_image_tokens), tok.vocab_size), TOKENS], axis=1)
  with torch.no_grad():
    ref = theirs(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2)).logits
  ours = model.logits(pixels, TOKENS, np.ones_like(TOKENS))
  assert rel_err(ours, ref[:, cfg.num_image_tokens:].float().numpy()) < 1e-4
  for bad in (tok.vocab_size - 1, tok.vocab_size + 1):
    c.model["image_token_id"] = bad
    with pytest.raises(ValueError, match=rf"config.model.image_token_id {bad}: it must lie in \[{tok.vocab_size}, "):
      build_model_config(c.model, tok)
  model.config = dataclasses.replace(cfg, image_token_id=tok.vocab_size - 1)
  with pytest.raises(ValueError, match=rf"a LLaVA export: config.image_token_id {tok.vocab_size - 1}: it must lie in"):
    model.save_hf(str(tmp_path / "hf2"))


def test_llava_config_errors_name_the_field(llava_dir, tmp_path):
  path, _ = llava_dir
  import dataclasses
  model = vlm_jax.load(path)
  model.config = dataclasses.replace(model.config, image_token_id=None)
  with pytest.raises(ValueError, match="a LLaVA export: config.image_token_id is not set: it must lie in"):
    model.save_hf(str(tmp_path / "x"))
  assert not (tmp_path / "x").exists()
  with open(f"{path}/config.json") as f:
    cfg = json.load(f)
  with pytest.raises(ValueError, match="vision_feature_layer=-2 is not supported"):
    hf_llava.config_from_hf({**cfg, "vision_feature_layer": -2})
  bad = {**cfg, "text_config": {k: v for k, v in cfg["text_config"].items() if k != "hidden_size"}}
  with pytest.raises(ValueError, match="hidden_size"):
    hf_llava.config_from_hf(bad)


def test_convert_cli_round_trips_llava(llava_dir, tmp_path):
  import os
  import subprocess
  import sys
  path, _ = llava_dir
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for args in (["--from", "hf", path, "--to", "vlm_jax", str(tmp_path / "ckpt")],
               ["--from", "vlm_jax", str(tmp_path / "ckpt"), "--to", "hf", str(tmp_path / "hf")]):
    proc = subprocess.run([sys.executable, "tools/convert.py", *args], cwd=repo, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
  theirs = {hf_files.canonical_name(k): v for k, v in safetensors_io.read(f"{path}/model.safetensors").items()}
  ours = {hf_files.canonical_name(k): v for k, v in safetensors_io.read(f"{tmp_path}/hf/model.safetensors").items()}
  assert sorted(ours) == sorted(theirs)
  for k in theirs:
    np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)


@pytest.mark.parametrize("field", ["vision_feature_layer", "vision_feature_select_strategy"])
def test_an_omitted_llava_field_means_the_transformers_default(llava_dir, field):
  """LlavaConfig's defaults (layer -2, strategy "default") are not what the converter supports: a config.json
  without the field is refused, not read as the supported value."""
  from transformers import LlavaConfig
  path, _ = llava_dir
  with open(f"{path}/config.json") as f:
    cfg = json.load(f)
  del cfg[field]
  default = getattr(LlavaConfig.from_dict(cfg), field)
  with pytest.raises(ValueError, match=rf"cfg.json: {field}={default!r} \(the default\) is not supported"):
    hf_llava.config_from_hf(cfg, source="cfg.json")


def test_llava_vision_activation_other_than_tanh_gelu_is_refused(llava_dir):
  path, _ = llava_dir
  with open(f"{path}/config.json") as f:
    cfg = json.load(f)
  cfg["vision_config"]["hidden_act"] = "quick_gelu"
  with pytest.raises(ValueError, match="cfg.json: vision_config.hidden_act 'quick_gelu' is not supported"):
    hf_llava.config_from_hf(cfg, source="cfg.json")


@pytest.mark.parametrize("where", ["text_config", "top level"])
def test_a_tie_flag_over_a_separate_head_keeps_the_head_as_transformers_does(llava_dir, pixels, tmp_path, where):
  """A config that ties the head over a file whose lm_head differs from the embedding: transformers keeps the
  file's head (and warns), so the import does too."""
  import shutil
  from transformers import LlavaForConditionalGeneration
  path = shutil.copytree(llava_dir[0], tmp_path / "tied")
  cfg = json.loads((path / "config.json").read_text())
  (cfg["text_config"] if where == "text_config" else cfg)["tie_word_embeddings"] = True
  (path / "config.json").write_text(json.dumps(cfg))
  theirs = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
  model = vlm_jax.load(str(path))
  assert not model.config.llm.tie_embeddings
  assert rel_err(model.logits(pixels, TOKENS, np.ones_like(TOKENS)), hf_logits(theirs, pixels, TOKENS)) < 1e-4


def test_the_top_level_tie_flag_ties_the_head(pixels, tmp_path):
  """LlavaConfig(tie_word_embeddings=True) leaves text_config's flag false and saves no lm_head: transformers ties
  by the top-level flag, and so does the import."""
  torch_model = tiny_llava(tie=True)
  torch_model.save_pretrained(tmp_path)
  assert "lm_head.weight" not in safetensors_io.read(str(tmp_path / "model.safetensors"))
  model = vlm_jax.load(str(tmp_path))
  assert model.config.llm.tie_embeddings
  assert rel_err(model.logits(pixels, TOKENS, np.ones_like(TOKENS)), hf_logits(torch_model, pixels, TOKENS)) < 1e-4
