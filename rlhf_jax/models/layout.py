"""Attention layout: which keys each query sees, and the position id of every token.

Positions are derived from masks, never from slot indices, so that left-padded, right-padded,
unpadded and packed inputs give the same logits at real tokens. Masks are built as an additive
bias with a large *finite* negative, so a fully masked (padding) query row stays finite.
"""
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

NEG_INF = float(jnp.finfo(jnp.float32).min)


class Layout(NamedTuple):
  positions: jax.Array  # [B, T] int32 position id of each query token.
  bias: jax.Array  # [B, 1, T, S] float32 additive attention bias (0 or NEG_INF).


@flax.struct.dataclass
class KVCache:
  """A fixed-size key/value cache for incremental decoding (a plain pytree).

  k, v: one [B, kv_heads, S, head_dim] array per layer (heads-major: appending a token is a
  contiguous write per head, and attention reads each head's slots without a transpose).
  `mask` marks the slots that hold real tokens, `index` is the next slot to write: a scalar
  shared by the batch, or [B] with one write position per row (continuous batching, where
  each row holds a different sequence at a different length). `next_pos` is the position id
  the next real token of each row gets. Padding inside a prefill occupies slots but is masked.
  `widths` (static, None = all S slots) are the attention widths a call may use: each layer
  attends to slots [0, w) only, w the narrowest width that holds every written slot (from
  `index`), so a decode step costs what the live lengths need, not what the cache holds. A
  row with nothing to write should point `index` low (e.g. 0) so it does not widen the step.
  """
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  mask: jax.Array  # [B, S] int32
  index: jax.Array  # [] or [B] int32
  next_pos: jax.Array  # [B] int32
  widths: tuple[int, ...] | None = flax.struct.field(pytree_node=False, default=None)

  @property
  def max_len(self) -> int:
    return self.mask.shape[1]


def write_rows(buffer: jax.Array, new: jax.Array, index: jax.Array, axis: int) -> jax.Array:
  """`buffer` with `new` written at `index` along `axis` (every other axis from 0): a shared
  scalar index is one dynamic_update_slice, a per-row [B] index one per row (a scatter)."""
  start = lambda i: tuple(i if a == axis else 0 for a in range(1, buffer.ndim))
  if index.ndim == 0:
    return jax.lax.dynamic_update_slice(buffer, new, (0,) + start(index))
  return jax.vmap(lambda b, n, i: jax.lax.dynamic_update_slice(b, n, start(i)))(buffer, new,
                                                                              index)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
  """Index of each token within its run of equal segment ids (restarts at every new segment)."""
  t = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
  is_start = jnp.concatenate(
      [jnp.ones_like(segment_ids[:, :1], dtype=bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
      axis=1)
  start = jax.lax.cummax(jnp.where(is_start, t[None, :], 0), axis=1)
  return t[None, :] - start


def _bias(allowed: jax.Array) -> jax.Array:
  return jnp.where(allowed, 0.0, NEG_INF).astype(jnp.float32)[:, None, :, :]


def full_layout(attention_mask: jax.Array, segment_ids: jax.Array | None,
                positions: jax.Array | None = None,
                parent_segment_ids: jax.Array | None = None) -> Layout:
  """Layout of a whole-sequence forward pass (training, scoring).

  attention_mask: [B, T], 1 = real token, padding on either side or both.
  segment_ids: optional [B, T] for packed rows, 1..n per sequence, 0 = padding; each token then
    attends causally within its own segment and positions restart at 0 per segment.
  parent_segment_ids: optional [B, T] (with segment_ids and positions) for prefix sharing: a
    token also sees the earlier tokens of its parent segment (0 = none). E.g. one row holding
    [prompt | chosen | rejected] as segments 1, 2, 3 with parents 0, 1, 1: each response
    attends to the shared prompt but not to the other response.
  positions: optional [B, T] position ids; by default derived from the mask / segments.
  """
  mask = attention_mask.astype(jnp.int32)
  if segment_ids is None:
    segments = mask
    derived = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  else:
    segments = segment_ids.astype(jnp.int32) * mask
    derived = segment_positions(segments)
  positions = derived if positions is None else positions
  t = jnp.arange(mask.shape[1])
  causal = t[None, :, None] >= t[None, None, :]
  visible = segments[:, :, None] == segments[:, None, :]
  if parent_segment_ids is not None:
    parents = parent_segment_ids.astype(jnp.int32) * mask
    visible |= (parents[:, :, None] == segments[:, None, :]) & (parents[:, :, None] > 0)
  allowed = causal & visible & (segments[:, None, :] > 0)
  return Layout(positions.astype(jnp.int32), _bias(allowed))


def cached_layout(attention_mask: jax.Array, cache: KVCache) -> tuple[Layout, KVCache]:
  """Layout of T new tokens written at slots [index, index+T) of `cache` (per row when the
  index is [B]); the updated cache.

  The returned cache carries the new mask/index/next_pos; the layers write k and v.
  """
  mask = attention_mask.astype(jnp.int32)
  t = mask.shape[1]
  new_mask = write_rows(cache.mask, mask, cache.index, axis=1)
  positions = cache.next_pos[:, None] + jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
  q_slot = jnp.reshape(cache.index, (-1, 1)) + jnp.arange(t)[None, :]  # [1 or B, T]
  k_slot = jnp.arange(cache.max_len)
  allowed = (k_slot[None, None, :] <= q_slot[:, :, None]) & (new_mask[:, None, :] > 0)
  new_cache = cache.replace(mask=new_mask, index=cache.index + t,
                            next_pos=cache.next_pos + mask.sum(axis=1))
  return Layout(positions.astype(jnp.int32), _bias(allowed)), new_cache


def last_token_index(attention_mask: jax.Array) -> jax.Array:
  """[B] index of the last real token of each row (any padding side)."""
  t = jnp.arange(attention_mask.shape[1])
  return jnp.max(jnp.where(attention_mask > 0, t[None, :], -1), axis=1)


def segment_last_index(segment_ids: jax.Array, max_segments: int) -> jax.Array:
  """[B, max_segments] index of the last token of segments 1..max_segments (-1 if absent)."""
  t = jnp.arange(segment_ids.shape[1])
  seg = jnp.arange(1, max_segments + 1)
  hit = segment_ids[:, None, :] == seg[None, :, None]
  return jnp.max(jnp.where(hit, t[None, None, :], -1), axis=2)
