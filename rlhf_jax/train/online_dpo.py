"""Online and iterative DPO stage: DPO-family updates on pairs of the policy's own samples,
labelled as they are drawn (config.online_dpo).

Offline DPO (train/preference.py) trains on pairs sampled once, from the SFT policy: as the
policy moves, those pairs become samples of another policy. Here the pairs are always fresh:

  mode="online"     Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online
                    AI Feedback", arXiv:2402.04792, Algorithm 1). Every iteration samples
                    samples_per_prompt responses for each of prompts_per_iter prompts from the
                    CURRENT policy, labels each prompt's responses into pairs, and takes
                    `epochs` passes of batch_size-pair DPO updates over them against the frozen
                    reference (the starting policy: SFT). Each pair is trained on right after
                    it was sampled, so the data stays on-policy.
  mode="iterative"  Iterative DPO: `rounds` rounds of offline DPO, each on prompts_per_round
                    prompts' pairs sampled from the policy at the start of the round, for
                    steps_per_round updates (batch_size pairs each, reshuffled every pass).
                    reference="fixed" keeps the starting policy as the reference of every
                    round (the KL-regularised objective to π_SFT, as in Xiong et al. 2024,
                    arXiv:2312.11456); reference="last_round" moves it to the policy at the end
                    of each round, so each round is a fresh DPO from the previous round's model
                    (Yuan et al. 2024, Self-Rewarding LMs, arXiv:2401.10020; Xu et al. 2023,
                    arXiv:2312.16682). One optimiser state runs through all rounds.
Both modes share one iteration: sample -> label -> pair -> updates (-> reference update); an
online iteration is a small round, a round a large iteration. The loop's step is one iteration
or round, so checkpoints, resume and eval_every count them.

Labels (config.online_dpo.reward_source): "model" a reward model (the reward stage's result or
config.online_dpo.reward_hf_dir; an ensemble scores with its members' mean), "gold" an
embedded world's gold reward (the review world's, the arithmetic world's), "grader" a Python
function of text named by config.online_dpo.grader ("module:function"; train/grading.py decodes
the samples and passes reference answers to a grader that takes them, as for the RL stage).
Pairs (config.online_dpo.pairs): "best_worst" takes each prompt's highest- against its
lowest-scored sample (one pair per prompt, Guo et al.'s two samples when samples_per_prompt =
2); "all" every one of the k(k-1)/2 pairs. A pair whose two samples score the same
(identical responses included) says nothing: it stays in the fixed-shape batch with pair_mask
0 and counts for nothing in the loss, the metrics or the pair count (train/pair_loss.py); a
minibatch of such pairs only is skipped.

The loss is config.online_dpo.loss, any key of objectives.PREFERENCE_LOSSES, through the same
loss_fn as offline DPO (train/pair_loss.py) in the generic step (train/step.py). The state is
{"params", "opt", "step" (updates), "rng", "iteration", "ref"}: the reference lives in the state
so resume and the last-round sync need nothing else; "iteration" keys each iteration's
sampling and pair order, so a resumed run draws exactly what an unbroken one would.
LoRA is not supported by this stage (config.lora.rank must be 0).
"""
import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from tqdm import auto as tqdm

from rlhf_jax import data, models, objectives, parallel, rng, sampling
from rlhf_jax import eval as eval_lib
from rlhf_jax.train import loop as loop_lib
from rlhf_jax.train import grading, optim, pair_loss, scoring, stage as stage_lib
from rlhf_jax.train import state as state_lib
from rlhf_jax.train import step as step_lib, task as task_lib

NAME = "online_dpo"
MODES = ("online", "iterative")
REWARD_SOURCES = ("model", "gold", "grader")
PAIRINGS = ("best_worst", "all")
REFERENCES = ("fixed", "last_round")
ROLLOUT_STREAM, ORDER_STREAM = 0x5EED, 0x0D3E  # fold_in tags of an iteration's two streams.
# Progress bars over an iteration's updates only when there are enough to be watched.
_PROGRESS_MIN_UPDATES = 32


def default_config() -> ml_collections.ConfigDict:
  """config.online_dpo (see the module docstring). Online: iterations x prompts_per_iter
  prompts, `epochs` passes per iteration. Iterative: rounds x prompts_per_round prompts,
  steps_per_round updates per round, reference "fixed" or "last_round". Both: samples_per_prompt
  samples of each prompt at `temperature` (max_new_tokens each; top_k / top_p as the sampler),
  paired by `pairs` and labelled by reward_source (grader: "module:function"; reward_hf_dir:
  an HF reward model instead of the pipeline's); train_prompts: the prompt pool; batch_size:
  pairs per update; loss, beta, label_smoothing, gamma, length_normalized, nll_weight and
  shared_prefix as config.dpo; eval_every: iterations between held-out evaluations (a task
  with a gold reward and config.eval; 0 = at the end); init_hf_dir as the other stages."""
  c = ml_collections.ConfigDict(dict(
      mode="online", iterations=50, prompts_per_iter=32, epochs=1,
      rounds=3, prompts_per_round=512, steps_per_round=100, reference="fixed",
      samples_per_prompt=2, pairs="best_worst", train_prompts=10_000, max_new_tokens=48,
      temperature=1.0, top_k=0, top_p=1.0, batch_size=16,
      loss="sigmoid", beta=0.1, label_smoothing=0.0, gamma=0.5, length_normalized=True,
      nll_weight=0.0, shared_prefix=False,
      reward_source="model", grader="", reward_hf_dir="", eval_every=10, init_hf_dir="",
      optim=optim.default_optim_config()))
  c.optim.lr, c.optim.warmup_steps, c.optim.schedule = 1e-4, 0, "constant"
  return c


# ---------------------------------------------------------------------------------------------
# What a config asks for, derived (never stored)
# ---------------------------------------------------------------------------------------------


def iterations(cfg) -> int:
  """Loop steps: online iterations or iterative rounds."""
  return cfg.iterations if cfg.mode == "online" else cfg.rounds


def prompts_per_iteration(cfg) -> int:
  return cfg.prompts_per_iter if cfg.mode == "online" else cfg.prompts_per_round


def pairs_per_prompt(cfg) -> int:
  k = cfg.samples_per_prompt
  return 1 if cfg.pairs == "best_worst" else k * (k - 1) // 2


def pair_slots(cfg) -> int:
  """Pairs labelled per iteration (ties included): the fixed size of its pair batch."""
  return prompts_per_iteration(cfg) * pairs_per_prompt(cfg)


def updates_per_iteration(cfg) -> int:
  if cfg.mode == "online":
    return cfg.epochs * pair_slots(cfg) // cfg.batch_size
  return cfg.steps_per_round


def loss_config(cfg) -> ml_collections.ConfigDict:
  """The config.dpo-shaped view of config.online_dpo that pair_loss.preference_loss_fn reads:
  padded pair rows (no packing), the reference in the step (or none for reference-free
  losses)."""
  return ml_collections.ConfigDict(dict(
      loss=cfg.loss, beta=cfg.beta, label_smoothing=cfg.label_smoothing, gamma=cfg.gamma,
      length_normalized=cfg.length_normalized, nll_weight=cfg.nll_weight,
      shared_prefix=cfg.shared_prefix,
      reference="none" if cfg.loss in pair_loss.REFERENCE_FREE else "model",
      packing=dict(rows=0)))


# ---------------------------------------------------------------------------------------------
# Checks before anything trains
# ---------------------------------------------------------------------------------------------


def validate(config: ml_collections.ConfigDict) -> None:
  """Every mode / label source / loss combination that can run, and sizes, naming the key."""
  cfg = config.online_dpo
  key = f"config.{NAME}"
  stage_lib.check_choice(config, f"{NAME}.mode", MODES)
  stage_lib.check_choice(config, f"{NAME}.reward_source", REWARD_SOURCES)
  stage_lib.check_choice(config, f"{NAME}.pairs", PAIRINGS)
  stage_lib.check_choice(config, f"{NAME}.reference", REFERENCES)
  if cfg.loss == "kto":
    raise ValueError(f"{key}.loss='kto': KTO learns from unpaired completions and this stage "
                     "trains on pairs; run KTO offline (config.dpo.loss='kto') or pick a loss "
                     "of objectives.PREFERENCE_LOSSES")
  stage_lib.check_choice(config, f"{NAME}.loss", sorted(objectives.PREFERENCE_LOSSES))
  sizes = (("iterations", "prompts_per_iter", "epochs") if cfg.mode == "online" else
           ("rounds", "prompts_per_round", "steps_per_round"))
  stage_lib.check_positive(config, *(f"{NAME}.{k}" for k in sizes), f"{NAME}.samples_per_prompt",
                           f"{NAME}.train_prompts", f"{NAME}.max_new_tokens",
                           f"{NAME}.batch_size")
  stage_lib.check_at_least(config, 0, f"{NAME}.eval_every", f"{NAME}.nll_weight",
                           f"{NAME}.label_smoothing", f"{NAME}.top_k")
  for name in ("temperature", "beta"):
    if not cfg[name] > 0:
      raise ValueError(f"{key}.{name}={cfg[name]}: must be > 0")
  if not 0 < cfg.top_p <= 1:
    raise ValueError(f"{key}.top_p={cfg.top_p}: must lie in (0, 1]")
  if cfg.samples_per_prompt < 2:
    raise ValueError(f"{key}.samples_per_prompt={cfg.samples_per_prompt}: a pair needs >= 2 "
                     "samples of each prompt")
  if cfg.reference == "last_round" and cfg.mode != "iterative":
    raise ValueError(f"{key}.reference='last_round' moves the reference at the end of each "
                     f"round: it needs {key}.mode='iterative' (online DPO keeps the SFT "
                     "reference)")
  stage_lib.check_optim(config, NAME)
  stage_lib.check_batch(config, f"{NAME}.batch_size", accum_key=f"{NAME}.optim.accum_steps")
  prompt_key = sizes[1]
  rows = prompts_per_iteration(cfg) * cfg.samples_per_prompt
  stage_lib.check_batch(config, f"{NAME}.{prompt_key}", value=rows)  # The sampler's rows.
  slots = pair_slots(cfg)
  if cfg.mode == "online" and (cfg.batch_size > slots or slots % cfg.batch_size):
    raise ValueError(f"{key}.batch_size={cfg.batch_size} must divide the {slots} pairs of an "
                     f"iteration ({key}.prompts_per_iter x pairs per prompt, {key}.pairs="
                     f"{cfg.pairs!r}), so that {key}.epochs passes cover every pair equally")
  if cfg.mode == "iterative" and cfg.batch_size > slots:
    raise ValueError(f"{key}.batch_size={cfg.batch_size} exceeds the {slots} pairs of a round "
                     f"({key}.prompts_per_round x pairs per prompt)")
  if cfg.train_prompts < prompts_per_iteration(cfg):
    raise ValueError(f"{key}.train_prompts={cfg.train_prompts} is fewer than the "
                     f"{prompts_per_iteration(cfg)} prompts of one iteration ({key}.{prompt_key})")
  if models.lora.config_from(config.get("lora")) is not None:
    raise ValueError(f"{key} trains the full policy: set config.lora.rank=0 (LoRA adapters are "
                     "supported by the offline dpo and ppo stages)")
  if cfg.reward_source == "gold" and config.task.kind not in task_lib.WORLD_KINDS:
    raise ValueError(f"{key}.reward_source='gold' needs a task with a gold reward "
                     f"(config.task.kind in {task_lib.WORLD_KINDS}); use a reward model or a "
                     "grader")
  if cfg.reward_source == "grader":  # It loads, and gets the reference answers it needs.
    grading.check(config, NAME)
  elif cfg.grader:
    raise ValueError(f"{key}.grader={cfg.grader!r} is set but {key}.reward_source="
                     f"{cfg.reward_source!r}: set reward_source='grader' to label with it")


# ---------------------------------------------------------------------------------------------
# Pairs from one iteration's samples
# ---------------------------------------------------------------------------------------------


def select_pairs(scores: np.ndarray, responses: list[np.ndarray], k: int, how: str
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(chosen [S], rejected [S], informative [S]): row indices into the iteration's samples
  (rows i·k .. i·k + k − 1 are prompt i's) and whether each pair says anything.

  how="best_worst": per prompt, its highest- against its lowest-scored sample (the first of
  equals); "all": every pair (a, b), a < b, the higher score chosen. A pair is informative when
  the chosen scores strictly higher and the two responses differ; others keep their slot (the
  batch has a fixed shape) and are masked out of the loss.
  """
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 1 or len(scores) % k or len(responses) != len(scores):
    raise ValueError(f"{len(scores)} scores / {len(responses)} responses for groups of {k}")
  groups = scores.reshape(-1, k)
  base = np.arange(len(groups))[:, None] * k
  if how == "best_worst":
    a, b = np.argmax(groups, 1)[:, None], np.argmin(groups, 1)[:, None]
  elif how == "all":
    combos = np.asarray(list(itertools.combinations(range(k), 2)), np.int64)
    a = np.broadcast_to(combos[:, 0], (len(groups), len(combos)))
    b = np.broadcast_to(combos[:, 1], (len(groups), len(combos)))
  else:
    raise ValueError(f"config.{NAME}.pairs={how!r}; expected one of {PAIRINGS}")
  a, b = (base + a).ravel(), (base + b).ravel()
  a_wins = scores[a] >= scores[b]
  chosen, rejected = np.where(a_wins, a, b), np.where(a_wins, b, a)
  differ = np.asarray([not np.array_equal(responses[c], responses[r])
                       for c, r in zip(chosen, rejected)], bool)
  return chosen, rejected, (scores[chosen] > scores[rejected]) & differ


def minibatch_order(key: jax.Array, slots: int, updates: int, batch_size: int) -> np.ndarray:
  """[updates, batch_size] pair indices: consecutive passes over the iteration's `slots`
  pairs, each in a fresh random order (pass e from fold_in(key, e)), cut into minibatches."""
  passes = math.ceil(updates * batch_size / slots)
  order = np.concatenate([np.asarray(jax.random.permutation(jax.random.fold_in(key, e), slots))
                          for e in range(passes)])
  return order[:updates * batch_size].reshape(updates, batch_size)


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


class OnlineDPOTrainer:
  """Holds the policy module, the labeller and the jitted functions; `iteration(state,
  prompts)` is the loop's step function (sample, label, pair, update, sync the reference)."""

  def __init__(self, config, task: task_lib.Task, mesh, module, *, rm=None):
    self.config, self.cfg, self.task, self.mesh = config, config.online_dpo, task, mesh
    cfg = self.cfg
    self.rules = config.sharding
    self.module = module
    tok = task.tokenize_config
    self.prompt_len = tok.max_prompt_len
    # Pair rows hold the sampled responses whole: their width is the sampler's buffer.
    self.pair_tok = dataclasses.replace(tok, max_response_len=cfg.max_new_tokens)
    self.sampling_cfg = sampling.sampling_config(cfg, tok.eos_id, tok.pad_id)
    self.k = cfg.samples_per_prompt
    self.slots, self.updates = pair_slots(cfg), updates_per_iteration(cfg)
    self.total_updates = iterations(cfg) * self.updates
    self.tx, self.schedule = optim.make_optimizer(cfg.optim, self.total_updates)
    self.loss_cfg = loss_config(cfg)
    self.rm = rm
    if cfg.reward_source == "model" and rm is None:
      raise ValueError(f"config.{NAME}.reward_source='model' needs a reward model")
    self._logps = _jitted_logps(module, cfg.temperature)
    if rm is not None:
      self._rm_scores = _jitted_rm_scores(rm[0])
    self._update = None

  # ---- state ----------------------------------------------------------------------------

  def init_state(self, params, ref_params, key: jax.Array) -> state_lib.State:
    """A fresh state: copies of `params` (trained) and `ref_params` (the reference); theirs
    are donated to the first update."""
    state = state_lib.state_from_params(jax.tree.map(jnp.copy, params), self.tx, key,
                                        self.mesh, self.rules)
    state["iteration"] = jax.device_put(jnp.zeros((), jnp.int32), state["step"].sharding)
    state["ref"] = jax.tree.map(jnp.copy, ref_params)
    loss_fn = pair_loss.preference_loss_fn(self.module, self.loss_cfg, self.prompt_len)
    in_step = self.loss_cfg.reference == "model"
    self._update = state_lib.jit_step(step_lib.make_train_step(
        loss_fn, self.tx, accum_steps=self.cfg.optim.accum_steps,
        state_extra=("ref",) if in_step else ()), state)
    self._copy = jax.jit(lambda t: jax.tree.map(jnp.copy, t),
                         out_shardings=state_lib.shardings(state["ref"]))
    return state

  @staticmethod
  def iteration_key(state, stream: int) -> jax.Array:
    """The key of `stream` (ROLLOUT_STREAM, ORDER_STREAM) of the state's next iteration."""
    root = jax.random.wrap_key_data(state["rng"])
    return jax.random.fold_in(jax.random.fold_in(root, state["iteration"]), stream)

  # ---- sample and label ------------------------------------------------------------------

  def rollout(self, params, prompts, key: jax.Array):
    """samples_per_prompt samples of every prompt of `prompts` (host {"ids", "mask"}, each
    prompt repeated, group-major) from `params`, drawn with `key`. Returns (placed ids, mask,
    device samples, host samples)."""
    ids, mask = parallel.distributed.shard_global((prompts["ids"], prompts["mask"]), self.mesh)
    samples = sampling.generate(self.module, params, ids, mask, key, self.sampling_cfg)
    return ids, mask, samples, parallel.distributed.gather(samples)

  @staticmethod
  def _prompt_rows(prompts) -> list[np.ndarray]:
    """Each row's real prompt ids (BOS included, as the policy saw them)."""
    return [row[m > 0] for row, m in zip(np.asarray(prompts["ids"]),
                                         np.asarray(prompts["mask"]))]

  def label(self, prompts, ids, mask, samples, host) -> np.ndarray:
    """[rows] float64 scores of the samples by config.online_dpo.reward_source."""
    source = self.cfg.reward_source
    if source == "model":
      return np.asarray(parallel.distributed.gather(
          self._rm_scores(self.rm[1], ids, mask, samples)), np.float64)
    rows = self._prompt_rows(prompts)
    if source == "gold":  # Every process scores every row (host work, cheap): all agree.
      return np.asarray(self.task.world.score_ids(rows, list(host.tokens)).reward, np.float64)
    # A grader reads the response up to, not including, its EOS (the sampler's lengths count
    # the EOS of finished rows), the prompt decoded without BOS (train/grading.py).
    responses = [t[:n - int(f)] for t, n, f in zip(host.tokens, host.lengths, host.finished)]
    return np.asarray(grading.grade(self.task, self.config, rows, responses, section=NAME),
                      np.float64)

  def make_pairs(self, prompts, host, scores):
    """(pair rows for the step, chosen, rejected, informative) of one iteration's samples."""
    responses = [t[:n] for t, n in zip(host.tokens, host.lengths)]  # EOS included if any.
    chosen, rejected, informative = select_pairs(scores, responses, self.k, self.cfg.pairs)
    rows = self._prompt_rows(prompts)
    pairs = [data.TokenizedPair(rows[c], responses[c], responses[r])
             for c, r in zip(chosen, rejected)]
    arrays = scoring.collate_pairs(pairs, self.pair_tok, self.cfg.shared_prefix)
    arrays["pair_mask"] = informative.astype(np.int32)
    return arrays, chosen, rejected, informative

  # ---- one iteration ---------------------------------------------------------------------

  def host_iteration(self, state, prompts):
    """One iteration from the host: rollout of the current policy, labels, pairs, updates,
    (iterative, reference="last_round") the reference sync. Returns (state, metrics, record):
    the record holds the iteration's host samples, scores and pairs."""
    cfg = self.cfg
    rollout_key = self.iteration_key(state, ROLLOUT_STREAM)
    order_key = self.iteration_key(state, ORDER_STREAM)
    # SAMPLE FROM THE CURRENT POLICY AND LABEL
    ids, mask, samples, host = self.rollout(state["params"], prompts, rollout_key)
    logp, ref_logp = parallel.distributed.gather(
        self._logps(state["params"], state["ref"], ids, mask, samples))
    scores = self.label(prompts, ids, mask, samples, host)
    # PAIRS (FIXED SHAPE, TIES MASKED)
    arrays, chosen, rejected, informative = self.make_pairs(prompts, host, scores)
    # UPDATES: epochs passes (online) or steps_per_round (iterative), batch_size pairs each
    order = minibatch_order(order_key, self.slots, self.updates, cfg.batch_size)
    step_metrics = []
    bar = tqdm.tqdm(order, desc="updates", leave=False,
                    disable=len(order) < _PROGRESS_MIN_UPDATES or None)
    for idx in bar:
      if not informative[idx].any():  # Nothing to learn; an update would be momentum only.
        continue
      minibatch = parallel.distributed.shard_global(
          jax.tree.map(lambda x: x[idx], arrays), self.mesh)
      state, m = self._update(state, minibatch)
      step_metrics.append(m)
    if cfg.mode == "iterative" and cfg.reference == "last_round":
      state["ref"] = self._copy(state["params"])
    state["iteration"] = jax.device_put(state["iteration"] + 1, state["step"].sharding)
    metrics = _mean_metrics(jax.device_get(step_metrics))
    metrics.update(self._host_metrics(prompts, host, scores, chosen, rejected, informative,
                                      logp - ref_logp))
    record = {"tokens": host.tokens, "lengths": host.lengths, "scores": scores,
              "chosen": chosen, "rejected": rejected, "informative": informative,
              "rollout_key": rollout_key}
    return state, metrics, record

  def iteration(self, state, prompts):
    """The loop's step function: one iteration on a batch of prompts; host metrics."""
    state, metrics, _ = self.host_iteration(state, prompts)
    return state, metrics

  def _host_metrics(self, prompts, host, scores, chosen, rejected, informative, kl):
    lens, finished = np.asarray(host.lengths), np.asarray(host.finished)
    n = max(int(informative.sum()), 1)
    pick = lambda rows: float(np.sum(scores[rows] * informative) / n)
    out = {"label/chosen": pick(chosen), "label/rejected": pick(rejected),
           "label/margin": pick(chosen) - pick(rejected), "label/mean": float(scores.mean()),
           "pairs": float(len(chosen)), "informative_pairs": float(informative.sum()),
           "kl": float(np.mean(kl)), "response_length": float(lens.mean()),
           "no_eos_fraction": float(1 - finished.mean()),
           # Tokens of the iteration's sequences (prompts + responses), for tokens/s.
           "tokens": float(np.sum(prompts["mask"]) + lens.sum())}
    if self.task.world is not None:  # Whatever labels the pairs, the gold reward is logged.
      out["gold_reward"] = float(np.mean(scores) if self.cfg.reward_source == "gold" else
                                 np.mean(self.task.world.score_ids(
                                     self._prompt_rows(prompts), list(host.tokens)).reward))
    return out


@functools.lru_cache(maxsize=None)
def _jitted_logps(module, temperature: float):
  """(params, ref, ids, mask, samples) -> summed log-probs [B] of each sample under the policy
  and under the reference (full forward passes at the sampling temperature): the Monte-Carlo
  KL(π‖π_ref) of an iteration's samples. One jitted function per (module, temperature), so
  trainers of the same model share its compilation."""
  def seq_logps(params, ids, mask, samples):
    return jnp.sum(sampling.response_logprobs(module, params, ids, mask, samples,
                                              temperature), axis=1)
  return jax.jit(lambda p, r, i, m, s: (seq_logps(p, i, m, s), seq_logps(r, i, m, s)))


@functools.lru_cache(maxsize=None)
def _jitted_rm_scores(rm_module):
  """(rm params [k, ...], ids, mask, samples) -> [B] ensemble-mean rewards of the samples."""
  return jax.jit(lambda rp, i, m, s: jnp.mean(scoring.ensemble_rewards(
      rm_module, rp, *sampling.sequences(i, m, s)), axis=0))


def _mean_metrics(step_metrics: list[dict]) -> dict[str, float]:
  """The updates' metrics over one iteration: means, except "skipped" and "update_norm" (the
  worst update: the loop's checks look for one bad step). No update (every pair tied): the
  loop still needs "skipped"."""
  if not step_metrics:
    return {"skipped": 0.0, "updates": 0.0}
  worst = ("skipped", "update_norm")
  out = {k: float((np.max if k in worst else np.mean)([float(m[k]) for m in step_metrics]))
         for k in step_metrics[0]}
  out["updates"] = float(len(step_metrics))
  return out


def prompt_iterator(task, config, position: int):
  """Batches of left-padded prompts for one iteration, each repeated samples_per_prompt times
  (group-major), global on every process (like the RL stage's). The pool is the task's RL
  training prompts (review world: the "rl" set)."""
  cfg = config.online_dpo
  return task_lib.grouped_prompt_batches(
      task, config, position, train_prompts=cfg.train_prompts,
      prompts_per_batch=prompts_per_iteration(cfg), repeats=cfg.samples_per_prompt)


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def _reward_model(config, reward: stage_lib.Init, task, mesh):
  """(module, stacked params) of the labelling reward model, or None (gold / grader)."""
  cfg = config.online_dpo
  if cfg.reward_source != "model":
    return None
  if isinstance(reward, stage_lib.StageResult):
    return reward.module, reward.params
  path = reward or cfg.reward_hf_dir
  if not path:
    raise ValueError(f"config.{NAME}.reward_source='model' needs a reward model: run the "
                     f"reward stage before this one, or name an HF reward model in "
                     f"config.{NAME}.reward_hf_dir")
  return stage_lib.load_reward(config, path, task, mesh, f"config.{NAME}.reward_hf_dir")


def _heldout_evaluator(config, task, mesh, module, ref_params):
  """params -> held-out gold reward and KL(π‖π_start) (review world with config.eval and
  config.sampling: the pipeline's prompts and sampling keys, so the last point equals the
  pipeline's evaluation), or None."""
  if task.world is None or "eval" not in config or "sampling" not in config:
    return None
  prompts = task.world.sample_prompts(config.eval.prompts, seed=rng.prompt_seed("heldout"))
  evaluate = eval_lib.make_policy_evaluator(config, task, mesh, module, ref_params,
                                            prompts=prompts)
  return lambda params: {f"heldout_{k}": v for k, v in evaluate(params).items()}


def run(config: ml_collections.ConfigDict, workdir: str, init: stage_lib.Init = None, *,
        reward: stage_lib.Init = None) -> stage_lib.StageResult:
  """config.online_dpo iterations (rounds) from the policy of `init`, which is also the
  reference (the pipeline's SFT policy). `reward`: the reward stage's result or an HF reward
  model directory (reward_source="model"; else config.online_dpo.reward_hf_dir).

  Returns the final policy with its held-out gold reward and KL to the starting policy
  (review world) and the number of pairs labelled.
  """
  validate(config)
  cfg = config.online_dpo
  task, mesh, module, params, dtype = stage_lib.start_policy(config, NAME, init, reward)
  rm = _reward_model(config, reward, task, mesh)
  if cfg.reward_source == "grader":  # A prompts file's reference answers, read before rollouts.
    grading.prepare(task, config, NAME)
  trainer = OnlineDPOTrainer(config, task, mesh, module, rm=rm)
  state = trainer.init_state(params, params, rng.key(config.seed, NAME))
  heldout = _heldout_evaluator(config, task, mesh, module, params)
  last_eval: dict[str, float] = {}

  def evaluate(trained):
    last_eval.clear()
    last_eval.update(heldout(trained))
    return dict(last_eval)

  desc = f"{NAME}[{cfg.mode}, {cfg.loss}]"
  with parallel.mesh_context(mesh, config.sharding):
    state = loop_lib.train_loop(
        workdir=workdir, state=state, step_fn=trainer.iteration,
        make_iterator=lambda pos: prompt_iterator(task, config, pos), to_device=lambda b: b,
        loop=stage_lib.loop_config(cfg, config.run, steps=iterations(cfg), log_every=1),
        extra=stage_lib.checkpoint_extra(config, module),
        eval_fn=evaluate if heldout is not None else None, desc=desc,
        schedule=lambda step: trainer.schedule(step * trainer.updates))
    if heldout is not None and not last_eval:  # A finished run resumed: nothing evaluated.
      evaluate(state["params"])
  policy = state["params"]
  metrics = {**last_eval, "iterations": int(state["iteration"]),
             "labelled_pairs": int(state["iteration"]) * trainer.slots}
  logging.info("%s: %s", desc, metrics)
  hf_dir = stage_lib.export(config, workdir, module, policy, task, dtype)
  return stage_lib.StageResult(NAME, module, policy, task, mesh, metrics, workdir, hf_dir,
                               dtype)
