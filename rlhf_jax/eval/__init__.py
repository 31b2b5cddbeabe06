"""Evaluation: policy samples scored by a gold reward, Monte-Carlo KL to a reference,
diversity."""
from rlhf_jax.eval.policy import (distinct_n, evaluate_policy, left_pad, mean_and_stderr,
                                  sample_responses)
from rlhf_jax.eval.overoptimization import (Fit, best_of_n_expected, best_of_n_kl,
                                            best_of_n_weights, fit_curve)
