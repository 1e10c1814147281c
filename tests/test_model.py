"""Model semantics: prefix-LM masks, the KV-cache path, ragged decoding, position-embedding resampling."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlm_jax import decode as decode_lib
from vlm_jax.api import Model
from vlm_jax.models.registry import get_model_config
from vlm_jax.models.vit import resample_posemb, vit_config
from vlm_jax.models.vlm import DecoderVLM, init_params


def randomize(params, seed=0):
  """Every leaf random (norm scales and biases too): a zero-init cannot hide a bug."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


@pytest.fixture(scope="module", params=["tiny", "tiny_gemma2_window"])
def model(request):
  cfg = get_model_config(request.param.removesuffix("_window"))
  if request.param.endswith("_window"):
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, sliding_window=3))
  return Model(cfg, randomize(init_params(cfg)))


@pytest.fixture(scope="module")
def images():
  return np.random.RandomState(0).uniform(-1, 1, (2, 28, 28, 3)).astype(np.float32)


TOKENS = np.array([[2, 5, 6, 7, 8, 9, 10, 11], [2, 12, 13, 14, 15, 16, 17, 18]])
MASK_AR = np.array([[0, 0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1]])


def test_later_prefix_token_changes_earlier_prefix_logits(model, images):
  base = np.asarray(model.logits(images, TOKENS, MASK_AR))
  changed = TOKENS.copy()
  changed[:, 3] = 40  # last prefix token
  out = np.asarray(model.logits(images, changed, MASK_AR))
  assert np.all(np.abs(out[:, :3] - base[:, :3]).max(axis=-1) > 1e-4), "prefix is not bidirectional"


def test_suffix_token_never_changes_earlier_positions(model, images):
  base = np.asarray(model.logits(images, TOKENS, MASK_AR))
  for t in range(4, 8):
    changed = TOKENS.copy()
    changed[:, t] = 41
    out = np.asarray(model.logits(images, changed, MASK_AR))
    np.testing.assert_array_equal(out[:, :t], base[:, :t])
    assert np.abs(out[:, t] - base[:, t]).max() > 1e-4


def test_padding_is_never_attended(model, images):
  mask_input = np.array([[1] * 6 + [0] * 2, [1] * 8])
  base = np.asarray(model.logits(images, TOKENS, MASK_AR, mask_input))
  changed = TOKENS.copy()
  changed[0, 6:] = 77
  out = np.asarray(model.logits(images, changed, MASK_AR, mask_input))
  np.testing.assert_array_equal(out[0, :6], base[0, :6])


def test_kv_cache_path_equals_full_pass(model, images):
  """Prefill the prefix, then extend one token at a time: the same logits as one full pass."""
  full = np.asarray(model.logits(images, TOKENS, MASK_AR))
  m = DecoderVLM(model.config)
  logits, cache = m.apply(model.params, images, TOKENS[:, :4], MASK_AR[:, :4], None, 4 + 4 + 4,
                          method=DecoderVLM.prefill)
  steps = [logits]
  for t in range(4, 8):
    step_logits, cache = m.apply(model.params, jnp.asarray(TOKENS[:, t:t + 1]), cache, method=DecoderVLM.extend)
    steps.append(step_logits)
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-4 * np.abs(full).max())


def _no_cache_greedy(model, images, prefix, n):
  """Reference: re-run the full forward pass for every new token."""
  tokens = list(prefix)
  for _ in range(n):
    mask_ar = [0] * len(prefix) + [1] * (len(tokens) - len(prefix))
    logits = model.logits(images, np.array([tokens]), np.array([mask_ar]))
    tokens.append(int(np.argmax(logits[0, -1])))
  return tokens[len(prefix):]


def test_cached_decode_equals_no_cache_loop(model, images):
  prefix = [2, 5, 6, 7]
  ours = np.asarray(model.generate_ids(images[:1], np.array([prefix]), 6, eos_id=-1))[0]
  assert list(ours) == _no_cache_greedy(model, images[:1], prefix, 6)


def test_ragged_batch_equals_one_by_one(model, images):
  prefixes = [[2, 5, 6, 7, 8, 9], [2, 12, 13]]
  batch = np.zeros((2, 6), np.int32)
  for i, p in enumerate(prefixes):
    batch[i, :len(p)] = p
  together = np.asarray(model.generate_ids(images, batch, 7, eos_id=-1))
  for i, p in enumerate(prefixes):
    alone = np.asarray(model.generate_ids(images[i:i + 1], np.array([p]), 7, eos_id=-1))
    np.testing.assert_array_equal(together[i], alone[0])


def test_positions_after_eos_are_pad(model, images):
  greedy = np.asarray(model.generate_ids(images, TOKENS[:, :4], 6, eos_id=-1))
  eos = int(greedy[0, 2])  # make row 0's third token the EOS
  out = np.asarray(model.generate_ids(images, TOKENS[:, :4], 6, eos_id=eos))
  first = int(np.argmax(out[0] == eos))
  assert first <= 2 and np.all(out[0, first + 1:] == 0)


def test_sampling_seeds_reproduce_and_top_k_1_is_greedy(model, images):
  prefix = TOKENS[:, :4]
  a = model.generate_ids(images, prefix, 6, sampler="sample", temperature=1.0, seed=3, eos_id=-1)
  b = model.generate_ids(images, prefix, 6, sampler="sample", temperature=1.0, seed=3, eos_id=-1)
  np.testing.assert_array_equal(a, b)
  greedy = model.generate_ids(images, prefix, 6, eos_id=-1)
  top1 = model.generate_ids(images, prefix, 6, sampler="sample", top_k=1, seed=5, eos_id=-1)
  np.testing.assert_array_equal(greedy, top1)
  # generate_ids decodes top_k=1 as greedy (Sampling.stochastic); the sampling path itself, run with it, agrees.
  class Sampled(decode_lib.Sampling):
    stochastic = True
  sampled = decode_lib.decode(model.config, model.params, images, prefix, prefix > 0, jax.random.key(5),
                              max_new_tokens=6, sampling=Sampled(temperature=1.0, top_k=1), eos_id=-1)
  np.testing.assert_array_equal(greedy, sampled)


@pytest.mark.parametrize("sampler", [dict(), dict(sampler="sample", temperature=2.0, seed=1),
                                     dict(sampler="beam", beam_size=2)])
def test_logits_mask_restricts_output(model, images, sampler):
  allowed = np.zeros(model.config.llm.vocab_size, bool)
  allowed[[30, 31]] = True
  out = np.asarray(model.generate_ids(images, TOKENS[:, :4], 5, eos_id=-1, logits_mask=allowed, **sampler))
  assert set(out.ravel()) <= {30, 31}
  if sampler.get("sampler") == "sample":  # a draw, not the same token throughout
    assert len(set(out.ravel())) == 2


def test_resample_posemb_matches_scipy_zoom():
  scipy_ndimage = pytest.importorskip("scipy.ndimage")
  posemb = np.random.RandomState(0).randn(1, 16, 8).astype(np.float32)
  ours = np.asarray(resample_posemb(posemb, 7)).reshape(7, 7, 8)
  ref = scipy_ndimage.zoom(posemb.reshape(4, 4, 8), (7 / 4, 7 / 4, 1), order=1)
  np.testing.assert_allclose(ours, ref, atol=1e-6)
  np.testing.assert_array_equal(resample_posemb(posemb, 4), posemb)


def test_vit_variants_and_patch_sizes():
  cfg = vit_config("So400m/14", image_size=224)
  assert (cfg.width, cfg.depth, cfg.mlp_dim, cfg.num_heads, cfg.num_patches) == (1152, 27, 4304, 16, 256)
  assert vit_config("B/16").patch_size == 16 and vit_config("g-opt/14").width == 1536
  with pytest.raises(ValueError, match="Unknown ViT variant"):
    vit_config("Q/14")


@pytest.mark.parametrize("name", ["tiny", "tiny_llama_mlp", "tiny_t5"])
def test_layer_options_give_same_loss_and_grads(name, images):
  """remat, unrolled layer loops and unfused projections (the accelerator path) change how the step is computed,
  never what: same loss, same gradients."""
  from vlm_jax.train import loss_fn
  cfg = get_model_config(name)
  params = randomize(init_params(cfg))
  batch = {"image": images, "tokens": TOKENS, "mask_ar": MASK_AR, "mask_loss": MASK_AR,
           "mask_input": np.ones_like(TOKENS)}

  def loss_and_grads(c):
    return jax.jit(jax.value_and_grad(lambda p: loss_fn(c, p, batch)))(params)
  ref_loss, ref_grads = loss_and_grads(cfg)
  options = [dict(remat="full"), dict(remat="dots"), dict(scan_unroll=True), dict(fuse_projections=False)]
  for overrides in options:
    loss, grads = loss_and_grads(get_model_config(name, **overrides))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, err_msg=str(overrides))
    # float32 reassociation: errors relative to each gradient's scale
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=max(1e-4 * np.abs(b).max(), 1e-7),
                                                         err_msg=str(overrides)), grads, ref_grads)
  with pytest.raises(ValueError, match="Unknown model override 'depth_typo'"):
    get_model_config(name, depth_typo=2)


@pytest.mark.parametrize("name", ["tiny", "tiny_gemma2", "tiny_llama_mlp", "tiny_t5"])
def test_per_layer_decode_layout_gives_same_logits(name, images):
  """The decode loop's layout (each layer's weights in arrays of their own) computes the same function."""
  from vlm_jax.models.vlm import model_for, per_layer
  cfg = get_model_config(name)
  params = randomize(init_params(cfg))
  step_cfg, step_params = per_layer(cfg, params)
  llm, stacked, depth = step_params["params"]["llm"], params["params"]["llm"], getattr(cfg.llm, "depth", None)
  if name == "tiny_t5":  # the decoder's layers; the encoder keeps its scan
    llm, stacked, depth = llm["decoder"], stacked["decoder"], cfg.llm.decoder_depth
    assert step_params["params"]["llm"]["encoder"] is params["params"]["llm"]["encoder"]
  assert "layers" not in llm and sorted(k for k in llm if k.startswith("layers_")) == [
      f"layers_{i}" for i in range(depth)]
  assert jax.tree.structure(llm["layers_0"]) == jax.tree.structure(stacked["layers"])
  args = (images, TOKENS, MASK_AR, np.ones_like(TOKENS))
  np.testing.assert_allclose(model_for(step_cfg).apply(step_params, *args), model_for(cfg).apply(params, *args),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape_x,shape_w,n", [((6, 8), (8, 24), 1), ((6, 24), (24, 8), 1),
                                               ((2, 3, 4, 5), (4, 5, 7), 2)])
def test_dense_custom_vjp_equals_autodiff(shape_x, shape_w, n):
  """`dense` has a hand-written backward (a GEMM layout XLA CPU runs fast): it must equal einsum's autodiff."""
  from vlm_jax.models.layers import dense
  rng = np.random.RandomState(0)
  x, w = rng.randn(*shape_x).astype(np.float32), rng.randn(*shape_w).astype(np.float32)
  dy = rng.randn(*shape_x[:len(shape_x) - n], *shape_w[n:]).astype(np.float32)
  ref = lambda x, w: jnp.tensordot(x, w, n)
  np.testing.assert_allclose(dense(x, w, n), ref(x, w), rtol=1e-5)
  got = jax.vjp(lambda x, w: dense(x, w, n), x, w)[1](dy)
  want = jax.vjp(ref, x, w)[1](dy)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("t,n,k,extras", [(5, 4, 1, "mask"), (5, 4, 2, "mask softcap"), (5, 4, 4, "bias"),
                                          (1, 4, 2, "mask"), (1, 4, 4, "bias mask"), (1, 4, 1, "bias"),
                                          (5, 2, 2, "")])
def test_attend_layouts_equal_plain_attention(t, n, k, extras):
  """`layers.attend` picks a GEMM layout by shape (MQA rows, heads-major, grouped einsum for one token): each must
  equal plain per-head attention, forward and backward, with or without mask, bias and softcap."""
  from vlm_jax.models.layers import NEG_INF, attend
  rng = np.random.RandomState(t * 100 + n * 10 + k)
  b, s, h = 2, 7, 8
  q, kk, v = (rng.randn(*shape).astype(np.float32) for shape in ((b, t, n, h), (b, s, k, h), (b, s, k, h)))
  mask = rng.rand(b, t, s) > 0.3 if "mask" in extras else None
  bias = rng.randn(1, n, t, s).astype(np.float32) if "bias" in extras else None
  cap = 2.0 if "softcap" in extras else None

  def plain(q, kk, v):
    kk, v = jnp.repeat(kk, n // k, axis=2), jnp.repeat(v, n // k, axis=2)
    logits = jnp.einsum("btnh,bsnh->bnts", q, kk) + (0 if bias is None else bias)
    logits = logits if cap is None else cap * jnp.tanh(logits / cap)
    logits = logits if mask is None else jnp.where(mask[:, None], logits, NEG_INF)
    return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, axis=-1), v)

  ours = lambda q, kk, v: attend(q, jnp.swapaxes(kk, 1, 2), jnp.swapaxes(v, 1, 2), mask, jnp.float32, cap,
                                 bias_BNTS=bias)
  np.testing.assert_allclose(ours(q, kk, v), plain(q, kk, v), rtol=1e-5, atol=1e-5)
  dy = rng.randn(b, t, n, h).astype(np.float32)
  for g, r in zip(jax.vjp(ours, q, kk, v)[1](dy), jax.vjp(plain, q, kk, v)[1](dy)):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)
