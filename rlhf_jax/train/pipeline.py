"""Stages chained by their results: SFT -> (pairs) -> reward model -> DPO / RL, then a held-out
evaluation of every policy; for the quickstart, the reproductions and user-model configs alike.

config.stages names what runs, in this order (each in its own sub-directory of the workdir,
each resumable from its own checkpoints):
  "sft"     supervised fine-tuning (train/sft.py);
  "pairs"   k samples of the SFT policy per prompt, every pair labelled by the task's gold
            reward (the review world; the DPO paper's IMDb set-up) for the reward model and DPO;
  "reward"  a reward model (ensemble) from the SFT policy's backbone (train/reward.py);
  "best_of_n"  n samples of the SFT policy per prompt, the best by the reward model, written
            as SFT data (train/best_of_n.py; nothing trains);
  "dpo"     the DPO family or KTO from the SFT policy (train/preference.py);
  "online_dpo"  online or iterative DPO from the SFT policy on pairs of its own samples,
            labelled by the reward model, the gold reward or a grader (train/online_dpo.py);
  "ppo"     PPO / GRPO / RLOO from the SFT policy against the reward model (train/rl.py).
A stage without an earlier stage to start from starts from its section's init_hf_dir, else
config.model_dir (a user's HF model), else fresh weights; a stage whose init_hf_dir is set
starts from it even when an earlier stage ran. Pairs come from the "pairs" step when it runs,
else from the task (config.data.pairs, or the review world's own process).

`validate(config)` checks the whole resolved config, every stage that will run and how they
connect, and `preflight(config)` the files, tokenizer and model they will read, before
anything trains (main.py calls both before writing anything to the workdir).
"""
import dataclasses
import json
import os
import time
from typing import Any

import jax
import ml_collections
from absl import logging

from rlhf_jax import configs, data, models, rng, sampling
from rlhf_jax import eval as eval_lib
from rlhf_jax.train import best_of_n, online_dpo, preference, reward, rl, sft
from rlhf_jax.train import grading
from rlhf_jax.train import stage as stage_lib
from rlhf_jax.train import task as task_lib

# Library stages by config section. "pairs" is a step between stages, not a trained stage.
STAGES = {"sft": sft, "reward": reward, "best_of_n": best_of_n, "dpo": preference,
          "online_dpo": online_dpo, "ppo": rl}
STEPS = ("sft", "pairs", "reward", "best_of_n", "dpo", "online_dpo", "ppo")


@dataclasses.dataclass
class PipelineResult:
  stages: dict[str, stage_lib.StageResult]  # By step name ("sft", "reward", "dpo", ...).
  pairs: tuple[list, list] | None  # (train, eval) labelled by the "pairs" step, if it ran.
  evaluation: dict[str, Any]  # Held-out gold reward and KL per policy (tasks with a gold reward).
  timings: dict[str, float]  # Wall time per step, seconds.


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------


def sampling_section() -> ml_collections.ConfigDict:
  """config.sampling: k samples per prompt of the SFT policy for the "pairs" step (train_prompts
  / eval_prompts fresh prompts; label_temperature 0 = the gold reward's argmax labels), and the
  settings of held-out sampling."""
  return ml_collections.ConfigDict(dict(
      train_prompts=256, eval_prompts=128, k=4, max_new_tokens=48, temperature=1.0,
      batch_size=256, label_temperature=0.0))


def review_world_config(*, size: str = "tiny", runlocal: bool = False
                        ) -> ml_collections.ConfigDict:
  """Every section of a review-world run, tuned to its scale: model, mesh, task, run, the
  stages, sampling and held-out evaluation. Experiments set `stages` and override what they
  study; `runlocal` shrinks everything to about a minute on a CPU."""
  c = configs.base_config(size=size)
  c.model.update(dict(d_model=128, n_layers=2, n_heads=4, mlp_dim=352, max_len=128))
  c.task = task_lib.review_world_config()
  c.sft = sft.default_config()
  c.sft.optim.lr, c.sft.optim.warmup_steps = 3e-3, 20
  c.sampling = sampling_section()
  c.reward = reward.default_config()
  c.reward.optim.lr = 1e-3
  c.dpo = preference.default_config()
  c.dpo.optim.lr, c.dpo.optim.warmup_steps = 1e-4, 10
  c.dpo.steps, c.dpo.batch_size, c.dpo.eval_every = 150, 32, 50
  c.ppo = rl.default_config()
  c.ppo.update(dict(iterations=30, train_prompts=4096, prompts_per_iter=64, minibatch_size=32,
                    epochs=2, max_new_tokens=48, kl_coef=0.05, kl_target=3.0, kl_horizon=1000,
                    eval_every=10))
  c.ppo.optim.lr = 3e-5
  c.eval = ml_collections.ConfigDict(dict(prompts=128, k=4))
  if runlocal:
    c.task.n_sft, c.task.n_eval = 4_000, 200
    c.task.n_pairs, c.task.n_eval_pairs = 2_000, 200
    c.run.checkpoint_every = 40
    c.sft.steps, c.sft.eval_every = 80, 40
    c.sampling.train_prompts, c.sampling.eval_prompts, c.sampling.batch_size = 64, 32, 128
    c.reward.steps, c.reward.eval_every = 60, 30
    c.dpo.steps, c.dpo.eval_every, c.dpo.batch_size = 40, 20, 16
    c.ppo.iterations, c.ppo.prompts_per_iter, c.ppo.minibatch_size = 6, 32, 16
    c.ppo.eval_every = 3
    c.eval.prompts, c.eval.k = 32, 2
  return c


def files_config(*, stages: tuple[str, ...]) -> ml_collections.ConfigDict:
  """Every section of a run on a user's HF model and files: config.model_dir (required: its
  weights and tokenizer), config.task / config.data (task.files_config), and the sections of
  `stages` at their defaults."""
  c = configs.base_config()
  c.model_dir = configs.required(str)
  c.task, c.data = task_lib.files_config()
  for name in stages:
    if name in STAGES:
      c[name] = STAGES[name].default_config()
  c.stages = tuple(stages)
  return c


# ---------------------------------------------------------------------------------------------
# Checks before anything trains
# ---------------------------------------------------------------------------------------------


def validate(config: ml_collections.ConfigDict) -> None:
  """The whole resolved config: shared sections, every stage in config.stages, and how the
  stages connect. Each error names the key."""
  stages = tuple(config.stages)
  unknown = [s for s in stages if s not in STEPS]
  if unknown or not stages:
    raise ValueError(f"config.stages={stages}: expected a non-empty sequence of {STEPS}")
  if list(stages) != sorted(stages, key=STEPS.index) or len(set(stages)) != len(stages):
    raise ValueError(f"config.stages={stages}: each at most once, in the order {STEPS}")
  stage_lib.check_finite(config)
  stage_lib.check_run(config)
  configs.check_model(config)
  task_lib.validate(config)
  for step in stages:
    if step in STAGES:
      STAGES[step].validate(config)
  if "pairs" in stages:
    if "sft" not in stages:
      raise ValueError("config.stages: 'pairs' samples the SFT policy, so 'sft' must run first")
    if config.task.kind != "review_world":
      raise ValueError("config.stages: 'pairs' labels samples with a gold reward, which only "
                       "config.task.kind='review_world' has; give config.data.pairs instead")
    stage_lib.check_positive(config, "sampling.train_prompts", "sampling.eval_prompts",
                             "sampling.k", "sampling.max_new_tokens", "sampling.batch_size")
    if config.sampling.k < 2:
      raise ValueError(f"config.sampling.k={config.sampling.k}: pairs need >= 2 samples")
  if config.task.kind == "arithmetic_world":
    for step in ("reward", "dpo"):
      if step in stages:
        raise ValueError(f"config.stages: {step!r} trains on preference pairs, which "
                         "config.task.kind='arithmetic_world' does not have (its reward is "
                         "verified, not learned); run ('sft', 'ppo') with config.ppo."
                         "reward_source='gold' or 'grader'")
  for step in ("best_of_n", "online_dpo", "ppo"):
    if step in stages and config[step].reward_source == "model":
      if "reward" not in stages and not config[step].reward_hf_dir:
        raise ValueError(f"config.{step}.reward_source='model' but no reward model: add "
                         f"'reward' to config.stages or name one in config.{step}.reward_hf_dir")
  if config.task.kind == "files":
    needs = {"sft": ("sft",), "reward": ("pairs",), "dpo": ("pairs",)}
    for step in stages:
      for kind in needs.get(step, ()):
        if not config.data[kind] and not (kind == "pairs" and "pairs" in stages):
          raise ValueError(f"config.data.{kind} is empty: stage {step!r} trains on it")
      if step in ("ppo", "best_of_n", "online_dpo") and not any(
          config.data[k] for k in ("prompts", "prompts_eval", "pairs", "sft")):
        raise ValueError(f"config.data.prompts is empty (and there are no config.data.pairs or "
                         f"config.data.sft files to take prompts from): stage {step!r} "
                         "samples the policy on prompts")


def _model_source(config, step: str, stages) -> tuple[str, str]:
  """(the HF directory whose model stage `step` trains, the key that names it); ("", ...) for
  fresh weights of config.model. A stage that starts from the SFT stage's result trains the
  model SFT started from."""
  if config[step].get("init_hf_dir"):
    return config[step].init_hf_dir, f"config.{step}.init_hf_dir"
  if step != "sft" and "sft" in stages:
    return _model_source(config, "sft", stages)
  if config.get("model_dir"):
    return config.model_dir, "config.model_dir"
  return "", "config.model"


def preflight(config: ml_collections.ConfigDict) -> None:
  """What validate cannot see without reading files, read cheaply before anything trains: the
  tokenizer (special tokens, vocabulary size), each HF model's config.json (its vocabulary and
  position table) and the first rows of every data file. Each refusal names the key or file."""
  stages = tuple(config.stages)
  task = task_lib.build_task(config)
  tok = task.tokenize_config
  for step in (s for s in stages if s in STAGES):
    path, key = _model_source(config, step, stages)
    if path:
      try:
        hf, config_path = models.hf.read_hf_config(path)
        cfg = models.config_from_hf(hf, config_path)
      except models.HFCheckpointError as e:
        raise models.HFCheckpointError(f"{key}={path}: {e}") from None
    else:
      cfg = configs.model_config(config.model, task.vocab_size)
    _check_model_fits(task, cfg, f"{key}={path}" if path else key, step,
                      _longest_sequence(config, step, tok))
    reward_dir = config[step].get("reward_hf_dir", "")
    if reward_dir and config[step].reward_source == "model":
      where = f"config.{step}.reward_hf_dir"
      for directory in stage_lib.reward_dirs(reward_dir, where):
        hf, config_path = models.hf.read_hf_config(directory)
        _check_model_fits(task, models.config_from_hf(hf, config_path),
                          f"{where}={reward_dir}", step, _longest_sequence(config, step, tok))
  if config.task.kind == "files":
    for kind, reader in (("sft", data.read_sft), ("pairs", data.read_preferences),
                         ("prompts", data.read_prompts)):
      for key in (kind, f"{kind}_eval"):
        if config.data[key]:
          # A file the held-out part is split from needs two examples at least.
          split = key == kind and not config.data[f"{kind}_eval"]
          data.check_readable(config.data[key], reader, chat_format=task.chat,
                              on_error=config.data.on_error, what=f"config.data.{key}",
                              min_examples=2 if split else 1)
    graded = [s for s in stages if s in STAGES and config[s].get("reward_source") == "grader"]
    for step in graded:
      # A grader that takes reference answers reads them from every prompts record.
      grader = grading.grader_of(config, step)
      if grader.wants_reference:
        for key in ("prompts", "prompts_eval"):
          if config.data[key]:
            data.check_readable(config.data[key], data.read_prompt_answers,
                                chat_format=task.chat,
                                on_error="raise" if grader.needs_reference
                                else config.data.on_error,
                                what=f"config.data.{key}, config.data.answer_field",
                                answer_field=config.data.get("answer_field", "answer"))


def _check_model_fits(task, cfg, where: str, step: str, longest: int) -> None:
  """The model has an embedding row for every token id and a position for every column."""
  stage_lib.check_vocab(task, cfg, where)
  if not cfg.uses_rope and longest > cfg.max_len:
    raise ValueError(f"{where}: the model's learned position table has {cfg.max_len} "
                     f"positions but stage {step!r} feeds sequences of up to {longest} tokens "
                     f"({_length_keys(step)}); shorten them")


def _longest_sequence(config, step: str, tok: data.TokenizeConfig) -> int:
  if step == "sft":
    return config.sft.length
  if step in ("ppo", "best_of_n"):
    return tok.max_prompt_len + config[step].max_new_tokens
  if step == "online_dpo":  # Pair rows hold whole samples; shared: both after one prompt.
    cfg = config.online_dpo
    return tok.max_prompt_len + (2 if cfg.shared_prefix else 1) * cfg.max_new_tokens
  if step == "dpo" and config.dpo.shared_prefix:
    return tok.max_prompt_len + 2 * tok.max_response_len
  return tok.max_prompt_len + tok.max_response_len


def _length_keys(step: str) -> str:
  if step in ("ppo", "best_of_n", "online_dpo"):
    return f"config.task.max_prompt_len + config.{step}.max_new_tokens"
  return {"sft": "config.sft.length"}.get(step, "config.task.max_prompt_len + max_response_len")


# ---------------------------------------------------------------------------------------------
# Pairs from the SFT policy's own samples
# ---------------------------------------------------------------------------------------------


def label_policy_samples(module, params, task, config, mesh, *, n_prompts: int, seed: int):
  """All k(k-1)/2 gold-labelled pairs of k policy samples for each of n fresh prompts."""
  world, tok, cfg = task.world, task.tokenize_config, config.sampling
  prompts = world.sample_prompts(n_prompts, seed=seed)
  sampling_cfg = sampling.sampling_config(cfg, tok.eos_id, tok.pad_id)
  tokens, _, _, _ = eval_lib.sample_responses(
      module, params, [world.encode(p) for p in prompts], k=cfg.k, sampling_cfg=sampling_cfg,
      prompt_len=tok.max_prompt_len, pad_id=tok.pad_id, mesh=mesh, rules=config.sharding,
      key=jax.random.fold_in(rng.key(config.seed, "pair_sampling"), seed),
      batch_size=cfg.batch_size)
  texts = [[world.decode(t) for t in row] for row in tokens]
  labelled = world.label_pairs(prompts, texts, temperature=cfg.label_temperature, seed=seed)
  logging.info("policy pairs (seed %d): %s", seed, labelled.report.summary())
  return task_lib.tokenize_pairs(task, labelled.examples, f"pairs (seed {seed})")


def policy_pairs(config, policy: stage_lib.StageResult) -> tuple[list, list]:
  """(train, eval) gold-labelled pairs of the policy's samples on two fresh prompt sets."""
  return tuple(label_policy_samples(policy.module, policy.params, policy.task, config,
                                    policy.mesh, n_prompts=n, seed=rng.prompt_seed(name))
               for n, name in ((config.sampling.train_prompts, "pairs_train"),
                               (config.sampling.eval_prompts, "pairs_eval")))


# ---------------------------------------------------------------------------------------------
# Running the stages
# ---------------------------------------------------------------------------------------------


def _start(config, section: str, results: dict):
  """The earlier result a stage starts from: the SFT policy, unless its init_hf_dir is set."""
  return None if config[section].get("init_hf_dir") else results.get("sft")


def run(config: ml_collections.ConfigDict, workdir: str, *, evaluate: bool = True,
        summary_name: str = "results.json") -> PipelineResult:
  """Runs config.stages in order; writes workdir/<summary_name> (each stage's final metrics, the
  held-out evaluation of every policy (`evaluate`, tasks with a gold reward), wall times).
  Experiment drivers that evaluate on their own pass evaluate=False and a summary name of
  their own (their results.json is the driver's)."""
  stages = tuple(config.stages)
  results: dict[str, stage_lib.StageResult] = {}
  pairs, timings = None, {}
  for step in stages:
    start = time.perf_counter()
    if step == "sft":
      results["sft"] = sft.run(config, os.path.join(workdir, "sft"))
    elif step == "pairs":
      pairs = policy_pairs(config, results["sft"])
      timings["sample_and_label"] = time.perf_counter() - start
      continue
    elif step == "reward":
      results["reward"] = reward.run(config, os.path.join(workdir, "reward"),
                                     _start(config, "reward", results), pairs=pairs)
    elif step == "best_of_n":
      results["best_of_n"] = best_of_n.run(config, os.path.join(workdir, "best_of_n"),
                                           _start(config, "best_of_n", results),
                                           reward=results.get("reward"))
    elif step == "dpo":
      results["dpo"] = preference.run(config, os.path.join(workdir, "dpo"),
                                      _start(config, "dpo", results), pairs=pairs)
    elif step == "online_dpo":
      results["online_dpo"] = online_dpo.run(config, os.path.join(workdir, "online_dpo"),
                                             _start(config, "online_dpo", results),
                                             reward=results.get("reward"))
    elif step == "ppo":
      results["ppo"] = rl.run(config, os.path.join(workdir, rl.name(config)),
                              _start(config, "ppo", results), reward=results.get("reward"))
    timings[step] = time.perf_counter() - start
  start = time.perf_counter()
  evaluation = evaluate_policies(config, results) if evaluate else {}
  if evaluation:
    timings["evaluate"] = time.perf_counter() - start
  out = PipelineResult(results, pairs, evaluation, timings)
  if jax.process_index() == 0:
    summary = {"stages": {k: {"workdir": r.workdir, "hf_dir": r.hf_dir,
                              "metrics": r.metrics} for k, r in results.items()},
               "evaluation": evaluation,
               "wall_time_s": {k: round(v, 1) for k, v in timings.items()}}
    with open(os.path.join(workdir, summary_name), "w") as f:
      json.dump(summary, f, indent=2, default=float)
  return out


def evaluate_policies(config, results: dict[str, stage_lib.StageResult]) -> dict[str, dict]:
  """Gold reward (mean ± s.e.) and Monte-Carlo KL(π‖π_SFT) of every policy the run trained,
  on the same held-out prompts and sampling keys (tasks with a gold reward; {} otherwise)."""
  first = next(iter(results.values()), None)
  if first is None or first.task.world is None or "sft" not in results or "eval" not in config:
    return {}
  base = results["sft"]
  prompts = base.task.world.sample_prompts(config.eval.prompts, seed=rng.prompt_seed("heldout"))
  key = rng.key(config.seed, "evaluation")  # The same sampling keys for every policy.
  out = {}
  for step, result in results.items():
    if step not in ("reward", "best_of_n"):  # Not policies of their own.
      out[result.name] = eval_lib.evaluate_policy(
          base.module, result.params, prompts, world=base.task.world, cfg=config.sampling,
          tok=base.task.tokenize_config, mesh=base.mesh, rules=config.sharding, key=key,
          ref_params=None if step == "sft" else base.params, k=config.eval.k)
  return out
