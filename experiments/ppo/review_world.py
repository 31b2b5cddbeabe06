"""Online RL on the embedded review world: PPO, GRPO or RLOO against a learned reward model or
the gold reward.

  python -m rlhf_jax.main --config=experiments/ppo/review_world.py:algo=ppo --workdir=DIR
  python -m rlhf_jax.main --config=experiments/ppo/review_world.py:algo=grpo,runlocal --workdir=DIR
  python -m rlhf_jax.main --config=experiments/ppo/review_world.py:algo=ppo,reward=gold --workdir=DIR

Pipeline: SFT -> (reward=model: a reward model on gold-labelled pairs of the SFT policy's own
samples) -> the algorithm -> gold reward and KL(π‖π_SFT) on held-out prompts (results.json).
PPO: value network from the reward model's backbone, KL (k1) in the reward, adaptive KL
controller (Ziegler et al. 2019). GRPO (Shao et al. 2024): 4 samples per prompt,
group-normalised advantages, k3 KL in the loss. RLOO (Ahmadian et al. 2024): 4 samples,
leave-one-out baseline, sequence KL in the reward. Matched samples per iteration (64 rollouts).
`preset=seed` switches to the seed's PPO hyperparameters (lr 1.41e-5, batch 256, minibatch 64,
4 epochs, clip 0.2, value clip 0.2, vf_coef 0.1, KL 0.2 adaptive to target 6, 256 new tokens),
meant for a pod. `--config.ppo.fused=True` compiles rollout, scoring and every update of an
iteration into one program (reward=model only; see PPOTrainer.fused_iteration, vmappable over
stacked states for one-compile sweeps). With algo=grpo, `variant=dr_grpo` or `variant=dapo`
switches to Dr. GRPO (Liu et al. 2025) or DAPO (Yu et al. 2025; add e.g.
`--config.ppo.oversample=2` for its dynamic sampling), whose keys train/grpo_variants.py lists:

  python -m rlhf_jax.main --config=experiments/ppo/review_world.py:algo=grpo,variant=dapo ...
"""
from rlhf_jax import configs
from rlhf_jax.train import grpo_variants, pipeline, rl


def get_config(arg=None):
  arg = configs.parse_arg(arg, algo="ppo", reward="model", runlocal=False, size="tiny",
                          preset="", value="separate", variant="")
  c = pipeline.review_world_config(size=arg.size, runlocal=arg.runlocal)
  c.stages = (("sft", "pairs", "reward", "ppo") if arg.reward == "model" else ("sft", "ppo"))
  if arg.preset == "seed":
    c.ppo = rl.default_config()
    if arg.runlocal:  # The same recipe, shrunk to run on a laptop.
      c.ppo.update(dict(iterations=4, prompts_per_iter=16, minibatch_size=8,
                        max_new_tokens=32, eval_every=2))
  elif arg.preset:
    raise ValueError(f"preset={arg.preset!r}; expected 'seed' or nothing")
  c.ppo.algorithm = arg.algo
  c.ppo.reward_source = arg.reward
  c.ppo.value = arg.value
  if arg.algo in ("grpo", "rloo"):
    # Same number of samples per iteration as PPO: prompts_per_iter x group_size.
    c.ppo.group_size = 4
    c.ppo.prompts_per_iter //= 4
    c.ppo.epochs = 1
  if arg.algo == "grpo":
    c.ppo.kl_estimator, c.ppo.kl_controller = "k3", "fixed"
    # The recipe's own keys, set here so that they replace the review world's (e.g. DAPO's
    # kl_coef = 0); the stage resolves the same variant again, as a check.
    c.ppo.grpo_variant = arg.variant or "grpo"
    c.ppo.update(grpo_variants.variant_overrides(c.ppo.grpo_variant, c.ppo))
  elif arg.variant:
    raise ValueError(f"variant={arg.variant!r} is a GRPO recipe: it needs algo=grpo")
  return configs.lock(c)
