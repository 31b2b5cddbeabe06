"""Direct preference optimisation stage: DPO and its family (objectives.PREFERENCE_LOSSES) and
KTO (the pairs split into unpaired completions).

Reference log-probs come from one of (config.dpo.reference):
  "model"       a frozen copy of the initial policy, kept in the train state as "ref" (so exact
                resume and TR-DPO's reference sync need nothing else), scored inside the step;
  "precomputed" scored once over the training pairs before training, cached in
                workdir/ref_logps.npz and reused on resume when its fingerprint matches;
  "none"        reference-free losses (simpo, orpo).
Prefix sharing (config.dpo.shared_prefix): each pair is one row [prompt | chosen | rejected]
(train.scoring), so the prompt is encoded once per pair.
Packing (config.dpo.packing.rows > 0): each step's batch_size pairs (KTO: examples) packed
whole, several per row, into fixed rows (train.scoring, data.pack_pair_rows), with or without
prefix sharing; the same losses and gradients as the padded layout from fewer token slots.
LoRA (config.lora.rank > 0): the state's params are the adapters; the policy's own params are
the frozen base, an undonated input of the step and also the reference (no copy).
"""
import hashlib
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from rlhf_jax import data, models, objectives, parallel, rng
from rlhf_jax.train import loop as loop_lib
from rlhf_jax.train import optim, pair_loss, scoring, stage as stage_lib, state as state_lib
from rlhf_jax.train import step as step_lib, task as task_lib

NAME = "dpo"
REFERENCE_MODES = ("model", "precomputed", "none")
# The DPO family's loss_fn is shared with the online stage (train/pair_loss.py); its names stay
# importable from here.
REFERENCE_FREE, LOSS_HPARAMS = pair_loss.REFERENCE_FREE, pair_loss.LOSS_HPARAMS
preference_loss_fn = pair_loss.preference_loss_fn


def default_config() -> ml_collections.ConfigDict:
  """config.dpo: `loss` is "kto" or a key of objectives.PREFERENCE_LOSSES (sigmoid = DPO);
  reference: see the module docstring; ref_sync_every/alpha: TR-DPO; init_hf_dir: the policy
  to start from ("" = the pipeline's SFT policy, else config.model_dir, else fresh);
  packing: see scoring.packing_config, plus loss_tokens, the response tokens a packed row may
  hold (the LM head's columns per row; 0 = packing.length)."""
  return ml_collections.ConfigDict(dict(
      loss="sigmoid", beta=0.1, label_smoothing=0.0, gamma=0.5, length_normalized=True,
      nll_weight=0.0, desirable_weight=1.0, undesirable_weight=1.0, reference="model",
      shared_prefix=False, ref_sync_every=0,
      ref_sync_alpha=1.0, init_hf_dir="", steps=200, batch_size=16, eval_every=100,
      packing=scoring.packing_config(loss_tokens=0), optim=optim.default_optim_config()))


def validate(config: ml_collections.ConfigDict) -> None:
  """The loss, reference mode, TR-DPO, KTO and LoRA combinations that can run, and sizes."""
  cfg = config.dpo
  stage_lib.check_choice(config, "dpo.loss", ("kto", *sorted(objectives.PREFERENCE_LOSSES)))
  stage_lib.check_choice(config, "dpo.reference", REFERENCE_MODES)
  stage_lib.check_positive(config, "dpo.steps", "dpo.batch_size")
  stage_lib.check_at_least(config, 0, "dpo.eval_every", "dpo.ref_sync_every", "dpo.nll_weight",
                           "dpo.label_smoothing", "dpo.desirable_weight",
                           "dpo.undesirable_weight")
  if not cfg.beta > 0:
    raise ValueError(f"config.dpo.beta={cfg.beta}: must be > 0")
  stage_lib.check_optim(config, "dpo")
  stage_lib.check_batch(config, "dpo.batch_size", accum_key="dpo.optim.accum_steps")
  scoring.check_packing(config, "dpo")
  is_kto = cfg.loss == "kto"
  if is_kto and cfg.optim.accum_steps > 1:
    raise ValueError("config.dpo.loss='kto' with accum_steps > 1 would estimate the batch KL "
                     "z0 per micro-batch; use accum_steps=1 and a larger batch")
  if is_kto and cfg.reference != "model":
    raise ValueError("config.dpo.loss='kto' needs config.dpo.reference='model' (the KL rows "
                     "need the reference in the step)")
  if is_kto and cfg.shared_prefix and not cfg.packing.rows:
    raise ValueError("config.dpo.loss='kto' with config.dpo.shared_prefix needs packing "
                     "(config.dpo.packing.rows > 0): padded KTO builds its KL rows in the "
                     "step, packed KTO on the host, where they can share the prompt")
  if cfg.loss in REFERENCE_FREE and cfg.reference != "none":
    raise ValueError(f"config.dpo.loss={cfg.loss!r} is reference-free: set "
                     "config.dpo.reference='none'")
  lora = models.lora.config_from(config.get("lora"))
  if cfg.ref_sync_every and lora is not None:
    raise ValueError("config.dpo.ref_sync_every (TR-DPO) moves the reference, but with "
                     "config.lora.rank > 0 the reference is the frozen base; set one to 0")
  if cfg.ref_sync_every and cfg.reference != "model":
    raise ValueError("config.dpo.ref_sync_every (TR-DPO) needs config.dpo.reference='model'")
  if cfg.ref_sync_every and not 0 < cfg.ref_sync_alpha <= 1:
    raise ValueError(f"config.dpo.ref_sync_alpha={cfg.ref_sync_alpha}: must lie in (0, 1]")


# ---------------------------------------------------------------------------------------------
# Pairwise losses
# ---------------------------------------------------------------------------------------------


def tr_dpo_sync(every: int, alpha: float):
  """TR-DPO (Gorbatovski et al. 2024, arXiv:2404.09656): every `every` steps the reference
  moves to alpha·policy + (1 − alpha)·reference (alpha = 1: hard copy)."""
  def post_update(state):
    due = (state["step"] % every) == 0
    ref = jax.tree.map(lambda p, r: jnp.where(due, alpha * p + (1 - alpha) * r, r),
                       state["params"], state["ref"])
    return {**state, "ref": ref}
  return post_update


# ---------------------------------------------------------------------------------------------
# KTO: unpaired completions, with mismatched (prompt, completion) rows for the batch KL
# ---------------------------------------------------------------------------------------------


def collate_unpaired(examples, tok: data.TokenizeConfig) -> dict[str, np.ndarray]:
  """Rows for KTO: [prompt (left-padded) | completion (right-padded)] and the labels. The
  mismatched rows of the batch KL are built in the step (`kto_loss_fn`), from the global batch."""
  rows = data.pad_unpaired(examples, tok.max_prompt_len, tok.max_response_len, tok.pad_id)
  return {"ids": rows.sequences.input_ids, "mask": rows.sequences.attention_mask,
          "loss_mask": rows.sequences.loss_mask, "desirable": rows.desirable.astype(np.int32)}


def stream_successors(batch_size: int, process_count: int) -> np.ndarray:
  """[batch_size] row indices: row r's successor holds the example that follows row r's in the
  data stream (the last wraps to the first), for a global batch assembled from the processes'
  equal local batches in process order.

  data.DataIterator gives process p of P the stream positions g = i·P + p, so local row i of
  process p (global row p·L + i, L = batch_size / P) holds position i·P + p of the batch. With
  one process this is simply r + 1 (mod batch_size); with several it is not the next row.
  """
  if batch_size % process_count:
    raise ValueError(f"global batch {batch_size} does not split over {process_count} processes")
  local = batch_size // process_count
  rows = np.arange(batch_size)
  nxt = ((rows % local) * process_count + rows // local + 1) % batch_size
  return (nxt % process_count) * local + nxt // process_count


def mismatched_rows(batch, prompt_len: int, successors: np.ndarray):
  """(ids, mask, loss_mask) of the KL rows: each prompt with the completion of the next example
  of the stream (`stream_successors`), whose log-ratio estimates the batch KL z₀ (Ethayarajh
  et al. 2024, arXiv:2402.01306, sec. 4).

  Built from the *global* batch inside the step, so the pairs are the same with one process or
  many (GSPMD moves the completions between devices); shifting rows within each process's
  local batch on the host would pair different examples for every process count. Prompts are
  left-padded to prompt_len and completions right-padded after it, so a completion moves with
  its mask and loss mask and stays a valid row.
  """
  def swap(x):
    return jnp.concatenate([x[:, :prompt_len], x[successors, prompt_len:]], 1)
  return swap(batch["ids"]), swap(batch["mask"]), swap(batch["loss_mask"])


def kto_loss_fn(module, cfg: ml_collections.ConfigDict, prompt_len: int):
  """loss_fn for step.make_train_step: summed KTO losses; count = examples. The reference is
  the frozen "ref" state entry (KTO needs reference log-probs of the mismatched rows too).
  Packed (config.dpo.packing.rows > 0), each pair slot holds an example's completion and its
  KL row's (`_collate_fn`), so one packed forward scores both and empty slots are masked."""
  packed = cfg.packing.rows > 0

  def logps(params, batch):
    """(summed log-probs of the completions, of the KL rows' completions)."""
    if packed:
      return scoring.packed_pair_logps(module, params, batch)[:2]
    b = batch["ids"].shape[0]
    kl_ids, kl_mask, kl_loss_mask = mismatched_rows(
        batch, prompt_len, stream_successors(b, jax.process_count()))
    ids = jnp.concatenate([batch["ids"], kl_ids])
    mask = jnp.concatenate([batch["mask"], kl_mask])
    loss_mask = jnp.concatenate([batch["loss_mask"], kl_loss_mask])
    sums = scoring.response_sums(module, params, ids, mask, loss_mask, prompt_len)[0]
    return sums[:b], sums[b:]

  def loss_fn(params, batch, rng_key, ref):
    del rng_key
    policy, policy_kl = logps(params, batch)
    reference, reference_kl = jax.lax.stop_gradient(logps(ref, batch))
    mask = batch["pair_mask"].reshape(-1) if packed else None
    losses, metrics = objectives.kto_loss(
        policy, reference, policy_kl, reference_kl, batch["desirable"].reshape(-1),
        beta=cfg.beta, desirable_weight=cfg.desirable_weight,
        undesirable_weight=cfg.undesirable_weight, mask=mask, kl_mask=mask)
    n = (jnp.asarray(policy.shape[0], jnp.float32) if mask is None else
         jnp.sum(mask.astype(jnp.float32)))
    return jnp.sum(losses), (n, {k: v * n for k, v in metrics.items()})
  return loss_fn


# ---------------------------------------------------------------------------------------------
# Precomputed reference log-probs
# ---------------------------------------------------------------------------------------------


def _fingerprint(pairs, params, cfg, model_cfg) -> str:
  """Identifies (data, reference params, model config, layout): a cache is reused only when all
  match. Only the first 4096 values of each leaf are read (sliced on device)."""
  h = hashlib.sha256()
  for p in pairs:
    for a in (p.prompt, p.chosen, p.rejected):
      h.update(np.asarray(a, np.int32).tobytes())
      h.update(b"|")
  for leaf in jax.tree.leaves(params):
    h.update(parallel.distributed.gather(jnp.ravel(leaf)[:4096]).tobytes())
  h.update(repr((cfg.shared_prefix, model_cfg)).encode())
  return h.hexdigest()


def cached_reference_logps(path: str, module, ref_params, pairs, tok, mesh, cfg):
  """Reference log-probs of every training pair, from `path` when it was computed for the same
  data and reference, else computed now (one pass) and written atomically."""
  key = _fingerprint(pairs, ref_params, cfg, module.cfg)
  if os.path.exists(path):
    cached = np.load(path)
    if str(cached["fingerprint"]) == key:
      logging.info("reference log-probs: reusing %s", path)
      return cached["chosen"], cached["rejected"]
    logging.warning("%s was computed for other data or another reference; recomputing", path)
  chosen, rejected = scoring.score_pairs(module, ref_params, pairs, tok, mesh, cfg.batch_size,
                                         cfg.shared_prefix)
  if jax.process_index() == 0:
    tmp = path + ".tmp.npz"
    np.savez(tmp, chosen=chosen, rejected=rejected, fingerprint=np.asarray(key))
    os.replace(tmp, path)
  return chosen, rejected


# ---------------------------------------------------------------------------------------------
# Evaluation and the stage
# ---------------------------------------------------------------------------------------------


def make_eval_fn(module, ref_params, eval_pairs, tok, mesh, cfg):
  """Held-out implicit-reward accuracy and margin (β·Δ_w > β·Δ_l), or for reference-free
  losses the accuracy of the policy's average log-probs."""
  score = lambda p: scoring.score_pairs(module, p, eval_pairs, tok, mesh, cfg.batch_size,
                                        cfg.shared_prefix)
  ref = None if cfg.reference == "none" else score(ref_params)
  n_c = np.asarray([len(p.chosen) for p in eval_pairs], np.float32)
  n_r = np.asarray([len(p.rejected) for p in eval_pairs], np.float32)

  def eval_fn(params):
    c, r = score(params)
    if ref is None:  # Reference-free: SimPO's reward, the average log-prob.
      margin = cfg.beta * (c / n_c - r / n_r)
    else:
      margin = cfg.beta * ((c - ref[0]) - (r - ref[1]))
    return {"eval_reward_accuracy": float(np.mean(margin > 0)),
            "eval_reward_margin": float(np.mean(margin))}
  return eval_fn


class _Indexed:
  """Example indices as the data source (DataIterator permutes them); collation looks the
  examples (and their precomputed reference log-probs) up."""

  def __init__(self, n: int):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return i


def _collate_fn(cfg, tok, train_pairs, reference_logps, pack=None):
  """indices -> the step's arrays for the configured loss and layout; `pack` (from
  scoring.pair_packer) packs (prompt, first, second) triples, None = padded.

  Packed KTO puts example i and its KL row (prompt i, completion of succ(i)) in one pair slot,
  with succ the rule padded KTO uses on one process (the next example of the batch, wrapping),
  so the two layouts score the same rows. On several processes each process packs its own
  examples, so succ stays within its share (padded KTO follows the global stream instead);
  either way z₀ averages over mismatched completions."""
  if cfg.loss == "kto":  # Each pair gives a desirable and an undesirable completion.
    unpaired = [data.TokenizedUnpaired(p.prompt, c, good) for p in train_pairs
                for c, good in ((p.chosen, True), (p.rejected, False))]
    if pack is None:
      return len(unpaired), lambda idx: collate_unpaired([unpaired[i] for i in idx], tok)

    def collate_kto(idx):
      examples = [unpaired[i] for i in idx]
      succ = stream_successors(len(examples), 1)
      packed = pack([(e.prompt, e.completion, examples[j].completion)
                     for e, j in zip(examples, succ)], tok.pad_id)
      return {**scoring.packed_pair_arrays(packed),
              "desirable": packed.per_pair([e.desirable for e in examples], np.int32)}
    return len(unpaired), collate_kto

  def collate(idx):
    pairs = [train_pairs[i] for i in idx]
    if pack is None:
      arrays = scoring.collate_pairs(pairs, tok, cfg.shared_prefix)
      place = lambda values: values.astype(np.float32)
    else:
      packed = pack([(p.prompt, p.chosen, p.rejected) for p in pairs], tok.pad_id)
      arrays, place = scoring.packed_pair_arrays(packed), packed.per_pair
    if reference_logps is not None:
      arrays["ref_chosen"] = place(reference_logps[0][idx])
      arrays["ref_rejected"] = place(reference_logps[1][idx])
    return arrays
  return len(train_pairs), collate


def run(config: ml_collections.ConfigDict, workdir: str, init: stage_lib.Init = None, *,
        pairs=None, reference=None) -> stage_lib.StageResult:
  """Trains the policy of `init` with config.dpo.loss.

  pairs: (train, eval) tokenised pairs, by default the task's (config.data.pairs or the review
  world's). reference: params (of the policy's module) for the frozen reference; by default
  the starting policy, as in the papers (e.g. continue from a later checkpoint against the
  SFT reference).
  """
  validate(config)
  cfg = config.dpo
  task, mesh, module, params, dtype = stage_lib.start_policy(config, NAME, init)
  rules = config.sharding
  tok = task.tokenize_config
  train_pairs, eval_pairs = pairs if pairs is not None else (
      task_lib.preference_examples(task, config, "train"),
      task_lib.preference_examples(task, config, "eval"))
  lora = models.lora.config_from(config.get("lora"))
  if reference is not None and (lora is not None or cfg.reference == "none"):
    raise ValueError("a separate reference needs config.dpo.reference 'model' or "
                     "'precomputed' and no LoRA (with config.lora.rank > 0 the reference is "
                     "the frozen base)")
  # The reference: a copy, since the policy's buffers are donated to the first step.
  ref_params = (None if cfg.reference == "none" else params if lora is not None else
                jax.tree.map(jnp.copy, params if reference is None else reference))

  tx, schedule = optim.make_optimizer(cfg.optim, cfg.steps)
  trainable = (jax.tree.map(jnp.copy, params) if lora is None else models.lora.init_sharded(
      module, params, lora, rng.key(config.seed, "lora_preference"), mesh, rules))
  state = state_lib.state_from_params(trainable, tx, rng.key(config.seed, "preference"), mesh,
                                      rules)
  in_step_reference = cfg.reference == "model" and lora is None
  if in_step_reference:
    state["ref"] = ref_params

  reference_logps = None
  if cfg.reference == "precomputed":
    os.makedirs(workdir, exist_ok=True)
    reference_logps = cached_reference_logps(os.path.join(workdir, "ref_logps.npz"), module,
                                             ref_params, train_pairs, tok, mesh, cfg)
  pack = None
  if cfg.packing.rows:
    pack = scoring.pair_packer(config, NAME, cfg.shared_prefix)
    scoring.check_pairs_fit(config, NAME, cfg.shared_prefix, train_pairs,
                            unpaired=cfg.loss == "kto")
  n_examples, collate = _collate_fn(cfg, tok, train_pairs, reference_logps, pack)
  # Each process collates its share of the global batch from its slice of the stream.
  batcher = data.PaddedBatcher(
      parallel.distributed.local_batch_size(cfg.batch_size, "config.dpo.batch_size"),
      lambda idx: collate(np.asarray(idx)))

  def make_iterator(position):
    return data.DataIterator(_Indexed(n_examples), batcher, seed=config.seed,
                             position=position)

  loss_fn = (kto_loss_fn(module, cfg, tok.max_prompt_len) if cfg.loss == "kto" else
             preference_loss_fn(module, cfg, tok.max_prompt_len))
  evaluate = make_eval_fn(module, ref_params, eval_pairs, tok, mesh, cfg)
  if lora is None:
    step_fn = state_lib.jit_step(step_lib.make_train_step(
        loss_fn, tx, accum_steps=cfg.optim.accum_steps,
        state_extra=("ref",) if in_step_reference else (),
        post_update=(tr_dpo_sync(cfg.ref_sync_every, cfg.ref_sync_alpha)
                     if cfg.ref_sync_every else None)), state)
    eval_fn, policy_of = evaluate, lambda trained: trained
  else:
    loss_fn = models.lora.lora_loss_fn(loss_fn, lora.scale,
                                       base_is_reference=cfg.reference == "model")
    step_fn = models.lora.jit_frozen_step(step_lib.make_train_step(
        loss_fn, tx, accum_steps=cfg.optim.accum_steps, state_extra=("base",)),
        "base", state, params)
    policy_of = lambda adapters: models.merge_lora(params, adapters, lora.scale)
    eval_fn = lambda adapters: evaluate(policy_of(adapters))
  with parallel.mesh_context(mesh, rules):
    state = loop_lib.train_loop(
        workdir=workdir, state=state, step_fn=step_fn, make_iterator=make_iterator,
        to_device=lambda b: parallel.shard_batch(b, mesh),
        loop=stage_lib.loop_config(cfg, config.run), extra=stage_lib.checkpoint_extra(config, module),
        eval_fn=eval_fn, desc=f"{NAME}[{cfg.loss}]", schedule=schedule,
        count_tokens=_token_count)
    results = eval_fn(state["params"])
  logging.info("dpo[%s]: %s", cfg.loss, results)
  policy = policy_of(state["params"])  # Plain policy params onwards (sampling, PPO, export).
  hf_dir = stage_lib.export(config, workdir, module, policy, task, dtype)
  return stage_lib.StageResult(NAME, module, policy, task, mesh, results, workdir, hf_dir,
                               dtype)


def _token_count(batch) -> int:
  """Real tokens of a host batch in any of the layouts (chosen + rejected, or KTO rows)."""
  masks = [v for k, v in batch.items() if k in ("mask", "chosen_mask", "rejected_mask")]
  return int(sum(np.sum(m) for m in masks))
