"""Supervised fine-tuning: masked next-token negative log-likelihood."""
import chex
import jax
import jax.numpy as jnp

from rlhf_jax.objectives.logprobs import token_logprobs


def next_token_nll(logits: jax.Array, input_ids: jax.Array,
                   loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of -log p(token), number of tokens) over the tokens where loss_mask is 1.

  logits[:, t] predicts input_ids[:, t + 1]; loss_mask marks the *target* tokens (the
  response, EOS included). Returning a sum and a count (not a mean) lets gradient
  accumulation normalise by the global token count of all micro-batches.
  Works unchanged on packed rows: a segment's first token is a prompt token (mask 0), so no
  loss crosses a segment boundary.
  """
  chex.assert_rank([logits, input_ids, loss_mask], [3, 2, 2])
  chex.assert_equal_shape([input_ids, loss_mask])
  logp = token_logprobs(logits[:, :-1], input_ids[:, 1:])
  weights = loss_mask[:, 1:].astype(jnp.float32)
  return -jnp.sum(logp * weights), jnp.sum(weights)
