"""Pure loss functions of log-probs, values and rewards (no Flax, no I/O)."""
from rlhf_jax.objectives.reward import bradley_terry
from rlhf_jax.objectives.sft import next_token_nll
