"""Quickstart: the RLHF pipeline's first stages on the embedded review world.

  python -m rlhf_jax.main --config=experiments/quickstart.py --workdir=/tmp/quickstart
  python -m rlhf_jax.main --config=experiments/quickstart.py:runlocal --workdir=/tmp/qs_small

Stages (each resumable in its own sub-directory of the workdir):
  1. SFT a small Llama-style policy on 20k reviews of the seeded review world (packed batches).
  2. Sample k = 4 responses for each of 256 prompts with the jitted KV-cache sampler and label
     all k(k-1)/2 pairs per prompt with the gold reward (as the DPO paper's IMDb set-up).
  3. Train a Bradley–Terry reward model initialised from the SFT backbone.
Prints and writes (quickstart_results.md/.json) a table: SFT gold reward (mean ± s.e.) and the
reward model's held-out accuracy against gold labels on pairs from fresh prompts.
Expected cost: under 3 minutes on a 2-core CPU (runlocal: under 1 minute).
"""
import ml_collections

from rlhf_jax import configs
from rlhf_jax.train.optim import default_optim_config


def get_config(arg=None):
  arg = configs.parse_arg(arg, runlocal=False, size="tiny")
  c = ml_collections.ConfigDict()
  c.stage = "quickstart"
  c.seed = 0
  # The `tiny` family shrunk to the review world's scale; vocab_size comes from the task.
  c.model = ml_collections.ConfigDict(dict(size=arg.size, d_model=128, n_layers=2, n_heads=4,
                                           mlp_dim=352, max_len=128))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.sharding = "fsdp"

  c.task = ml_collections.ConfigDict(dict(
      kind="review_world", world_seed=0, n_sft=20_000, n_eval=500,
      # Pairs of the process's own samples, for a standalone reward stage (unused here: the
      # quickstart labels the SFT policy's samples instead).
      n_pairs=10_000, n_eval_pairs=1_000, k=4, label_temperature=0.0))

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

  c.run = ml_collections.ConfigDict(dict(log_every=10, checkpoint_every=100,
                                         keep_checkpoints=2, max_nonfinite=5))
  c.distributed = ml_collections.ConfigDict(dict(
      enabled=False, coordinator_address="", num_processes=1, process_id=0, timeout_s=300))

  if arg.runlocal:  # A minute-scale smoke version of the same pipeline.
    c.task.n_sft, c.task.n_eval = 4_000, 200
    c.sft.steps, c.sft.eval_every = 80, 40
    c.sampling.train_prompts, c.sampling.eval_prompts, c.sampling.batch_size = 64, 32, 128
    c.reward.steps, c.reward.eval_every = 60, 30
    c.run.checkpoint_every = 40
  return configs.lock(c)
