"""RLOO and GRPO vs PPO with a matched number of samples (Ahmadian et al. 2024,
arXiv:2402.14740; Shao et al. 2024, arXiv:2402.03300), on the embedded review world.

  python -m rlhf_jax.main --config=experiments/critic_free/review_world.py --workdir=/tmp/cf
  python -m rlhf_jax.main --config=experiments/critic_free/review_world.py:runlocal --workdir=/tmp/c

Pipeline: SFT -> gold-labelled pairs of the SFT policy's samples -> reward model; then PPO,
GRPO and RLOO from the SFT policy against the reward model, each with 64 sampled responses per
iteration for the same number of iterations (PPO: 64 prompts × 1, separate value network from
the reward model's backbone, k1 KL in the reward, adaptive controller, 2 epochs; RLOO: 16
prompts × 4, leave-one-out baseline, sequence KL in the reward, 1 epoch; GRPO: 16 prompts × 4,
group-normalised advantages, k3 KL in the loss, fixed coefficient, 1 epoch), every iteration
fused into one compiled program. Measured: held-out gold reward and Monte-Carlo KL(π‖π_SFT)
every few iterations, wall time of the iterations, and XLA's memory analysis of each
algorithm's compiled iteration. Writes critic_free.png, results.md and results.json to the
workdir (driver: experiments/critic_free/run.py); committed copies are in
experiments/results/critic_free/.
Cost: 5 min 0 s wall (288 s user CPU) for the full run (2 seeds) on the 2-core CPU, beside
the test suite.
"""
import ml_collections

from rlhf_jax import configs
from rlhf_jax.train import pipeline

# Per-algorithm overrides of config.ppo (the settings of experiments/ppo/review_world.py).
OVERRIDES = {
    "ppo": dict(group_size=1, epochs=2),
    "rloo": dict(group_size=4, epochs=1, prompts_per_iter_divisor=4),
    "grpo": dict(group_size=4, epochs=1, prompts_per_iter_divisor=4, kl_in_reward=False,
                 kl_estimator="k3", kl_controller="fixed", loss_aggregation="grpo"),
}


def get_config(arg=None):
  arg = configs.parse_arg(arg, runlocal=False, size="tiny", seeds=2)
  c = pipeline.review_world_config(size=arg.size, runlocal=arg.runlocal)
  c.stages = ("sft", "pairs", "reward")  # The shared front; the runs are the driver's.
  c.driver = "experiments.critic_free.run:run"
  c.ppo.update(dict(iterations=40, eval_every=10))
  c.ppo.optim.lr = 1e-4  # As the frontier experiment: 3e-5 barely moves the policy here.
  overrides = {}
  for algo, o in OVERRIDES.items():
    o = dict(o)
    divisor = o.pop("prompts_per_iter_divisor", 1)
    overrides[algo] = dict(o, prompts_per_iter=c.ppo.prompts_per_iter // divisor)
  c.critic_free = ml_collections.ConfigDict(dict(
      algorithms=("ppo", "rloo", "grpo"), seeds=tuple(range(arg.seeds)), eval_every=5,
      overrides=overrides))
  if arg.runlocal:  # Every phase runs and writes its files (< 1 min); the numbers mean little.
    c.sft.steps, c.reward.steps, c.task.n_sft = 20, 10, 1000
    c.sampling.train_prompts, c.sampling.eval_prompts, c.eval.prompts = 32, 16, 8
    c.sampling.max_new_tokens = c.ppo.max_new_tokens = 16
    c.ppo.iterations, c.critic_free.eval_every = 2, 1
    c.critic_free.seeds = (0,)
  return configs.lock(c)
