"""Best-of-n stage: n samples of the policy for each prompt, scored by a reward model (or the
review world's gold reward), the best one kept.

Nothing trains here: the result is the selection itself, written to <workdir>/best_of_n.jsonl
as one {"prompt", "response", "finished", "score", "scores"} object per prompt (finished: the
response ended with EOS), in the SFT prompt/response
layout (strings are read verbatim), so a later SFT run on it is rejection-sampling fine-tuning
(`--config.data.sft=<workdir>/best_of_n.jsonl`). The metrics are the reward model's mean score
of all samples (best-of-1) and of the selected ones, the analytic KL of best-of-n to the policy
(log n − (n−1)/n; Stiennon et al. 2020, Gao et al. 2022), and on the review world the gold
reward of both. The policy is unchanged, so there is no HF export.
"""
import json
import os

import jax
import ml_collections
import numpy as np
from absl import logging

from rlhf_jax import eval as eval_lib
from rlhf_jax import rng, sampling
from rlhf_jax.train import scoring, stage as stage_lib, task as task_lib

NAME = "best_of_n"
SAMPLES_FILE = "best_of_n.jsonl"


def default_config() -> ml_collections.ConfigDict:
  """config.best_of_n: `n` samples for each of at most `prompts` prompts (0 = all) of the
  task's RL prompt `split` ("eval": config.data.prompts_eval or the held-out part of
  config.data.prompts, the review world's held-out prompts; "train" for rejection-sampling
  fine-tuning data), drawn at
  `temperature` with up to `max_new_tokens` tokens; `batch_size` rows per sampling batch;
  init_hf_dir / reward_hf_dir as in config.ppo."""
  return ml_collections.ConfigDict(dict(
      n=8, prompts=256, split="eval", max_new_tokens=128, temperature=1.0, batch_size=64,
      init_hf_dir="", reward_hf_dir="", reward_source="model"))


def validate(config: ml_collections.ConfigDict) -> None:
  stage_lib.check_positive(config, "best_of_n.n", "best_of_n.max_new_tokens",
                           "best_of_n.batch_size")
  stage_lib.check_at_least(config, 0, "best_of_n.prompts")
  if config.task.kind in task_lib.WORLD_KINDS and config.best_of_n.prompts < 1:
    raise ValueError("config.best_of_n.prompts=0 ('all') needs a prompt file; an embedded world "
                     "draws prompts, so give how many (>= 1)")
  stage_lib.check_choice(config, "best_of_n.reward_source", ("model", "gold"))
  stage_lib.check_choice(config, "best_of_n.split", ("train", "eval"))
  if not config.best_of_n.temperature > 0:
    raise ValueError(f"config.best_of_n.temperature={config.best_of_n.temperature}: must be "
                     "> 0 (n greedy samples would all be the same)")
  if config.best_of_n.reward_source == "gold" and config.task.kind not in task_lib.WORLD_KINDS:
    raise ValueError("config.best_of_n.reward_source='gold' needs an embedded world's gold "
                     f"reward (config.task.kind in {task_lib.WORLD_KINDS})")


def _scores(config, task, mesh, prompts, tokens, reward):
  """[N, n] scores of every sample: the reward model's ensemble mean, or the gold reward."""
  n_prompts, n = tokens.shape[:2]
  flat = tokens.reshape(n_prompts * n, -1)
  rows = [p for p in prompts for _ in range(n)]
  if reward is None:
    return task.world.score_ids(rows, list(flat)).reward.reshape(n_prompts, n)
  module, params = reward
  tok = task.tokenize_config
  ids, mask = eval_lib.left_pad(rows, tok.max_prompt_len, tok.pad_id)
  ids = np.concatenate([ids, flat], axis=1)
  mask = np.concatenate([mask, eval_lib.response_mask(flat, tok.eos_id)], axis=1)
  r = scoring.score_sequences(module, params, ids, mask, mesh, config.best_of_n.batch_size)
  return r.mean(axis=0).reshape(n_prompts, n)


def run(config: ml_collections.ConfigDict, workdir: str, init: stage_lib.Init = None, *,
        reward: stage_lib.Init = None) -> stage_lib.StageResult:
  """n samples per prompt of the policy of `init`, the best by the reward (`reward`: a reward
  stage's result or an HF reward-model directory; else config.best_of_n.reward_hf_dir; the
  gold reward with reward_source="gold")."""
  validate(config)
  cfg = config.best_of_n
  task, mesh, module, params, dtype = stage_lib.start_policy(config, NAME, init, reward)
  rm = (stage_lib.reward_model(config, NAME, reward, task, mesh)
        if cfg.reward_source == "model" else None)
  prompts = task_lib.prompts(task, config, cfg.split, n=cfg.prompts)
  prompts = prompts[:cfg.prompts] if cfg.prompts else prompts
  tok = task.tokenize_config
  sampling_cfg = sampling.sampling_config(cfg, tok.eos_id, tok.pad_id)
  tokens, finished, _, _ = eval_lib.sample_responses(
      module, params, prompts, k=cfg.n, sampling_cfg=sampling_cfg,
      prompt_len=tok.max_prompt_len, pad_id=tok.pad_id, mesh=mesh, rules=config.sharding,
      key=rng.key(config.seed, "best_of_n"), batch_size=cfg.batch_size)
  scores = _scores(config, task, mesh, prompts, tokens, rm)
  best = np.argmax(scores, axis=1)
  metrics = {"score_mean": float(scores.mean()),
             "score_best": float(scores[np.arange(len(best)), best].mean()),
             "kl_bound": float(eval_lib.best_of_n_kl(cfg.n)), "n": cfg.n,
             "prompts": len(prompts),
             "no_eos_fraction": float(1 - finished.mean())}
  if task.world is not None:
    gold = _scores(config, task, mesh, prompts, tokens, None)
    metrics.update(gold_mean=float(gold.mean()),
                   gold_best=float(gold[np.arange(len(best)), best].mean()))
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    path = os.path.join(workdir, SAMPLES_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      for i, prompt in enumerate(prompts):
        response = _response_text(task, tokens[i, best[i]])
        f.write(json.dumps({"prompt": _prompt_text(task, prompt), "response": response,
                            "finished": bool(finished[i, best[i]]),
                            "score": float(scores[i, best[i]]),
                            "scores": [float(s) for s in scores[i]]}) + "\n")
    os.replace(path + ".tmp", path)
    with open(os.path.join(workdir, "best_of_n_results.json"), "w") as f:
      json.dump(metrics, f, indent=2)
  logging.info("best-of-%d: %s", cfg.n, metrics)
  return stage_lib.StageResult(NAME, module, params, task, mesh, metrics, workdir, None, dtype)


def _prompt_text(task, ids) -> str:
  """A prompt as the text SFT reads verbatim: without the BOS that tokenisation adds again."""
  bos = task.tokenize_config.bos_id
  ids = np.asarray(ids)
  return task.decode(ids[1:] if bos is not None and len(ids) and ids[0] == bos else ids)


def _response_text(task, tokens) -> str:
  """A sampled response as text up to its EOS: the EOS's own text included when it has one
  (a chat template's end-of-turn token), so SFT on the file does not add a second one."""
  tokens = np.asarray(tokens)
  eos = task.tokenize_config.eos_id
  ended = np.flatnonzero(tokens == eos)
  if task.world is not None:
    return task.world.decode(tokens)
  return task.decode(tokens[:ended[0] + 1] if len(ended) else tokens)
