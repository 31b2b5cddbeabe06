"""Per-token log-probs and entropies from policy logits, always in float32.

`token_logprobs` never builds a [B, T, V] log-softmax: it needs one logsumexp over the vocab
and the target's logit, so the only full-vocab tensor is the logits themselves.
"""
import jax
import jax.numpy as jnp


def _scaled(logits: jax.Array, temperature: float) -> jax.Array:
  return logits.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)


def _picked(z: jax.Array, targets: jax.Array) -> jax.Array:
  """z[..., targets] as a fused compare-select-reduce over the vocab.

  On XLA:CPU a take_along_axis gather over the vocab (and its scatter gradient) is several
  times slower than this reduction, which also never materialises a one-hot tensor.
  """
  vocab = jax.lax.broadcasted_iota(jnp.int32, z.shape, z.ndim - 1)
  return jnp.sum(jnp.where(vocab == targets[..., None].astype(jnp.int32), z, 0.0), axis=-1)


def token_logprobs(logits: jax.Array, targets: jax.Array, temperature: float = 1.0) -> jax.Array:
  """log softmax(logits / temperature)[targets]: [B, T, V], [B, T] -> [B, T] float32.

  The caller aligns the two (logits[:, :-1] predict input_ids[:, 1:]).
  """
  z = _scaled(logits, temperature)
  return _picked(z, targets) - jax.nn.logsumexp(z, axis=-1)


def logprobs_and_entropy(logits: jax.Array, targets: jax.Array,
                         temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """Token log-probs and the entropy of each next-token distribution, sharing one logsumexp.

  H = logsumexp(z) - sum softmax(z) * z.
  """
  z = _scaled(logits, temperature)
  lse = jax.nn.logsumexp(z, axis=-1)
  picked = _picked(z, targets)
  probs = jnp.exp(z - lse[..., None])
  entropy = lse - jnp.sum(probs * z, axis=-1)
  return picked - lse, entropy
