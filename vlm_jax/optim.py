"""The optimizer: clip -> adam(w) / adafactor / sgd -> weight decay -> lr schedule -> per-module lr multipliers.

Every per-param policy (frozen, lr multipliers, weight decay) is an ordered regex table over "/"-joined
param names; the first matching pattern wins. Frozen params are not given to the optimizer at all: they get
no optimizer state and no gradient, and so stay bit-identical.
"""
import difflib
import re

import jax
import jax.numpy as jnp
import optax

from vlm_jax import treeutil


def matches(pattern: str, name: str) -> bool:
  """The whole name, or a leading run of its "/"-separated parts ("img" matches "img/embedding/kernel")."""
  return bool(re.fullmatch(pattern, name) or re.match(pattern + "(/|$)", name))


def first_match(name: str, table, default):
  for pattern, value in table:
    if matches(pattern, name):
      return value
  return default


def as_table(spec, value=True):
  """Accepts a regex string, a list of regexes, or a list of (regex, value) pairs."""
  if not spec:
    return ()
  if isinstance(spec, str):
    return ((spec, value),)
  return tuple(tuple(x) if isinstance(x, (list, tuple)) else (x, value) for x in spec)


def check_patterns(names, stage, optim_cfg, where: str):
  """Every pattern of the stage's `frozen` and `lr_mults` and of `optim.wd_mults` must be a regex matching some
  param name (a typo would otherwise freeze or scale nothing, silently), every multiplier a finite number >= 0.
  `where` names the stage's config key."""
  for key, spec, scaled in ((f"{where}.frozen", stage.get("frozen"), False),
                            (f"{where}.lr_mults", stage.get("lr_mults"), True),
                            ("config.optim.wd_mults", optim_cfg.get("wd_mults"), True)):
    for j, entry in enumerate(as_table(spec)):
      if len(entry) != 2 or not isinstance(entry[0], str):
        raise ValueError(f"{key}[{j}]: {entry if scaled else entry[0]!r} is not "
                         f"{'a (regex, multiplier) pair' if scaled else 'a regex string'}.")
      pattern, value = entry
      if scaled and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf")):
        raise ValueError(f"{key}[{j}]: the multiplier of {pattern!r} must be a finite number >= 0, got {value!r}.")
      try:
        matched = any(matches(pattern, n) for n in names)
      except re.error as e:
        raise ValueError(f"{key}[{j}]: {pattern!r} is not a regex ({e}).") from e
      if not matched:
        near = difflib.get_close_matches(pattern, names, n=3, cutoff=0.0)
        raise ValueError(f"{key}[{j}]: {pattern!r} matches no param name (closest: {', '.join(near)}).")


def frozen_names(names, frozen_spec) -> set:
  table = as_table(frozen_spec)
  return {n for n in names if first_match(n, table, False)}


def schedule(stage) -> optax.Schedule:
  """Linear warmup to `stage.lr`, then cosine / linear decay to `stage.lr * end_frac`, rsqrt, or constant."""
  lr, steps = float(stage.lr), int(stage.steps)
  sched_cfg = dict(stage.get("schedule", {}) or {})
  kind = sched_cfg.get("decay", "cosine")
  warmup = int(sched_cfg.get("warmup_steps", 0))
  end = lr * float(sched_cfg.get("end_frac", 0.0))
  decay_steps = max(steps - warmup, 1)
  if kind == "cosine":
    after = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
  elif kind == "linear":
    after = optax.linear_schedule(lr, end, decay_steps)
  elif kind == "rsqrt":
    timescale = max(warmup, 1)
    after = lambda count: lr * jax.lax.rsqrt(jnp.maximum(count, 0) / timescale + 1.0)
  elif kind == "constant":
    after = optax.constant_schedule(lr)
  else:
    raise ValueError(f"Unknown schedule decay {kind!r}; use cosine | linear | rsqrt | constant.")
  if not warmup:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(optim_cfg, stage, trainable_names) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer over the nested tree of trainable params named by `trainable_names`, its lr schedule)."""
  name = optim_cfg.get("name", "adamw")
  sched = schedule(stage)
  names = sorted(trainable_names)
  mults = treeutil.unflatten({n: float(first_match(n, as_table(stage.get("lr_mults")), 1.0)) for n in names})
  wd_table = as_table(optim_cfg.get("wd_mults", [(".*", 1.0)]))
  wd_mults = treeutil.unflatten({n: float(first_match(n, wd_table, 0.0)) for n in names})
  parts = []
  if optim_cfg.get("clip_norm"):
    parts.append(optax.clip_by_global_norm(float(optim_cfg.clip_norm)))
  if name == "adamw":
    parts.append(optax.scale_by_adam(b1=optim_cfg.get("b1", 0.9), b2=optim_cfg.get("b2", 0.999),
                                     eps=optim_cfg.get("eps", 1e-8)))
  elif name == "adafactor":
    parts.append(optax.scale_by_factored_rms())
  elif name == "sgd":
    if optim_cfg.get("momentum"):
      parts.append(optax.trace(decay=float(optim_cfg.momentum)))
  else:
    raise ValueError(f"Unknown optimizer {name!r}; use adamw | adafactor | sgd.")
  if optim_cfg.get("weight_decay"):
    # Decoupled decay (AdamW), weight_decay x the param's wd_mults entry, scaled by the lr schedule below like
    # the update.
    wd = float(optim_cfg.weight_decay)
    parts.append(optax.stateless(lambda updates, params: jax.tree.map(lambda u, p, m: u + wd * m * p, updates,
                                                                      params, wd_mults)))
  parts.append(optax.scale_by_schedule(sched))
  parts.append(optax.scale(-1.0))
  if any(m != 1.0 for m in jax.tree.leaves(mults)):
    parts.append(optax.stateless(lambda updates, params=None: jax.tree.map(lambda u, m: u * m, updates, mults)))
  return optax.chain(*parts), sched
