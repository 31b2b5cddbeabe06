"""SFT -> reward model -> PPO (or GRPO / RLOO) on your own Hugging Face model and data files.

  python -m rlhf_jax.main --config=experiments/hf/rlhf.py --workdir=DIR \
      --config.model_dir=/models/Qwen2.5-0.5B-Instruct \
      --config.data.sft=sft.jsonl --config.data.pairs=prefs.jsonl \
      --config.data.prompts=prompts.jsonl
  python -m rlhf_jax.main --config=experiments/hf/rlhf.py:algo=grpo ...        # or algo=rloo
  python -m rlhf_jax.main --config=experiments/hf/rlhf.py:reward_model=hf ... \
      --config.ppo.reward_hf_dir=/models/my-reward-model   # optimise an HF reward model instead
  python -m rlhf_jax.main --config=experiments/hf/rlhf.py:best_of_n ...  # + best-of-n samples

model_dir: a local HF directory (GPT-2, Llama or Qwen2 weights in safetensors, saved by
transformers) with its tokenizer files; eos/pad/bos come from its tokenizer_config.json
(override with --config.task.eos_token / pad_token / bos_token; a tokenizer without a pad
token needs one named) and chat-format data is rendered with its chat template. Data files are
JSONL, JSON arrays or parquet (rlhf_jax.data.readers: prompt/response, chat "messages", hh
transcripts; pairs as prompt/chosen/rejected, chat lists or hh transcripts; prompts as
"prompt" strings or message lists, or .txt lines). Without *_eval files a seeded
config.data.eval_fraction is held out; --config.data.on_error=skip skips bad rows and prints
how many per reason. data.prompts defaults to the prompts of data.pairs.

Each stage writes DIR/<stage>/ (metrics.jsonl, curves.png, TensorBoard, checkpoints; a rerun
resumes) and ends with DIR/<stage>/hf/: the SFT and RL policies as *ForCausalLM, the reward
model as *ForSequenceClassification (transformers' score + config.json's score_bias = ours),
the tokenizer files and chat template, a generation_config.json, in the dtype the model came
in (--config.export.dtype to change it). --config.model.dtype=bfloat16 computes in bfloat16
(float32 master weights). The critic: --config.ppo.value=separate (a value network from the
reward model's backbone, whatever its size; value_init=policy: from the policy's) or head.
`best_of_n` adds a best-of-n step after the reward model (n SFT samples per held-out prompt, the
best by the reward model, written as DIR/best_of_n/best_of_n.jsonl in the SFT layout).
`runlocal` shrinks lengths, batches and steps so that a tiny model runs in about a minute.
"""
from rlhf_jax import configs
from rlhf_jax.train import pipeline


def get_config(arg=None):
  arg = configs.parse_arg(arg, algo="ppo", reward_model="train", best_of_n=False,
                          runlocal=False)
  if arg.reward_model not in ("train", "hf"):
    raise ValueError(f"reward_model={arg.reward_model!r}; expected 'train' or 'hf'")
  stages = (("sft", "reward") if arg.reward_model == "train" else ("sft",)) + (
      ("best_of_n",) if arg.best_of_n else ()) + ("ppo",)
  c = pipeline.files_config(stages=stages)
  c.task.max_prompt_len, c.task.max_response_len = 512, 512
  c.sft.update(dict(steps=1000, rows=16, length=1024, eval_every=200))
  c.sft.optim.lr, c.sft.optim.warmup_steps = 2e-5, 50
  if "reward" in c:
    c.reward.update(dict(steps=500, batch_size=32, eval_every=100, eval_batch_size=64))
    c.reward.optim.lr, c.reward.optim.warmup_steps = 1e-5, 20
  c.ppo.algorithm = arg.algo
  c.ppo.update(dict(iterations=200, prompts_per_iter=64, minibatch_size=16, epochs=2,
                    max_new_tokens=256, eval_every=20))
  if arg.reward_model == "hf":
    c.ppo.reward_hf_dir = configs.required(str)
    if arg.best_of_n:
      c.best_of_n.reward_hf_dir = c.ppo.get_ref("reward_hf_dir")
  if arg.algo in ("grpo", "rloo"):  # The same samples per iteration as PPO, in groups.
    c.ppo.update(dict(group_size=8, prompts_per_iter=8, epochs=1))
  if arg.algo == "grpo":
    c.ppo.update(dict(kl_in_reward=False, kl_estimator="k3", kl_controller="fixed",
                      kl_coef=0.04, loss_aggregation="grpo"))
  c.run.update(dict(log_every=10, checkpoint_every=200))
  if arg.runlocal:  # A tiny model end to end in about a minute (tests use it).
    c.task.max_prompt_len, c.task.max_response_len = 48, 32
    c.data.eval_fraction = 0.1
    c.sft.update(dict(steps=6, rows=4, length=96, max_sequences=8, eval_every=3,
                      eval_batch_size=8))
    c.sft.optim.lr, c.sft.optim.warmup_steps = 1e-3, 1
    if "reward" in c:
      c.reward.update(dict(steps=6, batch_size=8, eval_every=3, eval_batch_size=16))
      c.reward.optim.lr, c.reward.optim.warmup_steps = 1e-3, 1
    c.ppo.update(dict(iterations=3, prompts_per_iter=8, minibatch_size=8, epochs=1,
                      max_new_tokens=16, eval_every=3))
    if arg.algo in ("grpo", "rloo"):
      c.ppo.update(dict(group_size=4, prompts_per_iter=2))
    c.ppo.optim.lr = 1e-4
    if arg.best_of_n:
      c.best_of_n.update(dict(n=2, prompts=8, max_new_tokens=16, batch_size=16))
    c.run.update(dict(log_every=1, checkpoint_every=3))
  return configs.lock(c)
