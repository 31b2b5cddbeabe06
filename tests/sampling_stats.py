"""Goodness-of-fit statistics for the sampler tests (scipy is not a dependency)."""
import jax
import numpy as np


def chi_square_pvalue(observed, probs, min_expected=5.0) -> float:
  """Pearson goodness-of-fit p-value, bins expected below `min_expected` pooled into one.

  Any draw in a zero-probability bin gives 0. The survival function of chi-square with k
  degrees of freedom at s is the regularised upper incomplete gamma Q(k/2, s/2).
  """
  observed = np.asarray(observed, np.float64)
  probs = np.asarray(probs, np.float64)
  if observed[probs == 0].sum() > 0:
    return 0.0
  expected = probs * observed.sum()
  big = expected >= min_expected
  o = np.append(observed[big], observed[~big].sum())
  e = np.append(expected[big], expected[~big].sum())
  o, e = o[e > 0], e[e > 0]
  stat = np.sum((o - e) ** 2 / e)
  return float(jax.scipy.special.gammaincc((len(o) - 1) / 2.0, stat / 2.0))
