"""Entry point: python -m rlhf_jax.main --config=experiments/quickstart.py:runlocal --workdir=DIR

Thin by design (flax lm1b): flags, multi-host set-up (parallel.distributed.initialize), then
the stage's run function. Everything else lives in importable libraries that colabs and tests call directly.
"""
import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

from rlhf_jax import configs
from rlhf_jax.parallel import distributed

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:arg].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, results.")
flags.mark_flags_as_required(["config", "workdir"])


def stages():
  """Stage name -> run(config, workdir). Imported lazily: a stage pulls in only what it needs."""
  from rlhf_jax.train import ppo, preference, quickstart, reproductions, reward, sft
  return {"sft": sft.run_sft, "reward": reward.run_reward, "dpo": preference.run_pipeline,
          "ppo": ppo.run_pipeline, "quickstart": quickstart.run,
          "frontier": reproductions.run_frontier, "critic_free": reproductions.run_critic_free}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config, workdir = _CONFIG.value, _WORKDIR.value
  configs.check_required(config)
  # Before anything touches a JAX backend: joining a multi-process job must come first.
  distributed.initialize(config.get("distributed"))
  run_fns = stages()
  if config.stage not in run_fns:
    raise app.UsageError(f"config.stage={config.stage!r}; expected one of {sorted(run_fns)}")
  os.makedirs(workdir, exist_ok=True)
  logging.info("config:\n%s", config)
  if distributed.is_main_process():
    print(config, flush=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      json.dump(config.to_dict(), f, indent=2, default=str)
  run_fns[config.stage](config, workdir)


if __name__ == "__main__":
  app.run(main)
