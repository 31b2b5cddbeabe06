"""Online vs offline DPO at a matched number of labelled samples (Guo et al. 2024, "Direct
Language Model Alignment from Online AI Feedback", arXiv:2402.04792: online DPO beats offline
DPO trained on the same number of preference labels), on the embedded review world.

  python -m rlhf_jax.main --config=experiments/online_dpo/config.py --workdir=DIR
  python -m rlhf_jax.main --config=experiments/online_dpo/config.py:runlocal --workdir=DIR

Pipeline: SFT -> 2 samples for each of 2048 prompts from the SFT policy, each pair labelled by
the gold reward (the "pairs" step). Then, all from the SFT policy, all with DPO (β = 0.1,
library loss "sigmoid"), batches of 32 pairs, 128 updates (2 passes over 2048 pairs) and the
same optimiser, all with exactly 4096 gold-labelled samples (2048 pairs):
  * offline DPO on the SFT policy's 2048 pairs (the library's DPO step, train.sweep);
  * iterative DPO: 4 rounds, each on 512 fresh pairs of the policy at the start of the round,
    32 updates per round, the reference fixed at SFT (train/online_dpo.py, mode="iterative");
  * online DPO: 32 iterations, each on 64 fresh pairs of the current policy, 4 updates per
    iteration (2 passes), the reference fixed at SFT (train/online_dpo.py, mode="online").
Held-out gold reward and Monte-Carlo KL(π‖π_SFT) every 16 updates (offline, online) or every
round (iterative) on the same 128 prompts × 4 samples with the same sampling keys. The driver is
experiments/online_dpo/run.py; it writes online_dpo.png (gold reward vs KL, gold reward vs
labelled samples), results.md and results.json; committed copies are in
experiments/results/online_dpo/. `seeds=2` repeats the three runs with a second training seed
(same SFT policy and offline pairs).
Cost: 4 min 1 s wall (187 s user CPU) on the 2-core CPU beside other jobs (sft 40 s, pairs
10 s, offline 89 s, iterative 57 s, online 41 s, each with its evaluations); runlocal about a
minute.
"""
import ml_collections

from rlhf_jax import configs
from rlhf_jax.train import online_dpo, pipeline


def get_config(arg=None):
  arg = configs.parse_arg(arg, runlocal=False, size="tiny", seeds=1)
  c = pipeline.review_world_config(size=arg.size, runlocal=arg.runlocal)
  c.stages = ("sft", "pairs")  # The shared front; the three DPO runs are the driver's.
  c.driver = "experiments.online_dpo.run:run"
  # Offline pairs: 2 samples per prompt (one pair each, as online), argmax gold labels. The
  # held-out pairs of the "pairs" step are not used here: a token set of them.
  n_prompts, batch, passes = (64, 8, 2) if arg.runlocal else (2048, 32, 2)
  c.sampling.update(dict(k=2, train_prompts=n_prompts, eval_prompts=16, label_temperature=0.0))
  updates = passes * n_prompts // batch
  c.dpo.update(dict(loss="sigmoid", beta=0.1, reference="model", batch_size=batch,
                    steps=updates, eval_every=0))
  c.dpo.optim.update(dict(lr=2e-4, warmup_steps=10, schedule="cosine"))
  c.online_dpo = online_dpo.default_config()
  iterations = 4 if arg.runlocal else 32
  rounds = 2 if arg.runlocal else 4
  c.online_dpo.update(dict(
      reward_source="gold", samples_per_prompt=2, pairs="best_worst", batch_size=batch,
      loss="sigmoid", beta=0.1, max_new_tokens=c.sampling.max_new_tokens,
      temperature=c.sampling.temperature, train_prompts=4 * n_prompts,
      iterations=iterations, prompts_per_iter=n_prompts // iterations, epochs=passes,
      rounds=rounds, prompts_per_round=n_prompts // rounds, steps_per_round=updates // rounds,
      reference="fixed", eval_every=max(iterations // 8, 1)))
  c.online_dpo.optim = c.dpo.optim.copy_and_resolve_references()  # The same optimiser.
  c.repro = ml_collections.ConfigDict(dict(
      seeds=tuple(range(arg.seeds)), offline_eval_every=updates // 8,
      iterative_eval_every=1))
  if arg.runlocal:  # Every phase runs and writes its files (about a minute); the numbers
    # mean little.
    c.sft.steps, c.task.n_sft = 20, 1000
    c.sampling.max_new_tokens = c.online_dpo.max_new_tokens = 16
    c.eval.prompts, c.eval.k = 8, 2
  return configs.lock(c)
