"""Direct preference optimisation stage: DPO and its family (objectives.PREFERENCE_LOSSES).

Reference log-probs come from one of (config.dpo.reference):
  "model"       a frozen copy of the initial policy, kept in the train state as "ref" (so exact
                resume and TR-DPO's reference sync need nothing else), scored inside the step;
  "precomputed" scored once over the training pairs before training, cached in
                workdir/ref_logps.npz and reused on resume when its fingerprint matches;
  "none"        reference-free losses (simpo, orpo).
Prefix sharing (config.dpo.shared_prefix): each pair is one row [prompt | chosen | rejected];
both responses attend to the single copy of the prompt and not to each other (segment ids with
a parent segment, explicit positions), so the prompt is encoded once per pair.
"""
import functools
import hashlib
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from rlhf_jax import configs, data, models, objectives, parallel
from rlhf_jax.train import loop as loop_lib
from rlhf_jax.train import optim, state as state_lib, step as step_lib, task as task_lib
from rlhf_jax.train.sft import loop_config

REFERENCE_MODES = ("model", "precomputed", "none")
# Config keys of config.dpo that each loss takes as keyword hyperparameters.
LOSS_HPARAMS = {"sigmoid": ("label_smoothing",), "robust": ("label_smoothing",),
                "simpo": ("gamma",), "ipo": ("length_normalized",)}


# ---------------------------------------------------------------------------------------------
# Batches: two padded rows per pair, or one prefix-shared row
# ---------------------------------------------------------------------------------------------

def pair_rows(batch: data.PreferenceBatch) -> dict[str, np.ndarray]:
  """Unshared layout: chosen and rejected as separate [B, P+R] rows, pair axis first."""
  return {"chosen_ids": batch.chosen.input_ids, "chosen_mask": batch.chosen.attention_mask,
          "chosen_loss_mask": batch.chosen.loss_mask, "rejected_ids": batch.rejected.input_ids,
          "rejected_mask": batch.rejected.attention_mask,
          "rejected_loss_mask": batch.rejected.loss_mask}


def shared_prefix_rows(batch: data.PreferenceBatch, prompt_len: int) -> dict[str, np.ndarray]:
  """Prefix-shared layout: one [B, P+2R] row per pair, [prompt (left-padded) | chosen |
  rejected], segments 1/2/3 with parents 0/1/1, positions continuing the prompt in both
  responses. `prompt_len` is P of the padded batch (responses start at column P)."""
  c, r = batch.chosen, batch.rejected
  width = c.input_ids.shape[1]
  mask = np.concatenate([c.attention_mask, r.attention_mask[:, prompt_len:]], 1)
  seg = np.zeros_like(mask)
  seg[:, :prompt_len], seg[:, prompt_len:width], seg[:, width:] = 1, 2, 3
  seg *= mask
  zeros_r = np.zeros_like(r.loss_mask[:, prompt_len:])
  return {"ids": np.concatenate([c.input_ids, r.input_ids[:, prompt_len:]], 1),
          "mask": mask, "segment_ids": seg,
          "parent_segment_ids": (seg >= 2).astype(np.int32),
          "positions": np.concatenate([c.positions, r.positions[:, prompt_len:]], 1),
          "chosen_loss_mask": np.concatenate([c.loss_mask, zeros_r], 1),
          "rejected_loss_mask": np.concatenate([np.zeros_like(c.loss_mask),
                                                r.loss_mask[:, prompt_len:]], 1)}


# ---------------------------------------------------------------------------------------------
# Sequence log-probs
# ---------------------------------------------------------------------------------------------

def _masked_sums(logp, loss_mask):
  w = loss_mask[:, 1:].astype(jnp.float32)
  return jnp.sum(logp * w, axis=-1), jnp.sum(w, axis=-1)


def response_sums(module, params, ids, mask, loss_mask, prompt_len: int):
  """(summed log-probs [B], token counts [B]) of the response tokens of [prompt (left-padded to
  prompt_len) | response] rows. Prompt tokens are never in a loss mask, so the LM head runs on
  columns prompt_len - 1 onwards only (`logits_to_keep`): the prompt's logits are never built."""
  logits = module.apply({"params": params}, ids, mask,
                        logits_to_keep=ids.shape[1] - prompt_len + 1)
  return _masked_sums(models.token_logprobs(logits[:, :-1], ids[:, prompt_len:]),
                      loss_mask[:, prompt_len - 1:])


def pair_logps(module, params, batch, *, prompt_len: int, shared_prefix: bool):
  """(chosen sum, rejected sum, chosen tokens, rejected tokens), each [B] float32: summed
  response log-probs of one forward pass over the pair batch (either layout).

  Responses start at column `prompt_len` in both layouts, so both read logits from column
  prompt_len - 1 onwards only (see `response_sums`).
  """
  if prompt_len < 1:
    raise ValueError(f"prompt_len={prompt_len}; pair rows need at least one prompt column")
  if not shared_prefix:
    ids = jnp.concatenate([batch["chosen_ids"], batch["rejected_ids"]])
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
    loss_mask = jnp.concatenate([batch["chosen_loss_mask"], batch["rejected_loss_mask"]])
    sums, counts = response_sums(module, params, ids, mask, loss_mask, prompt_len)
    (s_c, s_r), (n_c, n_r) = jnp.split(sums, 2), jnp.split(counts, 2)
    return s_c, s_r, n_c, n_r
  ids = batch["ids"]
  logits = module.apply({"params": params}, ids, batch["mask"], batch["segment_ids"],
                        positions=batch["positions"],
                        parent_segment_ids=batch["parent_segment_ids"],
                        logits_to_keep=ids.shape[1] - prompt_len + 1)
  # Column j of logits / next_lp is column prompt_len - 1 + j of the row.
  next_lp = models.token_logprobs(logits[:, :-1], ids[:, prompt_len:])
  s_c, n_c = _masked_sums(next_lp, batch["chosen_loss_mask"][:, prompt_len - 1:])
  # The first rejected token follows the prompt, not the chosen response: predict it from the
  # last prompt column (prompt_len - 1, logits column 0) instead of the column before it.
  first = prompt_len + (ids.shape[1] - prompt_len) // 2
  first_lp = models.token_logprobs(logits[:, 0], ids[:, first])
  s_r, n_r = _masked_sums(next_lp.at[:, first - prompt_len].set(first_lp),
                          batch["rejected_loss_mask"][:, prompt_len - 1:])
  return s_c, s_r, n_c, n_r


# ---------------------------------------------------------------------------------------------
# Loss and step
# ---------------------------------------------------------------------------------------------

def preference_loss_fn(module, cfg: ml_collections.ConfigDict, prompt_len: int,
                       beta_in_state: bool = False):
  """loss_fn for step.make_train_step: the summed per-pair losses; count = pairs.

  Its extra state entries are the reference params ("ref", for config.dpo.reference = "model")
  and, with `beta_in_state`, β as the last one (a traced scalar instead of config.dpo.beta, so
  a vmap over stacked states sweeps it: train.sweep).
  """
  hparams = {k: cfg[k] for k in LOSS_HPARAMS.get(cfg.loss, ())}
  logps_of = lambda p, b: pair_logps(module, p, b, prompt_len=prompt_len,
                                     shared_prefix=cfg.shared_prefix)

  def loss_fn(params, batch, rng, *extra):
    del rng
    ref, beta = (extra[:-1], extra[-1]) if beta_in_state else (extra, cfg.beta)
    s_c, s_r, n_c, n_r = logps_of(params, batch)
    if cfg.reference == "model":
      ref_c, ref_r, _, _ = jax.lax.stop_gradient(logps_of(ref[0], batch))
    elif cfg.reference == "precomputed":
      ref_c, ref_r = batch["ref_chosen"], batch["ref_rejected"]
    else:
      ref_c = ref_r = None
    logps = objectives.PreferenceLogps(policy_chosen=s_c, policy_rejected=s_r, ref_chosen=ref_c,
                                       ref_rejected=ref_r, chosen_tokens=n_c,
                                       rejected_tokens=n_r)
    losses, metrics = objectives.preference_loss(cfg.loss, logps, beta=beta,
                                                 nll_weight=cfg.nll_weight, **hparams)
    pairs = jnp.asarray(losses.shape[0], jnp.float32)
    # Batch means -> sums, so that accumulation renormalises by the global pair count.
    return jnp.sum(losses), (pairs, {k: v * pairs for k, v in metrics.items()})
  return loss_fn


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
  the frozen "ref" state entry (KTO needs reference log-probs of the mismatched rows too)."""
  def logps(params, ids, mask, loss_mask):
    return response_sums(module, params, ids, mask, loss_mask, prompt_len)[0]

  def loss_fn(params, batch, rng, ref):
    del rng
    b = batch["ids"].shape[0]
    kl_ids, kl_mask, kl_loss_mask = mismatched_rows(
        batch, prompt_len, stream_successors(b, jax.process_count()))
    ids = jnp.concatenate([batch["ids"], kl_ids])
    mask = jnp.concatenate([batch["mask"], kl_mask])
    loss_mask = jnp.concatenate([batch["loss_mask"], kl_loss_mask])
    policy = logps(params, ids, mask, loss_mask)
    reference = jax.lax.stop_gradient(logps(ref, ids, mask, loss_mask))
    losses, metrics = objectives.kto_loss(
        policy[:b], reference[:b], policy[b:], reference[b:], batch["desirable"],
        beta=cfg.beta, desirable_weight=cfg.desirable_weight,
        undesirable_weight=cfg.undesirable_weight)
    n = jnp.asarray(b, jnp.float32)
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


def collate_pairs(pairs, tok: data.TokenizeConfig, shared_prefix: bool):
  batch = data.pad_preferences(pairs, tok.max_prompt_len, tok.max_response_len, tok.pad_id)
  return shared_prefix_rows(batch, tok.max_prompt_len) if shared_prefix else pair_rows(batch)


@functools.lru_cache(maxsize=None)
def _jitted_pair_logps(module, prompt_len: int, shared_prefix: bool):
  """One jitted scorer per (module, layout): evaluation reuses it instead of retracing."""
  return jax.jit(lambda p, b: pair_logps(module, p, b, prompt_len=prompt_len,
                                         shared_prefix=shared_prefix)[:2])


def score_pairs(module, params, pairs, tok, mesh, batch_size: int, shared_prefix: bool):
  """Summed response log-probs (chosen [N], rejected [N]) of every pair, in batches.

  Multi-host: every process holds all pairs, feeds the rows its devices hold and gets every
  score back (so all processes agree on, e.g., the precomputed reference)."""
  batch_size = max(batch_size // mesh.size, 1) * mesh.size
  fn = _jitted_pair_logps(module, tok.max_prompt_len, shared_prefix)
  chosen, rejected = [], []
  for start in range(0, len(pairs), batch_size):
    chunk = pairs[start:start + batch_size]
    padded = chunk + [chunk[-1]] * (batch_size - len(chunk))  # Fixed shape: one compile.
    c, r = parallel.distributed.gather(fn(params, parallel.distributed.shard_global(
        collate_pairs(padded, tok, shared_prefix), mesh)))
    chosen.append(c[:len(chunk)])
    rejected.append(r[:len(chunk)])
  return np.concatenate(chosen), np.concatenate(rejected)


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
  chosen, rejected = score_pairs(module, ref_params, pairs, tok, mesh, cfg.batch_size,
                                 cfg.shared_prefix)
  if jax.process_index() == 0:
    tmp = path + ".tmp.npz"
    np.savez(tmp, chosen=chosen, rejected=rejected, fingerprint=np.asarray(key))
    os.replace(tmp, path)
  return chosen, rejected


class _IndexedPairs:
  """The training pairs with their precomputed reference log-probs, for DataIterator."""

  def __init__(self, pairs, ref_chosen, ref_rejected):
    self.pairs, self.ref_chosen, self.ref_rejected = pairs, ref_chosen, ref_rejected

  def __len__(self):
    return len(self.pairs)

  def __getitem__(self, i):
    return i


# ---------------------------------------------------------------------------------------------
# Evaluation and the stage
# ---------------------------------------------------------------------------------------------

def make_eval_fn(module, ref_params, eval_pairs, tok, mesh, cfg):
  """Held-out implicit-reward accuracy and margin (β·Δ_w > β·Δ_l), or for reference-free
  losses the accuracy of the policy's average log-probs."""
  ref = (None if cfg.reference == "none" else
         score_pairs(module, ref_params, eval_pairs, tok, mesh, cfg.batch_size,
                     cfg.shared_prefix))
  n_c = np.asarray([len(p.chosen) for p in eval_pairs], np.float32)
  n_r = np.asarray([len(p.rejected) for p in eval_pairs], np.float32)

  def eval_fn(params):
    c, r = score_pairs(module, params, eval_pairs, tok, mesh, cfg.batch_size,
                       cfg.shared_prefix)
    if ref is None:  # Reference-free: SimPO's reward, the average log-prob.
      margin = cfg.beta * (c / n_c - r / n_r)
    else:
      margin = cfg.beta * ((c - ref[0]) - (r - ref[1]))
    return {"eval_reward_accuracy": float(np.mean(margin > 0)),
            "eval_reward_margin": float(np.mean(margin))}
  return eval_fn


def run_preference(config: ml_collections.ConfigDict, workdir: str, *, task=None,
                   policy=None, train_pairs=None, eval_pairs=None, reference=None):
  """Trains the policy with config.dpo.loss; returns (module, params, results).

  policy: (module, params) to start from (e.g. the SFT stage's); by default a local HF
  directory (config.dpo.init_hf_dir) or, failing that, a fresh init of config.model.
  reference: params (of the policy's module) for the frozen reference; by default the starting
  policy, as in the papers (e.g. continue from a later checkpoint against the SFT reference).
  """
  cfg = config.dpo
  if cfg.reference not in REFERENCE_MODES:
    raise ValueError(f"config.dpo.reference={cfg.reference!r}; expected one of "
                     f"{REFERENCE_MODES}")
  is_kto = cfg.loss == "kto"
  if cfg.loss not in objectives.PREFERENCE_LOSSES and not is_kto:
    raise ValueError(f"config.dpo.loss={cfg.loss!r}; expected 'kto' or one of "
                     f"{sorted(objectives.PREFERENCE_LOSSES)}")
  if is_kto and cfg.optim.accum_steps > 1:
    raise ValueError("config.dpo.loss='kto' with accum_steps > 1 would estimate the batch KL "
                     "z0 per micro-batch; use accum_steps=1 and a larger batch")
  if is_kto and (cfg.reference != "model" or cfg.shared_prefix):
    raise ValueError("config.dpo.loss='kto' needs config.dpo.reference='model' and "
                     "shared_prefix=False (the KL rows need the reference in the step)")
  if cfg.loss in ("simpo", "orpo") and cfg.reference != "none":
    raise ValueError(f"config.dpo.loss={cfg.loss!r} is reference-free: set "
                     "config.dpo.reference='none'")
  task = task or task_lib.build_task(config.task)
  mesh = parallel.make_mesh(config.mesh.to_dict())
  rules = config.sharding
  tok = task.tokenize_config
  if policy is None:
    if cfg.init_hf_dir:
      policy = models.load_hf(cfg.init_hf_dir, mesh=mesh, rules=rules)
    else:
      module = models.build_model(configs.model_config(config.model, task.vocab_size))
      sample = jnp.ones((1, 8), jnp.int32)
      policy = (module, parallel.init_params(module, jax.random.key(config.seed), sample,
                                             mesh=mesh, rules=rules))
  module, params = policy
  train_pairs = train_pairs if train_pairs is not None else task_lib.preference_examples(
      task, config.task, "train")
  eval_pairs = eval_pairs if eval_pairs is not None else task_lib.preference_examples(
      task, config.task, "eval")
  # LoRA (config.lora.rank > 0): the state's params are the adapters; the policy's own params
  # are the frozen base, an undonated input of the step and also the reference (no copy).
  lora_cfg = models.lora.config_from(config.get("lora"))
  if lora_cfg is not None and cfg.ref_sync_every:
    raise ValueError("config.dpo.ref_sync_every (TR-DPO) moves the reference, but with "
                     "config.lora.rank > 0 the reference is the frozen base; set one to 0")
  if reference is not None and (lora_cfg is not None or cfg.reference == "none"):
    raise ValueError("run_preference(reference=...) needs config.dpo.reference 'model' or "
                     "'precomputed' and no LoRA (with config.lora.rank > 0 the reference is "
                     "the frozen base)")
  # The reference: a copy, since the policy's buffers are donated to the first step.
  ref_params = (None if cfg.reference == "none" else params if lora_cfg is not None else
                jax.tree.map(jnp.copy, params if reference is None else reference))

  tx, _ = optim.make_optimizer(cfg.optim, cfg.steps)
  trainable = (jax.tree.map(jnp.copy, params) if lora_cfg is None else models.lora.init_sharded(
      module, params, lora_cfg, jax.random.key(config.seed + 7), mesh, rules))
  state = state_lib.state_from_params(trainable, tx, jax.random.key(config.seed + 3), mesh,
                                      rules)
  state_extra, post_update = (), None
  if cfg.reference == "model" and lora_cfg is None:
    state["ref"] = ref_params
    state_extra = ("ref",)
    if cfg.ref_sync_every:
      post_update = tr_dpo_sync(cfg.ref_sync_every, cfg.ref_sync_alpha)
  elif cfg.ref_sync_every:
    raise ValueError("config.dpo.ref_sync_every (TR-DPO) needs config.dpo.reference='model'")

  if cfg.reference == "precomputed":
    os.makedirs(workdir, exist_ok=True)
    ref_c, ref_r = cached_reference_logps(os.path.join(workdir, "ref_logps.npz"), module,
                                          ref_params, train_pairs, tok, mesh, cfg)
  source = _IndexedPairs(train_pairs, *((ref_c, ref_r) if cfg.reference == "precomputed"
                                        else (None, None)))

  if is_kto:  # Each pair gives a desirable and an undesirable completion (unpaired data).
    unpaired = [data.TokenizedUnpaired(p.prompt, c, good) for p in train_pairs
                for c, good in ((p.chosen, True), (p.rejected, False))]
    source = _IndexedPairs(unpaired, None, None)

  def collate(indices):
    if is_kto:
      return collate_unpaired([unpaired[i] for i in indices], tok)
    arrays = collate_pairs([train_pairs[i] for i in indices], tok, cfg.shared_prefix)
    if cfg.reference == "precomputed":
      arrays["ref_chosen"] = source.ref_chosen[indices].astype(np.float32)
      arrays["ref_rejected"] = source.ref_rejected[indices].astype(np.float32)
    return arrays

  # Each process collates its share of the global batch from its slice of the stream.
  batcher = data.PaddedBatcher(
      parallel.distributed.local_batch_size(cfg.batch_size, "config.dpo.batch_size"),
      lambda idx: collate(np.asarray(idx)))

  def make_iterator(position):
    return data.DataIterator(source, batcher, seed=config.seed, position=position)

  loss_fn = (kto_loss_fn(module, cfg, tok.max_prompt_len) if is_kto else
             preference_loss_fn(module, cfg, tok.max_prompt_len))
  if lora_cfg is None:
    step_fn = state_lib.jit_step(step_lib.make_train_step(
        loss_fn, tx,
        accum_steps=cfg.optim.accum_steps, state_extra=state_extra, post_update=post_update),
        state)
    eval_fn = make_eval_fn(module, ref_params, eval_pairs, tok, mesh, cfg)
  else:
    loss_fn = models.lora.lora_loss_fn(loss_fn, lora_cfg.scale,
                                       base_is_reference=cfg.reference == "model")
    step_fn = models.lora.jit_frozen_step(step_lib.make_train_step(
        loss_fn, tx, accum_steps=cfg.optim.accum_steps, state_extra=("base",)),
        "base", state, params)
    eval_merged = make_eval_fn(module, ref_params, eval_pairs, tok, mesh, cfg)
    eval_fn = lambda adapters: eval_merged(models.merge_lora(params, adapters, lora_cfg.scale))
  with parallel.mesh_context(mesh, rules):
    state = loop_lib.train_loop(
        workdir=workdir, state=state, step_fn=step_fn, make_iterator=make_iterator,
        to_device=lambda b: parallel.shard_batch(b, mesh), loop=loop_config(cfg, config.run),
        extra={"config": config.to_dict()}, eval_fn=eval_fn, desc=f"dpo[{cfg.loss}]")
    results = eval_fn(state["params"])
  logging.info("dpo[%s]: %s", cfg.loss, results)
  if lora_cfg is not None:  # Plain policy params onwards (sampling, PPO, save_hf).
    return module, models.merge_lora(params, state["params"], lora_cfg.scale), results
  return module, state["params"], results


def default_dpo_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      loss="sigmoid", beta=0.1, label_smoothing=0.0, gamma=0.5, length_normalized=True,
      nll_weight=0.0, desirable_weight=1.0, undesirable_weight=1.0, reference="model",
      shared_prefix=False, ref_sync_every=0,
      ref_sync_alpha=1.0, init_hf_dir="", steps=200, batch_size=16, eval_every=100,
      optim=optim.default_optim_config()))


def run_pipeline(config: ml_collections.ConfigDict, workdir: str):
  """Stage "dpo": the SFT stage (resumable, workdir/sft) unless config.dpo.init_hf_dir names a
  local HF policy, then preference optimisation from it (workdir/dpo)."""
  from rlhf_jax.train import sft as sft_lib
  task = task_lib.build_task(config.task)
  policy = None
  if not config.dpo.init_hf_dir:
    module, params, task, _, _ = sft_lib.run_sft(config, os.path.join(workdir, "sft"))
    policy = (module, params)
  return run_preference(config, os.path.join(workdir, "dpo"), task=task, policy=policy)
