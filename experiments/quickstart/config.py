"""Quickstart: the RLHF pipeline's stages on the embedded review world.

  python -m rlhf_jax.main --config=experiments/quickstart/config.py --workdir=/tmp/quickstart
  python -m rlhf_jax.main --config=experiments/quickstart/config.py:runlocal --workdir=/tmp/qs

Stages (train/pipeline.py; each resumable in its own sub-directory of the workdir):
  1. SFT a small Llama-style policy on 20k reviews of the seeded review world (packed batches).
  2. Sample k = 4 responses for each of 256 prompts with the jitted KV-cache sampler and label
     all k(k-1)/2 pairs per prompt with the gold reward (as the DPO paper's IMDb set-up).
  3. Train a Bradley–Terry reward model initialised from the SFT backbone.
  4. DPO (β = 0.1) from the SFT policy on the same pairs.
  5. PPO from the SFT policy against the reward model (value net from its backbone, adaptive KL).
Then the driver (experiments/quickstart/run.py) prints and writes (quickstart_results.md/.json)
a table: SFT, DPO and PPO gold reward (mean ± s.e. over 512 samples on held-out prompts), DPO's
and PPO's Monte-Carlo KL(π‖π_SFT), and the reward model's held-out accuracy against gold labels
on pairs from fresh prompts; and a plot, quickstart.png (gold reward vs KL per policy with
error bars, every stage's training curve), with results.md (the table and the plot). Every
stage also exports its model to <stage>/hf/. A committed run: experiments/results/quickstart/.
Expected cost: about 1.5 minutes on a quiet 2-core CPU (96 s measured; runlocal: under a minute).
"""
from rlhf_jax import configs
from rlhf_jax.train import pipeline


def get_config(arg=None):
  arg = configs.parse_arg(arg, runlocal=False, size="tiny")
  c = pipeline.review_world_config(size=arg.size, runlocal=arg.runlocal)
  c.stages = ("sft", "pairs", "reward", "dpo", "ppo")
  c.driver = "experiments.quickstart.run:run"
  c.dpo.beta = 0.1
  c.ppo.iterations = 20 if not arg.runlocal else c.ppo.iterations
  return configs.lock(c)
