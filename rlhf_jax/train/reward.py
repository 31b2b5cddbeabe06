"""Reward-model stage: Bradley–Terry training of an ensemble of k reward models.

Members differ by their head's init seed and, for k > 1, by a bootstrap resample of the training
pairs (bagging; Coste et al. 2023, "Reward model ensembles help mitigate overoptimization", vary
only the seed on the same data), or by the training sets the caller gives each member. PPO can
optimise mean − c·std of the members (config.ppo.ensemble_std_coef). All members train in one
program: their params are stacked on a leading axis and the step is vmapped, so k members cost
one compile. k = 1 is the plain reward model (no resampling).

After training each member's head is affinely rescaled so that its rewards on a reference set
(the held-out pairs' chosen and rejected responses) have mean 0 and std 1; the gain and bias
are folded into the head's kernel and bias, so the stored params *are* the normalised model.
The export is an HF `*ForSequenceClassification` per member (see models.save_hf for the bias).

Packing (config.reward.packing.rows > 0): each step's batch_size pairs packed whole, several
per row, into fixed rows (data.pack_pair_rows), optionally prefix-shared ([prompt | chosen |
rejected], packing.shared_prefix); scores are read at each response's last token, so the loss
and gradients equal the padded layout's.
"""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from rlhf_jax import configs, data, models, objectives, parallel, rng
from rlhf_jax.train import loop as loop_lib
from rlhf_jax.train import optim, scoring, stage as stage_lib, state as state_lib
from rlhf_jax.train import step as step_lib, task as task_lib

NAME = "reward"


def default_config() -> ml_collections.ConfigDict:
  """config.reward: Bradley–Terry steps over `batch_size` pairs; `ensemble_size` members;
  use_margin: the data's margins in the loss; center_coef: the (r_c + r_r)² penalty;
  init_hf_dir: the backbone to start from ("" = the pipeline's SFT policy, else
  config.model_dir, else fresh); packing: see scoring.packing_config, plus shared_prefix (one
  copy of the prompt per packed pair)."""
  return ml_collections.ConfigDict(dict(
      steps=150, batch_size=32, ensemble_size=1, use_margin=False, center_coef=0.0,
      eval_every=50, eval_batch_size=256, init_hf_dir="",
      packing=scoring.packing_config(shared_prefix=False), optim=optim.default_optim_config()))


def validate(config: ml_collections.ConfigDict) -> None:
  stage_lib.check_positive(config, "reward.steps", "reward.batch_size", "reward.ensemble_size",
                           "reward.eval_batch_size")
  stage_lib.check_at_least(config, 0, "reward.eval_every", "reward.center_coef")
  stage_lib.check_optim(config, "reward")
  stage_lib.check_batch(config, "reward.batch_size", accum_key="reward.optim.accum_steps")
  scoring.check_packing(config, "reward")
  if config.reward.packing.shared_prefix and not config.reward.packing.rows:
    raise ValueError("config.reward.packing.shared_prefix needs config.reward.packing.rows > 0 "
                     "(the padded reward layout has one sequence per row)")


# ---------------------------------------------------------------------------------------------
# Loss and ensemble step
# ---------------------------------------------------------------------------------------------


def pair_arrays(batch: data.PreferenceBatch) -> dict[str, np.ndarray]:
  """Chosen and rejected rows side by side, every array with the pair axis first (so that
  micro-batching never separates a pair)."""
  return {"chosen_ids": batch.chosen.input_ids, "chosen_mask": batch.chosen.attention_mask,
          "rejected_ids": batch.rejected.input_ids,
          "rejected_mask": batch.rejected.attention_mask, "margin": batch.margin}


def pair_rewards(module, params, batch) -> tuple[jax.Array, jax.Array]:
  """(r_chosen, r_rejected) [B] from one forward pass over the 2B sequences."""
  ids = jnp.concatenate([batch["chosen_ids"], batch["rejected_ids"]])
  mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
  return tuple(jnp.split(module.apply({"params": params}, ids, mask), 2))


def packed_pair_rewards(module, params, batch) -> tuple[jax.Array, jax.Array]:
  """(r_chosen, r_rejected) [R·K] of packed pair rows (scoring.packed_pair_arrays), from one
  forward pass: the head reads each response's last column (`head_columns`); empty slots read
  column 0, for the caller to mask."""
  scores = module.apply({"params": params}, batch["ids"], batch["mask"], batch["segment_ids"],
                        positions=batch["positions"],
                        parent_segment_ids=batch.get("parent_segment_ids"),
                        head_columns=batch["last_column"])
  return scores[:, 0::2].reshape(-1), scores[:, 1::2].reshape(-1)


def reward_loss_fn(module, *, use_margin: bool, center_coef: float, packed: bool = False):
  """loss_fn for step.make_train_step: Bradley–Terry summed over pairs, count = pairs. packed:
  the batch is packed pair rows (`collate_packed`), empty pair slots weighted 0."""
  rewards_of = packed_pair_rewards if packed else pair_rewards

  def loss_fn(params, batch, rng_key):
    del rng_key
    r_c, r_r = rewards_of(module, params, batch)
    loss_sum, sums = objectives.bradley_terry(
        r_c, r_r, margin=batch["margin"].reshape(-1) if use_margin else None,
        center_coef=center_coef,
        weights=batch["pair_mask"].reshape(-1) if packed else None)
    return loss_sum, (sums["pairs"], {"accuracy": sums["accuracy"],
                                      "reward_margin": sums["margin"]})
  return loss_fn


def collate_packed(pairs, pack, pad_id: int) -> dict[str, np.ndarray]:
  """Packed pair rows of `pairs` (pack: scoring.pair_packer) and their margins [R, K]."""
  packed = pack([(p.prompt, p.chosen, p.rejected) for p in pairs], pad_id)
  return {**scoring.packed_pair_arrays(packed), "margin": packed.per_pair([p.margin
                                                                          for p in pairs])}


def _stacked_sharding(sharding: NamedSharding) -> NamedSharding:
  """The same placement with a new, unsharded leading (ensemble member) axis."""
  return NamedSharding(sharding.mesh, P(None, *sharding.spec))


def init_ensemble(module, keys: jax.Array, mesh, rules, backbone=None):
  """Stacked params [k, ...] born on the mesh; each member's backbone copied from `backbone`
  (e.g. the SFT policy's params) when given, its head drawn from its own key."""
  sample = jnp.ones((1, 8), jnp.int32)
  shardings = jax.tree.map(_stacked_sharding,
                           parallel.param_shardings(module, mesh, rules, sample, sample))

  def one(key, source):
    params = nn.unbox(module.init(key, sample, sample)["params"])
    return params if source is None else models.transfer_backbone(source, params)

  with parallel.mesh_context(mesh, rules):
    return jax.jit(jax.vmap(one, in_axes=(0, None)), out_shardings=shardings)(keys, backbone)


def ensemble_state(params, tx, key: jax.Array, mesh, rules) -> state_lib.State:
  """Per-member optimiser state, step and RNG, all stacked on the leading axis; the moments
  shard like the params (state.opt_shardings), not replicated."""
  k = jax.tree.leaves(params)[0].shape[0]
  member = NamedSharding(mesh, P(None))
  with parallel.mesh_context(mesh, rules):
    # Stacked params carry stacked shardings, so tx.init's own structure maps onto them.
    opt = jax.jit(jax.vmap(tx.init),
                  out_shardings=state_lib.opt_shardings(tx, params, mesh))(params)
  return {"params": params, "opt": opt,
          "step": jax.device_put(jnp.zeros((k,), jnp.int32), member),
          "rng": jax.device_put(jax.random.key_data(jax.random.split(key, k)),
                                NamedSharding(mesh, P(None, None)))}


def ensemble_step(step_fn):
  """vmap of a single-model step over members; metrics averaged over members (the loop logs
  scalars), "skipped" counts members whose update was skipped."""
  vmapped = jax.vmap(step_fn)

  def step(state, batch):
    state, metrics = vmapped(state, batch)
    out = {k: jnp.mean(v) for k, v in metrics.items()}
    out["skipped"] = jnp.sum(metrics["skipped"])
    return state, out
  return step


class EnsembleIterator:
  """k DataIterators over the members' training sets, advanced together; batches stacked
  [k, ...]. All members consume the same number of examples per batch (batch_size pairs, padded
  or packed), so one integer position resumes all of them."""

  def __init__(self, iterators):
    self._iterators = iterators

  @property
  def position(self) -> int:
    return self._iterators[0].position

  def __iter__(self):
    return self

  def __next__(self):
    batches = [next(it) for it in self._iterators]
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def bootstrap_sources(examples, k: int, seed: int):
  """Member i trains on a resample with replacement (i = 0 too when k > 1); k = 1: as is."""
  if k == 1:
    return [examples]
  out = []
  for member in range(k):
    idx = rng.host_rng(seed, "bootstrap", member).integers(0, len(examples), len(examples))
    out.append([examples[i] for i in idx])
  return out


def shard_members(batch, mesh):
  """[k, B, ...] arrays: members replicated, pairs split over data x fsdp. Multi-host: B is
  this process's share (its slice of the stream), assembled into the global batch."""
  def put(x):
    return parallel.sharding.put_process_local(x, NamedSharding(
        mesh, P(None, parallel.sharding.BATCH_AXES, *(None,) * (np.ndim(x) - 2))))
  return jax.tree.map(put, batch)


def normalize_heads(params, rewards: np.ndarray):
  """Folds r' = (r − mean) / std (per member, over `rewards` [k, N]) into the reward heads."""
  mean, std = rewards.mean(axis=1), rewards.std(axis=1) + 1e-8
  head = params["reward_head"]
  kernel = head["kernel"] / jnp.asarray(std)[:, None, None]
  bias = (head["bias"] - jnp.asarray(mean)[:, None]) / jnp.asarray(std)[:, None]
  return {**params, "reward_head": {"kernel": kernel, "bias": bias}}, mean, std


def evaluate_pairs(module, params, pairs, tok: data.TokenizeConfig, mesh, batch_size: int):
  """Held-out accuracy of each member, of the ensemble mean, and the mean ensemble std; and
  the member rewards [k, 2N] of the chosen then the rejected responses."""
  batch = data.pad_preferences(pairs, tok.max_prompt_len, tok.max_response_len, tok.pad_id)
  r_c = scoring.score_sequences(module, params, batch.chosen.input_ids,
                                batch.chosen.attention_mask, mesh, batch_size)
  r_r = scoring.score_sequences(module, params, batch.rejected.input_ids,
                                batch.rejected.attention_mask, mesh, batch_size)
  member_acc = (r_c > r_r).mean(axis=1)
  out = {"eval_accuracy": float((r_c.mean(0) > r_r.mean(0)).mean()),
         "eval_accuracy_members_mean": float(member_acc.mean()),
         "eval_accuracy_members": [float(a) for a in member_acc],
         "eval_ensemble_std": float(np.concatenate([r_c, r_r], 1).std(0).mean())}
  return out, np.concatenate([r_c, r_r], axis=1)


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------


def run(config: ml_collections.ConfigDict, workdir: str, init: stage_lib.Init = None, *,
        pairs=None) -> stage_lib.StageResult:
  """Trains config.reward.ensemble_size reward models from the backbone of `init`.

  pairs: (train, eval) tokenised pairs, by default the task's (config.data.pairs, or
  gold-labelled samples of the review world). `train` may instead be a list of training sets,
  one per member (the ensemble size is then their number, and no resampling is done).
  Returns the stacked, normalised ensemble (StageResult.params [k, ...]).
  """
  validate(config)
  cfg = config.reward
  task = init.task if isinstance(init, stage_lib.StageResult) else task_lib.build_task(config)
  mesh = parallel.make_mesh(config.mesh.to_dict())
  rules = config.sharding
  tok = task.tokenize_config
  train_pairs, eval_pairs = pairs if pairs is not None else (
      task_lib.preference_examples(task, config, "train"),
      task_lib.preference_examples(task, config, "eval"))
  per_member = bool(train_pairs) and isinstance(train_pairs[0], list)
  sources = (train_pairs if per_member else
             bootstrap_sources(train_pairs, cfg.ensemble_size, config.seed))
  if cfg.packing.rows:
    scoring.check_pairs_fit(config, NAME, cfg.packing.shared_prefix,
                            [p for src in sources for p in src])
    pack = scoring.pair_packer(config, NAME, cfg.packing.shared_prefix)
    collate = lambda exs: collate_packed(exs, pack, tok.pad_id)
  else:
    collate = lambda exs: pair_arrays(data.pad_preferences(exs, tok.max_prompt_len,
                                                           tok.max_response_len, tok.pad_id))
  # Each process collates its share of the global batch from its slice of the stream.
  batcher = data.PaddedBatcher(
      parallel.distributed.local_batch_size(cfg.batch_size, "config.reward.batch_size"), collate)

  def make_iterator(position):
    return EnsembleIterator([data.DataIterator(src, batcher, seed=config.seed + i,
                                               position=position)
                             for i, src in enumerate(sources)])

  tx, schedule = optim.make_optimizer(cfg.optim, cfg.steps)
  init_key, key = jax.random.split(rng.key(config.seed, "reward"))
  # The backbone: an earlier stage's policy, an HF directory (its score head, if any, is
  # replaced by each member's fresh head) or fresh weights of config.model.
  source = stage_lib.init_source(config, "reward", init)
  if source is None:
    module = models.build_model(configs.model_config(config.model, task.vocab_size), NAME)
    backbone, dtype = None, "float32"
  else:
    module, backbone, dtype = stage_lib.load_model(config, source, task=task, mesh=mesh,
                                                   role=NAME, fresh_key=init_key,
                                                   where="config.reward.init_hf_dir")
  params = init_ensemble(module, jax.random.split(init_key, len(sources)), mesh, rules,
                         backbone)
  state = ensemble_state(params, tx, key, mesh, rules)
  single = step_lib.make_train_step(
      reward_loss_fn(module, use_margin=cfg.use_margin, center_coef=cfg.center_coef,
                     packed=cfg.packing.rows > 0), tx, accum_steps=cfg.optim.accum_steps)
  step_fn = state_lib.jit_step(ensemble_step(single), state)

  def eval_fn(params):
    out = evaluate_pairs(module, params, eval_pairs, tok, mesh, cfg.eval_batch_size)[0]
    return {k: v for k, v in out.items() if not isinstance(v, list)}

  with parallel.mesh_context(mesh, rules):
    state = loop_lib.train_loop(
        workdir=workdir, state=state, step_fn=step_fn, make_iterator=make_iterator,
        to_device=lambda b: shard_members(b, mesh), loop=stage_lib.loop_config(cfg, config.run),
        extra=stage_lib.checkpoint_extra(config, module), eval_fn=eval_fn, desc=NAME, schedule=schedule,
        count_tokens=_token_count)
    results, rewards = evaluate_pairs(module, state["params"], eval_pairs, tok, mesh,
                                      cfg.eval_batch_size)
    params, mean, std = normalize_heads(state["params"], rewards)
  results.update({"normalization_mean": mean.tolist(), "normalization_std": std.tolist(),
                  "train_pairs": sum(len(s) for s in sources) if per_member else
                  len(train_pairs), "eval_pairs": len(eval_pairs)})
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "reward_results.json"), "w") as f:
      json.dump(results, f, indent=2)
  logging.info("reward: %s", results)
  hf_dir = stage_lib.export(config, workdir, module, params, task, dtype)
  return stage_lib.StageResult(NAME, module, params, task, mesh, results, workdir, hf_dir,
                               dtype)


def _token_count(batch) -> int:
  """Real tokens of a host batch, padded (chosen + rejected rows) or packed."""
  return int(sum(np.sum(v) for k, v in batch.items()
                 if k in ("mask", "chosen_mask", "rejected_mask")))
