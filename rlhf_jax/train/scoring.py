"""Scoring shared by the stages: summed response log-probs of preference pairs (both row
layouts) and reward-model scores of an ensemble, each jitted once and run over a dataset with
the one evaluation batch loop (`parallel.map_batches`).

Pair layouts (`collate_pairs`):
  unshared  chosen and rejected as separate [B, P+R] rows, [prompt (left-padded) | response];
  shared    one [B, P+2R] row per pair, [prompt | chosen | rejected]: both responses attend to
            the single copy of the prompt and not to each other (segment ids with a parent
            segment, explicit positions), so the prompt is encoded once per pair.
  packed    several whole pairs per fixed [R, T] row (data.pack_pair_rows, config
            `<stage>.packing`), unshared or prefix-shared: no row is mostly padding, so the
            same pairs cost fewer token slots. Losses and gradients equal the padded layout's.
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from rlhf_jax import data, objectives, parallel
from rlhf_jax.train import stage as stage_lib

# ---------------------------------------------------------------------------------------------
# Pair batches
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


def collate_pairs(pairs, tok: data.TokenizeConfig, shared_prefix: bool) -> dict[str, np.ndarray]:
  """Fixed-width arrays of `pairs` in either layout (widths from `tok`, not from the pairs)."""
  batch = data.pad_preferences(pairs, tok.max_prompt_len, tok.max_response_len, tok.pad_id)
  return shared_prefix_rows(batch, tok.max_prompt_len) if shared_prefix else pair_rows(batch)


# ---------------------------------------------------------------------------------------------
# Packed pair rows: config, packing, arrays
# ---------------------------------------------------------------------------------------------


def packing_config(**extra) -> ml_collections.ConfigDict:
  """`<stage>.packing`: rows = 0 keeps the padded layout (the default); rows > 0 packs each
  batch's `batch_size` pairs into `rows` global rows of `length` tokens (a fixed number of
  pairs per step, so steps, schedules and resume mean what they do padded). `extra`: the
  stage's own keys (the DPO stage's loss_tokens, the reward stage's shared_prefix)."""
  return ml_collections.ConfigDict(dict(rows=0, length=0, **extra))


def check_packing(config, section: str) -> None:
  """config.<section>.packing: sizes that can run; rows split like a batch (processes, batch
  devices, micro-batches)."""
  key = f"{section}.packing"
  cfg = config[section].packing
  loss_tokens = cfg.get("loss_tokens", 0)
  stage_lib.check_at_least(config, 0, f"{key}.rows", f"{key}.length",
                           *((f"{key}.loss_tokens",) if "loss_tokens" in cfg else ()))
  if not cfg.rows:
    if cfg.length or loss_tokens:
      raise ValueError(f"config.{key} sets sizes but config.{key}.rows=0 keeps the padded "
                       f"layout; set config.{key}.rows > 0 to pack")
    return
  stage_lib.check_positive(config, f"{key}.length")
  if loss_tokens > cfg.length:
    raise ValueError(f"config.{key}.loss_tokens={cfg.loss_tokens} exceeds "
                     f"config.{key}.length={cfg.length}")
  stage_lib.check_batch(config, f"{key}.rows", accum_key=f"{section}.optim.accum_steps")


def pair_packer(config, section: str, shared_prefix: bool):
  """triples -> data.PackedPairRows of this process's share of a batch (its rows and pairs),
  as config.<section>.packing says. A batch that does not fit names the keys to raise."""
  cfg = config[section]
  rows = parallel.distributed.local_batch_size(cfg.packing.rows,
                                               f"config.{section}.packing.rows")
  pairs = parallel.distributed.local_batch_size(cfg.batch_size, f"config.{section}.batch_size")
  # A stage without an LM head (no loss_tokens key) packs no loss-token entries.
  loss_tokens = None
  if "loss_tokens" in cfg.packing:
    loss_tokens = cfg.packing.loss_tokens or cfg.packing.length
  sizes_keys = "rows/length" + ("/loss_tokens" if loss_tokens is not None else "")
  sizes = dict(rows=rows, length=cfg.packing.length, loss_tokens=loss_tokens,
               # Any number of the batch's pairs may share a row: the slot arrays stay small.
               pairs_per_row=pairs, shared_prefix=shared_prefix)

  def pack(triples, pad_id: int) -> data.PackedPairRows:
    try:
      return data.pack_pair_rows(triples, pad_id=pad_id, **sizes)
    except ValueError as e:
      raise ValueError(f"config.{section}.packing: {e}; raise config.{section}.packing."
                       f"{sizes_keys} or lower config.{section}.batch_size") from None
  return pack


def check_pairs_fit(config, section: str, shared_prefix: bool, pairs,
                    unpaired: bool = False) -> None:
  """Every pair fits one packed row by itself: checked over the whole training set before the
  first step, not when the stream happens to reach a long pair. unpaired (KTO): a row holds
  an example's prompt and completion and another example's completion, bounded here by the
  longest completion of the set."""
  packing = config[section].packing
  if unpaired:
    longest = max(max(len(p.chosen), len(p.rejected)) for p in pairs)
    footprints = [data.pair_footprint((p.prompt, c, range(longest)), shared_prefix)
                  for p in pairs for c in (p.chosen, p.rejected)]
  else:
    footprints = [data.pair_footprint((p.prompt, p.chosen, p.rejected), shared_prefix)
                  for p in pairs]
  tokens, loss = (max(f[i] for f in footprints) for i in range(2))
  if tokens > packing.length:
    raise ValueError(f"config.{section}.packing.length={packing.length}: a training pair "
                     f"needs up to {tokens} tokens in one row")
  loss_tokens = packing.get("loss_tokens", 0)
  if loss_tokens and loss > loss_tokens:
    raise ValueError(f"config.{section}.packing.loss_tokens={loss_tokens}: a training pair "
                     f"has up to {loss} response tokens")


def packed_pair_arrays(packed: data.PackedPairRows) -> dict[str, np.ndarray]:
  """The step's arrays of packed pair rows, all [R, ...] (pair slots [R, K]); the loss-token
  entries only when packed with them."""
  out = {"ids": packed.input_ids, "mask": packed.attention_mask,
         "segment_ids": packed.segment_ids, "positions": packed.positions,
         "last_column": packed.last_column, "pair_mask": packed.pair_mask}
  if packed.predictor.shape[1]:
    out.update(predictor=packed.predictor, targets=packed.targets,
               target_slot=packed.target_slot)
  if packed.parent_segment_ids is not None:
    out["parent_segment_ids"] = packed.parent_segment_ids
  return out


# ---------------------------------------------------------------------------------------------
# Summed response log-probs
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
  return _masked_sums(objectives.token_logprobs(logits[:, :-1], ids[:, prompt_len:]),
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
  next_lp = objectives.token_logprobs(logits[:, :-1], ids[:, prompt_len:])
  s_c, n_c = _masked_sums(next_lp, batch["chosen_loss_mask"][:, prompt_len - 1:])
  # The first rejected token follows the prompt, not the chosen response: predict it from the
  # last prompt column (prompt_len - 1, logits column 0) instead of the column before it.
  first = prompt_len + (ids.shape[1] - prompt_len) // 2
  first_lp = objectives.token_logprobs(logits[:, 0], ids[:, first])
  s_r, n_r = _masked_sums(next_lp.at[:, first - prompt_len].set(first_lp),
                          batch["rejected_loss_mask"][:, prompt_len - 1:])
  return s_c, s_r, n_c, n_r


def packed_pair_logps(module, params, batch):
  """(first sums, second sums, first tokens, second tokens), each [R·K] float32 (pair slot k
  of row r at r·K + k; empty slots 0): summed response log-probs of one forward pass over
  packed pair rows (`packed_pair_arrays`).

  The LM head runs only at the predictor column of each loss token (`head_columns`), so no
  prompt column pays for it; the per-token log-probs are then summed per sequence slot
  within each row (a vmapped segment_sum: row-local, so rows shard and micro-batch freely).
  """
  logits = module.apply({"params": params}, batch["ids"], batch["mask"], batch["segment_ids"],
                        positions=batch["positions"],
                        parent_segment_ids=batch.get("parent_segment_ids"),
                        head_columns=batch["predictor"])
  slot = batch["target_slot"]
  real = slot >= 0
  logp = jnp.where(real, objectives.token_logprobs(logits, batch["targets"]), 0.0)
  slots = batch["last_column"].shape[1]
  per_slot = jax.vmap(lambda v, s: jax.ops.segment_sum(v, s, slots))
  sums, counts = per_slot(logp, slot), per_slot(real.astype(jnp.float32), slot)
  return (sums[:, 0::2].reshape(-1), sums[:, 1::2].reshape(-1), counts[:, 0::2].reshape(-1),
          counts[:, 1::2].reshape(-1))


@functools.lru_cache(maxsize=None)
def _jitted_pair_logps(module, prompt_len: int, shared_prefix: bool):
  """One jitted scorer per (module, layout): evaluation reuses it instead of retracing."""
  return jax.jit(lambda p, b: pair_logps(module, p, b, prompt_len=prompt_len,
                                         shared_prefix=shared_prefix)[:2])


def score_pairs(module, params, pairs, tok: data.TokenizeConfig, mesh, batch_size: int,
                shared_prefix: bool) -> tuple[np.ndarray, np.ndarray]:
  """Summed response log-probs (chosen [N], rejected [N]) of every pair.

  Multi-host: every process holds all pairs, feeds the rows its devices hold and gets every
  score back (so all processes agree on, e.g., the precomputed reference)."""
  fn = _jitted_pair_logps(module, tok.max_prompt_len, shared_prefix)
  return parallel.map_batches(lambda batch: fn(params, batch),
                              collate_pairs(pairs, tok, shared_prefix), mesh, batch_size)


# ---------------------------------------------------------------------------------------------
# Reward-model ensembles
# ---------------------------------------------------------------------------------------------


def ensemble_rewards(module, params, ids, mask, **layout) -> jax.Array:
  """[k, B] rewards of every member (params stacked [k, ...]) for the sequences [B, T]
  (with `layout`, e.g. packed rows read at head_columns [R, K]: [k, R, K])."""
  return jax.vmap(lambda p: module.apply({"params": p}, ids, mask, **layout))(params)


@functools.lru_cache(maxsize=None)
def _jitted_ensemble_rewards(module):
  """One jitted scorer per module: evaluations reuse it instead of retracing."""
  return jax.jit(lambda p, i, m: ensemble_rewards(module, p, i, m))


def score_sequences(module, params, ids: np.ndarray, mask: np.ndarray, mesh,
                    batch_size: int) -> np.ndarray:
  """[k, N] member rewards for N padded sequences (filler rows are empty and dropped)."""
  fn = _jitted_ensemble_rewards(module)
  return parallel.map_batches(lambda batch: fn(params, *batch), (ids, mask), mesh, batch_size,
                              fill="zeros", axis=1)
