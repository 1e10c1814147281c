"""Optimizer pieces: schedules, lr multipliers, weight-decay masks, optimizers by name, grad accumulation."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vlm_jax import optim, train as train_lib
from vlm_jax.models.registry import get_model_config
from vlm_jax.models.vlm import init_params


def stage(**kw):
  return ml_collections.ConfigDict(dict(dict(steps=100, lr=1.0, schedule=dict(decay="cosine", warmup_steps=10)),
                                        **kw))


@pytest.mark.parametrize("decay", ["cosine", "linear", "rsqrt", "constant"])
def test_schedules_warm_up_then_decay(decay):
  s = optim.schedule(stage(schedule=dict(decay=decay, warmup_steps=10)))
  assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.5) and float(s(10)) == pytest.approx(1.0)
  assert float(s(99)) <= 1.0
  if decay in ("cosine", "linear"):
    assert float(s(100)) == pytest.approx(0.0, abs=1e-6)


def test_unknown_optimizer_and_schedule():
  with pytest.raises(ValueError, match="Unknown optimizer 'lion'"):
    optim.make_optimizer(ml_collections.ConfigDict(dict(name="lion")), stage(), {"a"})
  with pytest.raises(ValueError, match="Unknown schedule decay"):
    optim.schedule(stage(schedule=dict(decay="step")))


@pytest.mark.parametrize("name", ["adamw", "adafactor", "sgd"])
def test_optimizers_by_name_apply_lr_multipliers(name):
  params = {"img": {"w": jnp.ones((4, 4))}, "llm": {"w": jnp.ones((4, 4))}}
  cfg = ml_collections.ConfigDict(dict(name=name, momentum=0.9, weight_decay=0.0))
  opt, _ = optim.make_optimizer(cfg, stage(schedule=dict(decay="constant"), lr=0.1, lr_mults=[("img/.*", 0.1)]),
                                {"img/w", "llm/w"})
  grads = jax.tree.map(lambda x: 0.5 * x, params)
  updates, _ = opt.update(grads, opt.init(params), params)
  ratio = np.asarray(updates["img"]["w"]) / np.asarray(updates["llm"]["w"])
  np.testing.assert_allclose(ratio, 0.1, rtol=1e-5)


def test_weight_decay_scaled_by_the_table():
  """wd_mults: the first matching regex's multiplier of weight_decay (0: no decay); unmatched params get none."""
  params = {"w": jnp.ones(3), "bias": jnp.ones(3), "scale": 2 * jnp.ones(3), "other": jnp.ones(3)}
  cfg = ml_collections.ConfigDict(dict(name="sgd", weight_decay=0.5,
                                       wd_mults=[(".*bias$", 0.0), ("scale", 0.25), ("w", 1.0)]))
  opt, _ = optim.make_optimizer(cfg, stage(schedule=dict(decay="constant")), set(params))
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = opt.update(zero, opt.init(params), params)
  np.testing.assert_allclose(updates["w"], -0.5)
  np.testing.assert_allclose(updates["bias"], 0.0)
  np.testing.assert_allclose(updates["scale"], -0.5 * 0.25 * 2)
  np.testing.assert_allclose(updates["other"], 0.0)


def test_grad_accumulation_equals_one_big_batch():
  cfg = get_model_config("tiny")
  params = init_params(cfg)["params"]
  rs = np.random.RandomState(0)
  batch = {"image": jnp.asarray(rs.uniform(-1, 1, (4, 28, 28, 3)), jnp.float32),
           "tokens": jnp.asarray(rs.randint(3, 100, (4, 8)), jnp.int32),
           "mask_ar": jnp.asarray([[0, 0, 0, 1, 1, 1, 1, 1]] * 4, jnp.int32),
           "mask_loss": jnp.asarray([[0, 0, 0, 1, 1, 1, 1, 0]] * 4, jnp.int32),
           "mask_input": jnp.ones((4, 8), jnp.int32)}
  opt, sched = optim.make_optimizer(ml_collections.ConfigDict(dict(name="sgd")), stage(), set())
  results = []
  for accum in (1, 2):
    step = jax.jit(train_lib.make_train_step(cfg, opt, sched, accum))
    new, _, metrics = step(params, {}, opt.init(params), batch, jnp.asarray(5))
    results.append((new, float(metrics["loss"])))
  assert results[0][1] == pytest.approx(results[1][1], rel=1e-5)
  for a, b in zip(jax.tree.leaves(results[0][0]), jax.tree.leaves(results[1][0])):
    np.testing.assert_allclose(a, b, atol=1e-5)
