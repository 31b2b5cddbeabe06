"""Helpers for experiment configs (ml_collections), big_vision style.

    def get_config(arg=None):
      arg = configs.parse_arg(arg, variant="tiny", runlocal=False)
      ...
      return configs.lock(config)
"""
import ast
from typing import Any

import ml_collections
from ml_collections import config_dict

from rlhf_jax import models


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """"variant=small,runlocal" -> ConfigDict(variant="small", runlocal=True); typed by defaults.

  A bare name sets a boolean default to True. Unknown names and ill-typed values are errors.
  """
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    name, eq, value = item.partition("=")
    name = name.strip()
    if name not in defaults:
      raise ValueError(f"unknown config argument {name!r} in {arg!r}; expected some of "
                       f"{sorted(defaults)}")
    default = defaults[name]
    if not eq:
      if not isinstance(default, bool):
        raise ValueError(f"config argument {name!r} needs a value ({name}=...)")
      out[name] = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {name}={value!r}: expected true or false")
      out[name] = value.lower() in ("true", "1")
    elif isinstance(default, str):
      out[name] = value
    else:
      try:
        out[name] = type(default)(ast.literal_eval(value))
      except (ValueError, SyntaxError) as e:
        raise ValueError(f"config argument {name}={value!r}: expected a "
                         f"{type(default).__name__}") from e
  return ml_collections.ConfigDict(out)


def lock(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Locked: assigning a key that does not exist is an error naming it."""
  config.lock()
  return config


def unset_required(config: ml_collections.ConfigDict, prefix: str = "config") -> list[str]:
  """Names of the required fields (see `required`) that are still unset."""
  missing = []
  for key, value in config.items(preserve_field_references=True):
    name = f"{prefix}.{key}"
    if isinstance(value, config_dict.FieldReference):
      if isinstance(value, RequiredField) and value.get() is None:
        missing.append(name)
    elif isinstance(value, ml_collections.ConfigDict):
      missing.extend(unset_required(value, name))
  return missing


def check_required(config: ml_collections.ConfigDict) -> None:
  missing = unset_required(config)
  if missing:
    raise ValueError(f"required config values are unset: {', '.join(missing)} "
                     "(set them with --config.KEY=VALUE)")


class RequiredField(config_dict.FieldReference):
  """A typed field that must be set before a run starts (checked by `check_required`).

  ml_collections' own required_placeholder raises on every read, including the one
  ConfigDict.lock() makes, so it cannot live in a locked config.
  """


def required(field_type: type) -> config_dict.FieldReference:
  """A required field: typed, None until set on the command line or in the file."""
  return RequiredField(None, field_type=field_type)


def model_config(cfg: ml_collections.ConfigDict, vocab_size: int | None = None
                 ) -> models.ModelConfig:
  """ModelConfig from config.model = {size: name, **ModelConfig overrides}.

  vocab_size (e.g. the task's vocabulary) is used unless the config sets one.
  """
  overrides: dict[str, Any] = {k: v for k, v in cfg.items() if k != "size" and v is not None}
  if vocab_size is not None and "vocab_size" not in overrides:
    overrides["vocab_size"] = vocab_size
  return models.get_config(cfg.size, **overrides)


def review_world_base(*, size: str = "tiny", runlocal: bool = False) -> ml_collections.ConfigDict:
  """The parts every review-world experiment shares: model, mesh, task, run and distributed.

  The `tiny` family shrunk to the world's scale (vocab_size comes from the task). Experiment
  files add their stage sections (sft, reward, dpo, ...) and set `stage`.
  """
  c = ml_collections.ConfigDict()
  c.stage = ""
  c.seed = 0
  c.model = ml_collections.ConfigDict(dict(size=size, d_model=128, n_layers=2, n_heads=4,
                                           mlp_dim=352, max_len=128))
  # Total size per axis; dcn: the part of it that spans slices/hosts (pod-shaped meshes,
  # parallel.make_hybrid_mesh). All ones: a plain mesh.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1,
                                          dcn=dict(data=1, fsdp=1, tensor=1)))
  c.sharding = "fsdp"
  c.task = ml_collections.ConfigDict(dict(
      kind="review_world", world_seed=0, n_sft=20_000, n_eval=500,
      # Gold-labelled pairs of the process's own samples (standalone reward / DPO stages).
      n_pairs=10_000, n_eval_pairs=1_000, k=4, label_temperature=0.0))
  c.run = ml_collections.ConfigDict(dict(log_every=10, checkpoint_every=100,
                                         keep_checkpoints=2, max_nonfinite=5))
  # Multi-host (parallel.distributed.initialize): off unless a coordinator is given here or in
  # $RLHF_JAX_COORDINATOR, or enabled=True (JAX detects the cluster: TPU pod, SLURM, ...).
  c.distributed = ml_collections.ConfigDict(dict(
      enabled=False, coordinator_address="", num_processes=1, process_id=0,
      initialization_timeout=300))
  # LoRA adapters for the DPO and PPO policies (models/lora.py): rank 0 = full fine-tuning.
  c.lora = models.lora.default_config()
  if runlocal:
    c.task.n_sft, c.task.n_eval = 4_000, 200
    c.task.n_pairs, c.task.n_eval_pairs = 2_000, 200
    c.run.checkpoint_every = 40
  return c


def add_review_world_stages(c: ml_collections.ConfigDict, *, runlocal: bool = False
                            ) -> ml_collections.ConfigDict:
  """The stage sections of the review-world pipeline, tuned to its scale: sft, sampling (k
  policy samples per prompt, gold-labelled into pairs), reward, dpo, ppo and eval (held-out
  prompts for gold reward and KL). Experiments override what they study."""
  # Imported here: the stage modules import this one.
  from rlhf_jax.train.optim import default_optim_config
  from rlhf_jax.train.ppo import default_ppo_config
  from rlhf_jax.train.preference import default_dpo_config

  c.sft = ml_collections.ConfigDict(dict(
      steps=300, rows=8, length=128, max_sequences=32, eval_every=100, eval_batch_size=64,
      optim=default_optim_config()))
  c.sft.optim.lr, c.sft.optim.warmup_steps = 3e-3, 20
  c.sampling = ml_collections.ConfigDict(dict(
      train_prompts=256, eval_prompts=128, k=4, max_new_tokens=48, temperature=1.0,
      batch_size=256, label_temperature=0.0))
  c.reward = ml_collections.ConfigDict(dict(
      steps=150, batch_size=32, ensemble_size=1, use_margin=False, center_coef=0.0,
      eval_every=50, eval_batch_size=256, optim=default_optim_config()))
  c.reward.optim.lr = 1e-3
  c.dpo = default_dpo_config()
  c.dpo.optim.lr, c.dpo.optim.warmup_steps = 1e-4, 10
  c.dpo.steps, c.dpo.batch_size, c.dpo.eval_every = 150, 32, 50
  c.ppo = default_ppo_config()
  c.ppo.update(dict(iterations=30, train_prompts=4096, prompts_per_iter=64, minibatch_size=32,
                    epochs=2, max_new_tokens=48, kl_coef=0.05, kl_target=3.0, kl_horizon=1000,
                    eval_every=10))
  c.ppo.optim.lr = 3e-5
  c.eval = ml_collections.ConfigDict(dict(prompts=128, k=4))
  if runlocal:
    c.sft.steps, c.sft.eval_every = 80, 40
    c.sampling.train_prompts, c.sampling.eval_prompts, c.sampling.batch_size = 64, 32, 128
    c.reward.steps, c.reward.eval_every = 60, 30
    c.dpo.steps, c.dpo.eval_every, c.dpo.batch_size = 40, 20, 16
    c.ppo.iterations, c.ppo.prompts_per_iter, c.ppo.minibatch_size = 6, 32, 16
    c.ppo.eval_every = 3
    c.eval.prompts, c.eval.k = 32, 2
  return c
