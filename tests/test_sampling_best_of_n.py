"""Exact best-of-n distribution and KL for a categorical policy, vs hand values, Monte Carlo
and the analytic formula log n - (n - 1)/n."""
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import sampling
from sampling_stats import chi_square_pvalue


def _analytic(n):
  return np.log(n) - (n - 1) / n


def _np_best_of_n(p, r, n):
  """float64 brute force: P(best in y's tie group) * p(y) / mass of the group."""
  p, r = np.asarray(p, np.float64), np.asarray(r, np.float64)
  at_most = np.array([p[r <= x].sum() for x in r])
  below = np.array([p[r < x].sum() for x in r])
  return (at_most ** n - below ** n) * p / (at_most - below)


def test_hand_computed_two_outcomes():
  # Uniform over {lo, hi}, best of 2: hi unless both draws are lo -> (1/4, 3/4).
  p, r = jnp.array([0.5, 0.5]), jnp.array([0.0, 1.0])
  np.testing.assert_allclose(sampling.best_of_n_distribution(p, r, 2), [0.25, 0.75], atol=1e-7)
  kl = 0.25 * np.log(0.5) + 0.75 * np.log(1.5)
  np.testing.assert_allclose(sampling.best_of_n_kl(p, r, 2), kl, rtol=1e-6)
  assert kl < _analytic(2) - 0.06  # 0.1308 < 0.1931: the formula is not exact for atoms.


def test_hand_computed_ties_split_by_policy_mass():
  # Outcomes 0 and 1 tie at the top (mass .5): the best of 2 lands there w.p. 1 - .5^2 = .75,
  # and argmax takes the first tied draw, which is 0 w.p. .2/.5.
  p, r = jnp.array([0.2, 0.3, 0.5]), jnp.array([1.0, 1.0, 0.0])
  np.testing.assert_allclose(sampling.best_of_n_distribution(p, r, 2), [0.3, 0.45, 0.25],
                             atol=1e-6)


def test_n_equal_one_is_the_policy():
  rng = np.random.RandomState(0)
  p, r = rng.dirichlet(np.ones(50)), rng.normal(size=50)
  np.testing.assert_allclose(sampling.best_of_n_distribution(p, r, 1), p, atol=1e-6)
  np.testing.assert_allclose(sampling.best_of_n_distribution(p, r, 7), _np_best_of_n(p, r, 7),
                             atol=1e-6)
  assert abs(float(sampling.best_of_n_kl(p, r, 1))) < 1e-6
  assert float(sampling.best_of_n_kl_estimate(1)) == 0.0


@pytest.mark.parametrize("n, ties", [(2, False), (5, False), (5, True)])
def test_matches_monte_carlo_best_of_n(n, ties):
  """Draw n i.i.d. outcomes, keep the first argmax of the reward: frequencies vs exact."""
  rng = np.random.RandomState(n + 10 * ties)
  m = 25
  p = rng.dirichlet(np.ones(m))
  r = rng.randint(0, 8, size=m).astype(np.float32) if ties else rng.permutation(m) * 1.0
  draws = rng.choice(m, size=(20000, n), p=p)
  winners = draws[np.arange(len(draws)), np.argmax(r[draws], axis=1)]
  exact = np.asarray(sampling.best_of_n_distribution(p, r, n), np.float64)
  assert abs(exact.sum() - 1) < 1e-5
  assert chi_square_pvalue(np.bincount(winners, minlength=m), exact) > 1e-3
  assert chi_square_pvalue(np.bincount(winners, minlength=m), p) < 1e-6


@pytest.mark.parametrize("n", [2, 4, 16])
def test_exact_kl_equals_log_n_minus_n_minus_1_over_n_without_atoms(n):
  """With distinct rewards the exact KL tends to log n - (n-1)/n as the largest outcome
  probability goes to 0 (the continuous case, where the formula is exact); it depends on the
  policy and rewards only through that limit (uniform and skewed policies agree)."""
  rng = np.random.RandomState(n)
  m = 4096
  for p in (np.full(m, 1.0 / m), rng.dirichlet(np.full(m, 5.0))):
    r = rng.permutation(m).astype(np.float32)
    kl = float(sampling.best_of_n_kl(p, r, n))
    np.testing.assert_allclose(kl, _analytic(n), atol=1e-5)
  np.testing.assert_allclose(float(sampling.best_of_n_kl_estimate(n)), _analytic(n), rtol=1e-6)


@pytest.mark.parametrize("n", [2, 3, 8, 64])
def test_exact_kl_is_below_the_formula_for_a_categorical_policy(n):
  """Atoms make the formula an upper bound (Beirami et al. 2024); the gap shrinks with m."""
  rng = np.random.RandomState(100 + n)
  gaps = []
  for m in (3, 30, 300):
    p, r = rng.dirichlet(np.ones(m)), rng.permutation(m).astype(np.float32)
    kl = float(sampling.best_of_n_kl(p, r, n))
    exact = _np_best_of_n(p, r, n)
    np.testing.assert_allclose(sampling.best_of_n_distribution(p, r, n), exact, atol=1e-6)
    terms = np.where(exact > 0, exact * np.log(np.maximum(exact, 1e-300) / p), 0.0)
    np.testing.assert_allclose(kl, terms.sum(), rtol=1e-4, atol=1e-6)
    gaps.append(_analytic(n) - kl)
  assert all(g > 0 for g in gaps)
  assert gaps[0] > gaps[1] > gaps[2]


def test_large_n_stays_normalised():
  """F^n - F_<^n with F near 1 and n large is where a naive power difference cancels."""
  rng = np.random.RandomState(3)
  p, r = rng.dirichlet(np.ones(1000)), rng.normal(size=1000)
  for n in (1000, 100000):
    bon = np.asarray(sampling.best_of_n_distribution(p, r, n), np.float64)
    assert (bon >= 0).all() and abs(bon.sum() - 1) < 1e-4
    kl = float(sampling.best_of_n_kl(p, r, n))
    # Best of very many draws is almost surely the top outcome: KL -> -log p(top).
    top = int(np.argmax(r))
    assert 0 < kl <= -np.log(p[top]) + 1e-4
  np.testing.assert_allclose(kl, -np.log(p[top]), rtol=1e-3)
