"""The public API: load / save round trips, generate on raw images, the tokenizer and its <loc> tokens."""
import dataclasses

import numpy as np
import pytest
from PIL import Image

import vlm_jax
from vlm_jax.api import Model
from vlm_jax.data.image import to_model_input
from vlm_jax.models.registry import get_model_config
from vlm_jax.models.vlm import init_params
from vlm_jax.tokenizer import SentencePieceTokenizer
from tests.test_model import randomize


@pytest.fixture(scope="module")
def model(tokenizer_file):
  cfg = get_model_config("tiny")
  return Model(cfg, randomize(init_params(cfg), seed=4), SentencePieceTokenizer(tokenizer_file))


def test_loc_tokens_are_single_ids(tokenizer_file):
  tok = SentencePieceTokenizer(tokenizer_file)
  answer = "<loc0064><loc0128><loc0512><loc0960> circle"
  ids = tok.encode(answer)
  assert [tok.sp.IdToPiece(i) for i in ids[:4]] == ["<loc0064>", "<loc0128>", "<loc0512>", "<loc0960>"]
  assert tok.decode(ids) == answer
  assert tok.decode(ids + [tok.eos_id, 7, 8]) == answer  # stops at EOS


def test_generate_accepts_pil_and_uint8_of_any_size_and_mode(model):
  rs = np.random.RandomState(0)
  rgb = rs.randint(0, 255, (40, 60, 3)).astype(np.uint8)
  images = [Image.fromarray(rgb), Image.fromarray(rgb).convert("L"), Image.fromarray(rgb).convert("RGBA"),
            rgb[:, :, :1].squeeze(-1)]
  out = model.generate(images, ["caption en", "what colour", "detect circle", "how many"], max_new_tokens=4)
  assert len(out) == 4 and all(isinstance(s, str) for s in out)
  # An RGB PIL image and its uint8 array are the same input.
  a = model.generate([Image.fromarray(rgb)], "caption en", max_new_tokens=5)
  b = model.generate(rgb[None], "caption en", max_new_tokens=5)
  assert a == b


def test_generate_reads_image_files_and_names_a_bad_one(model, tmp_path):
  rgb = np.random.RandomState(0).randint(0, 255, (40, 60, 3)).astype(np.uint8)
  Image.fromarray(rgb).save(tmp_path / "a.png")
  assert model.generate(str(tmp_path / "a.png"), "caption en", max_new_tokens=5) == \
      model.generate(rgb[None], "caption en", max_new_tokens=5)
  assert model.generate([tmp_path / "a.png"], "caption en", max_new_tokens=5) == \
      model.generate(rgb[None], "caption en", max_new_tokens=5)
  (tmp_path / "bad.png").write_bytes(b"not a png")
  with pytest.raises(ValueError, match=r"cannot load image .*bad.png"):
    model.generate([str(tmp_path / "bad.png")], "caption en")


def test_generate_uses_the_same_prefix_as_generate_ids(model):
  tok = model.tokenizer
  images = np.zeros((1, 28, 28, 3), np.uint8)
  ids = model.generate_ids(images, np.array([tok.encode_prefix("caption en")]), 6)
  assert model.generate(images, "caption en", max_new_tokens=6) == [tok.decode(np.asarray(ids)[0])]


def test_vlm_jax_checkpoint_round_trip(model, tmp_path):
  model.save(str(tmp_path / "ck"))
  loaded = vlm_jax.load(str(tmp_path / "ck"))
  assert loaded.config == model.config and loaded.tokenizer is not None
  tokens, mask_ar = np.array([[2, 5, 6, 7]]), np.array([[0, 0, 1, 1]])
  images = np.zeros((1, 28, 28, 3), np.float32)
  np.testing.assert_array_equal(loaded.logits(images, tokens, mask_ar), model.logits(images, tokens, mask_ar))


def test_bfloat16_checkpoint_keeps_its_dtype(model, tmp_path):
  model.with_dtype("bfloat16").save(str(tmp_path / "bf16"))
  loaded = vlm_jax.load(str(tmp_path / "bf16"))
  leaf = loaded.params["params"]["llm"]["final_norm"]["scale"]
  assert str(leaf.dtype) == "bfloat16" and loaded.config.llm.dtype == "bfloat16"
  out = loaded.generate(np.zeros((1, 30, 30, 3), np.uint8), "caption en", max_new_tokens=3)  # float32 path in
  assert len(out) == 1


def test_hf_export_carries_a_tokenizer_transformers_reads(model, tmp_path):
  from transformers import AutoTokenizer
  model.save_hf(str(tmp_path / "hf"))
  hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
  text = "detect red circle <loc0064><loc0128>"
  assert hf_tok(text)["input_ids"] == [model.tokenizer.bos_id] + model.tokenizer.encode(text)
  reloaded = vlm_jax.load(str(tmp_path / "hf"))
  assert reloaded.tokenizer is not None and reloaded.tokenizer.encode(text) == model.tokenizer.encode(text)


def test_hf_export_runs_in_transformers_with_its_processor(tmp_path):
  """AutoProcessor reads the export: its PaliGemmaProcessor makes our input ids (image tokens, BOS, prompt, newline)
  and pixels (from an image of another size and mode), and greedy generation in transformers gives our text. (With
  the main job's tokenizer: the small test one has no newline piece, which transformers' conversion of it adds.)"""
  import torch
  from transformers import AutoProcessor, PaliGemmaForConditionalGeneration
  from vlm_jax.data.synthetic import synthetic_tokenizer
  tok, cfg = synthetic_tokenizer(), get_model_config("tiny")
  cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, vocab_size=tok.vocab_size + 64))
  model = Model(cfg, randomize(init_params(cfg), seed=4), tok)
  model.save_hf(str(tmp_path / "hf"))
  processor = AutoProcessor.from_pretrained(str(tmp_path / "hf"))
  image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (45, 31), np.uint8))  # grey, not square
  prompt = "caption en"
  inputs = processor(text="<image>" + prompt, images=image, return_tensors="pt")
  n_image = model.config.img.num_patches
  assert inputs["input_ids"][0].tolist() == [processor.image_token_id] * n_image + model.tokenizer.encode_prefix(
      prompt)
  ours = to_model_input([image], model.image_size)[0]
  np.testing.assert_allclose(inputs["pixel_values"][0].permute(1, 2, 0).numpy(), ours, atol=1e-6)
  hf_model = PaliGemmaForConditionalGeneration.from_pretrained(str(tmp_path / "hf")).eval()
  with torch.inference_mode():
    out = hf_model.generate(**inputs, max_new_tokens=6, do_sample=False)
  theirs = processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
  assert theirs == model.generate([image], [prompt], max_new_tokens=6)[0] and theirs


def test_generate_without_tokenizer_is_a_clear_error():
  cfg = get_model_config("tiny")
  with pytest.raises(ValueError, match="no tokenizer"):
    Model(cfg, init_params(cfg)).generate(np.zeros((1, 28, 28, 3), np.uint8), "caption en")


def test_load_of_a_workdir_without_exported_model_says_so(tmp_path):
  (tmp_path / "checkpoints").mkdir()
  (tmp_path / "config.json").write_text("{}")  # the training config, not a model's
  with pytest.raises(ValueError, match="training workdir without an exported model/"):
    vlm_jax.load(str(tmp_path))


def test_every_entry_point_takes_a_training_workdir_as_its_exported_model(model, tmp_path):
  """One rule (checkpoint.model_dir) for vlm_jax.load, config.model.init, tools/convert.py and tools/eval.py."""
  import json
  import ml_collections
  from tools import convert, eval as eval_cli
  from vlm_jax import train_setup
  workdir = tmp_path / "run"
  (workdir / "checkpoints").mkdir(parents=True)
  (workdir / "config.json").write_text(json.dumps({"model": {"name": "tiny"}, "stages": []}))  # training config
  model.save(str(workdir / "model"))
  assert vlm_jax.load(str(workdir)).config == model.config
  model_cfg = ml_collections.ConfigDict({"init": str(workdir)})
  special = {f"{k}_id": v for k, v in model.tokenizer.special().items()}  # kept from the tokenizer
  assert train_setup.build_model_config(model_cfg, model.tokenizer) == dataclasses.replace(model.config, **special)
  config = ml_collections.ConfigDict({"model": {"init": str(workdir)}, "seed": 0})
  params = train_setup.initial_params(config, model.config, log=lambda *_: None)
  np.testing.assert_array_equal(params["llm"]["final_norm"]["scale"],
                                model.params["params"]["llm"]["final_norm"]["scale"])
  assert convert.read_model("vlm_jax", str(workdir), None).config == model.config
  assert eval_cli.default_out(str(workdir)) == str(workdir / "eval_results.json")
  (workdir / "model" / "checkpoints").mkdir()  # a model directory stays one, whatever it holds
  assert eval_cli.default_out(str(workdir / "model")) == str(workdir / "eval_results.json")


def test_eval_results_beside_a_remote_checkpoint_keep_its_url(monkeypatch):
  from tools import eval as eval_cli
  from vlm_jax import checkpoint
  monkeypatch.setattr(checkpoint, "is_workdir", lambda path: path == "gs://bucket/run")  # no network here
  assert eval_cli.default_out("gs://bucket/run/model/") == "gs://bucket/run/eval_results.json"
  assert eval_cli.default_out("gs://bucket/run") == "gs://bucket/run/eval_results.json"


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(model):
  from vlm_jax.data.synthetic import synthetic_tokenizer
  big = synthetic_tokenizer()
  assert big.vocab_size > model.config.llm.vocab_size
  with pytest.raises(ValueError, match=rf"tokenizer's {big.vocab_size} tokens do not fit the model's vocab_size"):
    Model(model.config, model.params, big)
  with pytest.raises(ValueError, match="do not fit"):
    model.tokenizer = big  # as tools/predict.py --tokenizer sets it
  small = dataclasses.replace(model.config, llm=dataclasses.replace(model.config.llm, vocab_size=100))
  with pytest.raises(ValueError, match="do not fit the model's vocab_size 100"):
    model.config = small
  assert model.tokenizer.vocab_size <= model.config.llm.vocab_size
