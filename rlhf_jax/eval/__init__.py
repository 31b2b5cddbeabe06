"""Evaluation: policy samples scored by a gold reward, Monte-Carlo KL to a reference,
diversity."""
from rlhf_jax.eval.policy import (distinct_n, evaluate_policy, left_pad, mean_and_stderr,
                                  sample_responses)
