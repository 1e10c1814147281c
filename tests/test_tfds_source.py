"""TFDS sources on an ArrayRecord dataset the test builds (no TensorFlow, no download)."""
import io

import numpy as np
import pytest
from PIL import Image

from vlm_jax.data.pipeline import make_train_iterator
from vlm_jax.data.tfds_source import TfdsSource
from vlm_jax.tokenizer import SentencePieceTokenizer


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  import tensorflow_datasets as tfds

  class TinyVqa(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)), "question": tfds.features.Text(),
          "answers": tfds.features.Sequence(tfds.features.Text())}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(6)}

    def _generate_examples(self, n):
      for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(np.full((10, 14, 3), 40 * i, np.uint8)).save(buf, format="PNG")
        yield i, {"image": buf.getvalue(), "question": f"what shade {i}", "answers": [f"shade {i}", "grey"]}

  path = str(tmp_path_factory.mktemp("tfds"))
  TinyVqa(data_dir=path, file_format="array_record").download_and_prepare()
  return path


FIELDS = dict(image="image", prompt="question", answer="answers")


def test_records_map_onto_turns(data_dir):
  src = TfdsSource("tiny_vqa", data_dir=data_dir, fields=FIELDS)
  assert len(src) == 6
  by_prompt = {src[i]["turns"][0][0]: src[i] for i in range(6)}
  ex = by_prompt["what shade 2"]
  assert ex["turns"] == [("what shade 2", "shade 2")]  # trains on the first of the reference answers
  assert ex["answers"] == ["shade 2", "grey"]  # evaluators score against all of them
  assert ex["image"].shape == (10, 14, 3) and int(ex["image"][0, 0, 0]) == 80


def test_literal_prompt_and_pipeline(data_dir, tokenizer_file):
  cfg = dict(kind="tfds", name="tiny_vqa", data_dir=data_dir, fields=dict(FIELDS, prompt="=caption en"))
  it, _ = make_train_iterator(cfg, SentencePieceTokenizer(tokenizer_file), 16, 16, 2, seed=0)
  batch = next(it)
  assert batch["image"].shape == (2, 16, 16, 3) and batch["mask_loss"].sum() > 0


def test_clear_errors(data_dir):
  with pytest.raises(ValueError, match=r"has no feature 'caption' \(for answer\)"):
    TfdsSource("tiny_vqa", data_dir=data_dir, fields=dict(FIELDS, answer="caption"))
  with pytest.raises(ValueError, match="cannot open TFDS dataset 'nope'"):
    TfdsSource("nope", data_dir=data_dir)


def test_a_dataset_not_prepared_is_an_error_not_a_download(tmp_path):
  """mnist is a registered builder with nothing prepared in this data_dir: TFDS's default would download it
  (here: retries against an unreachable server, and a half-written data_dir)."""
  with pytest.raises(ValueError, match="cannot open TFDS dataset 'mnist' split 'train' in "):
    TfdsSource("mnist", data_dir=str(tmp_path))
  assert not (tmp_path / "downloads").exists()
