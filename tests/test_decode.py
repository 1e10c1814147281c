"""The shared decode loop: beam search, best-of-n, scores, compile-once buckets (greedy, sampling, caching and
ragged batches are in test_model.py)."""
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

EOS = 1


def markov_extend(table_VV):
  """A toy model whose next-token distribution depends only on the last token: log-prob table [V, V]."""
  def extend(token_B, cache):
    return table_VV[token_B], {"steps": cache["steps"] + 1}
  return extend


def toy_case():
  """Greedy takes token 2 (p .6) but then must end with p .3; token 3 (p .4) ends with p .99."""
  v = 6
  table = np.full((v, v), 1e-9)
  table[2] = [0.025, 0.3, 0.0, 0.225, 0.225, 0.225]
  table[3] = [0.0025, 0.99, 0.0025, 0.0, 0.0025, 0.0025]
  table[4] = table[5] = table[0] = table[1] = [0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
  table = np.log(np.maximum(table, 1e-9) / np.maximum(table, 1e-9).sum(1, keepdims=True))
  first = np.log(np.array([[1e-9, 1e-9, 0.6, 0.4, 1e-9, 1e-9]]))
  return jnp.asarray(table, jnp.float32), jnp.asarray(first, jnp.float32)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_search_beats_greedy_on_a_constructed_case(length_penalty):
  table, first = toy_case()
  extend, cache = markov_extend(table), {"steps": jnp.zeros((1,), jnp.int32)}
  greedy, greedy_logp, greedy_len = decode_lib.sample_loop(
      extend, first, cache, jax.random.key(0), max_new_tokens=4, sampling=decode_lib.Sampling(), eos_id=EOS,
      pad_id=0)
  beam, beam_score = decode_lib.beam_loop(extend, first, cache, beam_size=2, max_new_tokens=4,
                                          length_penalty=length_penalty, eos_id=EOS, pad_id=0)
  assert list(np.asarray(greedy[0])) == [2, 1, 0, 0]
  assert list(np.asarray(beam[0])) == [3, 1, 0, 0]
  assert float(greedy_logp[0]) == pytest.approx(math.log(0.6 * 0.3), rel=1e-5)
  assert int(greedy_len[0]) == 2
  assert float(beam_score[0]) == pytest.approx(math.log(0.4 * 0.99) / 2 ** length_penalty, rel=1e-5)
  # Beam size 1 follows the greedy path.
  one, one_score = decode_lib.beam_loop(extend, first, cache, beam_size=1, max_new_tokens=4, length_penalty=0.0,
                                        eos_id=EOS, pad_id=0)
  np.testing.assert_array_equal(one, greedy)
  assert float(one_score[0]) == pytest.approx(float(greedy_logp[0]), rel=1e-6)


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


def test_the_loop_stops_once_every_row_has_ended():
  """No step runs after the last row's EOS (finished rows emit pads, so only counting steps shows this)."""
  table, first = toy_case()
  tokens = []

  def extend(token_B, cache):
    jax.debug.callback(lambda t: tokens.append(int(t[0])), token_B)
    return table[token_B], cache
  cache = {"steps": jnp.zeros((1,), jnp.int32)}
  for eos, steps in ((EOS, [2]), (-1, [2, 1, 1])):  # greedy: 2 then EOS; without an EOS, to the length limit
    tokens.clear()
    out, _, _ = decode_lib.sample_loop(extend, first, cache, jax.random.key(0), max_new_tokens=4,
                                       sampling=decode_lib.Sampling(), eos_id=eos, pad_id=0)
    jax.block_until_ready(out)
    jax.effects_barrier()
    assert tokens == steps, eos


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


def test_argmax_is_numpys_first_index_of_the_maximum():
  rs = np.random.RandomState(0)
  logits = rs.randint(0, 4, (64, 300)).astype(np.float32)  # many ties: the first index must win
  logits[3] = -np.inf  # a fully masked row: token 0, as np.argmax
  np.testing.assert_array_equal(jax.jit(decode_lib.argmax)(logits), np.argmax(logits, axis=-1))
  nan_row = np.array([[1.0, np.nan, 3.0]], np.float32)
  assert int(decode_lib.argmax(nan_row)[0]) == 0  # in range, whatever the row holds


def filter_by_sorting(logits_BV, top_k, top_p):
  """Independent reference for top-k / top-p: numpy, one row at a time, by sorting (as transformers' warpers)."""
  out = logits_BV.copy()
  for row in out:
    if top_k:
      row[row < np.sort(row)[::-1][top_k - 1]] = -np.inf
    if top_p < 1:
      desc = np.sort(row)[::-1]
      p = np.exp(desc.astype(np.float64) - desc[0])
      p /= p.sum()
      n_keep = np.sum(np.cumsum(p) - p < top_p)  # the fewest top tokens whose mass reaches top_p
      row[row < desc[n_keep - 1]] = -np.inf
  return out


@pytest.mark.parametrize("top_k,top_p", [(2, 1.0), (40, 1.0), (300, 1.0), (0, 0.3), (0, 0.9), (40, 0.9),
                                         (5, 0.999)])
def test_top_k_and_top_p_keep_the_tokens_sorting_keeps(top_k, top_p):
  rs = np.random.RandomState(top_k)
  logits = (3 * rs.randn(16, 300)).astype(np.float32)
  logits[:, :6] = logits[:, :1]  # ties, kept or cut together
  logits[1] = np.round(logits[1])  # a row of many ties
  logits[2, 100:] = -np.inf  # masked tokens
  logits[3, :] = 0.0
  logits[3, 1::2] = -0.0  # +0 and -0 are one value
  sampling = decode_lib.Sampling(temperature=0.7, top_k=top_k, top_p=top_p)
  ours = np.asarray(jax.jit(decode_lib.filter_logits, static_argnums=1)(logits, sampling))
  ref = filter_by_sorting(logits / np.float32(0.7), top_k, top_p)
  np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))  # the same tokens kept
  np.testing.assert_allclose(ours, ref, rtol=1e-6)  # XLA divides by the temperature as a product
  assert np.all(np.isfinite(ours).sum(-1) >= 1)


def test_top_k_and_top_p_sampling_sorts_nothing():
  """lax.top_k (k > 1) and a sort of the vocabulary cost XLA CPU more than a decode step; the bisection does not
  sort."""
  sampling = decode_lib.Sampling(temperature=1.0, top_k=40, top_p=0.9)
  step = jax.jit(lambda logits, keys: decode_lib.sample_token(logits, keys, sampling))
  keys = decode_lib.row_keys(jax.random.key(0), 64)
  logits = jnp.tile(jnp.arange(1000.0), (64, 1))  # top 3 hold 95% of the mass (1, e^-1, e^-2, ...)
  assert not re.search(r"\bsort\(|topk|TopK", step.lower(logits, keys).compile().as_text())
  assert set(np.asarray(step(logits, keys)).tolist()) == {997, 998, 999}


def test_categorical_draws_each_token_with_its_probability():
  probs = np.array([0.5, 0.25, 0.0, 0.125, 0.125, 0.0])
  n = 40000
  with np.errstate(divide="ignore"):
    logits = np.tile(np.log(probs).astype(np.float32) + 3.0, (n, 1))  # -inf for the zeros
  draws = np.asarray(jax.jit(decode_lib.categorical)(decode_lib.row_keys(jax.random.key(1), n), logits))
  counts = np.bincount(draws, minlength=6)
  assert counts[2] == counts[5] == 0
  np.testing.assert_allclose(counts / n, probs, atol=5 * np.sqrt(0.25 / n))
  # The ends of [0, 1): the first and the last token of positive weight, never a zero-weight one.
  weights = np.array([[0.0, 1.0, 0.0, 2.0, 0.0]] * 2, np.float32)
  u = np.array([0.0, np.nextafter(np.float32(1), np.float32(0))], np.float32)
  np.testing.assert_array_equal(decode_lib.invert_cdf(weights, u), [1, 3])


def test_invert_cdf_never_lands_on_a_zero_weight_token_where_the_cumsum_moves():
  """XLA's cumsum over a 32k row is not flat across zero weights (rounding in its blocked sum): a u that falls
  in such a step must still pick a token the filters kept."""
  rs = np.random.RandomState(0)
  w = (rs.exponential(size=(1, 32000)) * (rs.rand(1, 32000) < 0.3)).astype(np.float32)  # 70% filtered out
  cdf = np.asarray(jnp.cumsum(jnp.asarray(w), axis=-1))[0]
  steps = [j for j in range(1, w.shape[1]) if w[0, j] == 0 and cdf[j] != cdf[j - 1]]
  assert steps  # the hazard exists on this backend
  us = np.concatenate([np.linspace(min(cdf[j - 1], cdf[j]), max(cdf[j - 1], cdf[j]), 5) for j in steps[:40]])
  us = (us / cdf[-1]).astype(np.float32)
  picks = np.asarray(jax.jit(decode_lib.invert_cdf)(np.repeat(w, len(us), 0), us))
  assert np.all(w[0, picks] > 0), picks[w[0, picks] == 0]


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



def test_beam_search_equals_transformers_early_stopping_never():
  """beam_loop against transformers' generate on the same next-token table (a Markov 'language model': the
  log-probs depend on the last token only), with length penalties 0, 1 and 2: the same sequence and score as
  transformers' early_stopping="never" (the exact stopping rule). On the last table its default rule stops too
  soon and returns a lower-scoring answer."""
  import torch
  from transformers import GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
  from transformers.modeling_outputs import CausalLMOutputWithPast

  class Markov(PreTrainedModel, GenerationMixin):
    config_class = PretrainedConfig

    def __init__(self, config, table):
      super().__init__(config)
      self.table = torch.nn.Parameter(torch.tensor(table), requires_grad=False)

    def _init_weights(self, module):
      pass

    def forward(self, input_ids=None, **kw):
      return CausalLMOutputWithPast(logits=self.table[input_ids])

    def prepare_inputs_for_generation(self, input_ids, **kw):
      return {"input_ids": input_ids}

  eos, pad = 1, 0

  def both(table, w, n, lp):
    v = table.shape[0]
    model = Markov(PretrainedConfig(vocab_size=v), table).eval()
    theirs = {}
    for rule in ("never", False):
      config = GenerationConfig(max_new_tokens=n, eos_token_id=eos, pad_token_id=pad, use_cache=False, num_beams=w,
                                length_penalty=lp, early_stopping=rule, do_sample=False, return_dict_in_generate=True,
                                output_scores=True)
      out = model.generate(torch.tensor([[v - 1]]), generation_config=config)
      seq = out.sequences[0, 1:].tolist()
      theirs[rule] = (seq + [pad] * (n - len(seq)), float(out.sequences_scores[0]))
    table_j = jnp.asarray(table)
    tokens, score = decode_lib.beam_loop(lambda token_B, cache: (table_j[token_B], cache), table_j[v - 1][None],
                                         {"c": jnp.zeros((1,))}, beam_size=w, max_new_tokens=n, length_penalty=lp,
                                         eos_id=eos, pad_id=pad)
    ours = (np.asarray(tokens[0]).tolist(), float(score[0]))
    assert ours[0] == theirs["never"][0] and ours[1] == pytest.approx(theirs["never"][1], abs=1e-4), (w, n, lp)
    return theirs

  rs = np.random.RandomState(0)
  for _ in range(16):
    v = int(rs.choice([5, 7]))
    logits = rs.randn(v, v).astype(np.float32) * rs.choice([1.0, 2.5])
    logits[:, pad] = -30.0  # never generated
    logits[:, eos] += rs.uniform(-2, 1)
    both(np.asarray(jax.nn.log_softmax(jnp.asarray(logits)), np.float32), int(rs.choice([2, 3])),
         int(rs.choice([3, 5, 7])), float(rs.choice([0.0, 1.0, 2.0])))
  table = np.array([[-35.45, -3.337, -7.794, -5.412, -4.174, -0.057], [-34.67, -10.75, -6.625, -5.15, -2.319, -0.112],
                    [-31.46, -0.783, -4.02, -4.277, -0.79, -2.861], [-33.3, -8.086, -5.786, -1.475, -2.904, -0.338],
                    [-35.34, -8.929, -2.985, -0.113, -5.077, -2.996], [-33.74, -0.705, -1.494, -1.303, -4.671, -8.786]],
                   np.float32)
  theirs = both(table, 2, 6, 1.0)
  assert theirs["never"][0] == [2, 4, 3, 5, 1, 0] and theirs[False][0] == [1, 0, 0, 0, 0, 0]
  assert theirs["never"][1] > theirs[False][1]
