"""Pure loss functions of log-probs, values and rewards (no Flax, no I/O)."""
from rlhf_jax.objectives.reward import bradley_terry
from rlhf_jax.objectives.sft import next_token_nll
from rlhf_jax.objectives.kto import kto_loss
from rlhf_jax.objectives.preference import (PREFERENCE_LOSSES, PreferenceLogps, preference_loss,
                                            preference_metrics)
