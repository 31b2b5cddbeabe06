"""Preference collection round on the review world: k samples per prompt from our SFT policy.

  # 1. A policy: the quickstart's SFT stage (or any SFT workdir of ours).
  python -m rlhf_jax.main --config=experiments/quickstart/config.py --workdir=/tmp/qs
  # 2. Sample the round: 200 prompts x k=4 -> up to 6 pairs each (~1,200 comparisons,
  #    ~120 of them drawn for re-annotation), into /tmp/round1/collect.db.
  python -m rlhf_jax.collect generate --config=experiments/collect/review_world.py \
      --config.policy.path=/tmp/qs/sft --workdir=/tmp/round1
  # 3. Annotate in a browser: one login link per annotator (printed once; --replace makes
  #    a new one), then serve; each annotator opens their link. Then agreement and bias.
  python -m rlhf_jax.collect add-annotator alice --workdir=/tmp/round1 --port=8000
  python -m rlhf_jax.collect add-annotator bob --workdir=/tmp/round1 --port=8000
  python -m rlhf_jax.collect serve --workdir=/tmp/round1 --port=8000
  python -m rlhf_jax.collect stats --workdir=/tmp/round1
  # 3'. Or label synthetically with the gold reward (temperature > 0 = Bradley-Terry noise).
  python -m rlhf_jax.collect label --workdir=/tmp/round1 --labeler=gold --temperature=0.05
  # 4. Export and train a reward model on it (experiments/collect/reward_from_export.py).
  python -m rlhf_jax.collect export --workdir=/tmp/round1 --out=/tmp/round1/prefs.jsonl

A local HF directory works as the policy too (tokenizer.json inside it or at policy.tokenizer;
EOS/PAD from policy.eos_token/pad_token, else tokenizer_config.json, else config.json):
  --config=experiments/collect/review_world.py:policy=hf --config.policy.path=HF_DIR
and prompts from a file (one per line, or JSONL {"prompt": ...}):
  --config=experiments/collect/review_world.py:prompts=file --config.prompts.path=prompts.txt

Expected cost: under a minute on a 2-core CPU for the quickstart policy (runlocal: seconds).
"""
import ml_collections

from rlhf_jax import configs


def get_config(arg=None):
  arg = configs.parse_arg(arg, runlocal=False, policy="checkpoint", prompts="review_world")
  c = ml_collections.ConfigDict()
  c.seed = 0  # Sampling key, pair subsets, queue order, re-annotation draw.

  # "checkpoint": an SFT workdir of ours (model, tokenizer and ids from its saved config);
  # "hf": a local HF directory (models.load_hf) plus its tokenizer.json.
  c.policy = ml_collections.ConfigDict(dict(
      kind=arg.policy, path=configs.required(str), tokenizer="", eos_token="", pad_token="",
      bos_token=""))
  # "review_world": prompts like the SFT data's (prefixes of sampled reviews); fresh prompt
  # seed, so they are not the prompts the quickstart's reward model was evaluated on.
  # "file": a .txt (one prompt per line) or .jsonl ({"prompt": ...}); n = 0 takes all.
  c.prompts = ml_collections.ConfigDict(dict(
      kind=arg.prompts, world_seed=0, seed=100, n=200 if arg.prompts == "review_world" else 0,
      path=""))
  c.k = 4  # Samples per prompt (the seed pipeline's 2-4).
  c.pairs_per_prompt = 0  # 0 = all k(k-1)/2 pairs of distinct samples.
  c.repeat_fraction = 0.1  # Items judged twice (by another annotator where there is one).
  c.sampling = ml_collections.ConfigDict(dict(
      max_new_tokens=48, temperature=1.0, top_k=0, top_p=1.0, batch_size=256,
      max_prompt_len=8))  # Review-world prompts have <= 6 words; longer ones are cut.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.sharding = "fsdp"
  if arg.prompts == "file":
    c.sampling.max_prompt_len = 256

  if arg.runlocal:  # Seconds: a handful of comparisons, enough to click through.
    c.prompts.n = 8 if arg.prompts == "review_world" else 0
    c.k = 3
    c.sampling.max_new_tokens = 24
    c.sampling.batch_size = 32
  return configs.lock(c)
