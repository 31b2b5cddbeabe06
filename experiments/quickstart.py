"""Quickstart: the RLHF pipeline's first stages on the embedded review world.

  python -m rlhf_jax.main --config=experiments/quickstart.py --workdir=/tmp/quickstart
  python -m rlhf_jax.main --config=experiments/quickstart.py:runlocal --workdir=/tmp/qs_small

Stages (each resumable in its own sub-directory of the workdir):
  1. SFT a small Llama-style policy on 20k reviews of the seeded review world (packed batches).
  2. Sample k = 4 responses for each of 256 prompts with the jitted KV-cache sampler and label
     all k(k-1)/2 pairs per prompt with the gold reward (as the DPO paper's IMDb set-up).
  3. Train a Bradley–Terry reward model initialised from the SFT backbone.
  4. DPO (β = 0.1) from the SFT policy on the same pairs.
  5. PPO from the SFT policy against the reward model (value net from its backbone, adaptive KL).
Prints and writes (quickstart_results.md/.json) a table: SFT, DPO and PPO gold reward (mean ±
s.e. over 512 samples on held-out prompts), DPO's and PPO's Monte-Carlo KL(π‖π_SFT), and the
reward model's held-out accuracy against gold labels on pairs from fresh prompts; and a plot,
quickstart.png (gold reward vs KL per policy with error bars, every stage's training curve),
with results.md (the table and the plot). A committed run: experiments/results/quickstart/.
Expected cost: about 1.5 minutes on a quiet 2-core CPU (96 s measured; runlocal: under a minute).
"""
from rlhf_jax import configs


def get_config(arg=None):
  arg = configs.parse_arg(arg, runlocal=False, size="tiny")
  c = configs.review_world_base(size=arg.size, runlocal=arg.runlocal)
  c.stage = "quickstart"
  configs.add_review_world_stages(c, runlocal=arg.runlocal)
  c.dpo.beta = 0.1
  c.ppo.iterations = 20 if not arg.runlocal else c.ppo.iterations
  return configs.lock(c)
