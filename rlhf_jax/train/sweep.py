"""Sweeps that cost one compile, and the gold-reward-vs-KL curves they trace.

A sweep over one scalar hyperparameter (DPO's β, PPO's target KL) stacks one train state per
value on a leading axis and vmaps the step over it (purejaxrl style): every member sees the
same batches, so the members differ only by the swept value, and the whole sweep is one
program. Every few steps each member's policy is sampled on held-out prompts and measured
(gold reward, Monte-Carlo KL(π‖π_SFT)), giving one curve per run, as in the reward–KL frontier
of Rafailov et al. 2023 (arXiv:2305.18290, Fig. 2).

Curves are lists of points {"step", "gold_reward", "gold_reward_stderr", "kl", "kl_stderr",
...}; a point at step 0 is the SFT policy itself (KL 0).
"""
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from jax.sharding import NamedSharding, PartitionSpec as P

from rlhf_jax import data, objectives, parallel, rng, sampling
from rlhf_jax import eval as eval_lib
from rlhf_jax.train import optim, state as state_lib, step as step_lib
from rlhf_jax.train import ppo as ppo_lib
from rlhf_jax.train import preference as preference_lib
from rlhf_jax.train import scoring

Evaluate = Callable[[object], dict[str, float]]  # policy params -> metrics.


stack_trees = parallel.stack_placed  # One tree of stacked members, placed on the mesh.


def member(tree, i: int):
  """Member i of a stacked tree."""
  return jax.tree.map(lambda x: x[i], tree)


def jit_sweep(step, state, in_axes):
  """jit(vmap(step)) with the stacked state donated and pinned to its shardings (as
  state.jit_step does for one member)."""
  return jax.jit(jax.vmap(step, in_axes=in_axes, out_axes=(in_axes[0], 0)), donate_argnums=0,
                 out_shardings=(state_lib.shardings(state), None))


def _due(step: int, every: int, last: int) -> bool:
  return step == 0 or step == last or (every > 0 and step % every == 0)


# ---------------------------------------------------------------------------------------------
# DPO over β: one vmapped step
# ---------------------------------------------------------------------------------------------

def dpo_beta_sweep(config: ml_collections.ConfigDict, *, task, mesh, module, sft_params,
                   train_pairs, betas, evaluate: Evaluate | None = None, eval_every: int = 0,
                   ) -> tuple[object, list[list[dict]]]:
  """DPO from the SFT policy at every β of `betas` at once: config.dpo.steps vmapped steps on
  the batches the preference stage would draw (same seed, same order), one compile.

  Returns (stacked final params [len(betas), ...], one curve per β): `evaluate` runs on each
  member at step 0, every `eval_every` steps and at the end.
  """
  cfg = config.dpo
  if cfg.loss not in objectives.PREFERENCE_LOSSES or cfg.reference != "model":
    raise ValueError(f"the β sweep needs a paired loss with a reference model; got "
                     f"config.dpo.loss={cfg.loss!r}, config.dpo.reference={cfg.reference!r}")
  if cfg.ref_sync_every:
    raise ValueError("config.dpo.ref_sync_every (TR-DPO) is not supported by the β sweep")
  if cfg.packing.rows:
    raise ValueError("config.dpo.packing.rows > 0: the β sweep draws padded batches; set "
                     "config.dpo.packing.rows=0 (the losses are the same either way)")
  tok, n = task.tokenize_config, len(betas)
  tx, _ = optim.make_optimizer(cfg.optim, cfg.steps)
  # As the preference stage: a copy of the SFT params (the first step donates them), same rng.
  one = state_lib.state_from_params(jax.tree.map(jnp.copy, sft_params), tx,
                                    rng.key(config.seed, "preference"), mesh, config.sharding)
  # The reference is a copy too: the state (and so its "ref" entry) is donated to each step.
  state = {**stack_trees([one] * n), "ref": jax.tree.map(jnp.copy, sft_params),
           "beta": jax.device_put(jnp.asarray(betas, jnp.float32),
                                  NamedSharding(mesh, P(None)))}
  loss_fn = preference_lib.preference_loss_fn(module, cfg, tok.max_prompt_len,
                                              beta_in_state=True)
  step = step_lib.make_train_step(loss_fn, tx, accum_steps=cfg.optim.accum_steps,
                                  state_extra=("ref", "beta"))
  axes = {k: (None if k == "ref" else 0) for k in state}  # One reference for all members.
  sweep_step = jit_sweep(step, state, (axes, None))
  batcher = data.PaddedBatcher(
      parallel.distributed.local_batch_size(cfg.batch_size, "config.dpo.batch_size"),
      lambda idx: scoring.collate_pairs([train_pairs[i] for i in idx], tok, cfg.shared_prefix))
  # Indices as the data source: the same permutation as the preference stage's.
  iterator = data.DataIterator(range(len(train_pairs)), batcher, seed=config.seed, position=0)
  curves = [[] for _ in range(n)]

  def record(step_i, metrics=None):
    for i in range(n):
      point = {"step": step_i, "beta": float(betas[i])}
      if metrics is not None:
        point["train_loss"] = float(metrics["loss"][i])
      point.update(evaluate(member(state["params"], i)))
      curves[i].append(point)
    logging.info("dpo β sweep step %d: %s", step_i,
                 [(c[-1]["beta"], round(c[-1]["gold_reward"], 4), round(c[-1]["kl"], 3))
                  for c in curves])

  with parallel.mesh_context(mesh, config.sharding):
    if evaluate is not None:
      record(0)
    for s in range(1, cfg.steps + 1):
      state, metrics = sweep_step(state, parallel.shard_batch(next(iterator), mesh))
      if evaluate is not None and _due(s, eval_every, cfg.steps):
        record(s, jax.device_get(metrics))
  return state["params"], curves


# ---------------------------------------------------------------------------------------------
# PPO over stacked states (target KL, seeds): the fused iteration, vmapped
# ---------------------------------------------------------------------------------------------

def ppo_sweep(trainer: ppo_lib.PPOTrainer, params, *, task, config: ml_collections.ConfigDict,
              kl_targets=None, kl_coefs=None, seeds=None, rm_params=None,
              evaluate: Evaluate | None = None, eval_every: int = 0,
              on_iteration: Callable[[int, dict], None] | None = None
              ) -> tuple[object, list[list[dict]]]:
  """config.ppo.iterations fused PPO/GRPO/RLOO iterations of several members at once (one
  compile); all see the same prompt batches. Member i may have its own target KL
  (kl_targets[i], read by the KL controller), initial KL coefficient (kl_coefs[i]), state seed
  (seeds[i]) and reward model (rm_params: stacked over members, each an ensemble [k, ...]);
  what is not given is shared.

  Returns (stacked final params, one curve per member); each point also has the rollout's
  mean reward-model score, observed KL and KL coefficient of that iteration.
  on_iteration(it, outputs) sees every iteration's host outputs (samples, rm_score, kl).
  """
  if not trainer.cfg.fused and trainer.cfg.reward_source != "model":
    raise ValueError("ppo_sweep vmaps the fused iteration: it needs reward_source='model'")
  given = [x for x in (kl_targets, kl_coefs, seeds, rm_params) if x is not None]
  if not given:
    raise ValueError("ppo_sweep needs at least one of kl_targets, kl_coefs, seeds, rm_params")
  n = len(given[0]) if not isinstance(given[0], dict) else jax.tree.leaves(given[0])[0].shape[0]
  seeds = seeds if seeds is not None else [None] * n
  states = []
  for i in range(n):
    key = rng.key(config.seed, "rl") if seeds[i] is None else jax.random.key(seeds[i])
    s = trainer.init_state(jax.tree.map(jnp.copy, params), key)
    if kl_coefs is not None:
      s["kl_coef"] = jax.device_put(jnp.asarray(kl_coefs[i], jnp.float32), s["kl_coef"].sharding)
    states.append(s)
  state = stack_trees(states)
  targets = None if kl_targets is None else jnp.asarray(kl_targets, jnp.float32)
  rms = trainer.rm_params if rm_params is None else rm_params
  fused = jit_sweep(trainer.fused_iteration, state,
                    (0, None, None, None, None if rm_params is None else 0,
                     None if targets is None else 0))
  prompts = ppo_lib.prompt_iterator(task, config, 0)
  curves = [[] for _ in range(n)]
  last = trainer.cfg.iterations

  def record(it, out=None):
    if out is not None:  # Host copies, whole on every process.
      out = parallel.distributed.gather({"rm_score": out["rm_score"], "kl": out["kl"],
                                         "kl_coef": state["kl_coef"]})
    for i in range(n):
      point = {"step": it}
      if kl_targets is not None:
        point["kl_target"] = float(kl_targets[i])
      if out is not None:
        point.update(rm_score=float(np.mean(out["rm_score"][i])),
                     kl_coef=float(out["kl_coef"][i]))
        if out["kl"] is not None:  # None without a reference pass (config.ppo.monitor_kl).
          point["train_kl"] = float(out["kl"][i])
      if evaluate is not None:
        point.update(evaluate(trainer.merged_policy(member(state["params"], i))))
      curves[i].append(point)

  with parallel.mesh_context(trainer.mesh, trainer.rules):
    record(0)
    for it in range(1, last + 1):
      batch = next(prompts)
      ids, mask = parallel.distributed.shard_global((batch["ids"], batch["mask"]),
                                                    trainer.mesh)
      state, out = fused(state, ids, mask, trainer.ref_params, rms, targets)
      if on_iteration is not None:
        on_iteration(it, {"prompts": batch, **parallel.distributed.gather(
            {"samples": out["samples"], "rm_score": out["rm_score"], "kl": out["kl"]})})
      if _due(it, eval_every, last):
        record(it, out)
        logging.info("ppo sweep iteration %d: %s", it, [
            (c[-1].get("kl_target"), round(c[-1].get("gold_reward", np.nan), 4),
             round(c[-1].get("kl", np.nan), 3), round(c[-1]["kl_coef"], 4)) for c in curves])
  return state["params"], curves


def ppo_with_curve(trainer: ppo_lib.PPOTrainer, params, *, task,
                   config: ml_collections.ConfigDict, evaluate: Evaluate | None = None,
                   eval_every: int = 0, seed: int | None = None,
                   on_iteration: Callable[[int, dict], None] | None = None
                   ) -> tuple[object, list[dict], dict]:
  """One run of trainer.iteration (fused or host-driven, any reward source, e.g. the gold
  reward) for config.ppo.iterations, evaluated on the schedule. Returns (final state, curve,
  timing): timing["train_s"] is the wall time of the iterations alone (evaluation excluded,
  the first iteration's compile included) and timing["iteration_s"] the median iteration.
  on_iteration(it, metrics) sees every iteration's host metrics (e.g. response length)."""
  state = trainer.init_state(jax.tree.map(jnp.copy, params),
                             rng.key(config.seed, "rl") if seed is None else
                             jax.random.key(seed))
  prompts = ppo_lib.prompt_iterator(task, config, 0)
  curve, times, last = [], [], trainer.cfg.iterations
  with parallel.mesh_context(trainer.mesh, trainer.rules):
    if evaluate is not None:
      curve.append({"step": 0, **evaluate(trainer.merged_policy(state["params"]))})
    for it in range(1, last + 1):
      start = time.perf_counter()
      state, metrics = trainer.iteration(state, next(prompts))  # Host floats: synchronous.
      times.append(time.perf_counter() - start)
      if on_iteration is not None:
        on_iteration(it, metrics)
      if evaluate is not None and _due(it, eval_every, last):
        point = {"step": it, "rm_score": metrics["rm_score"], "kl_coef": metrics["kl_coef"]}
        if "kl" in metrics:  # Absent without a reference pass (config.ppo.monitor_kl).
          point["train_kl"] = metrics["kl"]
        if "gold_reward" in metrics:
          point["train_gold_reward"] = metrics["gold_reward"]
        curve.append({**point, **evaluate(trainer.merged_policy(state["params"]))})
        logging.info("%s iteration %d: %s", trainer.cfg.algorithm, it, curve[-1])
  timing = {"train_s": float(np.sum(times)), "iteration_s": float(np.median(times)),
            "first_iteration_s": float(times[0])}
  return state, curve, timing


def compiled_memory(trainer: ppo_lib.PPOTrainer, state, prompts) -> dict[str, int]:
  """XLA's memory analysis of the compiled fused iteration (bytes): arguments, outputs,
  temporaries, and peak = arguments + outputs + temporaries − aliased (donated) bytes."""
  ids, mask = parallel.distributed.shard_global((prompts["ids"], prompts["mask"]),
                                                trainer.mesh)
  with parallel.mesh_context(trainer.mesh, trainer.rules):
    compiled = jax.jit(trainer.fused_iteration, donate_argnums=0).lower(
        state, ids, mask, trainer.ref_params, trainer.rm_params).compile()
  m = compiled.memory_analysis()
  out = {"argument_bytes": int(m.argument_size_in_bytes),
         "output_bytes": int(m.output_size_in_bytes),
         "temp_bytes": int(m.temp_size_in_bytes), "alias_bytes": int(m.alias_size_in_bytes)}
  out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
                       - out["alias_bytes"])
  return out


# ---------------------------------------------------------------------------------------------
# Best-of-n against a reward model
# ---------------------------------------------------------------------------------------------

def best_of_n_pool(config: ml_collections.ConfigDict, task, mesh, module, params, rm, *,
                   n_prompts: int, pool: int, seed: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
  """`pool` samples of the policy for each of n_prompts held-out prompts, scored by the reward
  model (ensemble mean) and by the gold reward: (proxy [n_prompts, pool], gold [same])."""
  world, tok, cfg = task.world, task.tokenize_config, config.sampling
  rm_module, rm_params = rm
  sampling_cfg = sampling.sampling_config(cfg, tok.eos_id, tok.pad_id)
  seed = rng.prompt_seed("heldout") if seed is None else seed
  prompt_ids = [world.encode(p) for p in world.sample_prompts(n_prompts, seed=seed)]
  rows = [p for p in prompt_ids for _ in range(pool)]
  score = jax.jit(lambda p, i, m, s: jnp.mean(
      scoring.ensemble_rewards(rm_module, p, *sampling.sequences(i, m, s)), axis=0))
  key = rng.key(config.seed, "best_of_n_pool")
  proxy, gold, done = [], [], 0
  with parallel.mesh_context(mesh, config.sharding):
    # Every process holds every prompt, feeds its devices' rows, and reads every row back.
    for b, (ids, mask), n in parallel.padded_batches(
        eval_lib.left_pad(rows, tok.max_prompt_len, tok.pad_id), mesh, cfg.batch_size):
      samples = sampling.generate(module, params, ids, mask, jax.random.fold_in(key, b),
                                  sampling_cfg)
      proxy.append(parallel.distributed.gather(score(rm_params, ids, mask, samples))[:n])
      tokens = list(parallel.distributed.gather(samples.tokens)[:n])
      gold.append(world.score_ids(rows[done:done + n], tokens).reward)
      done += n
  shape = (n_prompts, pool)
  return (np.concatenate(proxy).reshape(shape).astype(np.float64),
          np.concatenate(gold).reshape(shape).astype(np.float64))
