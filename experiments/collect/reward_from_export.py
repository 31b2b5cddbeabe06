"""Reward model on a collected round: Bradley-Terry on the pairs `collect export` wrote.

  python -m rlhf_jax.collect export --workdir=/tmp/round1 --out=/tmp/round1/prefs.jsonl
  python -m rlhf_jax.main --config=experiments/collect/reward_from_export.py \
      --config.data.pairs=/tmp/round1/prefs.jsonl \
      --config.task.tokenizer=/tmp/round1/tokenizer.json --workdir=/tmp/round1_rm

`collect generate` saves the policy's tokenizer as WORKDIR/tokenizer.json, so the reward model
reads the text with the tokenizer that wrote it. Without data.pairs_eval, a seeded eval_fraction of
the pairs is held out (rlhf_jax.train.task.held_out_split); that split is by pair, so two pairs
of one prompt can fall on both sides; for a clean held-out number export a second round (fresh
prompts) and pass it as data.pairs_eval. Defaults fit the review world (special tokens [EOS] /
[PAD], prompts <= 8 tokens, responses <= 48 + EOS); set the task lengths and tokens for
another tokenizer. The trained model labels a round with
`python -m rlhf_jax.collect label --labeler=reward --reward_checkpoint=/tmp/round1_rm/reward`
(the stage's directory; its HF export is /tmp/round1_rm/reward/hf).
Expected cost: about a minute on a 2-core CPU for ~1,000 pairs (runlocal: seconds).
"""
from rlhf_jax import configs
from rlhf_jax.train import pipeline


def get_config(arg=None):
  arg = configs.parse_arg(arg, runlocal=False, size="tiny")
  c = pipeline.files_config(stages=("reward",))
  del c.model_dir  # A fresh model of config.model on the round's own tokenizer.
  c.task.tokenizer = configs.required(str)
  c.data.pairs = configs.required(str)
  c.data.eval_fraction = 0.1
  # The quickstart's review-world scale; vocab_size comes from the tokenizer.
  c.model.update(dict(size=arg.size, d_model=128, n_layers=2, n_heads=4, mlp_dim=352,
                      max_len=128))
  c.task.update(dict(eos_token="[EOS]", pad_token="[PAD]", chat="hh", max_prompt_len=8,
                     max_response_len=49))
  c.reward.update(dict(steps=200, batch_size=32, eval_every=100, eval_batch_size=256))
  c.reward.optim.lr = 1e-3
  c.run.update(dict(log_every=10, checkpoint_every=100))
  if arg.runlocal:  # Seconds: a smoke run of the same stage.
    c.model.update(d_model=32, n_layers=1, n_heads=2, mlp_dim=64)
    c.reward.steps, c.reward.eval_every, c.reward.batch_size = 5, 5, 8
    c.reward.optim.warmup_steps = 1
    c.run.checkpoint_every, c.run.log_every = 5, 1
  return configs.lock(c)
