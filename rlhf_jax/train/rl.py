"""Online RL stage: PPO, GRPO or RLOO (config.ppo.algorithm) from a policy against a reward.

The policy (also the frozen reference) comes from `init`: an earlier stage's result (the SFT
policy), an HF directory, or config.ppo.init_hf_dir / config.model_dir. The reward is a reward
model (`reward`: the reward stage's result, or an HF `*ForSequenceClassification` directory,
config.ppo.reward_hf_dir, whose backbone may differ from the policy's in size; a directory of
member_<i> sub-directories is an ensemble), on an embedded world the gold reward
(config.ppo.reward_source = "gold"), or a Python grader of the decoded text, a verifiable
reward (reward_source = "grader", config.ppo.grader = "module:function"; train/grading.py).
The iterations themselves are train/ppo.py.
"""
import ml_collections
from absl import logging

from rlhf_jax import eval as eval_lib
from rlhf_jax import objectives, parallel, rng
from rlhf_jax.train import grading, grpo_variants
from rlhf_jax.train import loop as loop_lib
from rlhf_jax.train import optim, ppo, stage as stage_lib, task as task_lib

VALUE_INITS = ("reward", "policy")


def default_config() -> ml_collections.ConfigDict:
  """config.ppo: the seed's PPO hyperparameters (lr 1.41e-5, batch 256, minibatch 64, 4
  epochs, clip 0.2, value clip 0.2, vf_coef 0.1, initial KL coefficient 0.2, adaptive KL with
  target 6, up to 256 new tokens, temperature 1.0). group_size: samples per prompt (GRPO/RLOO
  groups); value: "separate" network or "head" on the policy; value_init: the separate
  network's backbone, from the "reward" model or the "policy"; reward_hf_dir: an HF reward
  model to optimise against instead of the pipeline's; init_hf_dir: the policy to start from
  ("" = the pipeline's SFT policy, else config.model_dir); slots: 0 samples each iteration's
  rollouts as one fixed batch, N > 0 with continuous batching over N slots (sampling's
  SamplingConfig.slots: rows that end are refilled, per-prompt random keys); packing.enabled
  runs the scoring passes and updates on the rollouts packed whole into rows of
  packing.length tokens (0 = max_prompt_len + max_new_tokens; data.pack_rollouts), not padded
  to max_new_tokens: the same losses and gradients, at the cost of the real tokens only.
  monitor_kl: run the reference pass for the logged KL even when no loss or reward term reads
  it (kl_coef = 0 under the fixed controller); False skips that forward pass then, as TRL does
  at beta = 0, and no `kl` is logged (ppo.log_prob_passes). With one update per iteration the
  old log-probs are always the update's own, not a separate pass (the same ratio, exactly 1).

  GRPO variants (train/grpo_variants.py): grpo_variant = "grpo" | "dr_grpo" | "dapo" sets the
  keys of that recipe (advantage std, loss_aggregation, KL, clip-higher, dynamic sampling,
  overlong handling) at the start of the stage; "" leaves every key as set.
  grpo_std_normalize: GRPO's (r − mean)/std group advantages (False: Dr. GRPO's r − mean);
  loss_aggregation: token-level ("token_mean", DAPO) or sequence-level ("seq_mean_token_mean",
  GRPO; "seq_mean_token_sum_norm", Dr. GRPO) reduction of every per-token loss;
  clip_eps_high: DAPO's clip-higher ε_high (None = clip_eps); mask_truncated: DAPO's overlong
  filtering (completions without EOS get loss weight 0); overlong_cache: DAPO's soft overlong
  punishment (eq. 13) over the last overlong_cache tokens before max_new_tokens, added to the
  score (0 = off); dynamic_sampling: DAPO's dynamic sampling (GRPO/RLOO, host-driven iteration
  only): sample prompts_per_iter x oversample prompts, keep the first prompts_per_iter groups
  whose scores are not all equal and fill a short batch with zero-weight groups;
  oversample (>= 1; > 1 needs dynamic_sampling): prompts sampled per update prompt.

  reward_source: "model" (a reward model), "gold" (an embedded world's gold reward) or
  "grader": grader = "module:function", a Python function (prompt, response[, reference]) ->
  float of the decoded text (rlhf_jax.graders; e.g. "rlhf_jax.graders:gsm8k_exact" with a
  prompts file whose records carry a reference answer, config.data.answer_field)."""
  c = ml_collections.ConfigDict(dict(
      algorithm="ppo", iterations=100, train_prompts=10_000, prompts_per_iter=256, group_size=1,
      minibatch_size=64, epochs=4, max_new_tokens=256, temperature=1.0, clip_eps=0.2,
      clip_eps_high=ml_collections.config_dict.placeholder(float), vf_clip=0.2, vf_coef=0.1,
      ent_coef=0.0, gamma=1.0, lam=0.95, kl_coef=0.2, kl_estimator="k1", kl_in_reward=True,
      kl_controller="adaptive", kl_target=6.0, kl_horizon=10_000, whiten_rewards=False,
      loss_aggregation="token_mean", grpo_std_normalize=True, mask_truncated=False,
      grpo_variant="", dynamic_sampling=False, oversample=1, overlong_cache=0,
      reward_source="model", grader="", ensemble_std_coef=0.0, reward_clip=0.0,
      missing_eos_penalty=1.0, length_penalty=0.0, value="separate", value_init="reward",
      eval_every=10, fused=False, slots=0, init_hf_dir="", reward_hf_dir="", monitor_kl=True,
      optim=optim.default_optim_config(),
      packing=ml_collections.ConfigDict(dict(enabled=False, length=0))))
  c.optim.lr, c.optim.warmup_steps, c.optim.schedule = 1.41e-5, 0, "constant"
  c.optim.weight_decay, c.optim.b2 = 0.0, 0.999
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  """Every algorithm/reward/critic combination that can run, and sizes, before any training."""
  stage_lib.check_choice(config, "ppo.grpo_variant", grpo_variants.VARIANT_NAMES)
  config = grpo_variants.resolve(config)  # The checks below see the variant's keys.
  cfg = config.ppo
  stage_lib.check_choice(config, "ppo.algorithm", ppo.ALGORITHMS)
  stage_lib.check_choice(config, "ppo.reward_source", ppo.REWARD_SOURCES)
  stage_lib.check_choice(config, "ppo.value", ppo.CRITICS)
  stage_lib.check_choice(config, "ppo.value_init", VALUE_INITS)
  stage_lib.check_choice(config, "ppo.kl_estimator", objectives.KL_ESTIMATORS)
  stage_lib.check_choice(config, "ppo.kl_controller", objectives.KL_CONTROLLERS)
  stage_lib.check_choice(config, "ppo.loss_aggregation", objectives.LOSS_AGGREGATIONS)
  stage_lib.check_positive(config, "ppo.iterations", "ppo.train_prompts",
                           "ppo.prompts_per_iter", "ppo.group_size", "ppo.minibatch_size",
                           "ppo.epochs", "ppo.max_new_tokens", "ppo.kl_horizon")
  stage_lib.check_at_least(config, 0, "ppo.eval_every", "ppo.kl_coef", "ppo.ent_coef",
                           "ppo.vf_coef", "ppo.reward_clip", "ppo.ensemble_std_coef",
                           "ppo.slots")
  for key in ("temperature", "clip_eps", "kl_target"):
    if not cfg[key] > 0:
      raise ValueError(f"config.ppo.{key}={cfg[key]}: must be > 0")
  stage_lib.check_optim(config, "ppo")
  if cfg.slots:  # The slots are rows of the sampler's batch: they split like one.
    stage_lib.check_batch(config, "ppo.slots")
  stage_lib.check_at_least(config, 0, "ppo.packing.length")
  if cfg.packing.enabled and cfg.fused:
    raise ValueError("config.ppo.packing.enabled=True packs on the host between the jitted "
                     "calls: it needs config.ppo.fused=False")
  if cfg.fused and cfg.reward_source != "model":
    raise ValueError("config.ppo.fused=True compiles the whole iteration: it needs "
                     "reward_source='model' (the gold reward is computed on the host)")
  if cfg.reward_source == "gold" and config.task.kind not in task_lib.WORLD_KINDS:
    raise ValueError("config.ppo.reward_source='gold' needs a task with a gold reward "
                     f"(config.task.kind in {task_lib.WORLD_KINDS}); use a reward model or a "
                     "grader (reward_source='grader')")
  _validate_grader(config)
  if cfg.algorithm != "ppo" and cfg.group_size < 2:
    raise ValueError(f"config.ppo.group_size={cfg.group_size}: {cfg.algorithm} needs >= 2")
  if cfg.algorithm == "grpo" and cfg.kl_in_reward:
    raise ValueError("config.ppo.algorithm='grpo' puts the KL in the loss: set "
                     "config.ppo.kl_in_reward=False (GRPO has no token rewards to put it in)")
  rows = cfg.prompts_per_iter * cfg.group_size
  if cfg.minibatch_size > rows or rows % cfg.minibatch_size:
    raise ValueError(f"config.ppo.minibatch_size={cfg.minibatch_size} must divide the "
                     f"{rows} rollouts per iteration (prompts_per_iter x group_size)")
  stage_lib.check_batch(config, "ppo.minibatch_size", accum_key="ppo.optim.accum_steps")
  stage_lib.check_batch(config, "ppo.prompts_per_iter", value=rows)
  _validate_dapo_pieces(config)


def _validate_grader(config) -> None:
  """reward_source="grader" loads config.ppo.grader now (a bad spec fails before anything
  trains, naming the key); a grader set for another reward source would silently not run."""
  grader = config.ppo.get("grader", "")  # Configs saved before graders lack the key.
  if config.ppo.reward_source == "grader":
    if not grader:
      raise ValueError("config.ppo.grader is empty but config.ppo.reward_source='grader': name "
                       "the grader as 'module:function', e.g. "
                       "'rlhf_jax.data.arithmetic_world:grade' or 'mypkg.rewards:score'")
    grading.check(config)
  elif grader:
    raise ValueError(f"config.ppo.grader={grader!r} is set but config.ppo.reward_source="
                     f"{config.ppo.reward_source!r}: set reward_source='grader' to train on "
                     "it, or clear config.ppo.grader")


def _validate_dapo_pieces(config) -> None:
  """Dynamic sampling, over-sampling and the soft overlong punishment (DAPO's pieces)."""
  cfg = config.ppo
  stage_lib.check_positive(config, "ppo.oversample")
  stage_lib.check_at_least(config, 0, "ppo.overlong_cache")
  if not isinstance(cfg.overlong_cache, int) or cfg.overlong_cache > cfg.max_new_tokens:
    raise ValueError(f"config.ppo.overlong_cache={cfg.overlong_cache!r}: must be an integer "
                     f"<= config.ppo.max_new_tokens={cfg.max_new_tokens} (the soft-punishment "
                     "window lies below the length limit; 0 = off)")
  if cfg.oversample > 1 and not cfg.dynamic_sampling:
    raise ValueError(f"config.ppo.oversample={cfg.oversample} samples more prompts than an "
                     "update takes: it needs config.ppo.dynamic_sampling=True to choose them")
  if cfg.dynamic_sampling:
    if cfg.algorithm == "ppo":
      raise ValueError("config.ppo.dynamic_sampling=True keeps groups of completions with "
                       "different rewards: it needs config.ppo.algorithm='grpo' or 'rloo' "
                       "(PPO's advantages are not per group)")
    if cfg.fused:
      raise ValueError("config.ppo.dynamic_sampling=True chooses the update batch on the host "
                       "after scoring: it needs config.ppo.fused=False")
    if cfg.train_prompts < cfg.prompts_per_iter * cfg.oversample:
      raise ValueError(f"config.ppo.train_prompts={cfg.train_prompts} is fewer than one "
                       f"iteration samples (config.ppo.prompts_per_iter x oversample = "
                       f"{cfg.prompts_per_iter * cfg.oversample})")


def name(config) -> str:
  """The stage's sub-directory: the algorithm's name."""
  return config.ppo.algorithm


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def _heldout_perplexity(config, task, trainer, mesh):
  """params -> the policy's NLL and perplexity on held-out SFT data (the seed's "perplexity
  degradation" as RL moves the policy), or None when the task has no SFT data."""
  files = config.get("data")
  if task.world is None and not (files and (files.sft or files.sft_eval)):
    return None
  nll = eval_lib.make_nll_evaluator(trainer.policy, task_lib.sft_examples(task, config, "eval"),
                                    task.tokenize_config, mesh, 64)

  def evaluate(params):
    heldout = nll(trainer.merged_policy(params))
    return {"sft_heldout_loss": heldout["eval_loss"],
            "sft_heldout_perplexity": heldout["eval_perplexity"]}
  return evaluate


def run(config: ml_collections.ConfigDict, workdir: str, init: stage_lib.Init = None, *,
        reward: stage_lib.Init = None) -> stage_lib.StageResult:
  """config.ppo.iterations iterations of config.ppo.algorithm from the policy of `init`.

  Returns the final policy (a plain causal LM; under LoRA the adapters folded in, with a value
  head the head dropped) with the held-out SFT perplexity (when the task has SFT data).
  """
  validate(config)
  config = grpo_variants.resolve(config)  # config.ppo.grpo_variant's keys, set on a copy.
  cfg = config.ppo
  task, mesh, module, params, dtype = stage_lib.start_policy(config, "ppo", init, reward)
  rm = stage_lib.reward_model(config, "ppo", reward, task, mesh)
  if cfg.reward_source == "grader":
    grading.prepare(task, config)  # A prompts file's reference answers, read before rollouts.
  trainer, trainable = ppo.make_trainer(config, task, mesh, policy=(module, params), rm=rm)
  state = trainer.init_state(trainable, rng.key(config.seed, "rl"))
  evaluate = _heldout_perplexity(config, task, trainer, mesh)

  with parallel.mesh_context(mesh, config.sharding):
    state = loop_lib.train_loop(
        workdir=workdir, state=state, step_fn=trainer.iteration,
        make_iterator=lambda pos: ppo.prompt_iterator(task, config, pos), to_device=lambda b: b,
        loop=stage_lib.loop_config(cfg, config.run, steps=cfg.iterations, log_every=1),
        extra=stage_lib.checkpoint_extra(config, trainer.policy_module), eval_fn=evaluate,
        desc=cfg.algorithm,
        schedule=lambda step: trainer.schedule(step * trainer.updates_per_iter))
    final = trainer.merged_policy(state["params"])
    metrics = evaluate(state["params"]) if evaluate is not None else {}
  metrics["kl_coef"] = float(parallel.distributed.gather(state["kl_coef"]))
  policy = {k: v for k, v in final.items() if k != "value_head"}
  logging.info("%s: %s", cfg.algorithm, metrics)
  hf_dir = stage_lib.export(config, workdir, trainer.policy, policy, task, dtype)
  return stage_lib.StageResult(name(config), trainer.policy, policy, task, mesh, metrics,
                               workdir, hf_dir, dtype)
