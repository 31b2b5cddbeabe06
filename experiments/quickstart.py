"""Quickstart: the RLHF pipeline's first stages on the embedded review world.

  python -m rlhf_jax.main --config=experiments/quickstart.py --workdir=/tmp/quickstart
  python -m rlhf_jax.main --config=experiments/quickstart.py:runlocal --workdir=/tmp/qs_small

Stages (each resumable in its own sub-directory of the workdir):
  1. SFT a small Llama-style policy on 20k reviews of the seeded review world (packed batches).
  2. Sample k = 4 responses for each of 256 prompts with the jitted KV-cache sampler and label
     all k(k-1)/2 pairs per prompt with the gold reward (as the DPO paper's IMDb set-up).
  3. Train a Bradley–Terry reward model initialised from the SFT backbone.
  4. DPO (β = 0.1) from the SFT policy on the same pairs.
Prints and writes (quickstart_results.md/.json) a table: SFT and DPO gold reward (mean ± s.e.
over 512 samples on held-out prompts), DPO's Monte-Carlo KL(π‖π_SFT), and the reward model's
held-out accuracy against gold labels on pairs from fresh prompts.
Expected cost: about 3 minutes on a 2-core CPU (runlocal: about 1 minute).
"""
import ml_collections

from rlhf_jax import configs
from rlhf_jax.train.optim import default_optim_config
from rlhf_jax.train.preference import default_dpo_config


def get_config(arg=None):
  arg = configs.parse_arg(arg, runlocal=False, size="tiny")
  c = configs.review_world_base(size=arg.size, runlocal=arg.runlocal)
  c.stage = "quickstart"

  c.sft = ml_collections.ConfigDict(dict(
      steps=300, rows=8, length=128, max_sequences=32, eval_every=100, eval_batch_size=64,
      optim=default_optim_config()))
  c.sft.optim.lr = 3e-3
  c.sft.optim.warmup_steps = 20

  c.sampling = ml_collections.ConfigDict(dict(
      train_prompts=256, eval_prompts=128, k=4, max_new_tokens=48, temperature=1.0,
      batch_size=256, label_temperature=0.0))

  c.reward = ml_collections.ConfigDict(dict(
      steps=200, batch_size=32, ensemble_size=1, use_margin=False, center_coef=0.0,
      eval_every=100, eval_batch_size=256, optim=default_optim_config()))
  c.reward.optim.lr = 1e-3

  c.dpo = default_dpo_config()
  c.dpo.beta = 0.1
  c.dpo.optim.lr, c.dpo.optim.warmup_steps = 1e-4, 10
  c.dpo.steps, c.dpo.batch_size, c.dpo.eval_every = 200, 32, 100

  # Held-out policy evaluation: k samples for each of `prompts` fresh prompts.
  c.eval = ml_collections.ConfigDict(dict(prompts=128, k=4))

  if arg.runlocal:  # A minute-scale smoke version of the same pipeline.
    c.dpo.steps, c.dpo.eval_every, c.dpo.batch_size = 40, 20, 16
    c.eval.prompts, c.eval.k = 32, 2
    c.sft.steps, c.sft.eval_every = 80, 40
    c.sampling.train_prompts, c.sampling.eval_prompts, c.sampling.batch_size = 64, 32, 128
    c.reward.steps, c.reward.eval_every = 60, 30
  return configs.lock(c)
