"""Entry point: python -m rlhf_jax.main --config=experiments/quickstart/config.py --workdir=DIR

Thin by design (flax lm1b): flags, multi-host set-up (parallel.distributed.initialize), the
checks of the whole resolved config before anything is written or trained, then either the
library pipeline (train/pipeline.py: config.stages) or an experiment's driver named by the
config (config.driver = "package.module:function", e.g. "experiments.frontier.run:run"; its
module may define validate(config) too). Everything else lives in importable libraries that
colabs and tests call directly.

Console: third-party INFO logging (orbax, jax, ...) is off; --verbosity (absl's own flag)
takes over when given: 0 brings every INFO line back, -1 keeps warnings only.

Host memory: on a CPU backend the run starts again, before JAX loads, with glibc settings that
keep the memory XLA:CPU frees for the next step (rlhf_jax.host_memory; 25% off a long-sequence
DPO step here). RLHF_JAX_HOST_MALLOC=system turns that off.
"""
if __name__ == "__main__":  # Before anything imports JAX: the process may start again here.
  from rlhf_jax import host_memory
  host_memory.reexec_with_retained_memory()

import importlib  # noqa: E402
import json
import logging as std_logging
import os
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from rlhf_jax import configs
from rlhf_jax.parallel import distributed
from rlhf_jax.train import pipeline  # Importing JAX touches no backend: initialize still first.

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:arg].",
                                          lock_config=True)


class _CheckedConfigParser(flags.ArgumentParser):
  """The config file's parser, with the two mistakes it reports badly (a traceback, or an
  AttributeError deep in a later check) turned into flag errors that name the file."""

  def __init__(self, parser):
    self._parser = parser

  def parse(self, argument):
    path = argument.split(":", 1)[0]
    try:
      config = self._parser.parse(argument)
    except AttributeError as e:
      if "get_config" in str(e):
        raise ValueError(f"{path} defines no get_config(arg=None): an experiment config file "
                         "returns its ConfigDict from get_config") from None
      raise
    if not isinstance(config, ml_collections.ConfigDict):
      raise ValueError(f"{path}: get_config() returned a {type(config).__name__}, not an "
                       "ml_collections.ConfigDict (return configs.lock(config))")
    return config

  def flag_type(self):
    return self._parser.flag_type()


flags.FLAGS["config"].parser = _CheckedConfigParser(flags.FLAGS["config"].parser)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, results.")
flags.mark_flags_as_required(["config", "workdir"])

_OURS = (os.sep + "rlhf_jax" + os.sep, os.sep + "experiments" + os.sep)


class _OwnInfoOnly(std_logging.Filter):
  """Passes warnings and errors from anywhere, INFO only from rlhf_jax and experiments: orbax
  and friends log hundreds of INFO lines per checkpoint through the same absl logger."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or any(p in record.pathname for p in _OURS)


def quiet_third_party() -> None:
  """Our INFO lines without third-party ones, unless --verbosity is given (then it decides
  for everyone: 0 = all INFO lines, -1 = warnings only)."""
  if flags.FLAGS["verbosity"].present:
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
  validate, run = resolve(config)
  # Everything that can be refused is refused here, before the workdir is touched.
  validate(config)
  if "stages" in config:
    pipeline.preflight(config)
  os.makedirs(workdir, exist_ok=True)
  if distributed.is_main_process():
    print(config, flush=True)
    _write_if_changed(os.path.join(workdir, "config.json"),
                      json.dumps(config.to_dict(), indent=2, default=str))
  run(config, workdir)


def _write_if_changed(path: str, text: str) -> None:
  """Rewrites only when the content differs: rerunning a finished run needs no write access."""
  if os.path.isfile(path):
    with open(path) as f:
      if f.read() == text:
        return
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


if __name__ == "__main__":
  app.run(main)
