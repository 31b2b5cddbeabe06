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
"""
import chex
import jax
import jax.numpy as jnp


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
