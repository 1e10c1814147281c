"""The shared decode loop on models: beam search, best-of-n, scores, ragged batches, the cache, compile-once
buckets, meshes (the token pickers on plain logits and tables are in test_samplers.py)."""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax import decode as decode_lib
from vlm_jax import sharding
from vlm_jax.api import Model
from vlm_jax.models.registry import get_model_config
from vlm_jax.models.vlm import init_params, model_for, per_layer
from tests.test_model import randomize

FAMILIES = ["tiny", "tiny_llama_mlp", "tiny_llama_resampler", "tiny_t5"]  # Gemma, LLaVA-style x2, PaLI-3-style


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
  """Each model family through the same decode loop."""
  cfg = get_model_config(request.param)
  return Model(cfg, randomize(init_params(cfg), seed=1))


@pytest.fixture(scope="module")
def tiny_model():
  cfg = get_model_config("tiny")
  return Model(cfg, randomize(init_params(cfg), seed=1))


@pytest.fixture(scope="module")
def images():
  return np.random.RandomState(0).uniform(-1, 1, (2, 28, 28, 3)).astype(np.float32)


PREFIX = np.array([[2, 5, 6, 7, 8, 9], [2, 12, 13, 0, 0, 0]])


N_NEW, LENGTH = 6, 16  # one decode length and one full-pass length: each family compiles few programs


def full_pass_logits(model, image, tokens, n_prefix):
  """float32 [len(tokens), V] logits of one row by a full forward pass (no cache), padded to LENGTH."""
  padded = np.zeros((1, LENGTH), np.int32)
  padded[0, :len(tokens)] = tokens
  mask_ar = (np.arange(LENGTH) >= n_prefix).astype(np.int32)[None]
  mask_input = (np.arange(LENGTH) < len(tokens)).astype(np.int32)[None]
  return np.asarray(model.logits(image, padded, mask_ar, mask_input)[0, :len(tokens)])


def teacher_forced_logp(model, image, prefix_row, out_row):
  """Summed log-probs of the generated tokens by one full forward pass."""
  prefix, gen = [t for t in prefix_row if t], list(out_row)
  logp = jax.nn.log_softmax(full_pass_logits(model, image, prefix + gen, len(prefix)))
  return float(sum(logp[len(prefix) - 1 + i, tok] for i, tok in enumerate(gen)))


BEAM = dict(eos_id=-1, sampler="beam", beam_size=3, length_penalty=0.0, return_scores=True)


def test_beam_size_1_equals_greedy(tiny_model, images):
  """`decode` runs beam_size 1 as greedy; beam search itself with one beam, on the model, agrees."""
  m = tiny_model
  greedy, greedy_score = m.generate_ids(images, PREFIX, N_NEW, eos_id=-1, length_penalty=0.0, return_scores=True)
  logits, cache, extend = decode_lib.prefill(m.config, m.params, images, PREFIX, PREFIX > 0, N_NEW)
  beam1, beam1_score = decode_lib.beam_loop(extend, logits, cache, beam_size=1, max_new_tokens=N_NEW,
                                            length_penalty=0.0, eos_id=-1, pad_id=0)
  np.testing.assert_array_equal(greedy, beam1)
  np.testing.assert_allclose(beam1_score, greedy_score, rtol=1e-5)


def test_cached_decode_and_scores_equal_full_passes(model, images):
  """Greedy tokens from the cached loop equal re-running the full forward pass for every new token, and greedy
  and beam scores equal the teacher-forced log-probs of their sequences."""
  greedy, g_score = model.generate_ids(images, PREFIX, N_NEW, eos_id=-1, length_penalty=0.0, return_scores=True)
  beam, b_score = model.generate_ids(images, PREFIX, N_NEW, **BEAM)
  for i in range(2):
    tokens = [t for t in PREFIX[i] if t]
    n_prefix = len(tokens)
    for _ in range(N_NEW):
      tokens.append(int(np.argmax(full_pass_logits(model, images[i:i + 1], tokens, n_prefix)[-1])))
    assert list(np.asarray(greedy)[i]) == tokens[n_prefix:]
    ref = teacher_forced_logp(model, images[i:i + 1], PREFIX[i], np.asarray(greedy)[i])
    assert float(g_score[i]) == pytest.approx(ref, rel=1e-4)
    ref = teacher_forced_logp(model, images[i:i + 1], PREFIX[i], np.asarray(beam)[i])
    assert float(b_score[i]) == pytest.approx(ref, rel=1e-4)


def test_ragged_batch_equals_one_by_one(model, images):
  greedy = np.asarray(model.generate_ids(images, PREFIX, N_NEW, eos_id=-1))
  beam, scores = model.generate_ids(images, PREFIX, N_NEW, **BEAM)
  for i in range(2):
    row = PREFIX[i:i + 1, :int((PREFIX[i] > 0).sum())]
    np.testing.assert_array_equal(greedy[i], np.asarray(model.generate_ids(images[i:i + 1], row, N_NEW,
                                                                           eos_id=-1))[0])
    alone, score = model.generate_ids(images[i:i + 1], row, N_NEW, **BEAM)
    np.testing.assert_array_equal(np.asarray(beam)[i], np.asarray(alone)[0])
    assert float(scores[i]) == pytest.approx(float(score[0]), rel=1e-5)


def test_best_of_n_keeps_the_best_of_the_same_draws(tiny_model, images):
  model = tiny_model
  kw = dict(sampler="sample", temperature=1.5, seed=7, eos_id=-1, return_scores=True)
  best, best_score = model.generate_ids(images, PREFIX, 5, best_of=3, **kw)
  again, _ = model.generate_ids(images, PREFIX, 5, best_of=3, **kw)
  np.testing.assert_array_equal(best, again)  # seeds reproduce
  # The same three draws per row (draw j of row r: key fold_in(fold_in(key(7), r), j)), made as a batch of
  # repeated rows with one sample each.
  rows = np.repeat(np.arange(2), 3)
  keys = jax.vmap(jax.random.fold_in)(decode_lib.row_keys(jax.random.key(7), 2)[rows], np.tile(np.arange(3), 2))
  draws, scores = decode_lib.decode(model.config, model.params, model._images(images, 2)[rows], PREFIX[rows],
                                    (PREFIX[rows] > 0).astype(np.int32), keys, max_new_tokens=5,
                                    sampling=decode_lib.Sampling.make("sample", temperature=1.5), eos_id=-1,
                                    return_scores=True)
  scores = np.asarray(scores).reshape(2, 3)
  pick = scores.argmax(1)
  np.testing.assert_array_equal(best, np.asarray(draws).reshape(2, 3, -1)[np.arange(2), pick])
  np.testing.assert_allclose(best_score, scores.max(1), rtol=1e-6)


def test_a_sampled_row_depends_on_its_key_not_on_its_batch(tiny_model, images):
  """Row r of a batch samples with fold_in(key, r): decoded alone with that key, it gives the same tokens."""
  kw = dict(sampler="sample", temperature=1.5, top_k=20, seed=3, eos_id=-1)
  batch = np.asarray(tiny_model.generate_ids(images, PREFIX, 6, **kw))
  assert not np.array_equal(batch, np.asarray(tiny_model.generate_ids(images, PREFIX, 6, **{**kw, "seed": 4})))
  key_1 = decode_lib.row_keys(jax.random.key(3), 2)[1:]
  alone = decode_lib.decode(tiny_model.config, tiny_model.params, tiny_model._images(images[1:], 1), PREFIX[1:, :3],
                            np.ones((1, 3), np.int32), key_1, max_new_tokens=6,
                            sampling=decode_lib.Sampling.make("sample", temperature=1.5, top_k=20), eos_id=-1)
  np.testing.assert_array_equal(batch[1], np.asarray(alone)[0])
  # generate_ids' first_row: a batch that starts at row 1 of a longer list samples row 1 as the whole list does.
  part = tiny_model.generate_ids(images[1:], PREFIX[1:, :3], 6, first_row=1, **kw)
  np.testing.assert_array_equal(batch[1], np.asarray(part)[0])
  with pytest.raises(ValueError, match=r"one key per row \(2\), got shape \(3,\)"):
    decode_lib.row_keys(jax.random.split(jax.random.key(0), 3), 2)


def test_sampling_options_are_validated():
  """An option the chosen sampler would ignore is an error naming it, not a silent no-op."""
  for option in (dict(temperature=0.7), dict(top_k=2), dict(top_p=0.5), dict(best_of=2)):
    with pytest.raises(ValueError, match="beam search is deterministic: it takes no temperature, top_k, top_p"):
      decode_lib.Sampling.make("beam", **option)
    with pytest.raises(ValueError, match="sampler='greedy' takes no temperature, top_k, top_p, beam_size"):
      decode_lib.Sampling.make("greedy", **option)
  with pytest.raises(ValueError, match="sampler='sample' takes no beam_size; use sampler='beam'"):
    decode_lib.Sampling.make("sample", beam_size=2)
  assert decode_lib.Sampling.make("greedy", top_k=0, top_p=1.0, length_penalty=0.5).length_penalty == 0.5
  with pytest.raises(ValueError, match="best_of needs sampling"):
    decode_lib.Sampling(best_of=2)
  with pytest.raises(ValueError, match="Unknown sampler"):
    decode_lib.Sampling.make("nucleus")


def test_gather_cache_takes_batch_rows_in_both_cache_layouts():
  """Beam search and best-of reorder cache rows: stacked [L, B, ...] "kv" leaves along axis 1, the decode loop's
  per-layer list of [B, ...] caches along axis 0, everything else along axis 0, scalars untouched."""
  rs = np.random.RandomState(0)
  k_LBSH = rs.randn(2, 3, 5, 4).astype(np.float32)
  valid_BS = rs.rand(3, 5) > 0.5
  rows = jnp.asarray([2, 2, 0])
  stacked = {"kv": {"k": k_LBSH}, "key_valid": valid_BS, "index": jnp.int32(4)}
  per_layer = {"kv": [{"k": k_LBSH[0]}, {"k": k_LBSH[1]}], "key_valid": valid_BS, "index": jnp.int32(4)}
  got_stacked = decode_lib.gather_cache(stacked, rows)
  got_per_layer = decode_lib.gather_cache(per_layer, rows)
  np.testing.assert_array_equal(got_stacked["kv"]["k"], k_LBSH[:, [2, 2, 0]])
  for i in range(2):
    np.testing.assert_array_equal(got_per_layer["kv"][i]["k"], k_LBSH[i, [2, 2, 0]])
  for got in (got_stacked, got_per_layer):
    np.testing.assert_array_equal(got["key_valid"], valid_BS[[2, 2, 0]])
    assert int(got["index"]) == 4


class CompileCounter:
  """Counts XLA backend compilations while active."""

  def __init__(self):
    self.count, self.active = 0, False
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event, duration, **kw):
    if self.active and event == "/jax/core/compile/backend_compile_duration":
      self.count += 1


COMPILES = CompileCounter()


@pytest.mark.parametrize("rows", [2, 1])
def test_decode_steps_update_the_kv_cache_in_place(model, images, rows):
  """Every layer's cache is carried through the loop and written one slot per step: the compiled decode copies or
  transposes no whole cache layer (XLA CPU did, at every step, for a [B, S, K, H] cache and for MQA's size-1 head
  axis: see layers.update_cache); at batch 1, at most one copy of each (four before `decode.loop_carry`).
  Families: MQA Gemma, GQA Llama, T5 (a head per kv head)."""
  cfg, params = per_layer(model.config, model.params)
  images, prefix = images[:rows], PREFIX[:rows]
  n = 300  # slots: a cache layer's size is then unlike any other array's
  _, cache = jax.eval_shape(lambda p: model_for(cfg).apply(p, images, prefix, prefix > 0, n, method="start"), params)
  slots = max(leaf.shape[-2] for leaf in jax.tree.leaves(cache["kv"]))  # T5's cross-attention keys: fewer
  layers = [leaf.size for leaf in jax.tree.leaves(cache["kv"]) if leaf.shape[-2] == slots]
  assert layers
  hlo = jax.jit(lambda p: decode_lib.decode(model.config, p, images, prefix, prefix > 0, jax.random.key(0),
                                            max_new_tokens=n, eos_id=-1)).lower(model.params).compile().as_text()
  moves = [(op, dims) for dims, op in re.findall(r"= f32\[([\d,]*)\]\S* (copy|transpose)\(", hlo)
           if math.prod(int(d) for d in dims.split(",")) in layers]
  assert len(moves) <= (0 if rows > 1 else len(layers)), moves


def test_second_batch_of_a_bucket_does_not_compile(tiny_model, images):
  model = tiny_model
  rs = np.random.RandomState(3)
  prompts = lambda: np.concatenate([np.full((2, 1), 2), rs.randint(3, 200, (2, 4))], axis=1)
  for sampler in [dict(), dict(sampler="beam", beam_size=3)]:
    model.generate_ids(images, prompts(), 6, **sampler).block_until_ready()  # the bucket's first batch compiles
    COMPILES.active = True
    try:
      # New contents, other prompt lengths within the same 16-token bucket: no compilation.
      model.generate_ids(images * 0.5, prompts(), 6, **sampler).block_until_ready()
      model.generate_ids(images, prompts()[:, :3], 6, **sampler).block_until_ready()
    finally:
      COMPILES.active = False
    assert COMPILES.count == 0, sampler
  COMPILES.active = True
  try:  # the counter does see compilations: a new bucket (more new tokens) compiles
    model.generate_ids(images, prompts(), 7).block_until_ready()
  finally:
    COMPILES.active = False
  assert COMPILES.count >= 1


MESH_SCRIPT = r"""
import json, sys
import numpy as np
import ml_collections
from vlm_jax import evaluate
from vlm_jax.api import Model
from vlm_jax.data.synthetic import synthetic_tokenizer
from vlm_jax.models.registry import get_model_config
from vlm_jax.models.vlm import init_params
from tests.test_model import randomize
import dataclasses
tok = synthetic_tokenizer()
cfg = get_model_config("tiny")
cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, vocab_size=tok.vocab_size))
model = Model(cfg, randomize(init_params(cfg), seed=4), tok)
rs = np.random.RandomState(0)
images = rs.uniform(-1, 1, (3, 28, 28, 3)).astype(np.float32)
prefix = np.array([[2, 5, 6, 7, 8, 9], [2, 12, 13, 0, 0, 0], [2, 40, 41, 42, 0, 0]])
# batch_size 3 is rounded up to the mesh's 4 data rows.
eval_cfg = ml_collections.ConfigDict(dict(name="val", metrics=["exact_match", "perplexity"], batch_size=3,
    max_new_tokens=5, prefix_len=12, text_len=20,
    data=dict(kind="synthetic", split="val", num_examples=6, seed=0, grid=2, image_size=32)))
# Which sharding the evaluator's decode inputs (images) arrive with.
from vlm_jax import decode as decode_lib
seen, plain_decode = [], decode_lib.decode
def spy(cfg, params, images, *args, **kw):
  spec = getattr(images.sharding, "spec", None)
  seen.append("one device" if spec is None else f"rows over {spec[0]}")
  return plain_decode(cfg, params, images, *args, **kw)
evaluate.decode_lib.decode = spy
out = {"seen": seen}
for name, m in [("one", model), ("mesh", model.shard({"data": 2, "fsdp": 2, "tensor": 2}))]:
  out[name] = {
      "greedy": np.asarray(m.generate_ids(images, prefix, 6, eos_id=-1)).tolist(),
      "beam": np.asarray(m.generate_ids(images, prefix, 6, eos_id=-1, sampler="beam", beam_size=3)).tolist(),
      "eval": evaluate.evaluate(m.config, m.params, tok, eval_cfg, mesh=m.mesh)}
  out[name]["eval"] = {"predictions": [r["prediction"] for r in out[name]["eval"]["predictions"]],
                       "perplexity": out[name]["eval"]["perplexity"]}
sh = model.shard({"data": 2, "fsdp": 2, "tensor": 2})
out["spec"] = str(sh.params["params"]["llm"]["layers"]["mlp"]["linear"].sharding.spec)
# A saved model loaded onto the mesh: restored straight into its shards (never whole on one device), and
# through vlm_jax.load in bfloat16 as asked.
import tempfile, vlm_jax
from vlm_jax import checkpoint, treeutil
with tempfile.TemporaryDirectory() as d:
  model.save(d + "/m")
  _, restored, _ = checkpoint.load_model(d + "/m", mesh=sh.mesh)
  loaded = vlm_jax.load(d + "/m", dtype="bfloat16", mesh={"data": 2, "fsdp": 2, "tensor": 2})
restored, flat = treeutil.flatten(restored["params"]), treeutil.flatten(loaded.params["params"])
out["loaded"] = {"devices": sorted({len(v.sharding.device_set) for v in restored.values()}),
                 "spec": str(restored["llm/layers/mlp/linear"].sharding.spec),
                 "dtypes": sorted({str(v.dtype) for v in flat.values()}),
                 "load_spec": str(flat["llm/layers/mlp/linear"].sharding.spec)}
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
def test_decode_and_evaluate_on_a_mesh_equal_one_device():
  import json
  import os
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", MESH_SCRIPT], cwd=repo, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.split("RESULT", 1)[1])
  assert "tensor" in out["spec"]  # params really are split
  assert out["loaded"]["spec"] == out["loaded"]["load_spec"] == out["spec"] and out["loaded"]["devices"] == [8]
  assert out["loaded"]["dtypes"] == ["bfloat16"]
  # generate_ids (greedy, beam) and the evaluator (2 batches) decode on one device, then split over the mesh.
  assert out["seen"] == ["one device"] * 4 + [f"rows over {sharding.LOGICAL_TO_MESH['batch']}"] * 4
  assert out["mesh"]["greedy"] == out["one"]["greedy"]
  assert out["mesh"]["beam"] == out["one"]["beam"]
  assert out["mesh"]["eval"]["predictions"] == out["one"]["eval"]["predictions"]
  assert out["mesh"]["eval"]["perplexity"] == pytest.approx(out["one"]["eval"]["perplexity"], rel=1e-5)
