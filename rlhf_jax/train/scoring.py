"""Scoring shared by the stages: summed response log-probs of preference pairs (both row
layouts) and reward-model scores of an ensemble, each jitted once and run over a dataset with
the one evaluation batch loop (`parallel.map_batches`).

Pair layouts (`collate_pairs`):
  unshared  chosen and rejected as separate [B, P+R] rows, [prompt (left-padded) | response];
  shared    one [B, P+2R] row per pair, [prompt | chosen | rejected]: both responses attend to
            the single copy of the prompt and not to each other (segment ids with a parent
            segment, explicit positions), so the prompt is encoded once per pair.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import data, objectives, parallel

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


def ensemble_rewards(module, params, ids, mask) -> jax.Array:
  """[k, B] rewards of every member (params stacked [k, ...]) for the sequences [B, T]."""
  return jax.vmap(lambda p: module.apply({"params": p}, ids, mask))(params)


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
