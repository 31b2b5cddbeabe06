"""The quickstart pipeline on the embedded review world: SFT -> samples -> gold labels -> RM.

Each stage writes to its own sub-directory of the workdir and resumes from its checkpoints;
sampling is a deterministic function of the SFT params and the seed, so a rerun redraws
exactly the same pairs.
"""
import json
import math
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from rlhf_jax import data, parallel, sampling
from rlhf_jax.train import reward as reward_lib
from rlhf_jax.train import sft as sft_lib
from rlhf_jax.train import task as task_lib


def left_pad(prompts: list[np.ndarray], width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  ids = np.full((len(prompts), width), pad_id, np.int32)
  mask = np.zeros_like(ids)
  for i, p in enumerate(prompts):
    p = p[-width:]
    ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
  return ids, mask


def sample_responses(module, params, prompt_ids: list[np.ndarray], *, k: int,
                     cfg: ml_collections.ConfigDict, tok: data.TokenizeConfig, mesh, rules,
                     key: jax.Array) -> tuple[np.ndarray, np.ndarray]:
  """k samples per prompt: (tokens [N, k, max_new], finished [N, k]) from the jitted sampler."""
  sampling_cfg = sampling.SamplingConfig(max_new_tokens=cfg.max_new_tokens, eos_id=tok.eos_id,
                                         pad_id=tok.pad_id, temperature=cfg.temperature)
  rows = [p for p in prompt_ids for _ in range(k)]
  batch = max(cfg.batch_size // mesh.size, 1) * mesh.size
  tokens, finished = [], []
  with parallel.mesh_context(mesh, rules):
    for b, start in enumerate(range(0, len(rows), batch)):
      chunk = rows[start:start + batch]
      short = batch - len(chunk)
      ids, mask = left_pad(chunk + [chunk[-1]] * short, tok.max_prompt_len, tok.pad_id)
      ids, mask = parallel.shard_batch((ids, mask), mesh)
      out = sampling.generate(module, params, ids, mask, jax.random.fold_in(key, b),
                              sampling_cfg)
      tokens.append(np.asarray(out.tokens)[:len(chunk)])
      finished.append(np.asarray(out.finished)[:len(chunk)])
  tokens, finished = np.concatenate(tokens), np.concatenate(finished)
  return (tokens.reshape(len(prompt_ids), k, -1), finished.reshape(len(prompt_ids), k))


def mean_and_stderr(x: np.ndarray) -> tuple[float, float]:
  x = np.asarray(x, np.float64).ravel()
  return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  timings = {}
  start = time.perf_counter()
  module, sft_params, task, mesh, sft_eval = sft_lib.run_sft(config, os.path.join(workdir,
                                                                                  "sft"))
  timings["sft_s"] = time.perf_counter() - start
  world = task.world
  if world is None:
    raise ValueError("the quickstart needs config.task.kind='review_world' (a gold reward)")
  tok = task.tokenize_config
  cfg = config.sampling

  # SAMPLE k RESPONSES PER PROMPT FROM THE SFT POLICY, LABEL ALL PAIRS WITH THE GOLD REWARD.
  start = time.perf_counter()
  key = jax.random.key(config.seed + 2)
  splits = {}
  for split, n, seed in (("train", cfg.train_prompts, 10), ("eval", cfg.eval_prompts, 11)):
    prompts = world.sample_prompts(n, seed=seed)
    prompt_ids = [world.encode(p) for p in prompts]
    tokens, finished = sample_responses(module, sft_params, prompt_ids, k=cfg.k, cfg=cfg,
                                        tok=tok, mesh=mesh, rules=config.sharding,
                                        key=jax.random.fold_in(key, seed))
    gold = world.score_ids([p for p in prompt_ids for _ in range(cfg.k)],
                           list(tokens.reshape(-1, tokens.shape[-1]))).reward
    texts = [[world.decode(t) for t in row] for row in tokens]
    labelled = world.label_pairs(prompts, texts, temperature=cfg.label_temperature,
                                 seed=seed)
    logging.info("quickstart %s pairs: %s", split, labelled.report.summary())
    splits[split] = dict(pairs=task_lib.tokenize_pairs(task, labelled.examples,
                                                       f"{split} pairs"),
                         gold=gold, finished=finished)
  timings["sample_and_label_s"] = time.perf_counter() - start

  # REWARD MODEL FROM THE SFT BACKBONE, EVALUATED AGAINST GOLD LABELS ON FRESH PROMPTS.
  start = time.perf_counter()
  _, _, rm = reward_lib.run_reward(config, os.path.join(workdir, "reward"), task=task,
                                   backbone=sft_params, train_pairs=splits["train"]["pairs"],
                                   eval_pairs=splits["eval"]["pairs"])
  timings["reward_s"] = time.perf_counter() - start

  gold_mean, gold_se = mean_and_stderr(splits["eval"]["gold"])
  results = {
      "sft_gold_reward_mean": gold_mean, "sft_gold_reward_stderr": gold_se,
      "sft_eos_fraction": float(splits["eval"]["finished"].mean()),
      "sft_eval_perplexity": sft_eval["eval_perplexity"],
      "rm_heldout_accuracy_vs_gold": rm["eval_accuracy"],
      "rm_train_pairs": rm["train_pairs"], "rm_eval_pairs": rm["eval_pairs"],
      **{k: round(v, 1) for k, v in timings.items()}}
  table = "\n".join([
      "| stage | metric | value |", "|---|---|---|",
      f"| SFT | gold reward on held-out prompts (mean ± s.e., {splits['eval']['gold'].size} "
      f"samples) | {gold_mean:.4f} ± {gold_se:.4f} |",
      f"| SFT | samples that ended with EOS | {results['sft_eos_fraction']:.3f} |",
      f"| SFT | held-out perplexity | {sft_eval['eval_perplexity']:.3f} |",
      f"| RM | held-out accuracy vs gold labels ({rm['eval_pairs']} pairs) | "
      f"{rm['eval_accuracy']:.3f} |",
      f"| all | wall time (s): SFT / sample+label / RM | {timings['sft_s']:.0f} / "
      f"{timings['sample_and_label_s']:.0f} / {timings['reward_s']:.0f} |"])
  print(table, flush=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "quickstart_results.md"), "w") as f:
      f.write(table + "\n")
    with open(os.path.join(workdir, "quickstart_results.json"), "w") as f:
      json.dump(results, f, indent=2)
  return results
