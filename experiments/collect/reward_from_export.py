"""Reward model on a collected round: Bradley-Terry on the pairs `collect export` wrote.

  python -m rlhf_jax.collect export --workdir=/tmp/round1 --out=/tmp/round1/prefs.jsonl
  python -m rlhf_jax.main --config=experiments/collect/reward_from_export.py \
      --config.task.pairs_train=/tmp/round1/prefs.jsonl \
      --config.task.tokenizer=/tmp/round1/tokenizer.json --workdir=/tmp/round1_rm

`collect generate` saves the policy's tokenizer as WORKDIR/tokenizer.json, so the reward model
reads the text with the tokenizer that wrote it. Without pairs_eval, a seeded eval_fraction of
the pairs is held out (rlhf_jax.train.task.held_out_split); that split is by pair, so two pairs
of one prompt can fall on both sides; for a clean held-out number export a second round (fresh
prompts) and pass it as pairs_eval. Defaults fit the review world (special tokens [EOS] /
[PAD], prompts <= 8 tokens, responses <= 48 + EOS); set the task lengths and tokens for
another tokenizer. The trained model labels a round with
`python -m rlhf_jax.collect label --labeler=reward --reward_checkpoint=/tmp/round1_rm`.
Expected cost: about a minute on a 2-core CPU for ~1,000 pairs (runlocal: seconds).
"""
import ml_collections

from rlhf_jax import configs
from rlhf_jax.train.optim import default_optim_config


def get_config(arg=None):
  arg = configs.parse_arg(arg, runlocal=False, size="tiny")
  c = ml_collections.ConfigDict()
  c.stage = "reward"
  c.seed = 0
  # The quickstart's review-world scale; vocab_size comes from the tokenizer.
  c.model = ml_collections.ConfigDict(dict(size=arg.size, d_model=128, n_layers=2, n_heads=4,
                                           mlp_dim=352, max_len=128))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.sharding = "fsdp"
  c.task = ml_collections.ConfigDict(dict(
      kind="files", tokenizer=configs.required(str), pairs_train=configs.required(str),
      pairs_eval="", eval_fraction=0.1, split_seed=0, eos_token="[EOS]", pad_token="[PAD]",
      max_prompt_len=8, max_response_len=49, over_length="truncate"))
  c.reward = ml_collections.ConfigDict(dict(
      steps=200, batch_size=32, ensemble_size=1, use_margin=False, center_coef=0.0,
      eval_every=100, eval_batch_size=256, optim=default_optim_config()))
  c.reward.optim.lr = 1e-3
  c.run = ml_collections.ConfigDict(dict(log_every=10, checkpoint_every=100,
                                         keep_checkpoints=2, max_nonfinite=5))
  c.distributed = ml_collections.ConfigDict(dict(
      enabled=False, coordinator_address="", num_processes=1, process_id=0,
      initialization_timeout=300))
  if arg.runlocal:  # Seconds: a smoke run of the same stage.
    c.model.update(d_model=32, n_layers=1, n_heads=2, mlp_dim=64)
    c.reward.steps, c.reward.eval_every, c.reward.batch_size = 5, 5, 8
    c.reward.optim.warmup_steps = 1
    c.run.checkpoint_every, c.run.log_every = 5, 1
  return configs.lock(c)
