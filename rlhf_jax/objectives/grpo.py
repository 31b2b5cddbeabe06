"""Critic-free sequence-level advantages from groups of completions of the same prompt.

Rewards are [B] with B = num_groups × group_size laid out group-major: rows
[g·k, (g + 1)·k) are the k = group_size completions of prompt g. Advantages are [B] float32,
one per completion; `ppo.policy_loss` broadcasts them over the completion's tokens.

  GRPO (Shao et al. 2024, "DeepSeekMath", arXiv:2402.03300, §4.1.2, outcome supervision):
      A_i = (r_i − mean_g(r)) / (std_g(r) + eps)
  Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv:2503.20783, §3.1)
  drops the std (it up-weights prompts that are too easy or too hard): A_i = r_i − mean_g(r).
  RLOO (Ahmadian et al. 2024, "Back to Basics", arXiv:2402.14740, eq. 6; Kool et al. 2019):
      A_i = r_i − 1/(k − 1) Σ_{j≠i} r_j  = k/(k − 1) · (r_i − mean_g(r))
  Overlong filtering (DAPO, Yu et al. 2025, arXiv:2503.14476, §3.4): completions cut off by
  the length limit (no EOS) get zero loss weight; see `truncation_mask` / `mask_truncated`.
  Soft overlong punishment (DAPO eq. 13): a length-dependent reward added to the score; see
  `overlong_penalty`.
  Dynamic sampling (DAPO §3.2, the constraint 0 < |{o_i : o_i correct}| < G of eq. 8): a
  group whose rewards are all equal has advantage 0 everywhere, so it only dilutes the batch;
  over-sample prompts and keep the groups with a reward spread. See `informative_groups`
  (jittable) and `select_informative_groups` (host side, picks the rows of the update batch).
"""
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np


def _grouped(rewards: jax.Array, group_size: int) -> jax.Array:
  chex.assert_rank(rewards, 1)
  if not isinstance(group_size, int) or group_size < 1:
    raise ValueError(f"group_size must be a positive int, got {group_size!r}")
  if rewards.shape[0] % group_size:
    raise ValueError(f"{rewards.shape[0]} rewards do not split into groups of {group_size}")
  return jnp.asarray(rewards, jnp.float32).reshape(-1, group_size)


def group_advantages(rewards: jax.Array, group_size: int, *, normalize_std: bool = True,
                     eps: float = 1e-6, ddof: int = 1) -> jax.Array:
  """GRPO advantages [B]: (r − group mean) / (group std + eps); Dr. GRPO if normalize_std=False.

  The std uses `ddof` (1 = the sample std, as TRL's torch.std; 0 = population std). A group
  whose rewards are all equal gets advantage 0 everywhere (no learning signal).
  With normalize_std and ddof=1, group_size must be ≥ 2.
  """
  r = _grouped(rewards, group_size)
  adv = r - jnp.mean(r, axis=-1, keepdims=True)
  if normalize_std:
    if group_size - ddof < 1:
      raise ValueError(f"a std with ddof={ddof} needs group_size > {ddof}, got {group_size}")
    adv = adv / (jnp.std(r, axis=-1, keepdims=True, ddof=ddof) + eps)
  return adv.reshape(-1)


def rloo_advantages(rewards: jax.Array, group_size: int) -> jax.Array:
  """RLOO advantages [B]: each reward minus the mean of the other k − 1 in its group (k ≥ 2)."""
  if isinstance(group_size, int) and group_size < 2:
    raise ValueError(f"RLOO needs group_size >= 2, got {group_size!r}")
  r = _grouped(rewards, group_size)
  others = (jnp.sum(r, axis=-1, keepdims=True) - r) / (group_size - 1)
  return (r - others).reshape(-1)


def truncation_mask(finished: jax.Array) -> jax.Array:
  """[B] float32: 1 for completions that ended with EOS, 0 for those truncated by the length
  limit (DAPO's overlong filtering)."""
  chex.assert_rank(finished, 1)
  return (jnp.asarray(finished) > 0).astype(jnp.float32)


def mask_truncated(x: jax.Array, finished: jax.Array) -> jax.Array:
  """x with the rows of truncated completions zeroed: x [B, ...] (a loss mask [B, T] or
  advantages [B]) times truncation_mask(finished) broadcast over the trailing axes.

  Zeroing the *loss mask* (not only the advantages) also drops those rows from the token
  counts of `ppo.aggregate_loss`. Their rewards should still enter the group statistics
  of `group_advantages` (as in DAPO): apply this after computing advantages.
  """
  chex.assert_equal_shape_prefix([x, finished], 1)
  keep = truncation_mask(finished).reshape((-1,) + (1,) * (jnp.ndim(x) - 1))
  return jnp.where(keep > 0, jnp.asarray(x), jnp.zeros_like(x))


def overlong_penalty(lengths: jax.Array, max_len: int, cache_len: int) -> jax.Array:
  """DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, eq. 13), [B] float32:

                 ⎧ 0                               |y| ≤ L_max − L_cache
      R(y)   =   ⎨ ((L_max − L_cache) − |y|) / L_cache   L_max − L_cache < |y| ≤ L_max
                 ⎩ −1                              L_max < |y|

  lengths [B]: |y|, response tokens (EOS included, as samples.lengths counts them);
  max_len = L_max (the generation limit, config.ppo.max_new_tokens); cache_len = L_cache, the
  soft-punishment window below it (the paper: 4,096 of 20,480). The penalty ramps linearly from
  0 at L_max − L_cache to −1 at L_max, so longer answers lose reward before they are cut off;
  it is added to the task reward. A sampler that stops at L_max never reaches the third case,
  where a truncated answer (|y| = L_max) already gets −1.
  """
  chex.assert_rank(lengths, 1)
  for name, value in (("max_len", max_len), ("cache_len", cache_len)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}")
  if cache_len > max_len:
    raise ValueError(f"cache_len={cache_len} must be <= max_len={max_len}: the window lies "
                     "below the length limit")
  length = jnp.asarray(lengths, jnp.float32)
  expected = max_len - cache_len
  ramp = (expected - length) / cache_len
  return jnp.where(length <= expected, 0.0, jnp.where(length <= max_len, ramp, -1.0)
                   ).astype(jnp.float32)


def informative_groups(rewards: jax.Array, group_size: int) -> jax.Array:
  """[G] bool: True for the groups whose rewards are not all equal (DAPO's dynamic-sampling
  filter, Yu et al. 2025, arXiv:2503.14476, eq. 8: 0 < |{o_i correct}| < G for 0/1 rewards).

  Equal rewards give every completion of the group advantage 0 under group_advantages (with or
  without the std) and rloo_advantages, so such a group has no policy gradient. The test is
  exact (max > min): any spread makes the advantages non-zero. A NaN reward makes its group
  uninformative (every comparison with NaN is false).
  """
  r = _grouped(rewards, group_size)
  return jnp.max(r, axis=-1) > jnp.min(r, axis=-1)


class GroupSelection(NamedTuple):
  """The update batch chosen by `select_informative_groups`.

  rows     [num_groups·k] int32, indices into the sampled rows, group-major.
  weights  [num_groups·k] float32, 1 on kept rows, 0 on filler rows (multiply the loss weight).
  kept     how many informative groups were kept (≤ num_groups).
  informative  how many of the sampled groups were informative.
  """
  rows: np.ndarray
  weights: np.ndarray
  kept: int
  informative: int


def select_informative_groups(rewards, group_size: int, num_groups: int,
                              row_weights=None) -> GroupSelection:
  """Host-side dynamic sampling (DAPO, Yu et al. 2025, arXiv:2503.14476, §3.2, eq. 8): from
  the rewards [B] of an over-sampled rollout (B = sampled groups × group_size, group-major),
  the rows of an update batch of exactly `num_groups` groups.

  The first `num_groups` informative groups (`informative_groups`) are kept in sampling order.
  With `row_weights` [B] (the loss weights, e.g. 0 on truncated rows under overlong
  filtering) a group also needs a row of positive weight: one whose every row is masked has
  no gradient whatever its rewards. DAPO keeps sampling until the batch is full; with a fixed
  over-sampling budget (static shapes) a short batch is filled instead with the first other
  groups, at weight 0, so that they are real samples (finite log-probs) that never reach the
  loss. Their advantages are 0 (or their rows masked) anyway; the zero weight also keeps them
  out of the token counts of `aggregate_loss`.
  """
  if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
    raise ValueError(f"num_groups must be a positive int, got {num_groups!r}")
  informative = np.asarray(informative_groups(jnp.asarray(rewards), group_size))
  if row_weights is not None:
    weighted = np.asarray(row_weights, np.float32).reshape(-1, group_size) > 0
    informative = informative & weighted.any(axis=-1)
  if informative.shape[0] < num_groups:
    raise ValueError(f"{informative.shape[0]} sampled groups cannot fill {num_groups}")
  ranked = np.concatenate([np.flatnonzero(informative), np.flatnonzero(~informative)])
  groups = ranked[:num_groups]
  kept = min(int(informative.sum()), num_groups)
  rows = (groups[:, None] * group_size + np.arange(group_size)[None, :]).reshape(-1)
  weights = np.repeat((np.arange(num_groups) < kept).astype(np.float32), group_size)
  return GroupSelection(rows.astype(np.int32), weights, kept, int(informative.sum()))
