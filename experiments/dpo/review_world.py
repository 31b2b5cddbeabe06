"""Direct preference optimisation on the embedded review world: SFT, then DPO or a relative.

  python -m rlhf_jax.main --config=experiments/dpo/review_world.py:loss=sigmoid --workdir=DIR
  python -m rlhf_jax.main --config=experiments/dpo/review_world.py:loss=ipo,runlocal --workdir=DIR

`loss` is "kto" (Ethayarajh et al. 2024, on the pairs split into unpaired completions) or any
key of rlhf_jax.objectives.PREFERENCE_LOSSES (sigmoid = DPO, Rafailov et al. 2023;
ipo, Azar et al. 2024; simpo, Meng et al. 2024; orpo, Hong et al. 2024; ...). Pairs are all
k(k-1)/2 gold-labelled pairs of k = 4 samples per prompt from the world's own process (as the
DPO paper's IMDb set-up labels samples with a sentiment classifier). simpo and orpo run
reference-free; the others use a frozen copy of the SFT policy (`reference=precomputed`
scores it once instead). Cost: about 2 minutes on a 2-core CPU; runlocal under 1 minute.
"""
from rlhf_jax import configs
from rlhf_jax.train import pipeline

# Per-loss defaults from each paper's recommended range, scaled to this small world.
BETA = {"sigmoid": 0.1, "robust": 0.1, "hinge": 0.1, "ipo": 0.1, "sppo_hard": 0.1,
        "nca_pair": 0.1, "apo_zero": 0.1, "apo_down": 0.1, "simpo": 2.0, "orpo": 0.1,
        "kto": 0.1}


def get_config(arg=None):
  arg = configs.parse_arg(arg, loss="sigmoid", reference="", runlocal=False, size="tiny",
                          shared_prefix=False)
  c = pipeline.review_world_config(size=arg.size, runlocal=arg.runlocal)
  c.stages = ("sft", "dpo")
  c.dpo.loss = arg.loss
  c.dpo.beta = BETA.get(arg.loss, 0.1)
  c.dpo.reference = arg.reference or ("none" if arg.loss in ("simpo", "orpo") else "model")
  c.dpo.shared_prefix = arg.shared_prefix
  if arg.loss in ("simpo", "orpo"):
    c.dpo.optim.lr = 3e-4
  if not arg.runlocal:
    c.dpo.steps, c.dpo.eval_every = 300, 100
  return configs.lock(c)
