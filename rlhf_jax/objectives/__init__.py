"""Pure functions of logits, log-probs, values and rewards (no Flax, no I/O): per-token
log-probs and entropies, and the losses built on them."""
from rlhf_jax.objectives.logprobs import logprobs_and_entropy, token_logprobs
from rlhf_jax.objectives.reward import bradley_terry
from rlhf_jax.objectives.sft import next_token_nll
from rlhf_jax.objectives.kto import kto_loss
from rlhf_jax.objectives.preference import (PREFERENCE_LOSSES, PreferenceLogps, preference_loss,
                                            preference_metrics)
from rlhf_jax.objectives.ppo import (KL_CONTROLLERS, KL_ESTIMATORS, LOSS_AGGREGATIONS,
                                     aggregate_loss, entropy_bonus, entropy_from_logits,
                                     explained_variance, fixed_kl_coef, gae, kl_penalty,
                                     masked_mean, masked_var, masked_whiten,
                                     multiplicative_kl_coef, next_kl_coef, policy_loss,
                                     shape_rewards, update_kl_coef, value_loss)
from rlhf_jax.objectives.grpo import (GroupSelection, group_advantages, informative_groups,
                                      mask_truncated, overlong_penalty, rloo_advantages,
                                      select_informative_groups, truncation_mask)
