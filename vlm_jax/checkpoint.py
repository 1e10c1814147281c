"""vlm_jax model checkpoints (`vlm_config.json` + Orbax `params/` + the tokenizer's files) and training checkpoints.

Both work across hosts: in a multi-process run every process calls the same save / restore, Orbax writes and
reads each process's shards of the global arrays, and files that are not arrays come from process 0. Paths
may be local or remote (`gs://...`, read through etils.epath).
"""
import json
import os

import jax
import orbax.checkpoint as ocp
from etils import epath

from vlm_jax import fileutil, treeutil
from vlm_jax.fileutil import is_remote
from vlm_jax.models.registry import config_from_dict, config_to_dict

CONFIG_FILE = "vlm_config.json"
# Inside a training workdir: the training checkpoints and the model exported when training ends.
TRAIN_CHECKPOINTS, EXPORTED_MODEL = "checkpoints", "model"


def is_model_dir(path: str) -> bool:
  path = epath.Path(path)
  return (path / CONFIG_FILE).is_file() and (path / "params").is_dir()


def is_workdir(path: str) -> bool:
  """A training workdir, whose config.json is the training config, not a model's (a model directory that
  happens to hold a checkpoints/ folder is still a model directory)."""
  return not is_model_dir(path) and (epath.Path(path) / TRAIN_CHECKPOINTS).is_dir()


def model_dir(path: str) -> str:
  """`path`, or for a training workdir the model it exported (every loader takes either)."""
  if not is_workdir(path):
    return path
  exported = os.path.join(path, EXPORTED_MODEL)
  if not is_model_dir(exported):
    raise ValueError(f"{path} is a training workdir without an exported {EXPORTED_MODEL}/ (training has not "
                     "finished, or config.export_model is off): pass a model directory.")
  return exported


def _stored_arrays(path) -> dict:
  """{flat key: array metadata (shape, dtype)} of the params Orbax saved at `path`, read without the arrays."""
  return treeutil.flatten(ocp.StandardCheckpointHandler().metadata(epath.Path(path)))


def save_model(out_dir: str, config, params, tokenizer=None, replace: bool = False):
  """Writes a new model directory (`replace`: over an existing one). A crash never leaves a directory that
  `is_model_dir` but is incomplete: one process writing a local directory fills a temporary sibling and renames
  it; otherwise (several processes, each holding shards of the global `params`, or a remote path) the old
  directory is deleted first, Orbax writes `params/` atomically and process 0 adds the config last."""
  if jax.process_count() > 1 or is_remote(out_dir):
    return _save_model_shared(epath.Path(out_dir), config, params, tokenizer, replace)
  params = jax.device_get(params)
  with fileutil.atomic_dir(out_dir, replace) as tmp:
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump(config_to_dict(config), f, indent=2)
    for name, data in (tokenizer.files() if tokenizer is not None else {}).items():
      with open(os.path.join(tmp, name), "wb") as f:
        f.write(data)
    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(os.path.join(tmp, "params"), params)
      ckptr.wait_until_finished()


def _save_model_shared(path, config, params, tokenizer, replace):
  from jax.experimental import multihost_utils
  if is_model_dir(path):
    if not replace:
      raise FileExistsError(f"{path} is already a model directory; choose a new directory.")
    if jax.process_index() == 0:
      path.rmtree()
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"save_model {path}: old model deleted")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path / "params", params, force=True)
    ckptr.wait_until_finished()
  if jax.process_index() == 0:
    for name, data in (tokenizer.files() if tokenizer is not None else {}).items():
      (path / name).write_bytes(data)
    (path / CONFIG_FILE).write_text(json.dumps(config_to_dict(config), indent=2))
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"save_model {path}")


def load_config(path: str):
  file = os.path.join(path, CONFIG_FILE)
  return config_from_dict(fileutil.read_json(file), source=file)


def load_model(path: str, config=None, mesh=None):
  """(config, params, tokenizer-or-None) from a `save_model` directory, each array in its stored dtype,
  whatever mesh they were saved from: on this process's first device, or read straight into their shards on
  `mesh` (by `sharding.param_shardings`), so that no device ever holds all of them."""
  from vlm_jax import tokenizer
  from vlm_jax.models.vlm import abstract_params, special_ids
  path = str(path) if is_remote(path) else os.path.abspath(path)
  config = config or load_config(path)
  expected = {"params": abstract_params(config)}
  found = _stored_arrays(os.path.join(path, "params"))
  treeutil.check_shapes(treeutil.flatten(expected), found, f"checkpoint {path}")
  with ocp.StandardCheckpointer() as ckptr:
    stored = treeutil.unflatten({k: v.dtype for k, v in found.items()})
    if mesh is None:
      where = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.local_devices()[0]), expected)
    else:
      from vlm_jax import sharding
      where = {"params": treeutil.unflatten(sharding.param_shardings(treeutil.flatten(expected["params"]), mesh))}
    target = jax.tree.map(lambda x, d, sh: jax.ShapeDtypeStruct(x.shape, d, sharding=sh), expected, stored,
                          where)
    params = ckptr.restore(os.path.join(path, "params"), target)
  return config, params, tokenizer.from_dir(path, special_ids(config))


class TrainCheckpoints:
  """Orbax CheckpointManager for training: params, optimizer state, data iterator state and a JSON meta
  (global step, stage, step within the stage, image size, process count, data rows) per global step. Saves
  are async; Orbax finalises each step directory atomically, so a kill at any moment leaves only complete
  checkpoints behind."""

  def __init__(self, directory: str, keep: int = 3):
    import grain
    self._grain = grain
    self.directory = str(directory) if is_remote(directory) else os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  @classmethod
  def latest_meta(cls, directory: str, keep: int = 3):
    """(latest step, its meta) of an existing checkpoint directory, or (None, None) where it holds none."""
    ckpts = cls(directory, keep)
    try:
      latest = ckpts.latest_step()
      return latest, ckpts.read_meta(latest) if latest is not None else None
    finally:
      ckpts.close()

  def latest_step(self):
    return self.manager.latest_step()

  def read_meta(self, step: int) -> dict:
    restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"])

  def save(self, step: int, params, opt_state, data_iterator, meta: dict):
    args = ocp.args.Composite(params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
                              meta=ocp.args.JsonSave(meta), data=self._grain.checkpoint.CheckpointSave(data_iterator))
    self.manager.save(step, args=args, force=True)

  def restore(self, step: int, abstract_params, abstract_opt_state, data_iterator):
    """Restores onto the shardings/dtypes of the abstract trees (any mesh, any number of processes), and the
    iterator in place unless it is None (grain keeps one iterator state per process, so a checkpoint saved
    by another number of processes has none for this one). Params of another model (the workdir holds a run
    of a different config) fail with every mis-shaped, missing or extra key named, before any array is read."""
    treeutil.check_shapes(treeutil.flatten(abstract_params),
                          _stored_arrays(epath.Path(self.directory) / str(step) / "params"),
                          f"the step {step} checkpoint in {self.directory} (a run of another model config: resume "
                          "with that config, or start this one in a new workdir)")
    args = {"params": ocp.args.StandardRestore(abstract_params),
            "opt_state": ocp.args.StandardRestore(abstract_opt_state)}
    if data_iterator is not None:
      args["data"] = self._grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    except ValueError as e:
      if "tree structures do not match" not in str(e):
        raise
      # The params fit (checked above): the optimizer state covers another set of trainable params.
      raise ValueError(f"the optimizer state of the step {step} checkpoint in {self.directory} does not match this "
                       "config's (another optim or frozen set? resume with the config that wrote it, or start "
                       f"this one in a new workdir): {str(e)[:300]}") from e
    return restored["params"], restored["opt_state"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
