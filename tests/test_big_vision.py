"""big_vision .npz import on a file written here in big_vision's own layout."""
import ml_dtypes
import numpy as np
import pytest

import vlm_jax
from vlm_jax import treeutil
from vlm_jax.convert import big_vision
from tests import hf_models


def write_big_vision_npz(path, flat_params):
  """As big_vision saves: flat '/'-joined keys under params/, layers stacked on axis 0, and numpy writing
  bfloat16 arrays as void of itemsize 2 (we view them as V2 explicitly, which is what ends up on disk)."""
  arrays = {}
  for name, a in flat_params.items():
    a = np.asarray(a)
    arrays["params/" + name] = a.view(np.dtype("V2")) if a.dtype == ml_dtypes.bfloat16 else a
  np.savez(path, **arrays)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
  path = tmp_path_factory.mktemp("hf_for_bv")
  hf_models.tiny_paligemma("gemma2", seed=3).save_pretrained(path)
  return vlm_jax.load(str(path))


def test_npz_import_matches_source_model(hf_model, tmp_path):
  """A big_vision-layout file of a model's params (stored bfloat16) loads back to the same logits."""
  flat = {k: np.asarray(v).astype(ml_dtypes.bfloat16) for k, v in treeutil.flatten(hf_model.params["params"]).items()}
  assert flat["llm/layers/attn/q_einsum/w"].shape[0] == hf_model.config.llm.depth  # stacked layers
  npz = tmp_path / "pt_28.npz"
  write_big_vision_npz(npz, flat)
  with np.load(npz) as raw:  # the file really holds void, as big_vision's do
    assert raw["params/img/embedding/kernel"].dtype.kind == "V"

  loaded = vlm_jax.load(str(npz), config=hf_model.config)
  for name, value in treeutil.flatten(loaded.params["params"]).items():
    assert value.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(value), flat[name].astype(np.float32), err_msg=name)

  tokens = np.array([[2, 5, 6, 7, 8]])
  mask_ar = np.array([[0, 0, 0, 1, 1]])
  images = np.zeros((1, 28, 28, 3), np.float32)
  reference = hf_model.with_dtype("bfloat16").with_dtype("float32")  # same rounding as the file
  np.testing.assert_allclose(loaded.logits(images, tokens, mask_ar), reference.logits(images, tokens, mask_ar),
                             atol=1e-5)


def test_npz_without_params_prefix_loads(hf_model, tmp_path):
  flat = {k: np.asarray(v) for k, v in treeutil.flatten(hf_model.params["params"]).items()}
  np.savez(tmp_path / "bare.npz", **flat)
  loaded = big_vision.load(str(tmp_path / "bare.npz"), hf_model.config)
  np.testing.assert_array_equal(loaded["params"]["llm"]["final_norm"]["scale"],
                                np.asarray(hf_model.params["params"]["llm"]["final_norm"]["scale"]))


def test_npz_needs_a_config(hf_model, tmp_path):
  np.savez(tmp_path / "x.npz", a=np.zeros(2))
  with pytest.raises(ValueError, match="pass config="):
    vlm_jax.load(str(tmp_path / "x.npz"))


def test_recover_dtype():
  x = np.arange(6, dtype=np.float32).astype(ml_dtypes.bfloat16)
  assert big_vision.recover_dtype(x.view(np.dtype("V2"))).dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(big_vision.recover_dtype(x.view(np.dtype("V2"))), x)


def test_npz_of_another_resolution_resamples_the_position_embeddings(hf_model, tmp_path):
  """A checkpoint for a coarser patch grid (big_vision's 224 px ones, for a 448 px model) loads with its
  position embeddings resampled to the model's grid, as big_vision's loader does; the other params are as saved.
  A grid that is not square is refused, naming the file."""
  import dataclasses
  from vlm_jax.models.vit import resample_posemb
  flat = {k: np.asarray(v) for k, v in treeutil.flatten(hf_model.params["params"]).items()}
  write_big_vision_npz(tmp_path / "low.npz", flat)
  img = hf_model.config.img
  bigger = dataclasses.replace(hf_model.config, img=dataclasses.replace(img, image_size=2 * img.image_size))
  loaded = treeutil.flatten(big_vision.load(str(tmp_path / "low.npz"), bigger)["params"])
  assert loaded["img/pos_embedding"].shape == (1, 4 * img.num_patches, img.width)
  np.testing.assert_allclose(loaded["img/pos_embedding"], resample_posemb(flat["img/pos_embedding"], 2 * img.grid))
  assert all(np.array_equal(loaded[k], v) for k, v in flat.items() if k != "img/pos_embedding")
  flat["img/pos_embedding"] = flat["img/pos_embedding"][:, :-1]
  write_big_vision_npz(tmp_path / "odd.npz", flat)
  with pytest.raises(ValueError, match=r"odd.npz: img/pos_embedding of shape .*: pos_embedding has \d+ tokens, not"):
    big_vision.load(str(tmp_path / "odd.npz"), bigger)
