"""Online or iterative DPO on the embedded review world: SFT, then DPO-family updates on pairs
of the policy's own samples, labelled as they are drawn (train/online_dpo.py).

  python -m rlhf_jax.main --config=experiments/online_dpo/review_world.py --workdir=DIR
  python -m rlhf_jax.main --config=experiments/online_dpo/review_world.py:runlocal --workdir=DIR
  python -m rlhf_jax.main --config=experiments/online_dpo/review_world.py:mode=iterative \
      --workdir=DIR
  python -m rlhf_jax.main --config=experiments/online_dpo/review_world.py:labels=model --workdir=DIR

mode=online (Guo et al. 2024, arXiv:2402.04792): every iteration samples 2 responses for each
of 32 prompts from the current policy, labels each pair by the gold reward (labels=gold) or a
reward model trained on gold-labelled pairs of the SFT policy's samples (labels=model: adds the
"pairs" and "reward" stages), and takes one pass of DPO (β = 0.1) updates over the 32 fresh
pairs, 16 pairs per update, against the frozen SFT policy. mode=iterative: 3 rounds of offline
DPO, each on 2 samples of 512 prompts drawn from the policy at the start of the round, 64
updates per round, the reference fixed at SFT (ref=last_round: moved to each round's result).
`loss` is any key of objectives.PREFERENCE_LOSSES (simpo / orpo run reference-free).
Held-out gold reward and KL(π‖π_SFT) of SFT and the trained policy: results.json.
Cost on the 2-core CPU beside other jobs: 1 min 54 s for mode=online (SFT 51 s, online DPO
51 s; held-out gold reward 0.29 -> 0.74 at KL(π‖π_SFT) 8.1 nats); runlocal 47 s.
"""
from rlhf_jax import configs
from rlhf_jax.train import online_dpo, pipeline


def online_dpo_section(runlocal: bool = False):
  """config.online_dpo tuned to the review world's scale (the library defaults are a pod's)."""
  c = online_dpo.default_config()
  c.update(dict(iterations=40, prompts_per_iter=32, epochs=1, rounds=3, prompts_per_round=512,
                steps_per_round=64, samples_per_prompt=2, pairs="best_worst",
                train_prompts=4096, max_new_tokens=48, batch_size=16, beta=0.1,
                reward_source="gold", eval_every=10))
  c.optim.lr = 3e-4
  if runlocal:
    c.update(dict(iterations=16, prompts_per_iter=32, rounds=2, prompts_per_round=128,
                  steps_per_round=16, train_prompts=1024, eval_every=0))
  return c


def get_config(arg=None):
  arg = configs.parse_arg(arg, mode="online", labels="gold", loss="sigmoid", ref="fixed",
                          runlocal=False, size="tiny")
  c = pipeline.review_world_config(size=arg.size, runlocal=arg.runlocal)
  c.online_dpo = online_dpo_section(arg.runlocal)
  c.online_dpo.update(dict(mode=arg.mode, reward_source=arg.labels, loss=arg.loss,
                           reference=arg.ref))
  if arg.loss in ("simpo", "orpo"):
    c.online_dpo.beta = 2.0 if arg.loss == "simpo" else 0.1
  c.stages = (("sft", "pairs", "reward", "online_dpo") if arg.labels == "model" else
              ("sft", "online_dpo"))
  return configs.lock(c)
