"""GRPO vs Dr. GRPO vs DAPO from one SFT policy on the arithmetic world, at matched prompts,
group size and iterations (Shao et al. 2024, arXiv:2402.03300; Liu et al. 2025, "Understanding
R1-Zero-Like Training", arXiv:2503.20783; Yu et al. 2025, "DAPO", arXiv:2503.14476).

  python -m rlhf_jax.main --config=experiments/grpo_variants/config.py --workdir=DIR
  python -m rlhf_jax.main --config=experiments/grpo_variants/config.py:runlocal --workdir=DIR

Pipeline: the SFT stage of experiments/arithmetic/config.py (a small Llama-style policy on
worked answers "2*9=18 7-18=-11 #### -11"), trained once; then from that policy GRPO, Dr. GRPO
and DAPO (config.ppo.grpo_variant, train/grpo_variants.py), each with the same prompts per
iteration, group size, iterations, learning rate and 0/1 gold reward (a correct final answer),
KL coefficient 0 (as Dr. GRPO and DAPO; GRPO's β left at 0 so that only the variants'
own pieces differ). DAPO over-samples `oversample` x the prompts for its dynamic sampling and
keeps the first prompts_per_iter groups whose rewards differ: it draws oversample x the
samples per iteration, and every plot and table counts the samples actually drawn.
Measured: held-out accuracy (temperature-1 samples, common random numbers), Monte-Carlo
KL(π‖π_SFT) and mean response length every few iterations; every iteration's training accuracy,
mean response length and (DAPO) kept-group fraction. The driver (experiments/grpo_variants/
run.py) writes grpo_variants.png, results.md and results.json; committed copies are in
experiments/results/grpo_variants/. Each finished variant is cached as workdir/<variant>.json.

Cost: 643 s wall (10 min 43 s) on the 2-core CPU beside other jobs (SFT 90 s; GRPO 152 s,
Dr. GRPO 156 s, DAPO 216 s for two seeds with their evaluations); runlocal about 40 s.
Measured (2 seeds, ± s.e. over seeds): held-out accuracy SFT 0.619 ± 0.021 (over samples),
GRPO 0.613 ± 0.002, Dr. GRPO 0.628 ± 0.015, DAPO 0.653 ± 0.007 (with twice the samples drawn;
0.636 ± 0.009 at GRPO's 15,360); response length ~17.3 tokens for all, no growth. What did and
did not reproduce: experiments/results/grpo_variants/results.md.
"""
import ml_collections

from experiments.arithmetic import config as arithmetic
from rlhf_jax import configs

VARIANTS = ("grpo", "dr_grpo", "dapo")


def get_config(arg=None):
  arg = configs.parse_arg(arg, runlocal=False, seeds=2, oversample=2)
  c = arithmetic.get_config("runlocal" if arg.runlocal else None)
  with c.unlocked():
    c.stages = ("sft",)  # The shared front; the three RL runs are the driver's.
    c.driver = "experiments.grpo_variants.run:run"
    c.export.enabled = False  # The compared policies are curves here, not exported models.
    # Sized for ~15 min on a busy 2-core CPU: 450 SFT steps (the arithmetic card's 600 reach
    # 0.69 held-out accuracy; fewer leave more groups with mixed rewards for every variant),
    # 60 iterations of 32 prompts x 8 samples.
    c.sft.update(dict(steps=450, eval_every=450))
    c.ppo.update(dict(iterations=60, eval_every=15))
    c.grpo_variants = ml_collections.ConfigDict(dict(
        variants=VARIANTS, seeds=tuple(range(arg.seeds)), eval_every=15,
        oversample={"dapo": arg.oversample}))
    if arg.runlocal:  # Every phase runs and writes its files (< 1 min); the numbers mean little.
      c.task.n_sft, c.task.n_eval = 2_000, 100
      c.sft.update(dict(steps=40, eval_every=40))
      c.ppo.update(dict(iterations=2, prompts_per_iter=8, group_size=4, minibatch_size=32,
                        train_prompts=256, eval_every=1))
      c.eval.update(dict(prompts=32, k=1))
      c.grpo_variants.update(dict(seeds=(0,), eval_every=1))
  return configs.lock(c)
