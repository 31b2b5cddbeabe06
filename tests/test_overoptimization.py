"""Reward-model overoptimisation tools (rlhf_jax.eval.overoptimization) against independent
references, and the reproduction's runlocal variant end to end."""
import itertools
import json
import math

import numpy as np
import pytest

from conftest import run_python
from rlhf_jax import sampling
from rlhf_jax.eval import overoptimization as oo


def _brute_force_best_of_n(scores, values, n):
  """Mean over every n-subset of the pool of the value of the subset's top-scoring sample."""
  outcomes = [values[list(c)][np.argmax(scores[list(c)])]
              for c in itertools.combinations(range(len(scores)), n)]
  return float(np.mean(outcomes))


@pytest.mark.parametrize("pool", [1, 5, 9])
def test_unbiased_estimator_equals_enumeration_of_all_subsets(pool):
  rng = np.random.default_rng(pool)
  scores, values = rng.normal(size=pool), rng.normal(size=pool)
  for n in range(1, pool + 1):
    want = _brute_force_best_of_n(scores, values, n)
    np.testing.assert_allclose(oo.best_of_n_expected(scores, n, values), want, rtol=1e-12,
                               atol=1e-12)
    # values = scores: the expected maximum of n draws without replacement.
    np.testing.assert_allclose(oo.best_of_n_expected(scores, n),
                               _brute_force_best_of_n(scores, scores, n), rtol=1e-12)
  assert oo.best_of_n_expected(scores, pool) == pytest.approx(scores.max())
  assert oo.best_of_n_expected(scores, 1) == pytest.approx(scores.mean())


def test_estimator_batches_over_leading_axes_and_rejects_bad_n():
  rng = np.random.default_rng(0)
  scores, values = rng.normal(size=(3, 2, 7)), rng.normal(size=(3, 2, 7))
  got = oo.best_of_n_expected(scores, 3, values)
  assert got.shape == (3, 2)
  for i, j in itertools.product(range(3), range(2)):
    assert got[i, j] == pytest.approx(_brute_force_best_of_n(scores[i, j], values[i, j], 3))
  with pytest.raises(ValueError, match="n <= pool size"):
    oo.best_of_n_expected(scores, 8)
  with pytest.raises(ValueError, match="differ in shape"):
    oo.best_of_n_expected(scores, 2, values[..., :3])


def test_weights_stay_finite_and_normalised_for_large_pools():
  # C(5000, 2000) overflows float64 by far; the log-space weights must not.
  w = oo.best_of_n_weights(5000, 2000)
  assert np.all(np.isfinite(w)) and w.sum() == pytest.approx(1.0, abs=1e-12)
  # Weights below float64 range underflow to 0; the top of the pool carries the mass.
  assert np.all(w[:1999] == 0) and np.all(w >= 0) and w[-1] > 0
  # Against exact integer arithmetic for a size where it is still feasible.
  exact = [math.comb(i - 1, 30) / math.comb(200, 31) for i in range(1, 201)]
  np.testing.assert_allclose(oo.best_of_n_weights(200, 31), exact, rtol=1e-10, atol=1e-300)


def test_best_of_n_kl_formula():
  ns = np.asarray([1, 2, 4, 16, 256])
  np.testing.assert_allclose(oo.best_of_n_kl(ns), np.log(ns) - (ns - 1) / ns, rtol=1e-12)
  assert oo.best_of_n_kl(1) == 0.0
  # Independently: the winner's quantile u has density n u^(n-1) on [0, 1] (continuous
  # rewards), so KL = ∫ n u^(n-1) log(n u^(n-1)) du, here by midpoint quadrature.
  u = (np.arange(200_000) + 0.5) / 200_000
  for n in (2, 4, 16, 256):
    density = n * u ** (n - 1)
    kl = np.mean(density * np.log(np.maximum(density, 1e-300)))
    assert oo.best_of_n_kl(n) == pytest.approx(kl, abs=2e-3)
    # And the exact categorical KL of a many-outcome uniform policy approaches it from below.
    exact = float(sampling.best_of_n_kl(np.full(20_000, 1 / 20_000), np.arange(20_000.0), n))
    assert exact <= oo.best_of_n_kl(n) + 1e-6
    assert exact == pytest.approx(oo.best_of_n_kl(n), abs=2e-3)


@pytest.mark.parametrize("form,alpha,beta", [("bon", 0.8, 0.15), ("rl", 0.5, 0.3)])
def test_fits_recover_known_coefficients(form, alpha, beta):
  d = np.linspace(0.0, 4.0, 40)
  g = d if form == "bon" else np.log(np.where(d > 0, d, 1.0))
  clean = d * (alpha - beta * g)
  fit = oo.fit_curve(d, clean, form)
  assert (fit.alpha, fit.beta, fit.r2) == pytest.approx((alpha, beta, 1.0), abs=1e-10)
  noisy = clean + np.random.default_rng(0).normal(scale=0.01, size=d.shape)
  fit = oo.fit_curve(d, noisy, form)
  assert fit.alpha == pytest.approx(alpha, abs=0.02)
  assert fit.beta == pytest.approx(beta, abs=0.02)
  assert 0.95 < fit.r2 <= 1.0
  grid = np.linspace(1e-3, 10, 100_001)
  assert fit.peak_d == pytest.approx(grid[np.argmax(fit(grid))], abs=1e-3)


def test_fit_rejects_degenerate_input():
  with pytest.raises(ValueError, match="two distinct"):
    oo.fit_curve([0.0, 1.0], [0.0, 0.5], "bon")
  with pytest.raises(ValueError, match="form="):
    oo.fit_curve([0.0, 1.0, 2.0], [0.0, 0.5, 0.7], "linear")
  with pytest.raises(ValueError, match=">= 0"):
    oo.fit_curve([-1.0, 1.0, 2.0], [0.0, 0.5, 0.7], "rl")


def test_runlocal_end_to_end(tmp_path):
  run_python(["-m", "rlhf_jax.main",
              "--config=experiments/overoptimization/config.py:runlocal",
              f"--workdir={tmp_path}", "--config.export.enabled=False"])
  for name in ("best_of_n.png", "rl.png", "results.md", "results.json"):
    assert (tmp_path / name).stat().st_size > 0, name
  results = json.loads((tmp_path / "results.json").read_text())
  # 2 sizes x 2 data sizes of best-of-n; plus a KL-penalised PPO run per size.
  assert len(results["best_of_n"]) == 4 and len(results["rl"]) == 6
  bon = results["best_of_n"]["xs/large"]
  assert bon["n"] == [1, 2, 4, 8] and bon["gold"][0] == bon["proxy"][0] == 0.0
  assert np.all(np.diff(bon["proxy"]) > 0)  # The selection score's expected max grows with n.
  np.testing.assert_allclose(bon["kl"], oo.best_of_n_kl(np.asarray(bon["n"])))
  # The report's verdicts are the measured curves' (recomputed here), not fixed text.
  from experiments.overoptimization import run as driver
  free = [f"{size}/{d}" for size in results["sizes"] for d in driver.DATA]
  table = (tmp_path / "results.md").read_text()
  for method, key in (("best-of-n", "best_of_n"), ("PPO, no KL penalty", "rl")):
    verdict = driver._verdict(driver.overoptimised(results[key][k]) for k in free)
    row = next(line for line in table.splitlines()
               if line.startswith(f"| proxy keeps rising while gold peaks then falls ({method})"))
    assert row.endswith(f"| {verdict} |"), row
