"""`collect generate`: k samples per prompt from a policy, written as comparison items.

The policy is an SFT checkpoint of ours (config.policy.kind="checkpoint": model, tokenizer and
special ids come from the config saved in the checkpoint) or a local HF directory
(kind="hf": `models.load_hf` + its tokenizer.json). Prompts come from the review world (the
embedded task, which also makes gold labels possible) or from a file. Sampling is the jitted
KV-cache sampler, one key per run folded per batch, so the same config gives the same round.
"""
import dataclasses
import gzip
import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from rlhf_jax import configs, data, models, parallel, sampling
from rlhf_jax import eval as eval_lib
from rlhf_jax.collect import checkpoints
from rlhf_jax.collect import db as db_lib

DB_NAME = "collect.db"


@dataclasses.dataclass
class Policy:
  module: Any
  params: Any
  tokenizer: Any
  eos_id: int
  pad_id: int
  bos_id: int | None
  description: str
  world_seed: int | None  # The review world it was trained on, if any (for gold labels).


def _special_id(tokenizer, explicit: str, from_files: str | None, fallback: int) -> int:
  """The config's token, else tokenizer_config.json's, else the model config's id."""
  token = explicit or from_files
  if token:
    return data.token_id(tokenizer, token)
  return fallback


def load_policy(cfg: ml_collections.ConfigDict, mesh, rules) -> Policy:
  """The policy of config.policy, its params on `mesh`."""
  if cfg.kind == "checkpoint":
    restored = checkpoints.restore(cfg.path, role="policy", mesh=mesh, rules=rules)
    tok = restored.task.tokenize_config
    world_seed = (restored.config.task.world_seed
                  if restored.config.task.kind == "review_world" else None)
    return Policy(restored.module, restored.params, restored.task.tokenizer, tok.eos_id,
                  tok.pad_id, tok.bos_id, f"checkpoint {restored.directory} step "
                  f"{restored.step}", world_seed)
  if cfg.kind == "hf":
    module, params = models.load_hf(cfg.path, role="policy", mesh=mesh, rules=rules)
    tok_path = cfg.tokenizer or cfg.path
    tokenizer = data.load_tokenizer(tok_path)
    specials = data.special_tokens(tok_path if os.path.isdir(tok_path)
                                   else os.path.dirname(tok_path))
    eos = _special_id(tokenizer, cfg.eos_token, specials.get("eos_token"),
                      module.cfg.eos_token_id)
    pad = _special_id(tokenizer, cfg.pad_token, specials.get("pad_token"),
                      module.cfg.pad_token_id)
    bos = data.token_id(tokenizer, cfg.bos_token) if cfg.bos_token else None
    if eos == pad:
      raise ValueError(f"{cfg.path}: the pad and eos ids are both {eos}; set "
                       "--config.policy.pad_token to a token other than EOS (padding must "
                       "not look like the end of a response)")
    if tokenizer.get_vocab_size() > module.cfg.vocab_size:
      raise ValueError(f"{tok_path}: the tokenizer has {tokenizer.get_vocab_size()} tokens but "
                       f"the model's vocabulary is {module.cfg.vocab_size}; wrong tokenizer?")
    return Policy(module, params, tokenizer, eos, pad, bos, f"hf {cfg.path}", None)
  raise ValueError(f"config.policy.kind={cfg.kind!r}; expected 'checkpoint' or 'hf'")


def read_prompt_file(path: str, limit: int = 0) -> list[tuple[str, str]]:
  """(text, "path:line") per prompt: a .txt file has one prompt per line (blank lines
  ignored), a .jsonl/.jsonl.gz file one {"prompt": str} object per line."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such prompt file")
  is_json = path.endswith((".jsonl", ".jsonl.gz", ".json"))
  opener = gzip.open if path.endswith(".gz") else open
  out = []
  with opener(path, "rt", encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      line = line.rstrip("\r\n")
      if not line.strip():
        continue
      where = f"{path}:{lineno}"
      if is_json:
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as e:
          raise data.DataError(where, f"malformed JSON at column {e.colno}: {e.msg}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
          raise data.DataError(where, "expected an object with a string field 'prompt'")
        text = obj["prompt"]
      else:
        text = line
      if not text.strip():
        raise data.DataError(where, "empty prompt")
      out.append((text, where))
      if limit and len(out) == limit:
        break
  if not out:
    raise data.DataError(path, "no prompts in the file")
  return out


def load_prompts(cfg: ml_collections.ConfigDict) -> tuple[list[tuple[str, str]], int | None]:
  """(prompts as (text, source), the review-world seed when the prompts come from it)."""
  if cfg.kind == "review_world":
    if cfg.n < 1:
      raise ValueError(f"config.prompts.n={cfg.n}: the review world needs a number of prompts "
                       "to draw (>= 1)")
    world = data.ReviewWorld(data.WorldConfig(seed=cfg.world_seed))
    texts = world.sample_prompts(cfg.n, seed=cfg.seed)
    return ([(t, f"review_world(seed={cfg.world_seed},prompt_seed={cfg.seed}):{i}")
             for i, t in enumerate(texts)], cfg.world_seed)
  if cfg.kind == "file":
    return read_prompt_file(cfg.path, cfg.n), None
  raise ValueError(f"config.prompts.kind={cfg.kind!r}; expected 'review_world' or 'file'")


def sample_responses(policy: Policy, prompts: list[str], *, k: int,
                     cfg: ml_collections.ConfigDict, key: jax.Array, mesh, rules
                     ) -> tuple[list[list[db_lib.Response]], int]:
  """k responses per prompt (decoded text, finished?, token count) and how many prompts were
  cut from the left to max_prompt_len."""
  sampling_cfg = sampling.sampling_config(cfg, policy.eos_id, policy.pad_id)
  encoded = data.encode_texts(policy.tokenizer, prompts, "tokenize prompts")
  prompt_ids = []
  truncated = 0
  for i, (text, ids) in enumerate(zip(prompts, encoded)):
    if policy.bos_id is not None:
      ids = np.concatenate([[policy.bos_id], ids]).astype(np.int32)
    if len(ids) == 0:
      raise data.DataError(f"prompt {i}", f"{text[:60]!r} encodes to no tokens")
    truncated += len(ids) > cfg.max_prompt_len
    prompt_ids.append(ids)
  tokens, finished, _, _ = eval_lib.sample_responses(
      policy.module, policy.params, prompt_ids, k=k, sampling_cfg=sampling_cfg,
      prompt_len=cfg.max_prompt_len, pad_id=policy.pad_id, mesh=mesh, rules=rules, key=key,
      batch_size=cfg.batch_size)
  out = []
  for row_tokens, row_finished in zip(tokens, finished):
    samples = []
    for t, done in zip(row_tokens, row_finished):
      # A finished row ends at its first EOS (PAD after it); an unfinished one used every
      # column (the loop stops early only once every row is finished).
      n = int(np.flatnonzero(t == policy.eos_id)[0]) + 1 if done else len(t)
      text = policy.tokenizer.decode([int(x) for x in t[:n - 1 if done else n]],
                                     skip_special_tokens=True)
      samples.append(db_lib.Response(text, bool(done), n))
    out.append(samples)
  return out, truncated


def run_generate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Samples the round and writes WORKDIR/collect.db (+ config.json and the policy's
  tokenizer.json); returns a summary."""
  configs.check_required(config)
  if config.k < 2:
    raise ValueError(f"config.k={config.k}: a comparison needs at least 2 responses per prompt")
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, DB_NAME)
  if os.path.exists(path):
    raise FileExistsError(f"{path} already exists; collect each round into a fresh workdir")
  start = time.perf_counter()
  mesh = parallel.make_mesh(config.mesh.to_dict())
  policy = load_policy(config.policy, mesh, config.sharding)
  prompts, prompt_world = load_prompts(config.prompts)
  responses, truncated = sample_responses(
      policy, [t for t, _ in prompts], k=config.k, cfg=config.sampling,
      key=jax.random.key(config.seed), mesh=mesh, rules=config.sharding)
  world_seed = prompt_world if prompt_world is not None else policy.world_seed
  conn = db_lib.create(path, {"config": config.to_dict(), "policy": policy.description,
                              "world_seed": world_seed, "truncated_prompts": truncated})
  try:
    summary = db_lib.add_round(conn, prompts, responses,
                               pairs_per_prompt=config.pairs_per_prompt,
                               repeat_fraction=config.repeat_fraction, seed=config.seed)
  except BaseException:
    conn.close()
    for suffix in ("", "-wal", "-shm"):  # No half-written round left to trip the next run.
      if os.path.exists(path + suffix):
        os.remove(path + suffix)
    raise
  conn.close()
  finished = np.mean([r.finished for rs in responses for r in rs])
  result = {**dataclasses.asdict(summary), "db": path, "policy": policy.description,
            "world_seed": world_seed, "truncated_prompts": truncated,
            "finished_fraction": float(finished), "seconds": round(time.perf_counter() - start,
                                                                   1)}
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config.to_dict(), f, indent=2, default=str)
  # The reward stage reads the exported text with `task.tokenizer`: the one that wrote it.
  policy.tokenizer.save(os.path.join(workdir, "tokenizer.json"))
  logging.info("collect generate: %s", result)
  return result
