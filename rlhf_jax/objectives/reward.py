"""Reward-model objective: the Bradley–Terry pairwise loss.

P(chosen > rejected) = σ(r_c − r_r − m)  (Bradley & Terry 1952; Ouyang et al. 2022, eq. 1;
the margin m is Llama 2's, Touvron et al. 2023, eq. 2). Optional reward centring adds
c · E[(r_c + r_r)²] (Eisenstein et al. 2023, "Helping or herding?"), which pins the otherwise
free offset of the rewards near zero.
"""
import chex
import jax
import jax.numpy as jnp


def bradley_terry(r_chosen: jax.Array, r_rejected: jax.Array, *,
                  margin: jax.Array | None = None, center_coef: float = 0.0,
                  weights: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Sum over pairs of −log σ(r_c − r_r − m) + c·(r_c + r_r)², and summed metrics.

  Returns (loss_sum, sums) where sums holds "pairs" (the weight total), "accuracy" (pairs with
  r_c > r_r) and "margin" (r_c − r_r), all sums, so that callers can normalise across
  micro-batches and devices. `weights` [B] masks padding pairs (1 = real).
  """
  chex.assert_rank([r_chosen, r_rejected], 1)
  chex.assert_equal_shape([r_chosen, r_rejected])
  r_c, r_r = r_chosen.astype(jnp.float32), r_rejected.astype(jnp.float32)
  w = jnp.ones_like(r_c) if weights is None else weights.astype(jnp.float32)
  diff = r_c - r_r
  m = jnp.zeros_like(diff) if margin is None else margin.astype(jnp.float32)
  per_pair = -jax.nn.log_sigmoid(diff - m) + center_coef * jnp.square(r_c + r_r)
  sums = {"pairs": jnp.sum(w), "accuracy": jnp.sum(w * (diff > 0)), "margin": jnp.sum(w * diff)}
  return jnp.sum(w * per_pair), sums
