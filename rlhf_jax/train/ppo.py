"""Online RL core: PPO (Ziegler et al. 2019; Ouyang et al. 2022), GRPO and RLOO iterations
(the stage that runs them is train/rl.py).

One iteration = rollout -> score -> reference log-probs and values -> advantages ->
`epochs` x minibatch updates -> KL-coefficient update. Implementation details follow "The N+
implementation details of RLHF with PPO" (Huang et al. 2024): the score is read at EOS, a
missing EOS is penalised, the per-token KL to the reference is in the reward (PPO) or in the
loss (GRPO), GAE over response tokens only, whitened advantages, clipped policy and value
losses, log-probs recomputed at the sampling temperature.

The trainable params are one tree {"policy": ..., "value": ...} ("value" absent when the
value is a head on the policy backbone, config.ppo.value = "head") under one optimiser; the
reference policy and the reward model are frozen and passed to the jitted functions as
arguments, never stored in the checkpoint (they are rebuilt from their own stages on resume).
With LoRA (config.lora.rank > 0) "policy" holds {"lora": adapters (+ "value_head")}: the
policy is the reference with the adapters attached (models.lora.apply_lora, applied unmerged),
so the reference doubles as the frozen base and there is no second copy of the policy (a
separate value network stays full).
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rlhf_jax import data, models, objectives, parallel, rng, sampling
from rlhf_jax import eval as eval_lib
from rlhf_jax.train import grading, grpo_variants
from rlhf_jax.train import optim, state as state_lib, step as step_lib, task as task_lib
from rlhf_jax.train.scoring import ensemble_rewards

ALGORITHMS = ("ppo", "grpo", "rloo")
REWARD_SOURCES = ("model", "gold", "grader")
HOST_REWARDS = ("gold", "grader")  # Computed on the host from the samples, not in the jit.
CRITICS = ("separate", "head")
ROLLOUT_STREAM = 0x5EED  # fold_in tag of the rollout's random stream.


# ---------------------------------------------------------------------------------------------
# Jitted pieces
# ---------------------------------------------------------------------------------------------

def _response_values(values: jax.Array, prompt_len: int, new_tokens: int) -> jax.Array:
  """Values of the states before each response token: column P-1+j for response token j."""
  return values[:, prompt_len - 1:prompt_len - 1 + new_tokens]


def critic_kind(cfg) -> str | None:
  """The critic config.ppo asks for: "head" (a value head on the policy backbone, one forward
  pass for both), "separate" (a value network of its own) or None (GRPO, RLOO)."""
  return cfg.value if cfg.algorithm == "ppo" else None


def check_critic(critic, policy_module, value_module) -> None:
  """The modules must be the ones the critic kind (config.ppo.value) reads."""
  if critic == "separate" and value_module is None:
    raise ValueError("config.ppo.value='separate' needs a value network: pass a value module "
                     "(models.build_model(cfg, 'value')), or set config.ppo.value='head' with a "
                     "'policy_value' policy module")
  if critic == "head" and policy_module.role != "policy_value":
    raise ValueError(f"config.ppo.value='head' needs a 'policy_value' policy module, got role "
                     f"{policy_module.role!r}")
  if critic != "separate" and value_module is not None:
    raise ValueError(f"a value network was given but the critic is {critic!r} "
                     "(config.ppo.value / algorithm)")


def forward(policy_module, value_module, critic, params, ids, mask, *, logits: bool = True,
            **layout):
  """(logits or None, values or None) [B, T(, V)] of the trainable tree {"policy", "value"?}
  for the `critic` kind; with logits=False only the values are computed (no LM head pass).
  `layout` (packed rows: segment_ids, positions, head_columns) goes to every model, which
  then gives [R, C(, V)] at the head columns."""
  if critic == "head":
    out, values = policy_module.apply({"params": params["policy"]}, ids, mask, **layout)
    return (out if logits else None), values
  policy = models.build_model(policy_module.cfg, "policy")
  out = policy.apply({"params": params["policy"]}, ids, mask, **layout) if logits else None
  values = (value_module.apply({"params": params["value"]}, ids, mask, **layout)
            if critic == "separate" else None)
  return out, values


def packed_layout(packed) -> dict:
  """The model arguments of packed rollout rows (data.pack_rollouts): segments, positions,
  and the LM/value heads applied only at the columns that predict response tokens."""
  return {"segment_ids": packed["segment_ids"], "positions": packed["positions"],
          "head_columns": packed["predictor"]}


def unpack_responses(entries: jax.Array, source: jax.Array, shape: tuple[int, ...]
                     ) -> jax.Array:
  """Per-token entries of packed rows [R, C] (or per-rollout ones [R, K]) placed in the
  padded response layout `shape` ([B, N] or [B]) by pack_rollouts' `source` indices (past the
  end = unused, dropped); 0 where nothing lands. Differentiable: its gradient is the gather
  back, so every loss reads the same [B, N] arrays in either layout."""
  size = int(np.prod(shape))
  flat = jnp.zeros((size,), entries.dtype).at[source.reshape(-1)].set(entries.reshape(-1),
                                                                     mode="drop")
  return flat.reshape(shape)


def score_rollout(policy_module, value_module, reward_module, *, critic, params, ref_params,
                  rm_params, prompt_ids, prompt_mask, samples, cfg, packed=None,
                  old: bool = True, ref: bool = True):
  """Old and reference log-probs, values and reward-model scores of one rollout.

  The old log-probs are recomputed by a full forward pass at the sampling temperature (not
  taken from the KV-cache decode): in bfloat16 the two differ by ~1e-2, which would start
  every PPO ratio away from 1. Returns [B, N] float32 old_logp, ref_logp, values (zeros for the
  critic-free algorithms) and [B] rm_score = ensemble mean − cfg.ensemble_std_coef · std (zeros
  when the reward comes from elsewhere). Without `old` / `ref` (log_prob_passes: nothing
  reads them before the update) that pass is not run and its key is absent. With `packed`
  (data.pack_rollouts of these rollouts, one split) every forward pass runs on the packed rows
  instead of the padded ones, with the same results.
  """
  policy = models.build_model(policy_module.cfg, "policy")
  shape = samples.tokens.shape
  if packed is None:
    ids, mask = sampling.sequences(prompt_ids, prompt_mask, samples)
    p, n = prompt_ids.shape[1], shape[1]
    logp_of = lambda prm: sampling.response_logprobs(policy, prm, prompt_ids, prompt_mask,
                                                     samples, cfg.temperature)
    _, values = forward(policy_module, value_module, critic, params, ids, mask, logits=False)
    values = (None if values is None
              else _response_values(values, p, n) * samples.response_mask)
    rm_layout, unpack_rm = {}, lambda r: r
  else:
    ids, mask, layout = packed["ids"], packed["mask"], packed_layout(packed)
    unpack = lambda x: unpack_responses(x, packed["source"], shape)

    def logp_of(prm):
      logits = policy.apply({"params": prm}, ids, mask, **layout)
      return unpack(objectives.token_logprobs(logits, packed["targets"], cfg.temperature))
    _, values = forward(policy_module, value_module, critic, params, ids, mask, logits=False,
                        **layout)
    values = None if values is None else unpack(values)
    rm_layout = {**layout, "head_columns": packed.get("last_column")}  # Absent without an RM.
    unpack_rm = jax.vmap(lambda r: unpack_responses(r, packed["last_source"], shape[:1]))
  scored = {}
  if old:
    scored["old_logp"] = logp_of(params["policy"])
  if ref:
    scored["ref_logp"] = logp_of(ref_params)
  scored["values"] = jnp.zeros(shape, jnp.float32) if values is None else values
  if rm_params is not None:
    r = unpack_rm(ensemble_rewards(reward_module, rm_params, ids, mask, **rm_layout))  # [k, B]
    scored["rm_score"] = jnp.mean(r, 0) - cfg.ensemble_std_coef * jnp.std(r, 0)
  else:
    scored["rm_score"] = jnp.zeros(shape[:1], jnp.float32)
  return scored


def log_prob_passes(cfg, updates_per_iter: int) -> tuple[bool, bool]:
  """(old, ref): whether the scoring pass computes the old and the reference log-probs.

  old: not with one update per iteration (epochs x minibatches = 1) unless the reward reads
  the KL (kl_in_reward with a coefficient that is or can become nonzero): the policy has not
  moved since sampling, so the update's own log-probs, stop-gradient, are the old ones (ρ = 1
  exactly, as TRL's GRPOTrainer with num_iterations = 1); the rollout KL is then measured in
  the update (metric rollout_kl).
  ref: not when nothing reads the reference, i.e. kl_coef = 0 under the fixed controller and
  config.ppo.monitor_kl = False (TRL at beta = 0 loads no reference); no KL is logged then.
  """
  kl_weighted = cfg.kl_coef > 0 or cfg.kl_controller != "fixed"
  old = updates_per_iter > 1 or (cfg.kl_in_reward and kl_weighted)
  return old, cfg.monitor_kl or kl_weighted


def compute_advantages(batch, kl_coef, cfg):
  """Token-level advantages and returns [B, N] and the per-token KL (None unless the batch
  holds both the old and the reference log-probs: log_prob_passes), for cfg.algorithm."""
  mask = batch["response_mask"].astype(jnp.float32)
  kl = None
  if "old_logp" in batch and "ref_logp" in batch:
    kl = jnp.where(mask > 0, objectives.kl_penalty(batch["old_logp"], batch["ref_logp"],
                                                   cfg.kl_estimator), 0.0)
  score = batch["score"]
  if cfg.algorithm == "ppo":
    if cfg.kl_in_reward and kl is not None:
      rewards, _ = objectives.shape_rewards(score, batch["old_logp"], batch["ref_logp"], mask,
                                            kl_coef=kl_coef, kind=cfg.kl_estimator)
    else:  # No KL term: the score at the last real token only.
      zeros = jnp.zeros_like(mask)
      rewards, _ = objectives.shape_rewards(score, zeros, zeros, mask, kl_coef=0.0)
    if cfg.whiten_rewards:
      rewards = objectives.masked_whiten(rewards, mask, shift_mean=False)
    adv, returns = objectives.gae(rewards, batch["values"], mask, gamma=cfg.gamma, lam=cfg.lam)
    adv = objectives.masked_whiten(adv, mask)  # 0 off the mask.
  else:
    if cfg.algorithm == "rloo" and cfg.kl_in_reward and kl is not None:  # Sequence KL.
      score = score - kl_coef * jnp.sum(kl, axis=1)
    seq_adv = (objectives.rloo_advantages(score, cfg.group_size) if cfg.algorithm == "rloo"
               else objectives.group_advantages(score, cfg.group_size,
                                                normalize_std=cfg.grpo_std_normalize))
    adv = seq_adv[:, None] * mask
    returns = jnp.zeros_like(adv)
  return adv, returns, kl


def ppo_loss_fn(policy_module, value_module, cfg, prompt_len: int):
  """loss_fn for step.make_train_step over one minibatch; count = 1 (the loss is a mean)."""
  critic = critic_kind(cfg)
  check_critic(critic, policy_module, value_module)

  def loss_fn(params, batch, rng_key, kl_coef):
    del rng_key
    n = batch["tokens"].shape[1]
    if "predictor" in batch:  # Packed rows (data.pack_rollouts of this (micro-)batch).
      logits, values = forward(policy_module, value_module, critic, params, batch["ids"],
                               batch["mask"], **packed_layout(batch))
      unpack = lambda x: unpack_responses(x, batch["source"], batch["tokens"].shape)
      logp, entropy = map(unpack, objectives.logprobs_and_entropy(logits, batch["targets"],
                                                                  cfg.temperature))
      v = None if values is None else unpack(values)
    else:
      ids = jnp.concatenate([batch["prompt_ids"], batch["tokens"]], 1)
      mask = jnp.concatenate([batch["prompt_mask"], batch["response_mask"]], 1)
      logits, values = forward(policy_module, value_module, critic, params, ids, mask)
      logp, entropy = objectives.logprobs_and_entropy(logits[:, prompt_len - 1:-1],
                                                      batch["tokens"], cfg.temperature)
      v = None if values is None else _response_values(values, prompt_len, n)
    rmask = batch["response_mask"].astype(jnp.float32) * batch["loss_weight"][:, None]
    # Every per-token term is reduced the same way (config.ppo.loss_aggregation).
    agg = dict(aggregation=cfg.loss_aggregation, max_len=n)
    # Without old log-probs (log_prob_passes: one update per iteration) the update's own are
    # the old ones; policy_loss stops their gradient, so ρ = 1 with gradient ∇logp.
    pg_loss, pg_metrics = objectives.policy_loss(
        logp, batch.get("old_logp", logp), batch["advantages"], rmask, clip_eps=cfg.clip_eps,
        clip_eps_high=cfg.clip_eps_high, **agg)
    ent = objectives.entropy_bonus(entropy, rmask, **agg)
    loss = pg_loss - cfg.ent_coef * ent
    metrics = {"policy_loss": pg_loss, "entropy": ent,
               **{f"policy/{k}": v for k, v in pg_metrics.items()}}
    if cfg.algorithm == "ppo":
      v_loss, v_metrics = objectives.value_loss(v, batch["values"], batch["returns"], rmask,
                                                clip_eps=cfg.vf_clip)
      loss = loss + cfg.vf_coef * v_loss
      metrics.update(value_loss=v_loss, **{f"value/{k}": x for k, x in v_metrics.items()})
    if not cfg.kl_in_reward and "ref_logp" in batch:  # GRPO-style: KL in the loss.
      kl = objectives.aggregate_loss(objectives.kl_penalty(logp, batch["ref_logp"], "k3"),
                                     rmask, **agg)
      loss = loss + kl_coef * kl
      metrics["kl_loss"] = kl
    if "old_logp" not in batch and "ref_logp" in batch:
      # The rollout's KL to the reference (what compute_advantages measures from the old
      # log-probs): the mean over rows of each row's summed per-token estimate. Micro-batches
      # hold equal numbers of rollouts, so the step's average of them is the batch mean.
      token_kl = objectives.kl_penalty(jax.lax.stop_gradient(logp), batch["ref_logp"],
                                       cfg.kl_estimator)
      metrics["rollout_kl"] = jnp.mean(jnp.sum(
          jnp.where(batch["response_mask"] > 0, token_kl, 0.0), axis=1))
    return loss, (jnp.ones((), jnp.float32), metrics)
  return loss_fn


@jax.jit
def _take_rows(batch, kl, rows, weights):
  """The update batch and KL (or None) at `rows` (dynamic sampling's choice), the loss weight
  times `weights` (0 on filler rows). Every process passes the same host rows: they are
  replicated."""
  picked, kl = jax.tree.map(lambda x: x[rows], (batch, kl))
  picked["loss_weight"] = picked["loss_weight"] * weights
  return picked, kl


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------

class PPOTrainer:
  """Holds the frozen models and jitted functions; `iteration(state, prompts)` is the loop's
  step function (rollout, scoring and updates of one batch of prompts)."""

  def __init__(self, config, task, mesh, *, policy_module, value_module, ref_params,
               reward_module=None, rm_params=None):
    config = grpo_variants.resolve(config)  # config.ppo.grpo_variant's keys (a copy).
    self.config, self.cfg, self.task, self.mesh = config, config.ppo, task, mesh
    self.rules = config.sharding
    self.policy_module = policy_module  # Role "policy_value" when the critic is a head on it.
    self.policy = models.build_model(policy_module.cfg, "policy")
    self.critic = critic_kind(self.cfg)
    check_critic(self.critic, policy_module, value_module)
    self.value_module = value_module
    self.ref_params, self.reward_module, self.rm_params = ref_params, reward_module, rm_params
    self.lora = models.lora.config_from(config.get("lora"))
    self._merged_policy = jax.jit(functools.partial(self.policy_params, fold=True))
    tok = task.tokenize_config
    self.prompt_len = tok.max_prompt_len
    self.sampling_cfg = sampling.sampling_config(self.cfg, tok.eos_id, tok.pad_id)
    self.old_pass, self.ref_pass = log_prob_passes(self.cfg, self.updates_per_iter)
    self._score = jax.jit(lambda params, ref, rm, pi, pm, s, packed: score_rollout(
        policy_module, value_module, reward_module, critic=self.critic,
        params=self.effective(params, ref), ref_params=ref, rm_params=rm, prompt_ids=pi,
        prompt_mask=pm, samples=s, cfg=self.cfg, packed=packed, old=self.old_pass,
        ref=self.ref_pass))
    # Packed rollouts (config.ppo.packing): rows of pack_length tokens, each batch device's
    # (and each micro-batch's) rollouts in rows of their own.
    self.batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    longest = self.prompt_len + self.cfg.max_new_tokens
    self.pack_length = self.cfg.packing.length or longest
    if self.pack_length < longest:
      raise ValueError(f"config.ppo.packing.length={self.pack_length}: a rollout can need "
                       f"{longest} tokens (the task's prompt length {self.prompt_len} + "
                       f"config.ppo.max_new_tokens)")
    self._batch = jax.jit(self._rollout_batch)
    self._kl_coef = jax.jit(self._next_kl_coef)
    self.tx, self.schedule = optim.make_optimizer(self.cfg.optim,
                                                  self.cfg.iterations * self.updates_per_iter)
    self._update = None

  @property
  def updates_per_iter(self) -> int:
    rows = self.cfg.prompts_per_iter * self.cfg.group_size
    return self.cfg.epochs * (rows // self.cfg.minibatch_size)

  def policy_params(self, params, base, fold: bool = False):
    """The policy's (or policy_value's) params from the trainable tree: params["policy"], or
    with LoRA the base (= the reference) with the adapters attached (applied unmerged inside a
    step) or, with `fold`, folded into plain kernels."""
    if self.lora is None:
      return params["policy"]
    trainable = dict(params["policy"])
    adapters = trainable.pop("lora")
    attach = models.lora.fold_lora if fold else models.apply_lora
    return {**attach(base, adapters, self.lora.scale), **trainable}

  def pack(self, rollouts, micro_batches: int = 1, last_columns: bool = True):
    """data.pack_rollouts of host rollouts {prompt_ids, prompt_mask, tokens, response_mask}
    split into `micro_batches` (each packed over the batch devices), sharded like a batch.
    Without `last_columns` (no reward model reads them) their entries are left out: an unused
    input whose shape varies would only cost recompiles."""
    packed = data.pack_rollouts(
        rollouts["prompt_ids"], rollouts["prompt_mask"], rollouts["tokens"],
        rollouts["response_mask"], groups=micro_batches * self.batch_devices,
        splits=micro_batches, length=self.pack_length, pad_id=self.task.tokenize_config.pad_id)
    if not last_columns:
      packed = {k: v for k, v in packed.items() if k not in ("last_column", "last_source")}
    return parallel.distributed.shard_global(packed, self.mesh)

  def effective(self, params, base):
    return {**params, "policy": self.policy_params(params, base)}

  def merged_policy(self, params):
    """Plain policy params for sampling, evaluation and export (jitted merge under LoRA)."""
    return params["policy"] if self.lora is None else self._merged_policy(params,
                                                                          self.ref_params)

  def init_state(self, params, key) -> state_lib.State:
    state = state_lib.state_from_params(params, self.tx, key, self.mesh, self.rules)
    state["kl_coef"] = jax.device_put(jnp.asarray(self.cfg.kl_coef, jnp.float32),
                                      state["step"].sharding)
    loss_fn = ppo_loss_fn(self.policy_module, self.value_module, self.cfg, self.prompt_len)
    if self.lora is None:
      self._update_fn = step_lib.make_train_step(
          loss_fn, self.tx, accum_steps=self.cfg.optim.accum_steps, state_extra=("kl_coef",))
      self._update = state_lib.jit_step(self._update_fn, state)
    else:  # Gradients w.r.t. the adapters only; the base is an undonated input.
      step = step_lib.make_train_step(
          lambda p, b, rng, kl_coef, base: loss_fn(self.effective(p, base), b, rng, kl_coef),
          self.tx, accum_steps=self.cfg.optim.accum_steps, state_extra=("kl_coef", "base"))
      self._update_fn = models.lora.with_frozen(step, "base")  # (state, batch, base).
      self._update = models.lora.jit_frozen_step(step, "base", state, self.ref_params)
    self._fused = jax.jit(self.fused_iteration, donate_argnums=0,
                          out_shardings=(state_lib.shardings(state), None))
    return state

  def gold_scores(self, prompt_ids, samples) -> np.ndarray | None:
    world = self.task.world
    if world is None:
      return None
    prompts = [row[mask > 0] for row, mask in zip(*map(np.asarray, prompt_ids))]
    # Every process scores every row (host work, cheap) so all hold the same scores.
    tokens = parallel.distributed.gather(samples.tokens)
    return world.score_ids(prompts, list(tokens)).reward

  def grader_scores(self, prompt_ids, samples) -> np.ndarray:
    """config.ppo.grader's scores (reward_source="grader"): prompts and responses decoded with
    the task's tokenizer (a response without its EOS) and graded on the host, every process
    grading every row as for the gold reward (train/grading.py)."""
    prompts = [row[mask > 0] for row, mask in zip(*map(np.asarray, prompt_ids))]
    tokens, lens, ended = map(np.asarray, parallel.distributed.gather(
        (samples.tokens, samples.lengths, samples.finished)))
    responses = [t[:n - int(e)] for t, n, e in zip(tokens, lens, ended)]
    return grading.grade(self.task, self.config, prompts, responses)

  def host_reward(self, prompt_ids, samples) -> np.ndarray | None:
    """The host-side reward config.ppo.reward_source names (HOST_REWARDS)."""
    if self.cfg.reward_source == "grader":
      return self.grader_scores(prompt_ids, samples)
    return self.gold_scores(prompt_ids, samples)

  def _rollout_batch(self, kl_coef, ids, mask, samples, scored, raw_score):
    """The update batch of one rollout: shaped score (length penalty, missing-EOS penalty,
    clipping), advantages, returns; plus the per-token KL."""
    cfg = self.cfg
    score = raw_score - cfg.length_penalty * samples.lengths.astype(jnp.float32)
    score = jnp.where(samples.finished, score, score - cfg.missing_eos_penalty)
    if cfg.overlong_cache:  # DAPO's soft overlong punishment (objectives.overlong_penalty).
      score = score + objectives.overlong_penalty(samples.lengths, cfg.max_new_tokens,
                                                  cfg.overlong_cache)
    if cfg.reward_clip > 0:
      score = jnp.clip(score, -cfg.reward_clip, cfg.reward_clip)
    batch = {"prompt_ids": ids, "prompt_mask": mask, "tokens": samples.tokens,
             "response_mask": samples.response_mask, "values": scored["values"],
             "score": score, "loss_weight": (samples.finished.astype(jnp.float32)
                                             if cfg.mask_truncated else jnp.ones_like(score)),
             **{k: scored[k] for k in ("old_logp", "ref_logp") if k in scored}}
    adv, returns, kl = compute_advantages(batch, kl_coef, cfg)
    return {**batch, "advantages": adv, "returns": returns}, kl

  @staticmethod
  def _rollout_kl(kl, metrics):
    """The rollout's mean summed per-sequence KL to the reference: from the per-token `kl`
    [B, N] of the scoring pass, or, when that pass had no old log-probs (kl is None), the
    update's rollout_kl metric (popped from `metrics`, averaged over the updates); None
    without a reference pass (log_prob_passes)."""
    if kl is not None:  # Then the update measured none (the batch had old log-probs).
      return jnp.mean(jnp.sum(kl, axis=1))
    return metrics.pop("rollout_kl", None)

  def _next_kl_coef(self, kl_coef, seq_kl, target=None):
    """KL controller on the observed KL of the rollout (_rollout_kl; None leaves the
    coefficient as it is). `target` (traced, so a vmap can sweep it: train.sweep) overrides
    cfg.kl_target."""
    cfg = self.cfg
    if seq_kl is None:
      return kl_coef
    target = cfg.kl_target if target is None else target
    rows = cfg.prompts_per_iter * cfg.group_size  # Rollouts per update batch.
    return objectives.next_kl_coef(cfg.kl_controller, kl_coef, seq_kl, rows, target=target,
                                   horizon=cfg.kl_horizon)

  @staticmethod
  def _rollout_key(state):
    """Sampling and shuffling keys of this iteration, apart from the update steps' keys
    (which fold the same step counter into the same root key)."""
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    return jax.random.fold_in(step_key, ROLLOUT_STREAM)

  def fused_iteration(self, state, ids, mask, ref_params, rm_params, kl_target=None):
    """Rollout + scoring + all updates + KL control as ONE traced program (purejaxrl style):
    jit it, or vmap it over stacked states (e.g. several KL coefficients or seeds, and
    `kl_target`, the controller's target per member) so a sweep is one compile. Needs a
    jittable reward (reward_source="model").

    Returns (state, outputs) with per-update metrics averaged, the samples, the batch (for
    host-side metrics) and the observed KL.
    """
    cfg = self.cfg
    sample_key, shuffle_key = jax.random.split(self._rollout_key(state))
    # ROLLOUT AND SCORING
    samples = sampling.generate(self.policy, self.policy_params(state["params"], ref_params),
                                ids, mask, sample_key, self.sampling_cfg)
    scored = score_rollout(self.policy_module, self.value_module, self.reward_module,
                           critic=self.critic, params=self.effective(state["params"], ref_params),
                           ref_params=ref_params, rm_params=rm_params,
                           prompt_ids=ids, prompt_mask=mask, samples=samples, cfg=cfg,
                           old=self.old_pass, ref=self.ref_pass)
    batch, kl = self._rollout_batch(state["kl_coef"], ids, mask, samples, scored,
                                    scored["rm_score"])
    # EPOCHS x MINIBATCHES (scans)
    rows, mb = ids.shape[0], cfg.minibatch_size

    def epoch(state, e):
      order = jax.random.permutation(jax.random.fold_in(shuffle_key, e), rows)[:rows // mb * mb]
      minibatches = jax.tree.map(lambda x: x[order].reshape(rows // mb, mb, *x.shape[1:]), batch)
      update = (self._update_fn if self.lora is None else
                lambda s, minibatch: self._update_fn(s, minibatch, ref_params))
      return jax.lax.scan(update, state, minibatches)

    state, metrics = jax.lax.scan(epoch, state, jnp.arange(cfg.epochs))
    metrics = {k: (jnp.max(v) if k == "skipped" else jnp.mean(v)) for k, v in metrics.items()}
    # KL CONTROLLER (a vmapped sweep gives each member its own target)
    seq_kl = self._rollout_kl(kl, metrics)
    state["kl_coef"] = self._next_kl_coef(state["kl_coef"], seq_kl, kl_target)
    return state, {"metrics": metrics, "samples": samples, "batch": batch,
                   "rm_score": scored["rm_score"], "kl": seq_kl}

  def dynamic_sampling(self, batch, kl):
    """DAPO's dynamic sampling (Yu et al. 2025, arXiv:2503.14476, §3.2) on the update batch
    and per-token KL of an over-sampled rollout (prompts_per_iter x oversample groups):
    (batch, kl) of prompts_per_iter groups, the first ones whose scores are not all equal
    (objectives.select_informative_groups), a short batch filled with zero-loss-weight groups,
    and the metrics dynamic_sampling/kept_groups and dynamic_sampling/informative_fraction.

    The test reads the shaped score (length, missing-EOS and overlong terms included), from
    which the advantages are computed: a group is dropped when its advantages are all 0 (RLOO's
    sequence KL in the reward aside: the test is on the task's score), or when the loss weights
    (overlong filtering) mask every row of it. Choosing after the advantages is exact because
    GRPO's and RLOO's are per group. With config.ppo.dynamic_sampling off: (batch, kl, {}).
    """
    cfg = self.cfg
    if not cfg.dynamic_sampling:
      return batch, kl, {}
    scores, loss_weight = parallel.distributed.gather((batch["score"], batch["loss_weight"]))
    pick = objectives.select_informative_groups(scores, cfg.group_size, cfg.prompts_per_iter,
                                                row_weights=loss_weight)
    batch, kl = _take_rows(batch, kl, pick.rows, pick.weights)
    sampled_groups = scores.shape[0] // cfg.group_size
    return batch, kl, {"dynamic_sampling/kept_groups": float(pick.kept),
                       "dynamic_sampling/informative_fraction":
                           pick.informative / sampled_groups}

  def host_iteration(self, state, ids, mask, gold):
    """The same iteration driven from the host: separate jitted rollout, scoring and update
    calls (any reward, including the task's host-side gold reward)."""
    cfg = self.cfg
    sample_key, shuffle_key = jax.random.split(self._rollout_key(state))
    samples = sampling.generate(self.policy, self.merged_policy(state["params"]), ids, mask,
                                sample_key, self.sampling_cfg)
    packed = None
    if cfg.packing.enabled:  # The scoring passes on packed rows (one split: no micro-batches).
      packed = self.pack(parallel.distributed.gather(
          {"prompt_ids": ids, "prompt_mask": mask, "tokens": samples.tokens,
           "response_mask": samples.response_mask}), last_columns=self.rm_params is not None)
    scored = self._score(state["params"], self.ref_params, self.rm_params, ids, mask, samples,
                         packed)
    gold_scores = gold(samples) if cfg.reward_source in HOST_REWARDS else None
    raw = (parallel.distributed.shard_global(np.asarray(gold_scores, np.float32), self.mesh)
           if gold_scores is not None else scored["rm_score"])
    batch, kl = self._batch(state["kl_coef"], ids, mask, samples, scored, raw)
    batch, kl, picked = self.dynamic_sampling(batch, kl)  # As is unless dynamic_sampling.
    rows, metrics = batch["score"].shape[0], []
    # One transfer per iteration, not one per minibatch; whole on every process, each of which
    # then feeds its own rows of every minibatch.
    host_batch = parallel.distributed.gather(batch)
    for e in range(cfg.epochs):
      order = np.asarray(jax.random.permutation(jax.random.fold_in(shuffle_key, e), rows))
      for start in range(0, rows // cfg.minibatch_size * cfg.minibatch_size,
                         cfg.minibatch_size):
        idx = order[start:start + cfg.minibatch_size]
        rows_of = jax.tree.map(lambda x: x[idx], host_batch)
        minibatch = parallel.distributed.shard_global(rows_of, self.mesh)
        if cfg.packing.enabled:
          minibatch.update(self.pack(rows_of, cfg.optim.accum_steps, last_columns=False))
        state, m = self._update(state, minibatch)
        metrics.append(m)
    metrics = {k: (np.max if k == "skipped" else np.mean)([float(m[k]) for m in metrics])
               for k in metrics[0]}
    seq_kl = self._rollout_kl(kl, metrics)
    if seq_kl is not None:
      state["kl_coef"] = jax.device_put(self._kl_coef(state["kl_coef"], seq_kl),
                                        state["kl_coef"].sharding)
    metrics.update(picked)
    return state, {"metrics": metrics, "samples": samples, "batch": batch,
                   "rm_score": scored["rm_score"], "kl": seq_kl, "gold": gold_scores}

  def iteration(self, state, prompts):
    """The loop's step function: one iteration on a batch of prompts, then host metrics."""
    cfg = self.cfg
    # The prompt batch is global on every process (prompt_iterator); each feeds its rows.
    ids, mask = parallel.distributed.shard_global((prompts["ids"], prompts["mask"]), self.mesh)
    gold_of = lambda samples: self.gold_scores((prompts["ids"], prompts["mask"]), samples)
    reward_of = lambda samples: self.host_reward((prompts["ids"], prompts["mask"]), samples)
    if cfg.fused:
      state, out = self._fused(state, ids, mask, self.ref_params, self.rm_params)
    else:
      state, out = self.host_iteration(state, ids, mask, reward_of)
    # Host metrics read every row: gathered whole onto every process (a no-op on one process);
    # of the update batch only the columns the metrics read.
    metric_keys = ("score",) + (("values", "returns", "response_mask")
                                if cfg.algorithm == "ppo" else ())
    samples, batch, rm_score = parallel.distributed.gather(
        (out["samples"], {k: out["batch"][k] for k in metric_keys}, out["rm_score"]))
    host = out.get("gold")  # The host-side reward the update used (gold or grader), if any.
    # The gold reward is scored once per iteration: reused when it was the reward.
    gold = host if cfg.reward_source == "gold" else gold_of(samples)
    tokens, lens = np.asarray(samples.tokens), np.asarray(samples.lengths)
    ended = np.asarray(samples.finished).astype(int)
    responses = [t[:n - e] for t, n, e in zip(tokens, lens, ended)]  # EOS excluded, as in eval.
    metrics = {k: float(v) for k, v in out["metrics"].items()}
    metrics.update({
        "score": float(np.mean(batch["score"])), "rm_score": float(np.mean(rm_score)),
        "kl_coef": float(state["kl_coef"]),
        "response_length": float(lens.mean()),
        "no_eos_fraction": float(1 - np.asarray(samples.finished).mean()),
        "distinct_1": eval_lib.distinct_n(responses, 1),
        "distinct_2": eval_lib.distinct_n(responses, 2),
        # Tokens of the iteration's sequences (prompts + sampled responses), for tokens/s.
        "tokens": float(np.sum(prompts["mask"]) + lens.sum())})
    if out["kl"] is not None:  # None without a reference pass (log_prob_passes).
      metrics["kl"] = float(out["kl"])
    if cfg.algorithm == "ppo":
      metrics["value/explained_variance"] = float(objectives.explained_variance(
          batch["values"], batch["returns"], batch["response_mask"]))
    if gold is not None:
      metrics["gold_reward"] = float(np.mean(gold))
    if cfg.reward_source == "grader":
      metrics["grader_reward"] = float(np.mean(host))
    return state, metrics


def prompt_iterator(task, config, position: int):
  """Batches of left-padded prompts, each repeated group_size times (group-major). Dynamic
  sampling draws `oversample` times the prompts an update takes (oversample is 1 otherwise),
  then keeps prompts_per_iter of them (PPOTrainer.dynamic_sampling)."""
  cfg = config.ppo
  return task_lib.grouped_prompt_batches(
      task, config, position, train_prompts=cfg.train_prompts,
      prompts_per_batch=cfg.prompts_per_iter * cfg.oversample, repeats=cfg.group_size)


def make_trainer(config: ml_collections.ConfigDict, task, mesh, *, policy, rm=None):
  """(PPOTrainer, initial trainable params {"policy", "value"?}) for config.ppo.algorithm from
  `policy` = (module, SFT params), which is also the reference. A separate value network
  (config.ppo.value = "separate") starts from the reward model's backbone, whatever its size
  (config.ppo.value_init = "reward"; the policy's when there is no reward model), or from the
  policy's ("policy"); config.ppo.value = "head" puts a fresh value head on the policy."""
  cfg = config.ppo
  rules = config.sharding
  module, sft_params = policy
  ref_params = sft_params
  sample = jnp.ones((1, 8), jnp.int32)
  key = rng.key(config.seed, "value_init")
  lora_cfg = models.lora.config_from(config.get("lora"))
  if lora_cfg is None:  # The policy's trainable params: a copy of SFT's (theirs are donated).
    trainable_policy = jax.tree.map(jnp.copy, sft_params)
  else:  # Adapters only; the SFT params stay frozen as the base (= the reference).
    trainable_policy = {"lora": models.lora.init_sharded(
        module, sft_params, lora_cfg, rng.key(config.seed, "lora_rl"), mesh, rules)}
  critic = critic_kind(cfg)
  value_module = None
  if critic is None:  # Critic-free: no value network at all.
    policy_module = module
    params = {"policy": trainable_policy}
  elif critic == "head":
    policy_module = models.build_model(module.cfg, "policy_value")
    fresh = parallel.init_params(policy_module, key, sample, mesh=mesh, rules=rules)
    # The SFT policy plus a fresh (zero) value head on its backbone.
    params = {"policy": {**trainable_policy, "value_head": fresh["value_head"]}}
  else:
    policy_module = module
    from_rm = rm is not None and cfg.value_init == "reward"
    value_module = models.build_model((rm[0] if from_rm else module).cfg, "value")
    fresh = parallel.init_params(value_module, key, sample, mesh=mesh, rules=rules)
    source = jax.tree.map(lambda x: x[0], rm[1]) if from_rm else sft_params
    params = {"policy": trainable_policy,
              "value": jax.tree.map(jnp.copy, models.transfer_backbone(source, fresh))}
  trainer = PPOTrainer(config, task, mesh, policy_module=policy_module,
                       value_module=value_module, ref_params=ref_params,
                       reward_module=rm[0] if rm is not None else None,
                       rm_params=rm[1] if rm is not None and cfg.reward_source == "model"
                       else None)
  return trainer, params
