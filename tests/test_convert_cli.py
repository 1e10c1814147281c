"""tools/convert.py run as a user would: a subprocess from the repo root, checked through its output files."""
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from tests import hf_models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join("tools", "convert.py")


def run_cli(*args, timeout=300, **extra_env):
  """(returncode, stdout, stderr) of the CLI. PYTHONPATH is dropped: the script must find the package itself."""
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
  env.update(extra_env)
  p = subprocess.run([sys.executable, SCRIPT, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=timeout)
  return p.returncode, p.stdout, p.stderr


def assert_ok(rc, stderr):
  assert rc == 0, stderr
  assert "Traceback" not in stderr


def assert_user_error(rc, stderr):
  """A clean failure: status 2, a message, no Python traceback."""
  assert rc == 2, stderr
  assert "error:" in stderr
  assert "Traceback" not in stderr


def safetensors_dtypes(path) -> set:
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
  header.pop("__metadata__", None)
  return {info["dtype"] for info in header.values()}


@pytest.fixture(scope="module")
def hf_gemma(tmp_path_factory):
  """One saved tiny random HF PaliGemma (Gemma 1 text) and its float32 state dict."""
  path = tmp_path_factory.mktemp("hf_src")
  model = hf_models.tiny_paligemma("gemma", seed=0)
  model.save_pretrained(path)
  return path, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def bv_npz(tmp_path_factory):
  """A big_vision-layout .npz (params/img/..., params/llm/...) of random `tiny` params, and those params.

  Shapes come from `init_params` under eval_shape (running it eagerly takes seconds); values are random
  everywhere, norm scales included, so a dropped or swapped tensor shows up.
  """
  import jax
  from vlm_jax import treeutil
  from vlm_jax.models.registry import get_model_config
  from vlm_jax.models.vlm import init_params
  shapes = treeutil.flatten(jax.eval_shape(lambda: init_params(get_model_config("tiny"))))
  rs = np.random.RandomState(0)
  flat = {k: rs.normal(size=v.shape).astype(v.dtype) for k, v in shapes.items()}
  assert all(k.startswith(("params/img/", "params/llm/")) for k in flat)
  path = tmp_path_factory.mktemp("bv") / "tiny.npz"
  np.savez(path, **flat)
  return path, flat


def test_help_mentions_every_flag():
  rc, out, err = run_cli("--help")
  assert_ok(rc, err)
  for word in ("--from", "--to", "--dtype", "--config", "hf", "big_vision", "vlm_jax", "bfloat16", "float32",
               "tiny", "paligemma_3b_224", "examples"):
    assert word in out, word


def test_hf_to_vlm_jax_to_hf_is_exact(hf_gemma, tmp_path):
  from transformers import PaliGemmaForConditionalGeneration
  src, want = hf_gemma
  ckpt, out = tmp_path / "ckpt", tmp_path / "hf"
  rc, _, err = run_cli("--from", "hf", src, "--to", "vlm_jax", ckpt)
  assert_ok(rc, err)
  assert "params" in err and "done in" in err  # the progress lines
  assert (ckpt / "vlm_config.json").is_file()
  rc, _, err = run_cli("--from", "hf", ckpt, "--to", "hf", out)  # the wrong --from: nothing is written
  assert_user_error(rc, err)
  assert f"{ckpt} holds a vlm_jax checkpoint, not hf: pass --from vlm_jax." in err and not out.exists()
  rc, _, err = run_cli("--from", "vlm_jax", ckpt, "--to", "hf", out)
  assert_ok(rc, err)
  got = PaliGemmaForConditionalGeneration.from_pretrained(out).state_dict()
  assert sorted(got) == sorted(want)
  for k, v in want.items():
    assert got[k].dtype == v.dtype, k
    assert np.array_equal(got[k].numpy(), v.numpy()), k


def test_hf_to_hf_bfloat16(hf_gemma, tmp_path):
  import torch
  from transformers import PaliGemmaForConditionalGeneration
  src, want = hf_gemma
  out = tmp_path / "hf_bf16"
  # Progress bars show for large files; the threshold is lowered so this tiny one counts as large.
  rc, _, err = run_cli("--from", "hf", src, "--to", "hf", out, "--dtype", "bfloat16", VLM_JAX_PROGRESS_MIN_BYTES="0")
  assert_ok(rc, err)
  assert "reading model.safetensors" in err and "writing model.safetensors" in err
  assert safetensors_dtypes(out / "model.safetensors") == {"BF16"}
  got = PaliGemmaForConditionalGeneration.from_pretrained(out, dtype=torch.bfloat16).state_dict()
  for k, v in want.items():  # both sides round float32 to nearest-even bfloat16
    assert torch.equal(got[k], v.to(torch.bfloat16)), k
  rc, _, err = run_cli("--from", "hf", src, "--to", "hf", out)  # refused before reading anything
  assert_user_error(rc, err)
  assert f"{out} exists and is not an empty directory" in err and "reading" not in err


def test_big_vision_with_config(bv_npz, tmp_path):
  from vlm_jax import checkpoint, treeutil
  npz, want = bv_npz
  out = tmp_path / "ckpt"
  rc, _, err = run_cli("--from", "big_vision", npz, "--to", "vlm_jax", out, "--config", "tiny")
  assert_ok(rc, err)
  assert "tiny" in err
  cfg, params, _ = checkpoint.load_model(str(out))
  assert cfg.name == "tiny"
  got = treeutil.flatten(params)
  assert sorted(got) == sorted(want)
  for k, v in want.items():
    np.testing.assert_array_equal(np.asarray(got[k]), v, err_msg=k)


def test_big_vision_without_config_fails_clearly(bv_npz, tmp_path):
  rc, _, err = run_cli("--from", "big_vision", bv_npz[0], "--to", "hf", tmp_path / "out")
  assert_user_error(rc, err)
  assert "--config" in err


def test_integer_weights_in_an_npz_are_refused(bv_npz, tmp_path):
  """bfloat16 bits stored as uint16 would load as numbers: garbage weights. The key and dtype are named."""
  with np.load(bv_npz[0]) as npz:
    arrays = dict(npz)
  name = next(k for k in arrays if k.endswith("pos_embedding"))
  arrays[name] = arrays[name].astype(np.float32).view(np.uint32)
  np.savez(tmp_path / "ints.npz", **arrays)
  rc, _, err = run_cli("--from", "big_vision", tmp_path / "ints.npz", "--to", "vlm_jax", tmp_path / "out",
                       "--config", "tiny")
  assert_user_error(rc, err)
  assert "weights must be floating point" in err and f"'{name.removeprefix('params/')}': 'uint32'" in err


def test_mismatched_config_names_key_and_shapes(bv_npz, tmp_path):
  out = tmp_path / "out"
  rc, _, err = run_cli("--from", "big_vision", bv_npz[0], "--to", "hf", out, "--config", "tiny_gemma2")
  assert_user_error(rc, err)
  assert "expected shape" in err
  assert "llm/layers/attn/kv_einsum/w" in err  # tiny has 1 KV head, tiny_gemma2 has 2
  assert not out.exists()


def test_encoder_decoder_converts_to_vlm_jax_and_refuses_hf_clearly(tmp_path):
  """A T5 / UL2 model: bfloat16 vlm_jax copy exact to the cast; no transformers class holds it, which the
  HF export says without a traceback."""
  import jax
  import jax.numpy as jnp
  from vlm_jax import checkpoint, treeutil
  from vlm_jax.api import Model
  from vlm_jax.models.registry import get_model_config
  from vlm_jax.models.vlm import init_params
  cfg = get_model_config("tiny_t5")
  params = init_params(cfg, seed=1)
  Model(cfg, params).save(str(tmp_path / "src"))
  rc, _, err = run_cli("--from", "vlm_jax", tmp_path / "src", "--to", "vlm_jax", tmp_path / "bf16", "--dtype",
                       "bfloat16")
  assert_ok(rc, err)
  assert f"text {cfg.llm.width}x{cfg.llm.encoder_depth}+{cfg.llm.decoder_depth}" in err
  _, got, _ = checkpoint.load_model(str(tmp_path / "bf16"))
  want = treeutil.flatten(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))
  got = treeutil.flatten(got)
  assert sorted(got) == sorted(want)
  for k in want:
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=k)
  rc, _, err = run_cli("--from", "vlm_jax", tmp_path / "src", "--to", "hf", tmp_path / "hf")
  assert_user_error(rc, err)
  assert not (tmp_path / "hf").exists()


def test_hf_to_hf_keeps_a_bfloat16_source_bfloat16(tmp_path):
  """Without --dtype, an HF source's stored dtype (its config.json's) is kept, not doubled to float32."""
  import torch
  src, out = tmp_path / "bf16", tmp_path / "out"
  hf_models.tiny_paligemma("gemma").to(torch.bfloat16).save_pretrained(src)
  assert json.loads((src / "config.json").read_text())["dtype"] == "bfloat16"
  rc, _, err = run_cli("--from", "hf", src, "--to", "hf", out)
  assert_ok(rc, err)
  assert "in bfloat16" in err
  assert safetensors_dtypes(out / "model.safetensors") == {"BF16"}
  assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_bad_attention_heads_are_a_clear_error(hf_gemma, tmp_path):
  import shutil
  src = shutil.copytree(hf_gemma[0], tmp_path / "src")
  config = json.loads((src / "config.json").read_text())
  config["text_config"]["num_key_value_heads"] = 3
  (src / "config.json").write_text(json.dumps(config))
  rc, _, err = run_cli("--from", "hf", src, "--to", "vlm_jax", tmp_path / "out")
  assert_user_error(rc, err)
  assert f"{src / 'config.json'}: text_config (num_attention_heads, num_key_value_heads" in err
  assert "num_heads 4 is not a multiple of num_kv_heads 3" in err
