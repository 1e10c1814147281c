"""Bad input gets a clear error naming the file, field or key."""
import json
import os
import shutil

import numpy as np
import pytest

import vlm_jax
from vlm_jax import checkpoint
from vlm_jax.api import Model
from vlm_jax.models.registry import get_model_config
from vlm_jax.models.vlm import init_params


@pytest.fixture(scope="module")
def hf_copy_source(tmp_path_factory):
  from tests import hf_models
  path = tmp_path_factory.mktemp("hf_src")
  hf_models.tiny_paligemma("gemma", seed=1).save_pretrained(path)
  return str(path)


@pytest.fixture
def hf_copy(hf_copy_source, tmp_path):
  dst = str(tmp_path / "hf")
  shutil.copytree(hf_copy_source, dst)
  return dst


def test_truncated_safetensors(hf_copy):
  file = os.path.join(hf_copy, "model.safetensors")
  size = os.path.getsize(file)
  with open(file, "r+b") as f:
    f.truncate(size - 1000)
  with pytest.raises(ValueError, match=r"model\.safetensors: truncated safetensors file"):
    vlm_jax.load(hf_copy)


def test_safetensors_with_garbage_header(hf_copy):
  with open(os.path.join(hf_copy, "model.safetensors"), "wb") as f:
    f.write(b"\x00" * 3)
  with pytest.raises(ValueError, match="truncated safetensors file"):
    vlm_jax.load(hf_copy)


@pytest.mark.parametrize("field", ["text_config.num_hidden_layers", "vision_config.patch_size", "text_config"])
def test_config_json_missing_field(hf_copy, field):
  file = os.path.join(hf_copy, "config.json")
  with open(file) as f:
    cfg = json.load(f)
  node = cfg
  *parents, last = field.split(".")
  for p in parents:
    node = node[p]
  del node[last]
  with open(file, "w") as f:
    json.dump(cfg, f)
  with pytest.raises(ValueError, match=rf"config\.json: missing field.*{field}"):
    vlm_jax.load(hf_copy)


def test_malformed_config_json(hf_copy):
  with open(os.path.join(hf_copy, "config.json"), "w") as f:
    f.write('{"model_type": "paligemma",')
  with pytest.raises(ValueError, match=r"config\.json: malformed JSON"):
    vlm_jax.load(hf_copy)


def test_hf_checkpoint_that_does_not_fit(hf_copy):
  """A config.json that disagrees with the tensors: the error names the key, expected and found shapes."""
  file = os.path.join(hf_copy, "config.json")
  with open(file) as f:
    cfg = json.load(f)
  cfg["text_config"]["intermediate_size"] = 96
  with open(file, "w") as f:
    json.dump(cfg, f)
  with pytest.raises(ValueError) as e:
    vlm_jax.load(hf_copy)
  assert "does not fit the model" in str(e.value)
  assert "language_model.layers.0.mlp.gate_proj.weight: expected shape (96, 64), found (128, 64)" in str(e.value)


def test_vlm_jax_checkpoint_that_does_not_fit(tmp_path):
  cfg = get_model_config("tiny")
  Model(cfg, init_params(cfg)).save(str(tmp_path / "ck"))
  with pytest.raises(ValueError, match=r"kv_einsum/w: expected shape \(2, 2, 2, 64, 16\), found \(2, 2, 1, 64, 16\)"):
    checkpoint.load_model(str(tmp_path / "ck"), get_model_config("tiny_gemma2"))


def test_save_never_overwrites(tmp_path):
  cfg = get_model_config("tiny")
  model = Model(cfg, init_params(cfg))
  (tmp_path / "ck").mkdir()
  (tmp_path / "ck" / "keep.txt").write_text("x")
  with pytest.raises(FileExistsError):
    model.save(str(tmp_path / "ck"))
  with pytest.raises(FileExistsError):
    model.save_hf(str(tmp_path / "ck"))
  assert os.listdir(tmp_path / "ck") == ["keep.txt"]


def test_images_of_wrong_rank(tmp_path):
  cfg = get_model_config("tiny")
  model = Model(cfg, init_params(cfg))
  tokens, mask_ar = np.array([[2, 5, 6]]), np.array([[0, 0, 1]])
  with pytest.raises(ValueError, match=r"images must have rank 4, got shape \(28, 28, 3\)"):
    model.logits(np.zeros((28, 28, 3), np.float32), tokens, mask_ar)
  with pytest.raises(ValueError, match=r"images must be a batch"):
    model.generate_ids(np.zeros((28, 28, 3), np.uint8), tokens, 2)
  with pytest.raises(ValueError, match=r"got shape \(1, 28, 28, 3, 1\)"):
    model.logits(np.zeros((1, 28, 28, 3, 1), np.float32), tokens, mask_ar)


def test_unknown_path_and_unknown_config(tmp_path):
  with pytest.raises(FileNotFoundError):
    vlm_jax.load(str(tmp_path / "nope"))
  with pytest.raises(ValueError, match="neither a HF PaliGemma / LLaVA directory"):
    vlm_jax.load(str(tmp_path))
  with pytest.raises(ValueError, match="Unknown model config 'paligemma_99b'"):
    get_model_config("paligemma_99b")
