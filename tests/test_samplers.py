"""The token pickers on plain logits and next-token tables, no model: argmax, the top-k / top-p filters, the
categorical draw, the sampling loop's stopping and beam search, against numpy, constructed cases and
transformers' generate."""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax import decode as decode_lib

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
