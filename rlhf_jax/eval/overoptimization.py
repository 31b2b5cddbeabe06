"""Reward-model overoptimisation analysis (Gao, Schulman & Hilton 2022, "Scaling Laws for Reward
Model Overoptimization", arXiv:2210.10760): the unbiased best-of-n estimator, the best-of-n KL,
and the paper's functional forms of gold reward against d = sqrt(KL(π‖π_init)).

Best-of-n is not run once per n. A pool of N >= n samples per prompt is drawn once, and the
expected outcome of "draw n of them, keep the one the proxy ranks highest" is computed exactly
over all C(N, n) subsets (the paper's section 2.2 / appendix estimator). With the pool sorted
by the selection score in ascending order, the i-th smallest (1-based) is the maximum of a
random n-subset with probability C(i − 1, n − 1) / C(N, n). The weights are formed in log
space (log-gamma), because C(N, n) overflows float64 for N in the thousands.

Functional forms (the paper's eqs. 1 and 2, with the gold reward measured from its value at
the initial policy, so both pass through the origin):
  best-of-n:  R_bon(d) = d (α − β d)
  RL:         R_RL(d)  = d (α − β log d)
Both are linear in (α, β), so the least-squares fit is closed form.
"""
import dataclasses
import math

import numpy as np


def best_of_n_weights(pool_size: int, n: int) -> np.ndarray:
  """[pool_size] float64: P(the i-th smallest of the pool is the max of a random n-subset),
  i = 1..pool_size, i.e. C(i − 1, n − 1) / C(N, n) (0 for i < n). Sums to 1 (hockey stick)."""
  if not 1 <= n <= pool_size:
    raise ValueError(f"best-of-n needs 1 <= n <= pool size, got n={n}, pool size={pool_size}")
  i = np.arange(n, pool_size + 1, dtype=np.float64)
  lgamma = np.vectorize(math.lgamma, otypes=[np.float64])
  log_binom = lambda a, b: lgamma(a + 1) - lgamma(b + 1) - lgamma(a - b + 1)
  log_w = log_binom(i - 1, n - 1) - log_binom(float(pool_size), float(n))
  # Renormalising in log space removes the O(1e-13) rounding of the log-gammas; the exact
  # weights sum to 1, so this changes nothing but the last bits.
  log_w -= np.logaddexp.reduce(log_w)
  out = np.zeros(pool_size, np.float64)
  out[n - 1:] = np.exp(log_w)
  return out


def best_of_n_expected(scores, n: int, values=None) -> np.ndarray:
  """Unbiased estimate of best-of-n from a pool, over the last axis.

  scores: [..., N] the selection score of each pooled sample (e.g. a proxy reward model's).
  values: [..., N] what to average for the winner (e.g. the gold reward of the same samples);
    defaults to `scores`, giving E[max of n scores].
  Returns [...]: the exact expectation, over all n-subsets of the pool drawn without
  replacement, of the value of the subset's highest-scoring sample. Ties in `scores` are broken
  by position (a stable sort: among tied samples the later one wins).
  """
  scores = np.asarray(scores, np.float64)
  values = scores if values is None else np.asarray(values, np.float64)
  if scores.shape != values.shape:
    raise ValueError(f"scores {scores.shape} and values {values.shape} differ in shape")
  if scores.ndim < 1:
    raise ValueError("scores need a pool axis (the last one)")
  order = np.argsort(scores, axis=-1, kind="stable")
  sorted_values = np.take_along_axis(values, order, axis=-1)
  return sorted_values @ best_of_n_weights(scores.shape[-1], n)


def best_of_n_kl(n) -> np.ndarray:
  """KL(best-of-n ‖ sampling policy) = log n − (n − 1)/n nats, the paper's analytic value.

  Exact for a continuous score distribution; an upper bound otherwise (see
  `rlhf_jax.sampling.best_of_n_kl` for the exact categorical value)."""
  n = np.asarray(n, np.float64)
  if np.any(n < 1):
    raise ValueError(f"best-of-n needs n >= 1, got {n}")
  return np.log(n) - (n - 1.0) / n


@dataclasses.dataclass(frozen=True)
class Fit:
  """R(d) = d (α − β g(d)), with g(d) = d (best-of-n) or log d (RL); r2 = 1 − SS_res/SS_tot."""
  form: str
  alpha: float
  beta: float
  r2: float

  def __call__(self, d) -> np.ndarray:
    return _design(self.form, np.asarray(d, np.float64)) @ np.asarray([self.alpha, self.beta])

  @property
  def peak_d(self) -> float:
    """The d >= 0 that maximises the fitted curve (inf if it never turns down; 0 if it falls
    from the start)."""
    if self.beta <= 0:
      return math.inf
    if self.form == "bon":  # α − 2βd = 0.
      return max(self.alpha / (2.0 * self.beta), 0.0)
    return math.exp(self.alpha / self.beta - 1.0)  # α − β(log d + 1) = 0.


FORMS = ("bon", "rl")


def _design(form: str, d: np.ndarray) -> np.ndarray:
  """Columns multiplying (α, β)."""
  if form == "bon":
    return np.stack([d, -d * d], axis=-1)
  if form == "rl":
    # d log d -> 0 as d -> 0 (the initial policy sits at the origin).
    safe = np.where(d > 0, d, 1.0)
    return np.stack([d, -np.where(d > 0, d * np.log(safe), 0.0)], axis=-1)
  raise ValueError(f"form={form!r}; expected one of {FORMS}")


def fit_curve(d, reward, form: str) -> Fit:
  """Least-squares (α, β) of R(d) = d (α − β g(d)) through the origin, and R².

  d: [M] sqrt(KL) >= 0; reward: [M] gold (or proxy) reward minus its value at d = 0.
  """
  d = np.asarray(d, np.float64).ravel()
  reward = np.asarray(reward, np.float64).ravel()
  if d.shape != reward.shape:
    raise ValueError(f"d {d.shape} and reward {reward.shape} differ in shape")
  if np.any(d < 0) or not np.all(np.isfinite(d)) or not np.all(np.isfinite(reward)):
    raise ValueError("d must be finite and >= 0 and reward finite")
  x = _design(form, d)
  if np.linalg.matrix_rank(x) < 2:
    raise ValueError(f"fit_curve({form!r}) needs at least two distinct d > 0")
  (alpha, beta), *_ = np.linalg.lstsq(x, reward, rcond=None)
  residual = reward - x @ np.asarray([alpha, beta])
  total = np.sum((reward - reward.mean()) ** 2)
  r2 = 1.0 - np.sum(residual ** 2) / total if total > 0 else float("nan")
  return Fit(form, float(alpha), float(beta), float(r2))
