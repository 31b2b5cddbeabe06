"""DPO on Anthropic hh-rlhf-format data with a policy loaded from a local HF directory.

  python -m rlhf_jax.main --config=experiments/dpo/hh_rlhf.py --workdir=DIR \
      --config.dpo.init_hf_dir=/models/Qwen2.5-0.5B --config.task.tokenizer=/models/Qwen2.5-0.5B \
      --config.task.eos_token='<|endoftext|>' --config.task.pad_token='<|fim_pad|>' \
      --config.task.pairs_train=/data/hh-rlhf/harmless-base/train.jsonl.gz

`pairs_train` is any file rlhf_jax.data.read_preferences reads (hh transcripts, prompt /
chosen / rejected strings, chat message lists). Without `pairs_eval`, `eval_fraction` of it is
held out. The policy (GPT-2, Llama or Qwen2) is also the frozen reference. `runlocal` shrinks
lengths, batch and steps so that a tiny local model finishes in seconds (tests use it).
"""
import ml_collections

from rlhf_jax import configs
from rlhf_jax.train.preference import default_dpo_config


def get_config(arg=None):
  arg = configs.parse_arg(arg, loss="sigmoid", runlocal=False)
  c = configs.review_world_base()  # model/mesh/run/distributed sections; the task is replaced.
  c.stage = "dpo"
  c.task = ml_collections.ConfigDict(dict(
      kind="files", tokenizer=configs.required(str), eos_token="</s>", pad_token="<pad>",
      max_prompt_len=256, max_response_len=256, over_length="truncate",
      sft_train="", sft_eval="", pairs_train=configs.required(str), pairs_eval="",
      eval_fraction=0.05, split_seed=0))
  c.dpo = default_dpo_config()
  c.dpo.loss = arg.loss
  c.dpo.reference = "none" if arg.loss in ("simpo", "orpo") else "model"
  c.dpo.init_hf_dir = configs.required(str)
  c.dpo.beta = 0.1
  c.dpo.optim.lr, c.dpo.optim.warmup_steps = 5e-7, 50  # The usual full-model DPO setting.
  c.dpo.steps, c.dpo.batch_size, c.dpo.eval_every = 1000, 64, 200
  if arg.runlocal:
    c.task.max_prompt_len, c.task.max_response_len = 48, 32
    c.task.eval_fraction = 0.02
    c.dpo.optim.lr, c.dpo.optim.warmup_steps = 1e-3, 2
    c.dpo.steps, c.dpo.batch_size, c.dpo.eval_every = 8, 8, 4
    c.run.log_every, c.run.checkpoint_every = 1, 4
  return configs.lock(c)
