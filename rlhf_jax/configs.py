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


def base_config(*, size: str = "tiny") -> ml_collections.ConfigDict:
  """The sections every run shares: seed, model, mesh, sharding, run (the host loop),
  distributed, lora and export, plus `stages` (what the library pipeline runs,
  train/pipeline.py) and `driver` (an experiment's "package.module:function" that main.py runs
  instead; "" = the pipeline). Stage sections (sft, reward, dpo, ppo, ...) are added by each
  experiment from the stage modules' default_config()."""
  c = ml_collections.ConfigDict()
  c.stages = ("sft",)
  c.driver = ""
  c.seed = 0
  # A fresh model: a named size (models.SIZES) with ModelConfig overrides. dtype is the compute
  # dtype (params stay float32) and remat rematerialises blocks: both also apply to a model
  # loaded from an HF directory.
  c.model = ml_collections.ConfigDict(dict(size=size, dtype="float32", remat=False))
  # Total size per axis; dcn: the part of it that spans slices/hosts (pod-shaped meshes,
  # parallel.make_hybrid_mesh). All ones: a plain mesh.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1,
                                          dcn=dict(data=1, fsdp=1, tensor=1)))
  c.sharding = "fsdp"
  # The host loop (train/loop.py). max_loss / max_update_norm: a step whose |loss| or applied
  # update norm exceeds them stops the run before that state is checkpointed (0 = off). The
  # defaults are loop.DEFAULT_MAX_LOSS / DEFAULT_MAX_UPDATE_NORM, justified there: far above
  # healthy runs (an Adam update's norm is ~lr * sqrt(#params): ~260 for 70B at lr 1e-3), far
  # below an explosion (lr = 1e30).
  c.run = ml_collections.ConfigDict(dict(log_every=10, checkpoint_every=100,
                                         keep_checkpoints=2, max_nonfinite=5,
                                         max_loss=1e6, max_update_norm=1e4))
  # Multi-host (parallel.distributed.initialize): off unless a coordinator is given here or in
  # $RLHF_JAX_COORDINATOR, or enabled=True (JAX detects the cluster: TPU pod, SLURM, ...).
  c.distributed = ml_collections.ConfigDict(dict(
      enabled=False, coordinator_address="", num_processes=1, process_id=0,
      initialization_timeout=300))
  # LoRA adapters for the DPO and PPO policies (models/lora.py): rank 0 = full fine-tuning.
  c.lora = models.lora.default_config()
  # Each stage ends by writing <its workdir>/hf in HF layout; dtype "" = the dtype the weights
  # came in with (bfloat16 in, bfloat16 out), or "float32" / "bfloat16".
  c.export = ml_collections.ConfigDict(dict(enabled=True, dtype=""))
  return c


def check_model(config: ml_collections.ConfigDict) -> None:
  """config.model: a known size, positive shapes, a known dtype (ModelConfig's own checks
  run too, naming the section), and config.export.dtype."""
  cfg = config.model
  if cfg.size not in models.SIZES:
    raise ValueError(f"config.model.size={cfg.size!r}; expected one of {sorted(models.SIZES)}")
  for key in ("vocab_size", "d_model", "n_layers", "n_heads", "mlp_dim", "max_len"):
    value = cfg.get(key)
    if value is not None and (not isinstance(value, int) or value < 1):
      raise ValueError(f"config.model.{key}={value!r}: must be an integer >= 1")
  if cfg.get("dtype", "float32") not in models.config.DTYPES:
    raise ValueError(f"config.model.dtype={cfg.dtype!r}; expected one of "
                     f"{tuple(models.config.DTYPES)}")
  try:
    model_config(cfg)
  except ValueError as e:
    raise ValueError(f"config.model: {e}") from None
  export = config.get("export")
  if export is not None and export.dtype not in ("", "float32", "bfloat16"):
    raise ValueError(f"config.export.dtype={export.dtype!r}; expected '', 'float32' or "
                     "'bfloat16'")
