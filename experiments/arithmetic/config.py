"""GRPO from a verifiable reward on the embedded arithmetic world (data/arithmetic_world.py).

  python -m rlhf_jax.main --config=experiments/arithmetic/config.py --workdir=/tmp/arith
  python -m rlhf_jax.main --config=experiments/arithmetic/config.py:runlocal --workdir=/tmp/ar
  python -m rlhf_jax.main --config=experiments/arithmetic/config.py:runlocal,reward=grader \\
      --workdir=/tmp/ar_grader
  python -m rlhf_jax.main --config=experiments/arithmetic/config.py:variant=dapo,oversample=2 \\
      --workdir=/tmp/ar_dapo

Problems: 2-3 single-digit operands joined by +, -, * ("7-2*9="); the SFT target is a worked
answer ending in GSM8K's marker ("2*9=18 7-18=-11 #### -11"), one token per character.
Pipeline: SFT of a small Llama-style policy (learns the format in a few dozen steps; its
accuracy stays well below 100%, mostly from carrying digits through products) -> GRPO
(Shao et al. 2024, arXiv:2402.03300) from the SFT policy, 8 samples per prompt, the reward 1 for
a correct final answer and 0 otherwise: the world's gold reward (`reward=gold`), or the same
check as a Python grader of the decoded text (`reward=grader`: config.ppo.reward_source =
"grader", config.ppo.grader = "rlhf_jax.data.arithmetic_world:grade"; any "module:function"
grader works the same way, e.g. `grader=rlhf_jax.graders:gsm8k_exact`, which reads the
reference answer the world supplies). Then held-out evaluation (results.json "evaluation"):
gold reward = accuracy at sampling temperature 1 (mean ± s.e.), Monte-Carlo KL(π‖π_SFT), EOS
fraction, for the SFT policy and the GRPO policy on the same 256 held-out problems (a
seeded tenth of the problem space reserved for evaluation: never in the SFT data or the RL
prompts, so accuracy there is arithmetic, not recall).

GRPO variants (train/grpo_variants.py): `variant=grpo` (default: std-normalised advantages,
sequence-mean loss, k3 KL in the loss), `dr_grpo`, `dapo` (`oversample=N` draws N x the prompts
for its dynamic sampling); KL coefficient 0 (as Dr. GRPO and DAPO; set --config.ppo.kl_coef for
GRPO's β). The keys the variants own are left at the stage defaults here, so each applies.

Measured (2-core CPU shared with other jobs; one run each, accuracy ± s.e. over the samples):
  runlocal (300 SFT steps of 16 packed rows; 10 GRPO iterations of 16 prompts x 8 samples; 128
    held-out problems x 2 samples): 59 s wall; SFT 0.375 ± 0.030 -> GRPO 0.449 ± 0.031,
    KL(π‖π_SFT) 0.36 nats.
  full (600 SFT steps; 100 GRPO iterations of 32 x 8; 256 x 2 held-out): SFT 334 s, GRPO 130 s;
    SFT 0.688 ± 0.021 -> GRPO 0.723 ± 0.020, KL 0.29 nats; training accuracy 0.76 -> ~0.79
    and per-token entropy 0.041 -> 0.030 over the run (GRPO mostly sharpens the SFT policy).
The gains are about one to two standard errors: a reproduction should average seeds.
"""
import ml_collections

from rlhf_jax import configs
from rlhf_jax.train import pipeline, rl, sft
from rlhf_jax.train import task as task_lib

GRADERS = {"gold": "", "grader": "rlhf_jax.data.arithmetic_world:grade"}


def get_config(arg=None):
  arg = configs.parse_arg(arg, reward="gold", grader="", variant="grpo", oversample=1,
                          runlocal=False, size="tiny")
  if arg.reward not in GRADERS:
    raise ValueError(f"reward={arg.reward!r}; expected one of {tuple(GRADERS)}")
  if arg.grader and arg.reward != "grader":
    raise ValueError(f"grader={arg.grader!r} needs reward=grader")
  c = configs.base_config(size=arg.size)
  c.model.update(dict(d_model=128, n_layers=2, n_heads=4, mlp_dim=352, max_len=64))
  c.task = task_lib.arithmetic_world_config()
  c.task.update(dict(n_sft=20_000, n_eval=500))
  c.stages = ("sft", "ppo")

  c.sft = sft.default_config()
  c.sft.update(dict(steps=600, rows=16, length=128, eval_every=200))
  c.sft.optim.lr, c.sft.optim.warmup_steps = 3e-3, 20

  # GRPO with a verifiable 0/1 reward: 32 prompts x 8 samples per iteration, two updates of
  # 128 rollouts each. A tiny policy's 0/1-reward gradient is noisy: larger learning rates
  # (5e-4 and up) or more updates per rollout raised KL(π‖π_SFT) without raising accuracy.
  c.ppo = rl.default_config()
  c.ppo.update(dict(
      algorithm="grpo", grpo_variant=arg.variant, iterations=100, train_prompts=8192,
      prompts_per_iter=32, group_size=8, minibatch_size=128, epochs=1, max_new_tokens=32,
      kl_coef=0.0, kl_controller="fixed", kl_estimator="k3", eval_every=25,
      reward_source="gold" if arg.reward == "gold" else "grader",
      grader=arg.grader or GRADERS[arg.reward], oversample=arg.oversample))
  c.ppo.optim.lr = 1e-4

  # Held-out sampling (pipeline.evaluate_policies reads config.sampling and config.eval).
  c.sampling = pipeline.sampling_section()
  c.sampling.update(dict(max_new_tokens=32, temperature=1.0, batch_size=256))
  c.eval = ml_collections.ConfigDict(dict(prompts=256, k=2))

  if arg.runlocal:
    c.task.n_sft, c.task.n_eval = 6_000, 200
    c.run.checkpoint_every = 100
    c.sft.update(dict(steps=300, eval_every=150))
    c.ppo.update(dict(iterations=10, prompts_per_iter=16, minibatch_size=64, eval_every=5,
                      train_prompts=1024))
    c.eval.prompts = 128
  return configs.lock(c)
