"""Reading a trained model (params only) out of a stage's orbax checkpoint directory.

Our stages save `state` = {"params", "opt", "step", "rng"} and `extra` = {"config": the run's
config as a dict, "model": the model's ModelConfig, "data_position", ...} (see
rlhf_jax.train.checkpoint and train.stage.checkpoint_extra). Collecting
preferences needs only the params, so this restores `state["params"]` alone (orbax partial
restore: the optimiser moments, twice the params' size, are never read) onto the mesh, and
rebuilds the model and the task (tokenizer, special ids) from the config saved in the same
checkpoint, so a checkpoint directory is all a user has to name.
"""
import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from rlhf_jax import configs, models, parallel
from rlhf_jax.train import checkpoint as ckpt_lib
from rlhf_jax.train import task as task_lib

# Written by orbax when a step is committed (rlhf_jax.train.checkpoint checks the same file):
# a step directory without it is a save that never finished.
_COMMIT_MARKER = "commit_success.txt"


@dataclasses.dataclass
class Restored:
  module: Any
  params: Any
  config: ml_collections.ConfigDict  # The training run's config, as saved.
  task: task_lib.Task
  step: int
  directory: str


def checkpoint_directory(path: str | os.PathLike) -> str:
  """The directory holding step sub-directories: `path/checkpoints` (a stage workdir such as
  QUICKSTART_DIR/sft) or `path` itself."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"{path}: no such checkpoint directory")
  nested = os.path.join(path, "checkpoints")
  return nested if os.path.isdir(nested) else path


def latest_committed_step(directory: str) -> int:
  """The newest step that was committed and whose files match their integrity manifest (a
  step saved before manifests existed counts as committed)."""
  steps = sorted((int(n) for n in os.listdir(directory) if n.isdigit()), reverse=True)
  for step in steps:
    step_dir = os.path.join(directory, str(step))
    if not os.path.isfile(os.path.join(step_dir, _COMMIT_MARKER)):
      logging.warning("%s: not committed (an unfinished save); trying an older step", step_dir)
      continue
    try:
      ckpt_lib.verify_manifest(step_dir)
    except ckpt_lib.IntegrityError as e:
      logging.warning("%s: %s; trying an older step", step_dir, e)
      continue
    return step
  raise FileNotFoundError(f"{directory}: no committed checkpoint step (found step "
                          f"directories {sorted(steps)}); point at a stage workdir or its "
                          "checkpoints/ directory")


def _manager(directory: str) -> ocp.CheckpointManager:
  # PyTreeCheckpointHandler reads what StandardCheckpointHandler wrote (the same format) and
  # supports partial restore.
  return ocp.CheckpointManager(
      directory, item_names=("state", "extra"),
      item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                     "extra": ocp.JsonCheckpointHandler()},
      options=ocp.CheckpointManagerOptions(read_only=True, create=False))


def restore(path: str | os.PathLike, *, role: str, mesh, rules) -> Restored:
  """Params of `role` ("policy" from SFT, "reward" from the reward stage) placed on `mesh`.

  The reward stage trains an ensemble with params stacked on a leading member axis; they come
  back stacked ([k, ...]), as `rlhf_jax.train.scoring.score_sequences` expects.
  """
  directory = checkpoint_directory(path)
  step = latest_committed_step(directory)
  manager = _manager(directory)
  try:
    extra = manager.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))["extra"]
    if "config" not in extra:
      raise ValueError(f"{directory}/{step}: the checkpoint's extra item has no 'config'; it "
                       "was not written by an rlhf_jax stage")
    config = ml_collections.ConfigDict(extra["config"])
    task = task_lib.build_task(config)
    # The model's own config is stored beside the run's since models can come from HF
    # directories; older checkpoints only have config.model.
    model_cfg = (models.config_from_dict(extra["model"]) if "model" in extra else
                 configs.model_config(config.model, task.vocab_size))
    module = models.build_model(model_cfg, role)
    sample = jnp.zeros((1, 1), jnp.int32)
    shapes, specs = parallel.abstract_params(module, sample)
    shardings = parallel.logical_to_shardings(specs, shapes, mesh, rules)
    stacked = None
    if role == "reward":
      stacked = int(config.reward.ensemble_size)
      shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct((stacked, *s.shape), s.dtype),
                            shapes)
      shardings = jax.tree.map(lambda s: NamedSharding(s.mesh, P(None, *s.spec)), shardings)
    target = jax.tree.map(lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h),
                          shapes, shardings)
    restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), target)
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item={"params": target}, restore_args={"params": restore_args},
        partial_restore=True)))["state"]
  finally:
    manager.close()
  logging.info("restored %s params of step %d from %s%s", role, step, directory,
               f" ({stacked} ensemble members)" if stacked else "")
  return Restored(module, state["params"], config, task, step, directory)
