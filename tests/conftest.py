import os

# Tests run on the CPU, deterministic and quiet, whatever the machine has.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import pytest

from tests import hf_models


@pytest.fixture(scope="session", params=["gemma", "gemma2"])
def hf_dir(request, tmp_path_factory):
  """A saved tiny random HF PaliGemma (every tensor randomised) and its torch model, per text family."""
  path = tmp_path_factory.mktemp(f"hf_{request.param}")
  model = hf_models.tiny_paligemma(request.param, seed=0)
  model.save_pretrained(path)
  return str(path), model


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory):
  """A small SentencePiece model trained here (Gemma's special ids and <loc>/<seg> pieces)."""
  return hf_models.train_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture
def rng():
  return np.random.RandomState(0)
