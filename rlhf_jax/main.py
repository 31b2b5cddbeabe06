"""Entry point: python -m rlhf_jax.main --config=experiments/quickstart/config.py --workdir=DIR

Thin by design (flax lm1b): flags, multi-host set-up (parallel.distributed.initialize), the
checks of the whole resolved config before anything is written or trained, then either the
library pipeline (train/pipeline.py: config.stages) or an experiment's driver named by the
config (config.driver = "package.module:function", e.g. "experiments.frontier.run:run"; its
module may define validate(config) too). Everything else lives in importable libraries that
colabs and tests call directly.

Console: third-party INFO logging (orbax, jax, ...) is off; --verbosity=0 (absl's own flag)
brings it back, -1 keeps only our warnings.
"""
import importlib
import json
import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from rlhf_jax import configs
from rlhf_jax.parallel import distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:arg].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, results.")
flags.mark_flags_as_required(["config", "workdir"])

_OURS = (os.sep + "rlhf_jax" + os.sep, os.sep + "experiments" + os.sep)


class _OwnInfoOnly(std_logging.Filter):
  """Passes warnings and errors from anywhere, INFO only from rlhf_jax and experiments: orbax
  and friends log hundreds of INFO lines per checkpoint through the same absl logger."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or any(p in record.pathname for p in _OURS)


def quiet_third_party() -> None:
  """Unless --verbosity was raised explicitly, third-party INFO lines are dropped."""
  if flags.FLAGS["verbosity"].present and flags.FLAGS.verbosity >= 0:
    return
  logging.set_verbosity(logging.INFO)  # Ours; the filter drops everyone else's INFO.
  handler = logging.get_absl_handler()
  handler.addFilter(_OwnInfoOnly())
  std_logging.getLogger().addFilter(_OwnInfoOnly())


def _import(module_name: str):
  """The driver's module; experiments/ is found next to the config file when the working
  directory is elsewhere."""
  try:
    return importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    config_file = os.path.abspath(config_flags.get_config_filename(flags.FLAGS["config"]))
    top = module_name.split(".")[0]
    root = os.path.dirname(config_file)
    while root != os.path.dirname(root) and not os.path.isdir(os.path.join(root, top)):
      root = os.path.dirname(root)
    if e.name != top or not os.path.isdir(os.path.join(root, top)):
      raise
    sys.path.insert(0, root)
    return importlib.import_module(module_name)


def resolve(config):
  """(validate, run) of the config: the library pipeline's, plus the driver's when set."""
  from rlhf_jax.train import pipeline
  spec = config.get("driver", "")
  if not spec:
    return pipeline.validate, pipeline.run
  uses_stages = "stages" in config  # A driver on library stages; else one of its own.
  module_name, _, function = spec.partition(":")
  module = _import(module_name)
  run = getattr(module, function or "run", None)
  if run is None:
    raise app.UsageError(f"config.driver={spec!r}: {module_name} has no function "
                         f"{function or 'run'!r}")
  own = getattr(module, "validate", None)

  def validate(config):
    if uses_stages:
      pipeline.validate(config)
    if own is not None:
      own(config)
  return validate, run


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  quiet_third_party()
  config, workdir = _CONFIG.value, _WORKDIR.value
  configs.check_required(config)
  # Before anything touches a JAX backend: joining a multi-process job must come first.
  distributed.initialize(config.get("distributed"))
  from rlhf_jax.train import pipeline
  validate, run = resolve(config)
  # Everything that can be refused is refused here, before the workdir is touched.
  validate(config)
  if "stages" in config:
    pipeline.preflight(config)
  os.makedirs(workdir, exist_ok=True)
  if distributed.is_main_process():
    print(config, flush=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config.to_dict(), f, indent=2, default=str)
  run(config, workdir)


if __name__ == "__main__":
  app.run(main)
