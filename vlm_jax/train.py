"""The train loop: every stage of `config.stages` in order, one jitted step, Orbax checkpoints, evals.

Per stage: image resolution, text length, steps, data mixture, lr schedule, lr multipliers and frozen
params. Between stages the position embeddings are resampled to the new grid, the pipeline is rebuilt and
the optimizer starts fresh for the new trainable set. A restart in the same workdir resumes from the latest
checkpoint (params, optimizer, data iterator, stage), so a killed run ends where an uninterrupted one does.

The same code runs on one process or many (one per host, after `vlm_jax.distributed.initialize`): each
process reads its rows of every global batch and hands them to `jax.make_array_from_process_local_data`;
params and optimizer state are global arrays laid out by `vlm_jax.sharding`; Orbax saves and restores
them from all processes; metrics.jsonl, loss.png, config.json and eval.json come from process 0. A run
may resume on another mesh or number of processes.
"""
import dataclasses
import io
import json
import math
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.experimental import multihost_utils

from vlm_jax import checkpoint, config_util, evaluate, fileutil, optim, sharding, treeutil
from vlm_jax.data.pipeline import make_source, make_sources, make_train_iterator, seek
from vlm_jax.models.vit import resample_posemb
from vlm_jax.models.vlm import abstract_params, teacher_forced_nll
from vlm_jax.run_log import MetricsLog, plot
from vlm_jax.train_setup import (build_model_config, check_config, initial_params, make_tokenizer,
                                 model_for_stage, normalize)


class TrainingError(RuntimeError):
  pass


class Preempted(Exception):
  """Raised by `train` after SIGTERM made it save a checkpoint and stop."""


def loss_fn(model_cfg, params, batch):
  """Per-example mean NLL over supervised tokens, then the batch mean (big_vision's convention)."""
  nll_B, count_B = teacher_forced_nll(model_cfg, params, batch["image"], batch["tokens"], batch["mask_ar"],
                                      batch["mask_loss"], batch["mask_input"])
  return jnp.mean(nll_B / jnp.maximum(count_B, 1.0))


def split_params(params, frozen: set):
  flat = treeutil.flatten(params)
  return (treeutil.unflatten({k: v for k, v in flat.items() if k not in frozen}),
          treeutil.unflatten({k: v for k, v in flat.items() if k in frozen}))


def merge_params(trainable, frozen):
  return treeutil.unflatten({**treeutil.flatten(frozen), **treeutil.flatten(trainable)})


def make_train_step(model_cfg, optimizer, schedule, grad_accum: int):
  """(trainable, frozen, opt_state, batch, step) -> (trainable, opt_state, metrics); params are the
  inner {"img", "llm"} trees without the "params" collection wrapper."""

  def loss_of(trainable, frozen, batch):
    return loss_fn(model_cfg, {"params": merge_params(trainable, frozen)}, batch)

  def step_fn(trainable, frozen, opt_state, batch, step):
    if grad_accum == 1:
      loss, grads = jax.value_and_grad(loss_of)(trainable, frozen, batch)
    else:  # micro-batches in a scan: one update per step, a fraction of the activation memory
      micro = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

      def accumulate(carry, mb):
        loss, grads = jax.value_and_grad(loss_of)(trainable, frozen, mb)
        return jax.tree.map(jnp.add, carry, (loss, grads)), None
      zero = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, trainable))
      (loss, grads), _ = jax.lax.scan(accumulate, zero, micro)
      loss, grads = jax.tree.map(lambda x: x / grad_accum, (loss, grads))
    updates, opt_state = optimizer.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    # param_norm: the updated params are finite (an update can overflow while the loss it came from is finite).
    return trainable, opt_state, {"loss": loss, "lr": schedule(step), "grad_norm": optax.tree.norm(grads),
                                  "param_norm": optax.tree.norm(trainable)}

  return step_fn


def resample_for(params, model_cfg):
  """Position embeddings resampled to the stage's patch grid (a no-op when it already fits)."""
  posemb = params["img"]["pos_embedding"]
  if posemb.shape[1] == model_cfg.img.num_patches:
    return params
  params = dict(params, img=dict(params["img"]))
  params["img"]["pos_embedding"] = resample_posemb(posemb, model_cfg.img.grid)
  return params


class _PreemptionWatch:
  """SIGTERM (preemption) stops the loop at a step boundary, where it checkpoints and exits. One process: a
  signal handler sets a flag. Several: JAX's preemption service (it catches SIGTERM on any host) names one
  step at which every process stops, so that all of them join the same checkpoint save."""

  def __init__(self):
    self.flag = False
    self._multi = jax.process_count() > 1
    self._old = None if self._multi else signal.signal(signal.SIGTERM, self._handler)

  def _handler(self, signum, frame):
    self.flag = True

  def should_stop(self, step: int) -> bool:
    return multihost_utils.reached_preemption_sync_point(step) if self._multi else self.flag

  def restore(self):
    if not self._multi:
      signal.signal(signal.SIGTERM, self._old)


@dataclasses.dataclass
class StageState:
  index: int
  cfg: ml_collections.ConfigDict
  model_cfg: object
  frozen: set
  abstract: dict  # the stage's param shapes (traced once, reused for names, shardings and restore targets)
  param_sh: dict  # NamedSharding per param (nested like the params)
  opt_sh: object  # NamedSharding per optimizer-state leaf
  step_fn: object
  optimizer: object
  data_iter: object
  preprocess: object
  rows: tuple  # (first row, number of rows) of each global batch this process reads

  @property
  def label(self) -> str:  # "stage 1 (instruct)" in logs and the progress bar
    return f"stage {self.index}" + (f" ({self.cfg.name})" if self.cfg.get("name") else "")


def train(config, workdir: str, log=print) -> dict:
  """Runs (or resumes) all stages. Returns the final evaluation results (also in workdir/eval.json).
  `workdir` may be remote (gs://...); in a multi-process run every process calls this with the same
  arguments and only process 0 logs."""
  check_config(config)
  config = normalize(config)
  is_main = jax.process_index() == 0
  log = log if is_main else (lambda *a, **k: None)
  workdir_path = epath.Path(workdir)
  mesh = sharding.make_mesh(config.get("mesh"), dcn_mesh_cfg=config.get("dcn_mesh"))
  tokenizer = make_tokenizer(config)
  # A bad model, optimizer, or data of a stage still to run or of an evaluator (a missing file or image, a
  # malformed record) fails now, before anything is written and not after hours of training.
  base_cfg = build_model_config(config.model, tokenizer)
  param_names = list(treeutil.flatten(abstract_params(base_cfg)))  # the same in every stage
  for i, stage_cfg in enumerate(config.stages):
    optim.make_optimizer(config.get("optim", {}), stage_cfg, set())
    optim.check_patterns(param_names, stage_cfg, config.get("optim", {}), f"config.stages[{i}]")
  ckpt_dir, keep = workdir_path / checkpoint.TRAIN_CHECKPOINTS, config.get("keep_checkpoints", 3)
  # Opening the checkpoints runs collectives: every process must decide alike, on what process 0 saw before it
  # created anything (another process may look after that).
  has_checkpoints = bool(multihost_utils.broadcast_one_to_all(np.asarray(ckpt_dir.exists())))
  latest, resume = checkpoint.TrainCheckpoints.latest_meta(str(ckpt_dir), keep) if has_checkpoints else (None, None)
  # Every source is read here, once: the stage's iterator and every evaluation reuse it.
  stage_sources = {i: _read_data(f"config.stages[{i}].data", make_sources, stage_cfg.data)
                   for i, stage_cfg in enumerate(config.stages) if i >= (resume["stage"] if resume else 0)}
  evals = [(eval_cfg, _read_data(f"config.evals[{i}].data", make_source, eval_cfg.data))
           for i, eval_cfg in enumerate(config.evals)]
  saved, text = workdir_path / "config.json", config.to_json_best_effort(indent=2)
  if is_main:
    workdir_path.mkdir(parents=True, exist_ok=True)
    if saved.exists() and (changed := config_util.changes(json.loads(saved.read_text()), json.loads(text))):
      # A resumed run takes the new config from where it stopped (a finished stage is not re-run): say what moved.
      log(f"the config differs from the one {workdir} last ran with: {'; '.join(changed)}")
  ckpts = checkpoint.TrainCheckpoints(str(ckpt_dir), keep=keep)
  global_step = first_step = resume["step"] if resume else 0
  metrics_log = MetricsLog(workdir, resume_step=global_step, enabled=is_main)
  if resume:
    log(f"resuming from step {global_step} (stage {resume['stage']}, step {resume['stage_step']} in the stage)")
  preempted = _PreemptionWatch()
  params = None
  results = {}
  try:
    for index, stage_cfg in enumerate(config.stages):
      stage_steps = int(stage_cfg.steps)
      if resume and index < resume["stage"]:
        continue
      stage = _build_stage(config, index, stage_cfg, base_cfg, tokenizer, mesh, stage_sources.pop(index))
      for report in stage.preprocess.skip_reports():  # records dropped while reading the files: say which
        log(f"{stage.label} data: {report}")
      n_params = len(treeutil.flatten(stage.abstract))
      start = 0
      if resume and index == resume["stage"]:
        params, opt_state = _restore(ckpts, latest, resume, stage, log)
        start = resume["stage_step"]
        resume = None
      else:
        if params is None:
          params = initial_params(config, stage.model_cfg, log)
        elif (patches := params["img"]["pos_embedding"].shape[1]) != stage.model_cfg.img.num_patches:
          grid = math.isqrt(patches)  # resample_for (in _place) resamples exactly then
          log(f"{stage.label}: resampling position embeddings from {grid}x{grid} to {stage.model_cfg.img.grid}x"
              f"{stage.model_cfg.img.grid}")
        params = _place(params, stage, mesh)
        trainable, _ = split_params(params, stage.frozen)
        opt_state = jax.jit(stage.optimizer.init, out_shardings=stage.opt_sh)(trainable)
      if is_main:  # the config this workdir's checkpoints come from, once they fit it (a resume checked them)
        fileutil.write_file(saved, text)
      log(f"{stage.label}: {stage_steps} steps at {stage.model_cfg.img.image_size}px, text_len "
          f"{stage_cfg.text_len}, batch {stage_cfg.batch_size}, {len(stage.frozen)} frozen / "
          f"{n_params - len(stage.frozen)} trainable param tensors")
      params, global_step, stopped = _run_stage(config, evals, stage, params, opt_state, start, global_step, mesh,
                                                ckpts, metrics_log, preempted, tokenizer, log)
      if stopped:
        raise Preempted(f"stopped by SIGTERM at step {global_step}; re-run to resume")
    ckpts.wait()
    export_dir = workdir_path / checkpoint.EXPORTED_MODEL
    # Steps run now (a finished run extended by a longer config, too) replace an earlier export.
    if config.get("export_model", True) and (global_step != first_step or not checkpoint.is_model_dir(export_dir)):
      final_cfg = model_for_stage(base_cfg, config.stages[-1])
      checkpoint.save_model(str(export_dir), final_cfg, {"params": params}, tokenizer, replace=True)  # every process
      log(f"wrote {export_dir} (vlm_jax.load it)")
    results = _final_eval(config, evals, base_cfg, params, tokenizer, mesh, workdir_path, metrics_log, global_step,
                          log)
    if is_main and (records := metrics_log.records()):
      png = io.BytesIO()
      plot(records, png)
      fileutil.write_file(workdir_path / "loss.png", png.getvalue())
  finally:
    preempted.restore()
    ckpts.close()
  return results


def _restore(ckpts, step, meta, stage, log):
  """(params, opt_state) of checkpoint `step` on this run's mesh; the data iterator restored in place, or put
  at the step's global batch when the checkpoint was written by a different process layout."""
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), stage.abstract,
                          stage.param_sh)
  abstract_opt = _abstract_opt_state(stage, abstract)
  saved_layout = (meta.get("process_count", 1), meta.get("data_rows", int(stage.cfg.batch_size)))
  same_layout = saved_layout == (jax.process_count(), stage.rows[1])
  params, opt_state = ckpts.restore(step, abstract, abstract_opt, stage.data_iter if same_layout else None)
  if not same_layout:
    log(f"checkpoint written by {meta.get('process_count', 1)} process(es): the data continues at global batch "
        f"{meta['stage_step']} of the stage")
    seek(stage.data_iter, meta["stage_step"], stage.rows[1])
  return params, opt_state


def _place(params, stage, mesh):
  """Params onto the stage's shardings, position embeddings resampled to its grid. The resampling works on
  the placed (global) arrays: in a multi-process run no process holds the whole of a sharded param."""
  params = jax.device_put(params, treeutil.unflatten(sharding.param_shardings(treeutil.flatten(params), mesh)))
  return jax.device_put(resample_for(params, stage.model_cfg), stage.param_sh)


def _read_data(where: str, build, data_cfg):
  """`build(data_cfg)` (sources read and checked), its errors naming the config key `where`."""
  try:
    return build(data_cfg)
  except ValueError as e:
    raise ValueError(f"{where}: {e}") from e


def _build_stage(config, index, stage_cfg, base_cfg, tokenizer, mesh, sources=None) -> StageState:
  """The stage's model, optimizer, shardings and data iterator (over `sources`, its data read by the caller; else
  read here)."""
  model_cfg = model_for_stage(base_cfg, stage_cfg)
  abstract = abstract_params(model_cfg)
  names = list(treeutil.flatten(abstract))
  frozen = optim.frozen_names(names, stage_cfg.get("frozen"))
  optimizer, schedule = optim.make_optimizer(config.get("optim", {}), stage_cfg, set(names) - frozen)
  step_fn = make_train_step(model_cfg, optimizer, schedule, int(config.get("grad_accum", 1)))
  batch_size, data_ways = int(stage_cfg.batch_size), sharding.batch_ways(mesh.shape)
  if batch_size % data_ways:
    raise ValueError(f"config.stages[{index}].batch_size {batch_size} is not divisible by the mesh's "
                     f"data x fsdp = {data_ways} devices.")
  rows = sharding.process_batch_rows(mesh, batch_size)
  data_iter, preprocess = make_train_iterator(
      stage_cfg.data, tokenizer, model_cfg.img.image_size, int(stage_cfg.text_len), batch_size,
      seed=int(config.seed) + 1000 * index, rows=rows, sources=sources)
  flat = treeutil.flatten(abstract)
  param_sh = treeutil.unflatten(sharding.param_shardings(flat, mesh))
  trainable, _ = split_params(abstract, frozen)
  opt_specs = sharding.opt_state_specs(jax.eval_shape(optimizer.init, trainable), flat, mesh.shape)
  opt_sh = jax.tree.map(lambda spec: jax.sharding.NamedSharding(mesh, spec), opt_specs,
                        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  return StageState(index, stage_cfg, model_cfg, frozen, abstract, param_sh, opt_sh, step_fn, optimizer, data_iter,
                    preprocess, rows)


def _abstract_opt_state(stage, abstract_params):
  trainable, _ = split_params(abstract_params, stage.frozen)
  shapes = jax.eval_shape(stage.optimizer.init, trainable)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, stage.opt_sh)


def _global_batch(batch, mesh, batch_size):
  """This process's rows of a batch -> global arrays of `batch_size` rows split over the mesh's data axes."""
  return {k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, np.ndim(v)), np.asarray(v),
                                                    (batch_size, *np.shape(v)[1:]))
          for k, v in batch.items()}


def _run_stage(config, evals, stage, params, opt_state, start, global_step, mesh, ckpts, metrics_log, preempted,
               tokenizer, log):
  """Runs one stage from `start`; returns (params, global step, stopped by SIGTERM)."""
  from tqdm.auto import tqdm
  steps = int(stage.cfg.steps)
  reported = stage.preprocess.skip_reports()  # logged at the start; records skipped from here on are named at the end
  trainable, frozen = split_params(params, stage.frozen)
  trainable_sh, _ = split_params(stage.param_sh, stage.frozen)
  jitted = jax.jit(stage.step_fn, donate_argnums=(0, 2),
                   out_shardings=(trainable_sh, stage.opt_sh, sharding.replicated(mesh)))
  log_every, ckpt_every = int(config.get("log_every", 10)), int(config.get("checkpoint_every", 0) or 0)
  eval_every = int(config.get("eval_every", 0) or 0)
  batch_size = int(stage.cfg.batch_size)
  bar = tqdm(total=steps, initial=start, desc=stage.label, disable=jax.process_index() != 0,
             dynamic_ncols=True)
  pending, t_last, n_last = None, time.time(), start
  last_good = ckpts.latest_step()

  def meta(stage_step):
    return {"step": global_step, "stage": stage.index, "stage_step": stage_step,
            "image_size": stage.model_cfg.img.image_size, "process_count": jax.process_count(),
            "data_rows": stage.rows[1]}

  def save(stage_step):
    nonlocal last_good
    ckpts.save(global_step, merge_params(trainable, frozen), opt_state, stage.data_iter, meta(stage_step))
    last_good = global_step

  def flush():
    """Checks and logs the last dispatched step's metrics: read one step late, so that reading them does not wait
    for the step just dispatched; read at once before anything saves that step's state."""
    nonlocal pending, t_last, n_last
    if pending is None:
      return
    record, pending = _record(pending, stage, batch_size, t_last, n_last), None
    if bad := [f"{k} is {record[k]}" for k in ("loss", "param_norm") if not np.isfinite(record[k])]:
      ckpts.wait()
      kept = (f"The last good checkpoint (step {last_good}) is kept in {ckpts.directory}." if last_good is not None
              else "No checkpoint was saved before it (checkpoint_every sets how often).")
      raise TrainingError(f"{' and '.join(bad)} at step {record['step']} ({stage.label}); stopping. {kept} Lower "
                          "the learning rate, or look for bad data near this step.")
    if record.pop("_log"):
      metrics_log.write(record)
      bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                      ex_s=f"{record['examples_per_sec']:.1f}")
      t_last, n_last = time.time(), record["stage_step"]

  for stage_step in range(start, steps):
    if preempted.should_stop(global_step):
      flush()  # never checkpoint a non-finite state, nor lose the last step's record
      if global_step != last_good:  # a resumed run, the next stage, or a checkpoint step: already saved
        save(stage_step)
      ckpts.wait()
      log(f"SIGTERM: checkpoint at step {global_step} saved; exiting.")
      bar.close()
      return merge_params(trainable, frozen), global_step, True
    batch = _global_batch(next(stage.data_iter), mesh, batch_size)
    with sharding.using(mesh):
      trainable, opt_state, metrics = jitted(trainable, frozen, opt_state, batch, jnp.asarray(stage_step))
    global_step += 1
    flush()  # the previous step's
    pending = (metrics, global_step, stage_step + 1,
               (stage_step + 1) % log_every == 0 or stage_step + 1 == steps)
    bar.update(1)
    at_end = stage_step + 1 == steps
    if (ckpt_every and global_step % ckpt_every == 0) or at_end:
      flush()
      save(stage_step + 1)
    if eval_every and global_step % eval_every == 0 and not (at_end and stage.index == len(config.stages) - 1):
      _periodic_eval(evals, stage.model_cfg, merge_params(trainable, frozen), tokenizer, mesh, metrics_log,
                     global_step, stage.index, log)
  flush()
  bar.close()
  if stats := stage.preprocess.stats():
    log(f"{stage.label} data (this process): {stats}")
  for report in stage.preprocess.skip_reports():
    if report not in reported:  # e.g. a corrupt image, found only when training read it
      log(f"{stage.label} data (this process): {report}")
  return merge_params(trainable, frozen), global_step, False


def _record(pending, stage, batch_size, t_last, n_last):
  metrics, step, stage_step, should_log = pending
  values = jax.device_get(metrics)
  elapsed = max(time.time() - t_last, 1e-9)
  return {"step": step, "stage": stage.index, "stage_step": stage_step,
          **{k: float(values[k]) for k in ("loss", "lr", "grad_norm", "param_norm")},
          "examples_per_sec": (stage_step - n_last) * batch_size / elapsed, "_log": should_log}


def _run_evals(evals, model_cfg, params, tokenizer, mesh, log):
  results = []
  for eval_cfg, source in evals:
    res = evaluate.evaluate(model_cfg, {"params": params}, tokenizer, eval_cfg, mesh=mesh, source=source)
    log(f"eval {res['name']}: {evaluate.summary(res)}")
    results.append(res)
  return results


def _eval_record(results, step, stage):
  """One metrics.jsonl record: eval/<name>/<metric> for each overall (not per-task) metric."""
  return {"step": step, "stage": stage, **{f"eval/{r['name']}/{k}": v for r in results for k, v in r.items()
                                           if isinstance(v, float) and "/" not in k}}


def _periodic_eval(evals, model_cfg, params, tokenizer, mesh, metrics_log, step, stage, log):
  metrics_log.write(_eval_record(_run_evals(evals, model_cfg, params, tokenizer, mesh, log), step, stage))


def _final_eval(config, evals, base_cfg, params, tokenizer, mesh, workdir_path, metrics_log, step, log):
  model_cfg = model_for_stage(base_cfg, config.stages[-1])
  results = _run_evals(evals, model_cfg, params, tokenizer, mesh, log)
  if not results or jax.process_index() != 0:
    return {}
  out = {r["name"]: r for r in results}
  metrics_log.write(_eval_record(results, step, len(config.stages) - 1))
  fileutil.write_file(workdir_path / "eval.json", json.dumps(out, indent=1))
  log(f"wrote {workdir_path / 'eval.json'}")
  return out
