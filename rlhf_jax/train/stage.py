"""What every stage shares: the typed result a stage hands on, where its model comes from, the
checks every stage's `validate` makes, the host-loop settings, and the HF export it ends with.

Every stage module (sft, reward, preference, rl, best_of_n) has the same three functions:

    default_config() -> ConfigDict        # its section of the config, documented
    validate(config) -> None              # every check that can fail before anything trains
    run(config, workdir, init=None, ...) -> StageResult

`init` is where the stage's model starts: an earlier stage's StageResult (its params and
module), a local HF directory, or None: the section's `init_hf_dir`, else `config.model_dir`,
else fresh weights of `config.model`. A stage writes everything under its workdir (metrics,
TensorBoard, checkpoints, a curves PNG) and ends by exporting `<workdir>/hf/`: the model in HF
layout in the dtype it came in (`config.export.dtype` overrides), with the tokenizer files,
chat template and a generation_config.json.
"""
import dataclasses
import math
import os
from typing import Any, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from jax.sharding import Mesh

from rlhf_jax import configs, data, models, parallel, rng
from rlhf_jax.train import loop as loop_lib
from rlhf_jax.train import optim
from rlhf_jax.train import task as task_lib


@dataclasses.dataclass
class StageResult:
  """What a stage hands to the next one (and to experiment drivers)."""
  name: str  # The stage's sub-directory name: "sft", "reward", "dpo", "ppo", "grpo", "rloo".
  module: models.Transformer  # Of the trained model (a reward model's: role "reward").
  params: Any  # Plain params; a reward ensemble's are stacked on a leading member axis.
  task: task_lib.Task
  mesh: Mesh
  metrics: dict[str, Any]  # Final held-out metrics.
  workdir: str
  hf_dir: str | None = None  # The HF export, <workdir>/hf (None when export is off).
  dtype: str = "float32"  # The stored dtype the weights came in with (kept by exports).


Init = StageResult | str | None


# ---------------------------------------------------------------------------------------------
# Checks for validate(config)
# ---------------------------------------------------------------------------------------------


def _value(config, key: str):
  value = config
  for part in key.split("."):
    value = value[part]
  return value


def check_positive(config, *keys: str) -> None:
  """Each config key (dotted, below `config`) holds a number >= 1 (sizes, steps, counts)."""
  for key in keys:
    value = _value(config, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"config.{key}={value!r}: must be an integer >= 1")


def check_at_least(config, minimum: float, *keys: str) -> None:
  for key in keys:
    value = _value(config, key)
    if not isinstance(value, (int, float)) or not value >= minimum:
      raise ValueError(f"config.{key}={value!r}: must be >= {minimum}")


def check_choice(config, key: str, choices: Iterable) -> None:
  value = _value(config, key)
  if value not in tuple(choices):
    raise ValueError(f"config.{key}={value!r}: expected one of {tuple(choices)}")


def check_finite(config: ml_collections.ConfigDict, prefix: str = "config") -> None:
  """Every float anywhere in the config is finite (NaN/Inf name their key here, not later)."""
  for key, value in config.items():
    name = f"{prefix}.{key}"
    if isinstance(value, ml_collections.ConfigDict):
      check_finite(value, name)
    elif isinstance(value, float) and not math.isfinite(value):
      raise ValueError(f"{name}={value}: must be a finite number")


def batch_axes_size(config) -> int:
  """Devices the batch axis is split over (data x fsdp) on this run's mesh (config.mesh; its
  "dcn" part only says how each axis is laid out, not how large it is)."""
  spec = {k: v for k, v in config.mesh.to_dict().items() if k != "dcn"}
  try:
    sizes = parallel.mesh_shape(spec, jax.device_count())
  except ValueError as e:
    raise ValueError(f"config.mesh: {e}") from None
  shape = dict(zip(parallel.MESH_AXES, sizes))
  return shape["data"] * shape["fsdp"]


def check_batch(config, key: str, value: int | None = None, accum_key: str | None = None
                ) -> None:
  """A global batch size splits over the processes, the batch devices and micro-batches."""
  value = _value(config, key) if value is None else value
  what = f"config.{key}={value}"
  if value < 1:
    raise ValueError(f"{what}: must be >= 1")
  if value % jax.process_count():
    raise ValueError(f"{what} must be divisible by the number of processes "
                     f"({jax.process_count()}): each feeds an equal share")
  devices = batch_axes_size(config)
  accum = _value(config, accum_key) if accum_key else 1
  if value % (devices * accum):
    raise ValueError(f"{what} must be divisible by the batch devices (data x fsdp = {devices})"
                     + (f" x config.{accum_key}={accum}" if accum_key else "")
                     + ": every device takes an equal share of every (micro-)batch")


def check_optim(config, section: str) -> None:
  key = f"{section}.optim"
  cfg = _value(config, key)
  if not cfg.lr > 0:
    raise ValueError(f"config.{key}.lr={cfg.lr}: must be > 0")
  check_choice(config, f"{key}.schedule", optim.SCHEDULES)
  check_at_least(config, 0, f"{key}.warmup_steps", f"{key}.weight_decay", f"{key}.grad_clip")
  check_positive(config, f"{key}.accum_steps")
  for name in ("b1", "b2", "end_lr_fraction"):
    if not 0 <= cfg[name] <= 1:
      raise ValueError(f"config.{key}.{name}={cfg[name]}: must lie in [0, 1]")
  if not cfg.eps > 0:
    raise ValueError(f"config.{key}.eps={cfg.eps}: must be > 0")


def check_run(config) -> None:
  check_positive(config, "run.log_every", "run.checkpoint_every", "run.keep_checkpoints",
                 "run.max_nonfinite")
  check_at_least(config, 0, "run.max_loss", "run.max_update_norm")  # 0 = no bound.


# ---------------------------------------------------------------------------------------------
# Where a stage's model comes from
# ---------------------------------------------------------------------------------------------


def init_source(config, section: str, init: Init) -> Init:
  """The explicit `init`, else config.<section>.init_hf_dir, else config.model_dir, else None
  (fresh weights)."""
  if init is not None:
    return init
  return config[section].get("init_hf_dir") or config.get("model_dir") or None


def compute_config(cfg: models.ModelConfig, model: ml_collections.ConfigDict
                   ) -> models.ModelConfig:
  """`cfg` with the run's numerics (config.model.dtype, remat): they are settings of the run,
  not of the weights, so they apply to a loaded model too. Params stay float32."""
  return dataclasses.replace(cfg, dtype=model.get("dtype", cfg.dtype),
                             remat=model.get("remat", cfg.remat))


def check_vocab(task: task_lib.Task, cfg: models.ModelConfig, where: str) -> None:
  """The model must have an embedding row for every id the tokenizer can produce."""
  if task.vocab_size > cfg.vocab_size:
    raise ValueError(
        f"{where}: the tokenizer produces ids up to {task.vocab_size - 1} (added tokens "
        f"included) but the model's vocabulary has {cfg.vocab_size} rows: resize the model's "
        "embeddings to the tokenizer (e.g. transformers' resize_token_embeddings) and save it "
        "again, or use the tokenizer the model was trained with")


def _fresh_heads(module, key: jax.Array, mesh: Mesh, rules) -> dict:
  """The params of `module` other than its backbone, initialised as module.init would; the
  backbone's init is dead code XLA removes, so it is never materialised."""
  sample = jnp.ones((1, 8), jnp.int32)
  shardings = parallel.param_shardings(module, mesh, rules, sample)
  heads = [k for k in shardings if k != "backbone"]
  with parallel.mesh_context(mesh, rules):
    return jax.jit(lambda k: {h: nn.unbox(module.init(k, sample)["params"])[h] for h in heads},
                   out_shardings={h: shardings[h] for h in heads})(key)


def start_policy(config, section: str, init: Init, *others: Init):
  """(task, mesh, module, params, stored dtype) of a stage that trains or samples a policy:
  the task of the first StageResult among `init` and `others` (else built from config), the
  run's mesh, and the policy from init_source (a fresh one from the "sft" stream, as the SFT
  stage draws it)."""
  task = next((r.task for r in (init, *others) if isinstance(r, StageResult)), None)
  task = task or task_lib.build_task(config)
  mesh = parallel.make_mesh(config.mesh.to_dict())
  module, params, dtype = load_model(
      config, init_source(config, section, init), task=task, mesh=mesh, role="policy",
      fresh_key=rng.key(config.seed, "sft"), where=f"config.{section}.init_hf_dir")
  return task, mesh, module, params, dtype


def load_model(config, source: Init, *, task: task_lib.Task, mesh: Mesh, role: str,
               fresh_key: jax.Array, where: str) -> tuple[models.Transformer, Any, str]:
  """(module of `role`, params, stored dtype) from an HF directory, an earlier result or fresh.

  `where` names the config key the source came from, for errors. From a StageResult of
  another role (e.g. a reward model from the SFT policy) only the backbone is carried over;
  the head of `role` is fresh (from `fresh_key`).
  """
  rules = config.sharding
  sample = jnp.ones((1, 8), jnp.int32)
  if isinstance(source, StageResult):
    module = models.build_model(compute_config(source.module.cfg, config.model), role)
    params, dtype = source.params, source.dtype
    if source.module.role != role:  # The backbone carried over, the heads of `role` fresh.
      params = {**_fresh_heads(module, fresh_key, mesh, rules),
                "backbone": params["backbone"]}
  elif isinstance(source, str):
    dtype = models.source_dtype(source)
    module, params = models.load_hf(source, role=role, mesh=mesh, rules=rules,
                                    dtype=config.model.get("dtype"), key=fresh_key)
    module = models.build_model(compute_config(module.cfg, config.model), role)
  else:
    cfg = configs.model_config(config.model, task.vocab_size)
    module = models.build_model(cfg, role)
    params = parallel.init_params(module, fresh_key, sample, mesh=mesh, rules=rules)
    dtype = "float32"
  check_vocab(task, module.cfg, where)
  return module, params, dtype


def reward_dirs(path: str, where: str) -> list[str]:
  """The HF directories of a reward model: `path` itself, or its member_<i> sub-directories
  (an ensemble the reward stage exported), in member order. Each must be a sequence
  classifier (a score head), not a causal LM: a missing head would score with random
  weights."""
  members = [d for d in os.listdir(path) if d.startswith("member_")] if os.path.isdir(
      path) else []
  dirs = [os.path.join(path, d) for d in sorted(members, key=lambda d: int(d.split("_")[1]))]
  for directory in dirs or [path]:
    hf, _ = models.hf.read_hf_config(directory)
    if not any(a.endswith("ForSequenceClassification") for a in hf.get("architectures") or ()):
      raise ValueError(f"{where}={path}: {directory} holds {hf.get('architectures')}, not a "
                       "reward model (*ForSequenceClassification with a score head)")
  return dirs or [path]


def load_reward(config, path: str, task: task_lib.Task, mesh: Mesh, where: str):
  """(reward module, params stacked [k, ...]) from `reward_dirs(path)`. Its backbone may
  differ from the policy's; its vocabulary must cover the tokenizer's."""
  loaded = [models.load_hf(d, role="reward", mesh=mesh, rules=config.sharding,
                           dtype=config.model.get("dtype")) for d in reward_dirs(path, where)]
  module = loaded[0][0]
  check_vocab(task, module.cfg, f"{where}={path}")
  return module, parallel.stack_placed([p for _, p in loaded])


def reward_model(config, section: str, reward: Init, task: task_lib.Task, mesh: Mesh):
  """(module, stacked params) of the reward model a policy stage scores with: `reward` (the
  reward stage's result or an HF directory), else config.<section>.reward_hf_dir; None when
  neither is given and config.<section>.reward_source is "gold"."""
  if isinstance(reward, StageResult):
    return reward.module, reward.params
  path = reward or config[section].reward_hf_dir
  if path:
    return load_reward(config, path, task, mesh, f"config.{section}.reward_hf_dir")
  if config[section].reward_source == "model":
    raise ValueError(f"config.{section}.reward_source='model' needs a reward model: run the "
                     "reward stage before this one, or name an HF reward model in "
                     f"config.{section}.reward_hf_dir")
  return None


# ---------------------------------------------------------------------------------------------
# Loop settings and export
# ---------------------------------------------------------------------------------------------


def loop_config(cfg: ml_collections.ConfigDict, run: ml_collections.ConfigDict, *,
                steps: int | None = None, log_every: int | None = None
                ) -> loop_lib.LoopConfig:
  return loop_lib.LoopConfig(total_steps=cfg.steps if steps is None else steps,
                             log_every=run.log_every if log_every is None else log_every,
                             eval_every=cfg.eval_every, checkpoint_every=run.checkpoint_every,
                             keep_checkpoints=run.keep_checkpoints,
                             max_nonfinite=run.max_nonfinite,
                             max_loss=run.get("max_loss", loop_lib.DEFAULT_MAX_LOSS),
                             max_update_norm=run.get("max_update_norm",
                                                     loop_lib.DEFAULT_MAX_UPDATE_NORM),
                             optim=cfg.optim.to_dict())


def checkpoint_extra(config, module) -> dict[str, Any]:
  """The JSON stored with every checkpoint: the run's config and the model's own config (so a
  checkpoint of a model loaded from an HF directory can be read back without that directory:
  collect.checkpoints.restore)."""
  return {"config": config.to_dict(), "model": models.config_to_dict(module.cfg)}


def export_dtype(config, dtype: str) -> str:
  """config.export.dtype, else the dtype the weights came in with."""
  return (config.export.dtype if "export" in config and config.export.dtype else dtype)


def save_tokenizer(directory: str, task: task_lib.Task) -> None:
  """The task's tokenizer next to an export, with the special tokens the run used (config.task
  eos/pad/bos_token overrides included): a user's tokenizer files are copied with those tokens
  written in, a tokenizer without files of its own (a bare tokenizer.json, the review world's)
  is written with them. The exported tokenizer then pads and stops as training did."""
  tok = task.tokenize_config
  used = {"eos_token": tok.eos_id, "pad_token": tok.pad_id, "bos_token": tok.bos_id}
  data.save_tokenizer_files(directory, task.tokenizer_files, **{
      name: task.tokenizer.id_to_token(i) for name, i in used.items() if i is not None})


def export(config, workdir: str, module, params, task: task_lib.Task, dtype: str
           ) -> str | None:
  """Writes <workdir>/hf: the model (a causal LM; a reward model as a sequence classifier),
  the tokenizer files and the generation config. A stacked reward ensemble of k > 1 members
  is written member by member, hf/member_<i>. Returns the directory (None: export is off)."""
  if "export" in config and not config.export.enabled:
    return None
  out = os.path.join(workdir, "hf")
  stored = export_dtype(config, dtype)
  if module.role == "reward":
    k = jax.tree.leaves(params)[0].shape[0]
    members = [jax.tree.map(lambda x, i=i: x[i], params) for i in range(k)]
    dirs = [out] if k == 1 else [os.path.join(out, f"member_{i}") for i in range(k)]
  else:
    members, dirs = [params], [out]
  for member, directory in zip(members, dirs):
    models.save_hf(module, member, directory, dtype=stored, special_ids=task.special_ids)
    if jax.process_index() == 0:
      save_tokenizer(directory, task)
  logging.info("exported %s (%s, %s) to %s", module.role, module.cfg.arch, stored, out)
  return out
