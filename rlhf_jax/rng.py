"""Named random streams of a run: one root seed (config.seed), one named stream per purpose.

Every stage draws its keys here instead of adding a magic offset to the seed at the call site,
so that two purposes can never share a stream by accident and a reader sees at once what each
key is for. A stream is `jax.random.key(seed + offset)`: the offsets are the values the stages
used before the streams had names, kept so that committed results reproduce bit for bit.

The review world's prompt sets are named the same way (`PROMPTS`): each is a fixed, seeded
draw of prompts, disjoint in purpose (pairs for the reward model, held-out evaluation, RL).
"""
import jax
import numpy as np

# Offsets from config.seed.
STREAMS = {
    "sft": 0,              # SFT init and step keys; a fresh policy's init in other stages.
    "reward": 1,           # Reward-model heads (one key per ensemble member) and step keys.
    "pair_sampling": 2,    # Policy samples labelled into preference pairs.
    "preference": 3,       # DPO-family train state.
    "evaluation": 4,       # Held-out sampling of every policy (common random numbers).
    "value_init": 5,       # A fresh value head or critic.
    "rl": 6,               # PPO / GRPO / RLOO train state: rollouts and updates.
    "lora_preference": 7,  # LoRA adapters of the DPO-family policy.
    # The sweeps' best-of-n pools (train.sweep.best_of_n_pool, the frontier reproduction):
    # offset 7 as before the streams had names, shared with LoRA DPO, which no run with
    # such a pool uses (the frontier runs DPO as a vmapped sweep without LoRA).
    "best_of_n_pool": 7,
    "lora_rl": 8,          # LoRA adapters of the RL policy.
    "best_of_n": 9,        # The best-of-n stage's samples (train/best_of_n.py).
    "online_dpo": 10,      # Online / iterative DPO train state: rollouts, pair order, updates.
}

# Seeds of the review world's prompt sets (ReviewWorld.sample_prompts(n, seed=...)).
PROMPTS = {
    "pairs_train": 10,     # Prompts whose policy samples are labelled into training pairs.
    "pairs_eval": 11,      # ... into held-out pairs (the reward model's accuracy).
    "heldout": 12,         # Held-out prompts every policy is evaluated on.
    "rl": 20,              # The RL stage's training prompts.
}


# Host-side (numpy) streams: SeedSequence([seed, tag, ...]) tags.
HOST_STREAMS = {
    "bootstrap": 7,        # Reward-ensemble members' resamples of the training pairs.
    "held_out_split": 8,   # The held-out part of a data file without an eval file of its own.
}


def host_rng(seed: int, stream: str, *more: int) -> np.random.Generator:
  """A numpy generator of host stream `stream` (and any further integers, e.g. a member)."""
  if stream not in HOST_STREAMS:
    raise ValueError(f"unknown host stream {stream!r}; expected one of {sorted(HOST_STREAMS)}")
  return np.random.default_rng([int(seed), HOST_STREAMS[stream], *map(int, more)])


def key(seed: int, stream: str) -> jax.Array:
  """The root key of `stream` for a run seeded with `seed`."""
  if stream not in STREAMS:
    raise ValueError(f"unknown random stream {stream!r}; expected one of {sorted(STREAMS)}")
  return jax.random.key(int(seed) + STREAMS[stream])


def prompt_seed(name: str) -> int:
  """The seed of the review world's prompt set `name`."""
  if name not in PROMPTS:
    raise ValueError(f"unknown prompt set {name!r}; expected one of {sorted(PROMPTS)}")
  return PROMPTS[name]
