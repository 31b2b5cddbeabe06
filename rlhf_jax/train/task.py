"""The task a stage trains on: the embedded review world, or files (JSONL + tokenizer.json)."""
import dataclasses
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from rlhf_jax import data


@dataclasses.dataclass
class Task:
  tokenizer: Any
  tokenize_config: data.TokenizeConfig
  # The model's vocabulary = the tokenizer's, exactly: padding it up (for matmul shapes) would
  # give the policy ids no tokenizer can decode and no gold reward can score.
  vocab_size: int
  world: data.ReviewWorld | None = None  # Set for the embedded task (it has a gold reward).


def build_task(cfg: ml_collections.ConfigDict) -> Task:
  """config.task.kind = "review_world" (seeded, generated here) or "files" (a tokenizer path
  and JSONL paths read by rlhf_jax.data)."""
  if cfg.kind == "review_world":
    world = data.ReviewWorld(data.WorldConfig(seed=cfg.world_seed))
    vocab = world.vocab_size
    return Task(world.tokenizer, world.tokenize_config(vocab_size=vocab), vocab, world)
  if cfg.kind == "files":
    tokenizer = data.load_tokenizer(cfg.tokenizer)
    vocab = tokenizer.get_vocab_size()
    tok_cfg = data.TokenizeConfig(eos_id=data.token_id(tokenizer, cfg.eos_token),
                                  pad_id=data.token_id(tokenizer, cfg.pad_token),
                                  max_prompt_len=cfg.max_prompt_len,
                                  max_response_len=cfg.max_response_len, vocab_size=vocab,
                                  over_length=cfg.over_length)
    return Task(tokenizer, tok_cfg, vocab)
  raise ValueError(f"config.task.kind={cfg.kind!r}; expected 'review_world' or 'files'")


def sft_examples(task: Task, cfg: ml_collections.ConfigDict, split: str
                 ) -> list[data.TokenizedSFT]:
  """Tokenised SFT examples of `split` ("train" or "eval"), truncation counted and logged."""
  if task.world is not None:
    n = cfg.n_sft if split == "train" else cfg.n_eval
    raw = task.world.sample_sft(n, seed={"train": 0, "eval": 1}[split])
  else:
    raw = data.read_sft(cfg.sft_train if split == "train" else cfg.sft_eval)
  result = data.tokenize_sft(raw, task.tokenizer, task.tokenize_config)
  logging.info("SFT %s: %d examples; %s", split, len(result.examples), result.summary())
  return result.examples


def preference_examples(task: Task, cfg: ml_collections.ConfigDict, split: str
                        ) -> list[data.TokenizedPair]:
  """Tokenised preference pairs of `split`: gold-labelled samples of the review world's own
  process, or a JSONL file in any layout `data.read_preferences` reads."""
  if task.world is not None:
    n = cfg.n_pairs if split == "train" else cfg.n_eval_pairs
    raw = task.world.sample_preferences(n, k=cfg.k, temperature=cfg.label_temperature,
                                        seed={"train": 0, "eval": 1}[split])
  elif split == "eval" and cfg.pairs_eval:
    raw = data.read_preferences(cfg.pairs_eval)
  else:
    raw = held_out_split(data.read_preferences(cfg.pairs_train), cfg.eval_fraction, split,
                         seed=cfg.split_seed) if not cfg.pairs_eval else data.read_preferences(
                             cfg.pairs_train)
  return tokenize_pairs(task, raw, f"pairs {split}")


def held_out_split(examples: list, fraction: float, split: str, seed: int = 0) -> list:
  """A deterministic train/eval split of one file: `fraction` of it (a seeded permutation)
  is held out for evaluation and never trained on."""
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"config.task.eval_fraction={fraction}: expected a value in (0, 1) when "
                     "config.task.pairs_eval is empty")
  order = np.random.default_rng([seed, 8]).permutation(len(examples))
  n_eval = max(1, int(round(fraction * len(examples))))
  keep = order[:n_eval] if split == "eval" else order[n_eval:]
  return [examples[i] for i in sorted(keep)]


def tokenize_pairs(task: Task, raw, desc: str) -> list[data.TokenizedPair]:
  result = data.tokenize_preferences(raw, task.tokenizer, task.tokenize_config)
  logging.info("%s: %d pairs; %s", desc, len(result.examples), result.summary())
  return result.examples
