"""Per-token quantities from policy logits, always in float32.

`token_logprobs` never builds a [B, T, V] log-softmax: it needs one logsumexp over the vocab
and one gather, so the only full-vocab tensor is the logits themselves.
"""
import jax
import jax.numpy as jnp


def _scaled(logits: jax.Array, temperature: float) -> jax.Array:
  return logits.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)


def token_logprobs(logits: jax.Array, targets: jax.Array, temperature: float = 1.0) -> jax.Array:
  """log softmax(logits / temperature)[targets]: [B, T, V], [B, T] -> [B, T] float32.

  The caller aligns the two (logits[:, :-1] predict input_ids[:, 1:]).
  """
  z = _scaled(logits, temperature)
  picked = jnp.take_along_axis(z, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return picked - jax.nn.logsumexp(z, axis=-1)


def logprobs_and_entropy(logits: jax.Array, targets: jax.Array,
                         temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """Token log-probs and the entropy of each next-token distribution, sharing one logsumexp.

  H = logsumexp(z) - sum softmax(z) * z.
  """
  z = _scaled(logits, temperature)
  lse = jax.nn.logsumexp(z, axis=-1)
  picked = jnp.take_along_axis(z, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  probs = jnp.exp(z - lse[..., None])
  entropy = lse - jnp.sum(probs * z, axis=-1)
  return picked - lse, entropy
