"""DPO vs PPO reward–KL frontier in miniature (Rafailov et al. 2023, arXiv:2305.18290, Fig. 2:
IMDb controlled sentiment generation), on the embedded review world.

  python -m rlhf_jax.main --config=experiments/frontier/dpo_vs_ppo.py --workdir=/tmp/frontier
  python -m rlhf_jax.main --config=experiments/frontier/dpo_vs_ppo.py:runlocal --workdir=/tmp/f

Pipeline (as the paper's IMDb set-up): SFT -> 4 samples per prompt from the SFT policy -> all
6 pairs per prompt labelled by the gold reward -> a Bradley–Terry reward model. Then, all from
the SFT policy and all measured on the same held-out prompts (gold reward and Monte-Carlo
KL(π‖π_SFT), every few steps, so each run traces a curve):
  * DPO at β ∈ {0.05, 0.1, 1, 5} on those pairs: one vmapped program, the same batches;
  * PPO against the reward model with the adaptive KL controller at target KL ∈ {3, 6, 9, 12}:
    one vmapped program (the fused iteration), the same prompts;
  * PPO against the gold reward itself (target KL 6; host-side reward, so not fused);
  * best-of-n against the reward model, n = 1..64, from one pool of 64 samples per prompt with
    the unbiased estimator (KL = log n − (n−1)/n).
The driver is experiments/frontier/run.py. Writes frontier.png, results.md and results.json to the workdir; the committed copies are in
experiments/results/frontier/.
Cost: 13 min 47 s wall (545 s user CPU) for the full run on the 2-core CPU, partly beside
other jobs (sft 39 s, pairs 9 s, reward 81 s, DPO sweep 364 s, PPO sweep 236 s, PPO on gold
83 s, best-of-n 12 s).
"""
import ml_collections

from rlhf_jax import configs
from rlhf_jax.train import pipeline


def get_config(arg=None):
  arg = configs.parse_arg(arg, runlocal=False, size="tiny")
  c = pipeline.review_world_config(size=arg.size, runlocal=arg.runlocal)
  c.stages = ("sft", "pairs", "reward")  # The shared front; the sweeps are the driver's.
  c.driver = "experiments.frontier.run:run"
  c.dpo.steps, c.dpo.eval_every = 300, 50
  # A short adaptive-controller horizon (256 rollouts, 4 iterations): with the default 1000 the
  # coefficient moves under 1.3% per iteration and the four targets would barely differ.
  # A small starting coefficient that the controller raises once a run nears its target, and
  # lr 1e-4 (the quickstart's 3e-5 moves KL(π‖π_SFT) by ~0.01 nats in 4 iterations here).
  c.ppo.update(dict(iterations=40, kl_coef=0.02, kl_horizon=256, eval_every=10))
  c.ppo.optim.lr = 1e-4
  c.frontier = ml_collections.ConfigDict(dict(
      dpo_betas=(0.05, 0.1, 1.0, 5.0), dpo_eval_every=50,
      ppo_kl_targets=(3.0, 6.0, 9.0, 12.0), gold_kl_targets=(6.0,), ppo_eval_every=10,
      bon_ns=(1, 2, 4, 8, 16, 32, 64), bon_pool=64, bon_prompts=64))
  if arg.runlocal:  # Every phase runs and writes its files (< 1 min); the numbers mean little.
    c.sft.steps, c.reward.steps, c.task.n_sft = 20, 10, 1000
    c.sampling.train_prompts, c.sampling.eval_prompts, c.eval.prompts = 32, 16, 8
    c.sampling.max_new_tokens = 16
    c.dpo.steps, c.frontier.dpo_eval_every = 4, 2
    c.ppo.update(dict(iterations=2, prompts_per_iter=16, minibatch_size=8, max_new_tokens=16))
    c.frontier.ppo_eval_every = 1
    c.frontier.bon_ns, c.frontier.bon_pool, c.frontier.bon_prompts = (1, 2, 4, 8), 8, 16
  return configs.lock(c)
