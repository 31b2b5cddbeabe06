"""models.transformer.causal_attention (the whole-sequence path) equals
jax.nn.dot_product_attention on every layout the training step builds, at every real query
row and in the gradients. Padding query rows see no key; both functions return some average
of values there (not the same one), which nothing downstream reads, so the comparison and
the output cotangent leave those rows out."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models import layout as layout_lib
from rlhf_jax.models.transformer import causal_attention


def _layouts(b, t):
  rng = np.random.RandomState(0)
  left = np.ones((b, t), np.int32)
  for i in range(b):
    left[i, :rng.randint(0, t // 2)] = 0  # Left padding of varying width.
  seg = np.zeros((b, t), np.int32)  # Prefix sharing: [prompt | chosen | rejected | pad].
  seg[:, :t // 2], seg[:, t // 2:3 * t // 4], seg[:, 3 * t // 4:t - 8] = 1, 2, 3
  parents = (seg >= 2).astype(np.int32)
  positions = np.tile(np.arange(t, dtype=np.int32), (b, 1))
  shared_mask = (seg > 0).astype(np.int32)
  return {  # name: (layout, real query rows [B, T])
      "unpadded": (layout_lib.full_layout(jnp.ones((b, t), jnp.int32), None),
                   np.ones((b, t), np.int32)),
      "left_padded": (layout_lib.full_layout(jnp.asarray(left), None), left),
      "prefix_shared": (layout_lib.full_layout(jnp.asarray(shared_mask), jnp.asarray(seg),
                                               jnp.asarray(positions), jnp.asarray(parents)),
                        shared_mask),
  }


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("query_block", [64, 128, 256])
def test_matches_dot_product_attention(kv_heads, query_block):
  b, t, h, d = 2, 256, 4, 16
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (b, t, h, d), jnp.float32)
  k = jax.random.normal(keys[1], (b, t, kv_heads, d), jnp.float32)
  v = jax.random.normal(keys[2], (b, t, kv_heads, d), jnp.float32)
  scale = 1 / math.sqrt(d)
  for name, (lay, real) in _layouts(b, t).items():
    real = real.astype(bool)
    want = jax.nn.dot_product_attention(q, k, v, bias=lay.bias, scale=scale)
    got = causal_attention(q, k, v, lay.bias, scale, jnp.float32, query_block=query_block)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=2e-5,
                               rtol=2e-5, err_msg=name)
    # Gradients too (the training step differentiates through the blocks' hand-written
    # backward pass), with the zero cotangent that masked losses give padding rows; the
    # bias's gradient as well, though nothing differentiates a layout.
    g = jax.random.normal(jax.random.key(1), want.shape) * real[:, :, None, None]
    grad = lambda f: jax.grad(lambda *a: jnp.sum(f(*a) * g), argnums=(0, 1, 2, 3))(
        q, k, v, lay.bias)
    ours = lambda q, k, v, bias: causal_attention(q, k, v, bias, scale, jnp.float32,
                                                  query_block=query_block)
    theirs = lambda q, k, v, bias: jax.nn.dot_product_attention(q, k, v, bias=bias,
                                                                scale=scale)
    for a, e, arg in zip(grad(ours), grad(theirs), "qkvb"):
      np.testing.assert_allclose(a, e, atol=5e-5, rtol=5e-5, err_msg=f"{name} d{arg}")


def test_bfloat16_compute_matches():
  b, t, h, d = 2, 256, 4, 16
  keys = jax.random.split(jax.random.key(2), 3)
  q, k, v = (jax.random.normal(kk, (b, t, h, d), jnp.float32) for kk in keys)
  lay = layout_lib.full_layout(jnp.ones((b, t), jnp.int32), None)
  cast = lambda x: x.astype(jnp.bfloat16)
  want = jax.nn.dot_product_attention(cast(q), cast(k), cast(v), bias=lay.bias, scale=0.25)
  got = causal_attention(q, k, v, lay.bias, 0.25, jnp.bfloat16, query_block=64)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             atol=2e-2, rtol=2e-2)
