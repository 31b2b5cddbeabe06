"""One decoder backbone (GPT-2 and Llama/Qwen2 flavours) and the heads on top of it.

Every kernel carries logical axis names from a small vocabulary (see rlhf_jax/parallel/rules.py):
  vocab, embed, heads (q/o width = n_heads*head_dim), kv_heads (k/v width), mlp
and activations are constrained with batch / length / act_embed. Kernels are 2-D (the head
axis is flattened into the feature axis) because flax applies logical constraints to the
flattened shape of a DenseGeneral init.
"""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from rlhf_jax.models import layout as layout_lib
from rlhf_jax.models.config import ModelConfig

ROLES = ("policy", "reference", "value", "reward", "policy_value")

_normal = nn.initializers.normal


def _kernel(init, names):
  return nn.with_logical_partitioning(init, names)


def _rows(x: jax.Array) -> jax.Array:
  """[B, T, D] -> [B*T, D] for the projections: with two contracting dims (B, T) the weight
  gradients' dot_general runs about 1.7x slower on XLA:CPU than with one."""
  return x.reshape(-1, x.shape[-1])


class Dense(nn.Dense):
  """nn.Dense, plus a LoRA update when its params carry one: y = x W + b + scale · (x A) B.

  `models.lora.apply_lora` puts A ("lora_a" [in, r]), B ("lora_b" [r, out]) and the scale
  ("lora_scale", a float32 scalar) next to the kernel of each adapted projection. Applying the
  update to the activations instead of folding A B into W means no merged copy of the kernels
  and no kernel-sized gradient: the backward pass only produces r-wide products. Without
  those entries (plain params, init, export) this is nn.Dense exactly.
  """

  @nn.compact
  def __call__(self, inputs):
    y = super().__call__(inputs)
    if not self.has_variable("params", "lora_a"):
      return y
    dtype = self.dtype or jnp.float32
    a, b = (self.get_variable("params", n).astype(dtype) for n in ("lora_a", "lora_b"))
    scale = self.get_variable("params", "lora_scale").astype(dtype)
    return y + scale * jnp.dot(jnp.dot(inputs.astype(dtype), a), b)


def _dense(features, names, cfg: ModelConfig, *, use_bias, std=0.02, name=None):
  return Dense(features, use_bias=use_bias, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
               kernel_init=_kernel(_normal(std), names),
               bias_init=_kernel(nn.initializers.zeros, names[1:]), name=name)


class RMSNorm(nn.Module):
  """Llama RMSNorm: normalise in float32, scale after casting back (as transformers does)."""
  eps: float
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", _kernel(nn.initializers.ones, ("embed",)), (x.shape[-1],),
                       jnp.float32)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * x32.astype(self.dtype)


def _norm(cfg: ModelConfig, name):
  if cfg.arch == "gpt2":
    return nn.LayerNorm(epsilon=cfg.norm_eps, dtype=cfg.compute_dtype, param_dtype=jnp.float32,
                        use_fast_variance=False,  # E[x²]-E[x]² loses float32 precision.
                        scale_init=_kernel(nn.initializers.ones, ("embed",)),
                        bias_init=_kernel(nn.initializers.zeros, ("embed",)), name=name)
  return RMSNorm(cfg.norm_eps, cfg.compute_dtype, name=name)


def rope_frequencies(cfg: ModelConfig) -> jax.Array:
  """Inverse frequencies [head_dim/2], including Llama-3 rescaling when configured."""
  d = cfg.head_size
  inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  if cfg.rope_scaling is None:
    return inv
  s = dict(cfg.rope_scaling)
  factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
  old_len = s["original_max_position_embeddings"]
  wavelen = 2 * math.pi / inv
  scaled = jnp.where(wavelen > old_len / lo, inv / factor, inv)
  smooth = (old_len / wavelen - lo) / (hi - lo)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
  return jnp.where(medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotates [B, T, H, D] by positions [B, T] with the rotate-half pairing of transformers."""
  angles = positions.astype(jnp.float32)[:, :, None] * inv_freq[None, None, :]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


QUERY_BLOCK = 128  # Query rows per block in causal_attention (sequences of >= 2 blocks).


def causal_attention(q, k, v, bias, scale: float, dtype, query_block: int = QUERY_BLOCK):
  """Whole-sequence attention [B, T, H, D] x [B, T, KV, D] -> [B, T, H, D], for a `bias`
  [B, 1, T, T] that is causal (every layout.full_layout bias is: keys after a query are
  masked, whatever the padding, segments or prefix sharing).

  Same numerics as jax.nn.dot_product_attention up to float32 rounding (float32 logits and
  softmax, weights cast to `dtype` for the value product), arranged for the training step on
  XLA:CPU, where the [B, H, T, T] score work dominated the step far beyond its FLOP share:
  - heads-major operands (one transpose each) instead of dot_generals over [B, T, H, D];
  - query blocks: block i attends only keys [0, (i+1)·block), so the all-masked upper
    blocks are never computed (3/4 of the score work at T = 2 blocks, 10/16 at 4). Each
    block sees all its keys at once, so its softmax is exact (no online rescaling);
  - the heads-major operands are materialised once (_materialized) before the blocks slice
    them, and the scale is applied to q ([.., D]) rather than to each block's logits;
  - a hand-written backward pass (_block_attention) that makes fewer passes over the
    [.., block, keys] float32 tensors than autodiff of the softmax does.
  Grouped-query heads repeat k/v (the backward pass sums the repeats). A padding query row
  (no visible key) gets a uniform average over its block's keys instead of all keys: a
  different meaningless value in a row that no real token attends to and no loss reads.
  Measured on a busy 2-core CPU, small shape (16 x 256 tokens, 8 heads of 64), attention
  forward + backward alone: 1.21 s -> 0.81 s per layer for the blocks (median of 7,
  interleaved); a packed DPO step (4 x 1024 tokens, benchmarks/packed_pairs.py's workload)
  9.42 -> 8.04 s for the hand-written backward pass (median of 6, interleaved), then
  7.41 -> 6.68 s for the materialised operands and pre-scaled q (median of 8, interleaved;
  the packed reward step 7.52 -> 6.99 s, median of 10).
  """
  b, t, h, d = q.shape
  heads_major = lambda x: x.astype(dtype).transpose(0, 2, 1, 3)
  # The scale multiplies q in float32, then rounds once to `dtype` with the transpose.
  q, k, v = heads_major(q.astype(jnp.float32) * scale), heads_major(k), heads_major(v)
  if k.shape[1] != h:
    k, v = jnp.repeat(k, h // k.shape[1], axis=1), jnp.repeat(v, h // v.shape[1], axis=1)
  blocks = t // query_block if t % query_block == 0 and t >= 2 * query_block else 1
  if blocks > 1:
    q, k, v = _materialized(q), _materialized(k), _materialized(v)
  return _block_attention(q, k, v, bias, blocks).transpose(0, 2, 1, 3)


@jax.custom_vjp
def _materialized(x):
  """x, written once to its own buffer before the query blocks slice it.

  XLA:CPU fuses a cheap producer into every consumer: the transpose and RoPE rotation behind
  a heads-major key were recomputed inside each block's key-prefix slice (4.5x over at 8
  blocks) and the cosines with them. lax.optimization_barrier does not stop that (XLA:CPU
  expands it before fusion); a gather does, as it reads its operand by index, so XLA fuses
  the producer into the gather once and the blocks slice the gathered buffer. The gather is
  the identity over the [B·H] (batch, head) rows: whole [T, D] slices, in the operand's own
  layout (one over the sequence axis came out sequence-major and needed another transpose).
  The backward pass passes the cotangent through.
  """
  b, h, t, d = x.shape
  rows = x.reshape(b * h, t, d)
  return jnp.take(rows, jnp.arange(b * h), axis=0, unique_indices=True,
                  indices_are_sorted=True, mode="clip").reshape(b, h, t, d)


_materialized.defvjp(lambda x: (_materialized(x), None), lambda _, g: (g,))


def _attention_block(q, k, v, bias, lo: int, hi: int):
  """Query rows [lo, hi) of heads-major, pre-scaled q over keys [0, hi): (out in q.dtype,
  float32 weights exp(logits - row max) [.., hi - lo, hi], their row sums [.., hi - lo, 1]).
  The softmax is normalised after the value product: the division runs on [.., D], not on
  the weights."""
  logits = jnp.einsum("bhtd,bhsd->bhts", q[:, :, lo:hi], k[:, :, :hi],
                      preferred_element_type=jnp.float32) + bias[:, :, lo:hi, :hi]
  weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
  total = jnp.sum(weights, axis=-1, keepdims=True)
  out = jnp.einsum("bhts,bhsd->bhtd", weights.astype(q.dtype), v[:, :, :hi],
                   preferred_element_type=jnp.float32)
  return (out / total).astype(q.dtype), weights, total


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _block_attention(q, k, v, bias, blocks: int):
  """causal_attention's core on heads-major [B, H, T, D] operands (q pre-scaled), in
  `blocks` query blocks."""
  return _block_attention_fwd(q, k, v, bias, blocks)[0]


def _block_attention_fwd(q, k, v, bias, blocks):
  size = q.shape[2] // blocks
  parts = [_attention_block(q, k, v, bias, i * size, (i + 1) * size) for i in range(blocks)]
  out = jnp.concatenate([o for o, _, _ in parts], axis=2) if blocks > 1 else parts[0][0]
  return out, (q, k, v, bias, out, [(w, s) for _, w, s in parts])


def _block_attention_bwd(blocks, saved, d_out):
  """The softmax backward as flash attention writes it: with p = w / s and o = p·v,
  d logits = p ∘ (dp - rowsum(d_out ∘ o)), where rowsum(d_out ∘ o) = rowsum(p ∘ dp) is a
  [.., D] reduction instead of a [.., keys] one, and 1/s is folded into d_out ([.., D])."""
  q, k, v, bias, out, saved_blocks = saved
  size, f32 = q.shape[2] // blocks, jnp.float32
  dq = []
  dk, dv = jnp.zeros(k.shape, f32), jnp.zeros(v.shape, f32)
  dbias = jnp.zeros(bias.shape, f32)  # Layout constants: unused, so XLA drops it.
  for i, (weights, total) in enumerate(saved_blocks):
    lo, hi = i * size, (i + 1) * size
    g = d_out[:, :, lo:hi].astype(f32)
    g_over_total = (g / total).astype(q.dtype)
    row_dot = jnp.sum(g * out[:, :, lo:hi].astype(f32), axis=-1, keepdims=True) / total
    dp = jnp.einsum("bhtd,bhsd->bhts", g_over_total, v[:, :, :hi], preferred_element_type=f32)
    d_logits = weights * (dp - row_dot)
    dbias = dbias.at[:, :, lo:hi, :hi].set(jnp.sum(d_logits, axis=1, keepdims=True))
    d_logits = d_logits.astype(q.dtype)
    dq.append(jnp.einsum("bhts,bhsd->bhtd", d_logits, k[:, :, :hi], preferred_element_type=f32))
    dk = dk.at[:, :, :hi].add(jnp.einsum("bhts,bhtd->bhsd", d_logits, q[:, :, lo:hi],
                                         preferred_element_type=f32))
    dv = dv.at[:, :, :hi].add(jnp.einsum("bhts,bhtd->bhsd", weights.astype(q.dtype),
                                         g_over_total, preferred_element_type=f32))
  dq = jnp.concatenate(dq, axis=2) if blocks > 1 else dq[0]
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dbias.astype(bias.dtype)


_block_attention.defvjp(_block_attention_fwd, _block_attention_bwd)


def _cached_attention(q, k_cache, v_cache, bias, head_dim: int, dtype):
  """Attention of new queries [B, T, H, D] over heads-major cache slots [B, KV, S, D].

  jax.nn.dot_product_attention: float32 logits and softmax, native grouped-query heads.
  """
  k, v = (c.transpose(0, 2, 1, 3).astype(dtype) for c in (k_cache, v_cache))
  return jax.nn.dot_product_attention(q.astype(dtype), k, v, bias=bias,
                                      scale=1.0 / math.sqrt(head_dim))


class Attention(nn.Module):
  """Causal multi-head / grouped-query attention with an optional fixed-size KV cache."""
  cfg: ModelConfig
  out_std: float

  @nn.compact
  def __call__(self, x, lay: layout_lib.Layout, kv=None, cache_index=None, widths=None):
    cfg = self.cfg
    h, kvh, hd = cfg.n_heads, cfg.kv_heads, cfg.head_size
    bias = cfg.arch == "gpt2" or cfg.qkv_bias
    b, t, _ = x.shape
    x = _rows(x)
    q = _dense(h * hd, ("embed", "heads"), cfg, use_bias=bias, name="q")(x).reshape(b, t, h, hd)
    k = _dense(kvh * hd, ("embed", "kv_heads"), cfg, use_bias=bias, name="k")(x)
    v = _dense(kvh * hd, ("embed", "kv_heads"), cfg, use_bias=bias, name="v")(x)
    k, v = k.reshape(b, t, kvh, hd), v.reshape(b, t, kvh, hd)
    if cfg.uses_rope:
      inv_freq = rope_frequencies(cfg)
      q, k = apply_rope(q, lay.positions, inv_freq), apply_rope(k, lay.positions, inv_freq)
    if kv is not None:  # Write the new keys/values into the cache.
      # The cache is heads-major [B, kv_heads, S, D]: a [B, S, kv_heads, D] cache made XLA copy
      # and transpose every layer's whole cache on every decode step (cost growing with S).
      heads_major = lambda x: x.transpose(0, 2, 1, 3)
      kv = tuple(layout_lib.write_rows(c, heads_major(x).astype(c.dtype), cache_index, axis=2)
                 for c, x in ((kv[0], k), (kv[1], v)))
    dtype = cfg.compute_dtype
    if kv is None:  # Whole sequences (training, scoring): the causal block path below.
      out = causal_attention(q, k, v, lay.bias, 1.0 / math.sqrt(hd), dtype)
    else:
      # Read only as many slots as the rows have written (KVCache.widths): one static slice per
      # width, chosen at run time. The switch only reads the cache: a branch that wrote it
      # would make XLA copy the whole cache on every step.
      attend_to = lambda w: lambda q, kc, vc, bias: _cached_attention(
          q, kc[:, :, :w], vc[:, :, :w], bias[..., :w], hd, dtype)
      if not widths:
        out = attend_to(kv[0].shape[2])(q, *kv, lay.bias)
      else:
        which = jnp.sum(jnp.max(cache_index) + t > jnp.asarray(widths[:-1], jnp.int32))
        out = jax.lax.switch(which, [attend_to(w) for w in widths], q, *kv, lay.bias)
    out = _dense(cfg.d_model, ("heads", "embed"), cfg, use_bias=cfg.arch == "gpt2",
                 std=self.out_std, name="o")(out.reshape(b * t, h * hd))
    return out.reshape(b, t, cfg.d_model), kv


class Mlp(nn.Module):
  cfg: ModelConfig
  out_std: float

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    shape, x = x.shape, _rows(x)
    if cfg.arch == "gpt2":  # GELU (tanh approximation, "gelu_new") MLP with biases.
      hdn = _dense(cfg.mlp_dim, ("embed", "mlp"), cfg, use_bias=True, name="fc")(x)
      hdn = jax.nn.gelu(hdn, approximate=True)
      out = _dense(cfg.d_model, ("mlp", "embed"), cfg, use_bias=True, std=self.out_std,
                   name="proj")(hdn)
    else:
      gate = _dense(cfg.mlp_dim, ("embed", "mlp"), cfg, use_bias=False, name="gate")(x)
      up = _dense(cfg.mlp_dim, ("embed", "mlp"), cfg, use_bias=False, name="up")(x)
      out = _dense(cfg.d_model, ("mlp", "embed"), cfg, use_bias=False, std=self.out_std,
                   name="down")(jax.nn.silu(gate) * up)
    return out.reshape(shape)


class Block(nn.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, lay, kv=None, cache_index=None, widths=None):
    # GPT-2 scales the init of residual output projections by 1/sqrt(2 * n_layers).
    out_std = 0.02 / math.sqrt(2 * self.cfg.n_layers) if self.cfg.arch == "gpt2" else 0.02
    a, kv = Attention(self.cfg, out_std, name="attn")(_norm(self.cfg, "attn_norm")(x), lay, kv,
                                                      cache_index, widths)
    x = x + a
    x = x + Mlp(self.cfg, out_std, name="mlp")(_norm(self.cfg, "mlp_norm")(x))
    return nn.with_logical_constraint(x, ("batch", "length", "act_embed")), kv


class Decoder(nn.Module):
  """Token (+ learned position) embedding, the blocks, the final norm: hidden states [B,T,D]."""
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    self.embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.compute_dtype,
                          param_dtype=jnp.float32,
                          embedding_init=_kernel(_normal(0.02), ("vocab", "embed")))
    if not cfg.uses_rope:
      self.wpe = self.param("wpe", _kernel(_normal(0.01), (None, "embed")),
                            (cfg.max_len, cfg.d_model), jnp.float32)
    # `widths` (argument 5, counting self), the cache's attention widths, is static.
    block = nn.remat(Block, prevent_cse=True, static_argnums=(5,)) if cfg.remat else Block
    self.blocks = [block(cfg, name=f"block_{i}") for i in range(cfg.n_layers)]
    self.final_norm = _norm(cfg, "final_norm")

  def __call__(self, input_ids, attention_mask, segment_ids=None, cache=None, positions=None,
               parent_segment_ids=None):
    if cache is None:
      lay = layout_lib.full_layout(attention_mask, segment_ids, positions, parent_segment_ids)
    else:
      lay, cache = layout_lib.cached_layout(attention_mask, cache)
    x = self.embed(input_ids)
    if not self.cfg.uses_rope:
      x = x + jnp.take(self.wpe, lay.positions, axis=0).astype(x.dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
    new_k, new_v = [], []
    for i, block in enumerate(self.blocks):
      kv = None if cache is None else (cache.k[i], cache.v[i])
      start = None if cache is None else cache.index - input_ids.shape[1]
      x, kv = block(x, lay, kv, start, None if cache is None else cache.widths)
      if kv is not None:
        new_k.append(kv[0])
        new_v.append(kv[1])
    if cache is not None:
      cache = cache.replace(k=tuple(new_k), v=tuple(new_v))
    return self.final_norm(x), cache

  def attend(self, hidden):
    """Tied LM head: logits against the token embedding matrix."""
    return self.embed.attend(hidden)


class Transformer(nn.Module):
  """The decoder with the head of one role.

  role "policy"/"reference": logits [B, T, vocab] (float32).
  role "value": per-token values [B, T] (float32; head zero-initialised).
  role "reward": scalar per sequence [B], read at the last real token; with `segment_ids` and
    `max_segments` (packed rows), [B, max_segments] read at each segment's last token.
  role "policy_value": (logits, values) from one backbone (PPO with a value head on the
    policy); its params also serve a "policy" module (the value head is simply unused).
  With `cache`, returns (output, updated cache). `positions` and `parent_segment_ids` give
  explicit position ids and prefix sharing (see layout.full_layout). `logits_to_keep` = N > 0
  applies the LM head to the last N columns only (transformers' argument of the same name): a
  loss over response tokens then never builds the prompt's [B, T_prompt, vocab] logits, their
  head matmuls or their log-softmax. `head_columns` [B, N] (column indices; negative ones read
  column 0, for the caller to mask) applies the head of any role to those columns' hidden
  states only, output [B, N, ...]: packed rows interleave prompts and responses, so no tail
  holds just the loss tokens, and a gather before the head keeps its cost to them (a reward
  model reads its packed scores the same way, at each sequence's last column).
  """
  cfg: ModelConfig
  role: str = "policy"

  def setup(self):
    if self.role not in ROLES:
      raise ValueError(f"unknown model role {self.role!r}; expected one of {ROLES}")
    cfg = self.cfg
    self.backbone = Decoder(cfg)
    if self.role in ("policy", "reference", "policy_value") and not cfg.tie_embeddings:
      self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.compute_dtype,
                              param_dtype=jnp.float32,
                              kernel_init=_kernel(_normal(0.02), ("embed", "vocab")))
    if self.role in ("value", "policy_value"):
      self.value_head = nn.Dense(1, dtype=jnp.float32, param_dtype=jnp.float32,
                                 kernel_init=_kernel(nn.initializers.zeros, ("embed", None)),
                                 bias_init=_kernel(nn.initializers.zeros, (None,)))
    elif self.role == "reward":
      self.reward_head = nn.Dense(
          1, dtype=jnp.float32, param_dtype=jnp.float32,
          kernel_init=_kernel(_normal(1.0 / math.sqrt(cfg.d_model + 1)), ("embed", None)),
          bias_init=_kernel(nn.initializers.zeros, (None,)))

  def __call__(self, input_ids, attention_mask=None, segment_ids=None, cache=None,
               max_segments=None, positions=None, parent_segment_ids=None,
               logits_to_keep: int = 0, head_columns=None):
    if logits_to_keep and self.role not in ("policy", "reference", "policy_value"):
      raise ValueError(f"logits_to_keep={logits_to_keep} needs a role with an LM head, not "
                       f"{self.role!r}")
    if logits_to_keep and head_columns is not None:
      raise ValueError("give logits_to_keep or head_columns, not both")
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    hidden, new_cache = self.backbone(input_ids, attention_mask, segment_ids, cache, positions,
                                      parent_segment_ids)
    if head_columns is not None:
      hidden = jnp.take_along_axis(hidden, jnp.maximum(head_columns, 0)[..., None], axis=1)
    if self.role in ("policy", "reference", "policy_value"):
      kept = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
      rows = _rows(kept)
      out = self.backbone.attend(rows) if self.cfg.tie_embeddings else self.lm_head(rows)
      out = out.reshape(*kept.shape[:-1], out.shape[-1])
      out = nn.with_logical_constraint(out.astype(jnp.float32), ("batch", "length", "act_vocab"))
      if self.role == "policy_value":
        out = (out, self.value_head(hidden.astype(jnp.float32))[..., 0])
    elif self.role == "value":
      out = self.value_head(hidden.astype(jnp.float32))[..., 0]
    else:
      scores = self.reward_head(hidden.astype(jnp.float32))[..., 0]
      if head_columns is not None:
        out = scores
      elif segment_ids is None:
        idx = layout_lib.last_token_index(attention_mask)
        out = jnp.take_along_axis(scores, jnp.maximum(idx, 0)[:, None], axis=1)[:, 0]
      else:
        if max_segments is None:
          raise ValueError("a reward model on packed rows needs max_segments")
        idx = layout_lib.segment_last_index(segment_ids * attention_mask, max_segments)
        out = jnp.where(idx >= 0, jnp.take_along_axis(scores, jnp.maximum(idx, 0), axis=1), 0.0)
    return out if cache is None else (out, new_cache)
