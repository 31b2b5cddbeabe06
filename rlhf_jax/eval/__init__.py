"""Evaluation: policy samples scored by a gold reward, Monte-Carlo KL to a reference,
diversity, held-out perplexity, and the training curves of a stage."""
from rlhf_jax.eval.heldout import make_nll_evaluator
from rlhf_jax.eval.policy import (distinct_n, evaluate_policy, left_pad, make_policy_evaluator,
                                  mean_and_stderr, response_mask, sample_responses)
from rlhf_jax.eval.overoptimization import (Fit, best_of_n_expected, best_of_n_kl,
                                            best_of_n_weights, fit_curve)
