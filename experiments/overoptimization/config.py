"""Reward-model overoptimisation in miniature (Gao, Schulman & Hilton 2022, "Scaling Laws for
Reward Model Overoptimization", arXiv:2210.10760, Figs. 1-3), on the embedded review world,
whose programmatic gold reward plays the paper's gold reward model.

  python -m rlhf_jax.main --config=experiments/overoptimization/config.py --workdir=/tmp/overopt
  python -m rlhf_jax.main --config=experiments/overoptimization/config.py:runlocal \
      --workdir=/tmp/overopt_small

Pipeline (experiments/overoptimization/run.py):
  1. SFT the policy, and one SFT language model per proxy size (the proxies' "pretrained"
     backbones; the proxy as large as the policy reuses the policy's).
  2. Sample k = 4 responses per prompt from the SFT policy and label all 6 pairs per prompt
     with the gold reward; the small training set is a prefix of the large one.
  3. Proxy reward models: 3 sizes x 2 training-set sizes. The two data sizes of one model size
     train together as one vmapped program (same steps, so the small set is seen more often).
  4. Best-of-n: a pool of `pool_size` SFT samples for each of `pool_prompts` held-out prompts,
     scored by the gold reward and every proxy; for each n the unbiased estimator over all
     n-subsets of the pool, KL = log n - (n - 1)/n.
  5. PPO against each proxy with no KL penalty (kl_coef 0), plus one run per size with a KL
     penalty on the large-data proxy; the three runs of a size are one vmapped fused iteration.
     Gold reward, proxy reward and Monte-Carlo KL(π‖π_SFT) of every rollout; averaged over
     windows of `log_window` iterations. The gold baseline is paired: the SFT policy's gold
     reward on each iteration's own prompts (`baseline_k` samples each).
  6. Fits R_bon(d) = d(α - βd) and R_RL(d) = d(α - β log d) of the gold reward (minus the SFT
     policy's) against d = sqrt(KL); plots and results.md with the paper's checks.
Cost, measured: the committed full run took 12 min 52 s of wall time (699 s user CPU) on
this 2-core machine beside the CI test suite: SFT 45 s, pairs 4 s, proxies 93 s,
best-of-n pool 133 s, PPO 491 s (the paired SFT baseline of the PPO curves included).
"""
import ml_collections

from rlhf_jax import configs
from rlhf_jax.train import pipeline

# Proxy reward-model sizes (the Llama-style family at the review world's scale). "m" is the
# policy's own size, so its backbone is the SFT policy itself.
RM_SIZES = {
    "xs": dict(d_model=32, n_layers=1, n_heads=2, mlp_dim=96),
    "s": dict(d_model=64, n_layers=2, n_heads=2, mlp_dim=176),
    "m": dict(d_model=128, n_layers=2, n_heads=4, mlp_dim=352),
}


def get_config(arg=None):
  arg = configs.parse_arg(arg, runlocal=False)
  c = pipeline.review_world_config(runlocal=arg.runlocal)
  # The library stages the driver runs (validated before it starts), and the driver.
  c.stages = ("sft", "pairs", "reward", "ppo")
  c.driver = "experiments.overoptimization.run:run"
  c.overopt = ml_collections.ConfigDict(dict(
      rm_sizes=ml_collections.ConfigDict(RM_SIZES),
      # Training prompts of the large set (6 gold-labelled pairs each) and of the small one.
      train_prompts_large=512, train_prompts_small=64,
      pool_prompts=64, pool_size=512, bon_max_log2=8,  # n = 1, 2, 4, ..., 256.
      score_batch_size=1024, kl_penalty=0.1, log_window=4, baseline_k=4,
      reanalyse=False))  # True: only redo the analysis of workdir/results.json.
  c.reward.steps, c.reward.eval_every = 150, 150
  # PPO without a KL penalty pushes far from the SFT policy: a larger learning rate and more
  # iterations than the quickstart's.
  c.ppo.update(dict(iterations=60, prompts_per_iter=64, minibatch_size=32, epochs=2,
                    kl_coef=0.0, kl_controller="fixed", fused=True, eval_every=0))
  c.ppo.optim.lr = 1.5e-4
  if arg.runlocal:  # Every stage, shrunk to check the plumbing (two proxy sizes, not three).
    c.model.update(dict(d_model=32, n_layers=1, n_heads=2, mlp_dim=64))
    c.overopt.rm_sizes = ml_collections.ConfigDict(dict(
        xxs=dict(d_model=16, n_layers=1, n_heads=2, mlp_dim=32),
        xs=dict(d_model=32, n_layers=1, n_heads=2, mlp_dim=64)))
    c.sft.steps, c.sft.eval_every = 30, 30
    c.overopt.update(dict(train_prompts_large=24, train_prompts_small=8, pool_prompts=4,
                          pool_size=16, bon_max_log2=3, log_window=1, score_batch_size=64,
                          baseline_k=2))
    c.reward.steps, c.reward.eval_every = 8, 8
    c.ppo.update(dict(iterations=3, prompts_per_iter=8, minibatch_size=8, epochs=1,
                      max_new_tokens=12))
    c.sampling.max_new_tokens = 12
  return configs.lock(c)
