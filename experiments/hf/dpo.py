"""DPO (or any loss of its family, or KTO) on your own Hugging Face model and preference file.

  python -m rlhf_jax.main --config=experiments/hf/dpo.py --workdir=DIR \
      --config.model_dir=/models/Qwen2.5-0.5B-Instruct --config.data.pairs=prefs.jsonl
  python -m rlhf_jax.main --config=experiments/hf/dpo.py:loss=ipo ...     # simpo, orpo, kto, ...
  python -m rlhf_jax.main --config=experiments/hf/dpo.py:sft ... --config.data.sft=sft.jsonl

`loss` is "kto" (the pairs split into unpaired completions) or a key of
rlhf_jax.objectives.PREFERENCE_LOSSES (sigmoid = DPO, ipo, simpo, orpo, hinge, robust, ...);
simpo and orpo run reference-free, the others against a frozen copy of the starting policy
(--config.dpo.reference=precomputed scores it once instead). `sft` runs an SFT stage on
data.sft first and starts DPO from it. Files, tokenizer, chat template, exports and dtypes as
in experiments/hf/rlhf.py: DIR/dpo/hf/ is the trained policy as *ForCausalLM with the
tokenizer files. `runlocal` shrinks lengths, batch and steps so that a tiny local model runs
in seconds (tests use it).
"""
from rlhf_jax import configs
from rlhf_jax.train import pipeline

REFERENCE_FREE = ("simpo", "orpo")


def get_config(arg=None):
  arg = configs.parse_arg(arg, loss="sigmoid", sft=False, runlocal=False)
  c = pipeline.files_config(stages=("sft", "dpo") if arg.sft else ("dpo",))
  c.dpo.loss = arg.loss
  c.dpo.reference = "none" if arg.loss in REFERENCE_FREE else "model"
  c.dpo.beta = 2.0 if arg.loss == "simpo" else 0.1
  c.dpo.optim.lr, c.dpo.optim.warmup_steps = 5e-7, 50  # The usual full-model DPO setting.
  c.dpo.steps, c.dpo.batch_size, c.dpo.eval_every = 1000, 64, 200
  if arg.sft:
    c.sft.update(dict(steps=1000, rows=16, length=1024, eval_every=200))
    c.sft.optim.lr, c.sft.optim.warmup_steps = 2e-5, 50
  c.run.update(dict(log_every=10, checkpoint_every=200))
  if arg.runlocal:
    c.task.max_prompt_len, c.task.max_response_len = 48, 32
    c.data.eval_fraction = 0.05
    c.dpo.optim.lr, c.dpo.optim.warmup_steps = 1e-3, 2
    c.dpo.steps, c.dpo.batch_size, c.dpo.eval_every = 8, 8, 4
    if arg.sft:
      c.sft.update(dict(steps=6, rows=4, length=96, max_sequences=8, eval_every=3,
                        eval_batch_size=8))
      c.sft.optim.lr, c.sft.optim.warmup_steps = 1e-3, 1
    c.run.update(dict(log_every=1, checkpoint_every=4))
  return configs.lock(c)
