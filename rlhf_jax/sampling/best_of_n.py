"""Best-of-n: sample n responses per prompt, keep the one a reward function ranks highest.

Best-of-n is the baseline policy of the reward-overoptimisation literature (Stiennon et al.
2020, arXiv:2009.01325; Gao et al. 2022, arXiv:2210.10760), where its KL from the sampling
policy is quoted as log n - (n - 1)/n. That number is exact only when no single outcome has
positive probability (a continuous reward distribution). For a categorical policy the exact
KL, computed by `best_of_n_kl`, is strictly smaller for n > 1 and approaches the formula as
the largest outcome probability goes to 0 (Beirami et al. 2024, arXiv:2401.01879), so the
formula is an upper bound there, not an identity.
"""
from typing import Callable

import chex
import flax.struct
import jax
import jax.numpy as jnp

from rlhf_jax.sampling.sampler import Params, Samples, SamplingConfig, generate

# reward_fn(prompt_ids [R, P], prompt_mask [R, P], samples with R rows) -> [R] float32.
RewardFn = Callable[[jax.Array, jax.Array, Samples], jax.Array]


@flax.struct.dataclass
class BestOfN:
  """The chosen response per prompt (`samples` has B rows) and how it was chosen.

  index: [B] int32, which of the n draws won; rewards: [B] its reward;
  all_rewards: [B, n] float32, the reward of every draw (draw j of prompt b was row b*n + j).
  """
  samples: Samples
  rewards: jax.Array
  all_rewards: jax.Array
  index: jax.Array


def best_of_n(module, params: Params, prompt_ids: jax.Array, prompt_mask: jax.Array,
              key: jax.Array, cfg: SamplingConfig, n: int, reward_fn: RewardFn) -> BestOfN:
  """Samples n responses per prompt in one `generate` call and keeps the argmax of reward_fn.

  Prompts are repeated so that the n draws of a prompt are adjacent rows: on a data mesh they
  mostly land on the same device, and the [B*n] rewards reshape to [B, n] without a gather
  across prompts. Ties go to the first draw (argmax). Sampling is jitted inside `generate`;
  `reward_fn` runs as given (jit it yourself, e.g. a reward model closing over its params),
  and the whole function is traceable, so it can also sit inside a caller's jit.
  """
  chex.assert_rank([prompt_ids, prompt_mask], 2)
  if n < 1:
    raise ValueError(f"best_of_n needs n >= 1, got {n}")
  b = prompt_ids.shape[0]
  ids = jnp.repeat(prompt_ids, n, axis=0)
  mask = jnp.repeat(prompt_mask, n, axis=0)
  samples = generate(module, params, ids, mask, key, cfg)
  rewards = jnp.asarray(reward_fn(ids, mask, samples), jnp.float32)
  chex.assert_shape(rewards, (b * n,))
  rewards = rewards.reshape(b, n)
  index = jnp.argmax(rewards, axis=1).astype(jnp.int32)
  rows = jnp.arange(b) * n + index
  chosen = jax.tree.map(lambda x: jnp.take(x, rows, axis=0), samples)
  return BestOfN(samples=chosen, rewards=jnp.take_along_axis(rewards, index[:, None], 1)[:, 0],
                 all_rewards=rewards, index=index)


def _rank_masses(probs: jax.Array, rewards: jax.Array):
  """Per outcome y: (F(y), A(y), G(y)) = policy mass with reward <= r(y), > r(y), == r(y).

  Each is summed so that it is accurate where it is small: A from the top (log F = log1p(-A)
  is what n multiplies for the likely winners, and a forward cumsum's rounding there would
  grow n-fold), G directly over the tie group (a difference of cumsums near 1 would lose
  the relative precision of a small p(y)).
  """
  m = probs.shape[0]
  order = jnp.argsort(rewards)
  sorted_r = rewards[order]
  sorted_p = probs[order]
  zero = jnp.zeros((1,), probs.dtype)
  cum = jnp.concatenate([zero, jnp.cumsum(sorted_p)])
  rev = jnp.concatenate([jnp.cumsum(sorted_p[::-1])[::-1], zero])  # rev[i] = sum sorted_p[i:].
  right = jnp.searchsorted(sorted_r, rewards, side="right")
  group_id = jnp.searchsorted(sorted_r, rewards, side="left")  # First index of the tie group.
  group = jax.ops.segment_sum(probs, group_id, num_segments=m)[group_id]
  return cum[right], rev[right], group


def _log_ratio(probs: jax.Array, rewards: jax.Array, n) -> jax.Array:
  """log(p_bon(y) / p(y)) per outcome (finite where p(y) > 0), computed without cancellation.

  With G(y) = F(y) - F_<(y) the mass of y's reward tie group,
    p_bon(y) = (F(y)^n - F_<(y)^n) * p(y) / G(y)
  (the best of n i.i.d. draws falls in the group with probability F^n - F_<^n; within the
  group, the first draw of it is y with probability p(y)/G). F^n - F_<^n is written as
  F^n * (-expm1(n * log1p(-G/F))), which stays accurate when F is close to 1 and n is large.
  """
  probs = jnp.asarray(probs, jnp.float32)
  rewards = jnp.asarray(rewards, jnp.float32)
  chex.assert_rank([probs, rewards], 1)
  chex.assert_equal_shape([probs, rewards])
  probs = probs / jnp.sum(probs)
  n = jnp.asarray(n, jnp.float32)
  at_most, above, group = _rank_masses(probs, rewards)
  group = jnp.maximum(group, jnp.finfo(jnp.float32).tiny)
  at_most = jnp.maximum(at_most, group)
  log_at_most = jnp.where(above < 0.5, jnp.log1p(-above), jnp.log(at_most))
  frac = jnp.minimum(group / at_most, 1.0)
  # log1p(-1) = -inf when the group holds all mass up to it; then -expm1(-inf) = 1.
  head = -jnp.expm1(n * jnp.log1p(-frac))
  return n * log_at_most + jnp.log(head) - jnp.log(group)


def _policy_and_log_ratio(probs, rewards, n) -> tuple[jax.Array, jax.Array]:
  probs = jnp.asarray(probs, jnp.float32)
  return probs / jnp.sum(probs), _log_ratio(probs, rewards, n)


@jax.jit
def best_of_n_distribution(probs: jax.Array, rewards: jax.Array, n) -> jax.Array:
  """Exact distribution [M] of the best of n i.i.d. draws from a categorical policy [M].

  probs: [M] policy probabilities (normalised here); rewards: [M] the reward of each outcome.
  Ties are resolved as `best_of_n` does (argmax = first of the tied draws), which splits a tie
  group's mass in proportion to the policy.
  """
  probs, ratio = _policy_and_log_ratio(probs, rewards, n)
  return jnp.where(probs > 0, probs * jnp.exp(ratio), 0.0)


@jax.jit
def best_of_n_kl(probs: jax.Array, rewards: jax.Array, n) -> jax.Array:
  """Exact KL(best-of-n || policy) in nats for a categorical policy: sum p_bon log(p_bon/p)."""
  probs, ratio = _policy_and_log_ratio(probs, rewards, n)
  bon = jnp.where(probs > 0, probs * jnp.exp(ratio), 0.0)
  return jnp.sum(jnp.where(bon > 0, bon * ratio, 0.0))


def best_of_n_kl_estimate(n) -> jax.Array:
  """The standard analytic KL of best-of-n, log n - (n - 1)/n (nats).

  Exact for a continuous outcome distribution (the winner's reward quantile has density
  n u^(n-1)); an upper bound on `best_of_n_kl` for a categorical policy.
  """
  n = jnp.asarray(n, jnp.float32)
  return jnp.log(n) - (n - 1.0) / n
