"""Jitted autoregressive sampling from a policy with a KV cache: a fixed batch, or continuous
batching over a fixed number of slots.

Fixed batch (`SamplingConfig.slots=None`). One call of `generate` is one XLA program: a prefill
of the (padded) prompt batch, then a `lax.while_loop` that feeds one token per step into a cache
of exactly `prompt_len + max_new_tokens - 1` slots (the last sampled token is never fed back),
and stops as soon as every row has emitted EOS. All buffers have fixed shapes; finished rows
keep running through the loop, but their new cache slots are masked and their outputs
overwritten with PAD. A batch therefore costs (its longest response) x (all its rows).

Continuous batching (`slots=S`). Every prompt is prefilled once, up front; S slots then decode
side by side, and a slot whose response ends (EOS or max_new_tokens) is refilled inside the
same while_loop with the next prompt in order (its prompt keys/values are copied into the
slot, and its first token is drawn from the prefill's logits). The loop runs until every prompt
is done, so a batch costs about (generated tokens) / S steps of S rows: no step is spent on a
row that has finished. Each decode step also attends only to the cache slots the live rows can
see, rounded up to a width bucket (prompt + 32, 64, 128, ... new tokens), so its cost tracks
the live length rather than max_new_tokens. Outputs are in prompt order, shaped as the fixed
batch's, and slot count never changes them (see Randomness).

Log-probs. `Samples.logprobs` is log softmax(logits / temperature)[token]: the temperature-scaled
distribution *before* top-k / top-p filtering and EOS suppression (`min_new_tokens`). That is
the quantity PPO recomputes from a full forward pass with the sampling temperature, so the
ratio pi_new / pi_old starts at exactly 1; it is *not* the probability under the truncated
distribution the token was drawn from (which is 0 for filtered tokens and would not match any
full-forward recomputation).

Randomness. By default (fixed batch) column j is drawn with `fold_in(key, j)` over the whole
batch at once, so one key gives one result, independent of how the batch is sharded over the
mesh (threefry bits do not depend on sharding); rows draw different numbers, so repeated
prompts give different samples. With `key_per_prompt=True`, and always under continuous
batching, prompt i draws column j with `fold_in(fold_in(key, i), j)`: its response depends on
(key, i) only, not on the other rows, the slot it lands in or the slot count.
"""
import dataclasses
import functools
from typing import Any

import chex
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from rlhf_jax import models, objectives, parallel
from rlhf_jax.models.transformer import Transformer

Params = Any


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to sample; hashable, so it is a static argument of the jitted `generate`.

  max_new_tokens: response buffer length (columns of every `Samples` field).
  eos_id: the token that ends a row (it is kept, inside the response mask). None = no stop
    token: every row runs to max_new_tokens (benchmarks, fixed-length rollouts).
  pad_id: written after EOS. Must differ from eos_id: rewards are read at the last real token,
    and a PAD that equals EOS would make a padded row look terminated.
  temperature: logits are divided by it before filtering and sampling, and log-probs use it.
  top_k: keep the k most likely tokens (0 = off). Ties at the k-th value are all kept.
  top_p: keep the smallest set of most likely tokens whose mass reaches top_p (1.0 = off),
    applied after top_k (the order transformers uses). Ties at the cut are all kept.
  greedy: take the argmax instead of sampling (top_k/top_p cannot change the argmax).
  min_new_tokens: EOS cannot be drawn before this many tokens (its logit is removed from the
    sampling distribution, not from the reported log-probs).
  prefill_chunk: feed the prompt in chunks of this many columns (None = all at once). The
    policy returns logits for every prompt position, so an unchunked prefill materialises a
    [batch, prompt_len, vocab] float32 tensor; chunking caps it at [batch, chunk, vocab].
  slots: None = fixed batch; an int = continuous batching with this many decode slots (at
    most the number of prompts; see the module docstring). More slots amortise each step's
    weight reads over more rows; fewer waste less at the tail, when the last long responses
    run with the other slots empty.
  key_per_prompt: draw prompt i's column j from fold_in(fold_in(key, i), j) (always so under
    continuous batching), so a prompt's sample does not depend on the rest of the batch.
  """
  max_new_tokens: int
  eos_id: int | None
  pad_id: int
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  greedy: bool = False
  min_new_tokens: int = 0
  prefill_chunk: int | None = None
  slots: int | None = None
  key_per_prompt: bool = False

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={self.max_new_tokens}; must be >= 1")
    if self.eos_id is not None and self.eos_id == self.pad_id:
      raise ValueError(f"eos_id == pad_id == {self.pad_id}; PAD must differ from EOS")
    if not self.temperature > 0:
      raise ValueError(f"temperature={self.temperature}; must be > 0 (use greedy=True for "
                       "argmax decoding)")
    if self.top_k < 0:
      raise ValueError(f"top_k={self.top_k}; must be >= 0 (0 = off)")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p={self.top_p}; must be in (0, 1]")
    if not 0 <= self.min_new_tokens <= self.max_new_tokens:
      raise ValueError(f"min_new_tokens={self.min_new_tokens}; must be in "
                       f"[0, max_new_tokens={self.max_new_tokens}]")
    if self.prefill_chunk is not None and self.prefill_chunk < 1:
      raise ValueError(f"prefill_chunk={self.prefill_chunk}; must be >= 1 or None")
    if self.slots is not None and self.slots < 1:
      raise ValueError(f"slots={self.slots}; must be >= 1 or None (fixed batch)")


def sampling_config(settings, eos_id: int | None, pad_id: int) -> SamplingConfig:
  """A SamplingConfig from a config section holding max_new_tokens and temperature (and top_k,
  top_p, greedy, min_new_tokens, slots when it has them; slots 0 = fixed batch) and the task's
  special ids."""
  optional = {k: settings[k] for k in ("top_k", "top_p", "greedy", "min_new_tokens", "slots")
              if k in settings}
  if "slots" in optional:
    optional["slots"] = optional["slots"] or None  # Config files hold 0 for "fixed batch".
  return SamplingConfig(max_new_tokens=settings.max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                        temperature=settings.temperature, **optional)


@flax.struct.dataclass
class Samples:
  """Generated responses, one row per prompt row, `max_new_tokens` columns.

  tokens: [B, N] int32, PAD after EOS (and after the last column the loop reached).
  logprobs: [B, N] float32 log-probs of `tokens` under softmax(logits / temperature), unfiltered
    (see the module docstring); 0 outside the response mask.
  response_mask: [B, N] int32, 1 for every generated token up to and including EOS.
  lengths: [B] int32, the number of response tokens (sum of response_mask).
  finished: [B] bool, whether the row emitted EOS (False: it was cut at max_new_tokens).
  """
  tokens: jax.Array
  logprobs: jax.Array
  response_mask: jax.Array
  lengths: jax.Array
  finished: jax.Array


@flax.struct.dataclass
class _Loop:
  """The while_loop carry; named fields so the body never reads carries by position."""
  step: jax.Array  # [] int32: the response column sampled next.
  cache: models.KVCache
  tokens: jax.Array
  logprobs: jax.Array
  response_mask: jax.Array
  finished: jax.Array


def _shard_rows(tree):
  """Pins the leading (row) axis of every array to the `batch` logical axis.

  Loop carries get their sharding from propagation; without this, XLA may pick a replicated
  carry and gather the cache every step. The other axes stay unconstrained so a tensor-parallel
  preset can keep the cache's heads split. A no-op outside `parallel.mesh_context`.
  """
  def pin(x):
    if x.ndim == 0:
      return x
    return nn.with_logical_constraint(x, ("batch",) + (P.UNCONSTRAINED,) * (x.ndim - 1))
  return jax.tree.map(pin, tree)


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Sets every token outside the top-k / top-p set to -inf: [B, V] -> [B, V].

  `logits` are already temperature-scaled. Top-k keeps values >= the k-th largest; top-p then
  keeps the shortest prefix of the (top-k) sorted tokens whose probability mass reaches top_p,
  i.e. token i survives iff the mass strictly above it is < top_p (so the most likely token
  always survives). Both cuts are thresholds on the logit value, so tied tokens share a fate.
  """
  chex.assert_rank(logits, 2)
  vocab = logits.shape[-1]
  if top_k == 0 and top_p >= 1.0:
    return logits
  if 0 < top_k < vocab:
    # lax.top_k is far cheaper than a full sort at large vocab, and its sorted values are all
    # top-p needs after a top-k cut.
    ranked = jax.lax.top_k(logits, top_k)[0]
    logits = jnp.where(logits < ranked[:, -1:], -jnp.inf, logits)
  else:
    ranked = -jnp.sort(-logits, axis=-1)
  if top_p < 1.0:
    probs = jax.nn.softmax(ranked, axis=-1)
    mass_above = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.sum(mass_above < top_p, axis=-1, keepdims=True)  # >= 1: mass_above[0] == 0.
    threshold = jnp.take_along_axis(ranked, kept - 1, axis=-1)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def _inverse_cdf_draw(logits: jax.Array, u: jax.Array) -> jax.Array:
  """One token per row from softmax(logits) [B, V] by inversion, given u [B, 1] ~ U(0, 1): the
  first token whose cumulative probability exceeds u · total.

  Exact in distribution (a token of probability 0, e.g. filtered to -inf, can never be drawn:
  its cumulative value equals its predecessor's). It needs one uniform per row instead of one
  Gumbel per vocabulary entry, whose generation dominated a small model's decode step on
  XLA:CPU (2.3 ms of ~6 ms at batch 16, vocab 8192).
  """
  cdf = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=-1)
  return jnp.minimum(jnp.sum(cdf <= u * cdf[:, -1:], axis=-1), logits.shape[-1] - 1)


CDF_BLOCK = 128  # Vocabulary entries per block of `_blocked_inverse_cdf_draw`.


def _blocked_inverse_cdf_draw(logits: jax.Array, u: jax.Array) -> jax.Array:
  """The draw of `_inverse_cdf_draw` in O(V) instead of a full-vocabulary cumsum, which
  XLA:CPU runs as a windowed reduction costing as much as the LM head itself (6.5 ms at
  [128, 8192]): cumulative mass over blocks of CDF_BLOCK tokens finds the block, a cumsum inside
  that one block finds the token. Exact in distribution; a token of probability 0 is never
  drawn (both searches are clamped to entries with mass, so rounding between the two sums
  cannot land on a filtered token).
  """
  b, v = logits.shape
  nb = -(-v // CDF_BLOCK)
  probs = jnp.pad(jax.nn.softmax(logits, axis=-1), ((0, 0), (0, nb * CDF_BLOCK - v)))
  blocks = probs.reshape(b, nb, CDF_BLOCK)
  block_cdf = jnp.cumsum(jnp.sum(blocks, axis=-1), axis=-1)  # [B, nb]
  target = u[:, 0] * block_cdf[:, -1]
  last_with_mass = lambda x: jnp.max(jnp.where(x > 0, jnp.arange(x.shape[-1]), 0), axis=-1)
  j = jnp.minimum(jnp.sum(block_cdf <= target[:, None], axis=-1),
                  last_with_mass(jnp.sum(blocks, axis=-1)))
  inside = jnp.take_along_axis(blocks, j[:, None, None], axis=1)[:, 0]  # [B, CDF_BLOCK]
  before = jnp.where(j > 0, jnp.take_along_axis(block_cdf, jnp.maximum(j - 1, 0)[:, None],
                                                axis=1)[:, 0], 0.0)
  k = jnp.sum(before[:, None] + jnp.cumsum(inside, axis=-1) <= target[:, None], axis=-1)
  return j * CDF_BLOCK + jnp.minimum(k, last_with_mass(inside))


def _uniforms(key: jax.Array, column: jax.Array, prompt: jax.Array | None,
              rows: int) -> jax.Array:
  """[rows, 1] uniforms for drawing one column: batch-wide from fold_in(key, column) when
  `prompt` is None, else row r from fold_in(fold_in(key, prompt[r]), column[r])."""
  if prompt is None:
    return jax.random.uniform(jax.random.fold_in(key, column), (rows, 1), jnp.float32)
  column = jnp.broadcast_to(column, (rows,))
  draw = lambda i, j: jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, i), j), (1,),
                                         jnp.float32)
  return jax.vmap(draw)(prompt, column)


def _draw(logits: jax.Array, u: jax.Array, column: jax.Array,
          cfg: SamplingConfig) -> tuple[jax.Array, jax.Array]:
  """One token per row: (token [B] int32, its unfiltered temperature-scaled log-prob [B]
  float32). `column` ([] or [B]) is the response column being drawn (for min_new_tokens), `u`
  [B, 1] the uniforms of the draw."""
  scaled = logits.astype(jnp.float32) / jnp.float32(cfg.temperature)
  sampling = scaled
  if cfg.eos_id is not None and cfg.min_new_tokens > 0:
    is_eos = jnp.arange(scaled.shape[-1]) == cfg.eos_id
    early = jnp.reshape(column < cfg.min_new_tokens, (-1, 1))
    sampling = jnp.where(is_eos[None, :] & early, -jnp.inf, sampling)
  if cfg.greedy:
    token = jnp.argmax(sampling, axis=-1)
  else:
    # The batch-keyed draw keeps its full cumsum, so that runs made with it reproduce bit for
    # bit; per-prompt keys (new with continuous batching) use the O(V) blocked search.
    per_prompt = cfg.key_per_prompt or cfg.slots is not None
    draw = _blocked_inverse_cdf_draw if per_prompt else _inverse_cdf_draw
    token = draw(filter_logits(sampling, cfg.top_k, cfg.top_p), u)
  token = token.astype(jnp.int32)
  logprob = objectives.token_logprobs(logits[:, None, :], token[:, None], cfg.temperature)[:, 0]
  return token, logprob


def _emit(state: _Loop, logits: jax.Array, key: jax.Array, cfg: SamplingConfig) -> _Loop:
  """Samples column `state.step` from `logits` [B, V] and writes it; finished rows get PAD."""
  b = logits.shape[0]
  prompt = jnp.arange(b, dtype=jnp.int32) if cfg.key_per_prompt else None
  token, logprob = _draw(logits, _uniforms(key, state.step, prompt, b), state.step, cfg)
  live = ~state.finished
  token = jnp.where(live, token, cfg.pad_id)
  col = (0, state.step)
  tokens = jax.lax.dynamic_update_slice(state.tokens, token[:, None], col)
  logprobs = jax.lax.dynamic_update_slice(state.logprobs, jnp.where(live, logprob, 0.0)[:, None],
                                          col)
  mask = jax.lax.dynamic_update_slice(state.response_mask, live.astype(jnp.int32)[:, None], col)
  finished = state.finished
  if cfg.eos_id is not None:
    finished = finished | (live & (token == cfg.eos_id))
  return _shard_rows(state.replace(step=state.step + 1, tokens=tokens, logprobs=logprobs,
                                   response_mask=mask, finished=finished))


def _left_pad(ids: jax.Array, mask: jax.Array, width: int, pad_id: int):
  """Left-pads [B, T] ids / mask to `width` columns with masked PAD (positions come from masks,
  so extra masked columns change no logit)."""
  extra = width - ids.shape[1]
  if extra == 0:
    return ids, mask
  return (jnp.pad(ids, ((0, 0), (extra, 0)), constant_values=pad_id),
          jnp.pad(mask, ((0, 0), (extra, 0))))


def _at_last_real(x: jax.Array, mask: jax.Array) -> jax.Array:
  """x[b, last real column of row b]: [B, T, ...], [B, T] -> [B, ...] (column 0 if none)."""
  idx = jnp.maximum(models.last_token_index(mask), 0)
  return jnp.take_along_axis(x, idx.reshape((-1,) + (1,) * (x.ndim - 1)), axis=1)[:, 0]


def _prefill(module: Transformer, params: Params, ids: jax.Array, mask: jax.Array,
             cache: models.KVCache, chunk: int | None) -> tuple[jax.Array, models.KVCache]:
  """Writes the prompt into the cache; returns the next-token logits [B, V] of every row.

  Those are the logits at each row's last real token, wherever the padding is: masks decide
  positions and visibility, so a right-padded prompt's trailing PAD slots stay masked and
  decoding continues after them with the right position ids.
  """
  apply = functools.partial(module.apply, {"params": params})
  if chunk is None or chunk >= ids.shape[1]:
    logits, cache = apply(ids, mask, cache=cache)
    return _at_last_real(logits, mask), cache
  b, t = ids.shape
  n = t // chunk  # The caller padded t to a multiple of chunk.

  def body(carry, xs):
    cache, last = carry
    chunk_ids, chunk_mask = xs
    logits, cache = apply(chunk_ids, chunk_mask, cache=cache)
    seen = jnp.any(chunk_mask > 0, axis=1)[:, None]
    return (cache, jnp.where(seen, _at_last_real(logits, chunk_mask), last)), None

  split = lambda x: x.reshape(b, n, chunk).transpose(1, 0, 2)
  last = jnp.zeros((b, module.cfg.vocab_size), jnp.float32)
  (cache, last), _ = jax.lax.scan(body, (cache, last), (split(ids), split(mask)))
  return last, cache


def generate(module: Transformer, params: Params, prompt_ids: jax.Array,
             prompt_mask: jax.Array, key: jax.Array, cfg: SamplingConfig) -> Samples:
  """Samples up to `cfg.max_new_tokens` tokens after each prompt row, as one jitted program.

  module: a policy/reference `Transformer` (static); params: its plain params.
  prompt_ids, prompt_mask: [B, P] int, padded on either side (left padding is the convention);
    every row needs at least one real token. Place them with `parallel.shard_batch` and call
    under `parallel.mesh_context` to run data-parallel over the mesh.
  key: a PRNG key; the result is a deterministic function of it (and of the inputs).
  """
  # The logical axis rules in force are a static argument: jit's trace cache does not see
  # flax's rules context, and a program traced under one preset must not be reused under
  # another on the same mesh.
  return _generate(module, params, prompt_ids, prompt_mask, key, cfg,
                   parallel.axis_rules(nn.get_logical_axis_rules()))


@functools.partial(jax.jit, static_argnames=("module", "cfg", "rules"))
def _generate(module, params, prompt_ids, prompt_mask, key, cfg, rules) -> Samples:
  with nn.logical_axis_rules(rules):
    ids, mask = _checked_prompts(module, prompt_ids, prompt_mask, cfg)
    if cfg.slots is None:
      out = _generate_fixed(module, params, ids, mask, key, cfg)
    else:
      out = _generate_continuous(module, params, ids, mask, key, cfg)
  chex.assert_shape([out.tokens, out.logprobs, out.response_mask],
                    (prompt_ids.shape[0], cfg.max_new_tokens))
  chex.assert_type([out.logprobs], jnp.float32)
  return out


def _samples(state) -> Samples:
  """The outputs held by either loop's carry (`_Loop` or `_Slots`)."""
  return Samples(tokens=state.tokens, logprobs=state.logprobs,
                 response_mask=state.response_mask,
                 lengths=jnp.sum(state.response_mask, axis=1, dtype=jnp.int32),
                 finished=state.finished)


def _checked_prompts(module, prompt_ids, prompt_mask, cfg) -> tuple[jax.Array, jax.Array]:
  """int32 prompt ids / mask after the boundary checks, left-padded to a multiple of
  cfg.prefill_chunk when chunking."""
  chex.assert_rank([prompt_ids, prompt_mask], 2)
  chex.assert_equal_shape([prompt_ids, prompt_mask])
  chex.assert_type([prompt_ids, prompt_mask], int)
  vocab = module.cfg.vocab_size
  for name in ("pad_id", "eos_id"):
    value = getattr(cfg, name)
    if value is not None and not 0 <= value < vocab:
      raise ValueError(f"SamplingConfig.{name}={value} is outside the vocab [0, {vocab})")
  ids, mask = prompt_ids.astype(jnp.int32), prompt_mask.astype(jnp.int32)
  if cfg.prefill_chunk is not None:
    width = -(-ids.shape[1] // cfg.prefill_chunk) * cfg.prefill_chunk
    ids, mask = _left_pad(ids, mask, width, cfg.pad_id)
  return _shard_rows((ids, mask))


def _generate_fixed(module, params, ids, mask, key, cfg) -> Samples:
  """The fixed batch: every row decodes until all rows are done."""
  b, n = ids.shape[0], cfg.max_new_tokens

  # PREFILL: the last sampled token is never fed back, so n - 1 decode slots suffice.
  cache = _shard_rows(models.init_cache(module.cfg, b, ids.shape[1] + n - 1))
  logits, cache = _prefill(module, params, ids, mask, cache, cfg.prefill_chunk)
  state = _Loop(step=jnp.zeros((), jnp.int32), cache=_shard_rows(cache),
                tokens=jnp.full((b, n), cfg.pad_id, jnp.int32),
                logprobs=jnp.zeros((b, n), jnp.float32),
                response_mask=jnp.zeros((b, n), jnp.int32),
                finished=jnp.zeros((b,), bool))
  state = _emit(_shard_rows(state), logits, key, cfg)

  # DECODE: feed column step-1, sample column step. A finished row feeds PAD with mask 0, so
  # its slot stays masked; the loop ends early once no row is live.
  def cond(s: _Loop):
    return (s.step < n) & ~jnp.all(s.finished)

  def body(s: _Loop):
    prev = jax.lax.dynamic_slice_in_dim(s.tokens, s.step - 1, 1, axis=1)
    live = (~s.finished).astype(jnp.int32)[:, None]
    logits, cache = module.apply({"params": params}, prev, live, cache=s.cache)
    return _emit(s.replace(cache=_shard_rows(cache)), logits[:, -1], key, cfg)

  return _samples(jax.lax.while_loop(cond, body, state))


# ---------------------------------------------------------------------------------------------
# Continuous batching
# ---------------------------------------------------------------------------------------------

SMALLEST_WIDTH = 32  # New-token span of the narrowest attention-width bucket.


@flax.struct.dataclass
class _Slots:
  """The continuous-batching carry: S decode slots, and the outputs of all B prompts.

  prompt [S]: the prompt a slot decodes or last decoded (B before its first); column [S]: the
  response column it samples next; token [S]: the last token it sampled (fed next); active
  [S]: it is mid response. next_prompt []: the first prompt not yet given a slot.
  """
  prompt: jax.Array
  column: jax.Array
  token: jax.Array
  active: jax.Array
  next_prompt: jax.Array
  cache: models.KVCache
  tokens: jax.Array
  logprobs: jax.Array
  response_mask: jax.Array
  finished: jax.Array


def attention_widths(prompt_len: int, max_new_tokens: int) -> tuple[int, ...]:
  """The cache widths a continuous-batching decode step may attend to: the prompt plus 32, 64,
  128, ... new tokens, capped at the whole cache (prompt_len + max_new_tokens - 1). Doubling
  keeps the compiled variants few (one per width) and the wasted width under 2x."""
  full = prompt_len + max_new_tokens - 1
  widths, span = [], SMALLEST_WIDTH
  while prompt_len + span < full:
    widths.append(prompt_len + span)
    span *= 2
  return tuple(widths) + (full,)


def _record(state: _Slots, slot: jax.Array, valid: jax.Array, token: jax.Array,
            logprob: jax.Array, cfg: SamplingConfig) -> _Slots:
  """Writes the draws of slots `slot` [R] (where `valid`) at (their prompt, their column),
  advances their columns, and ends a slot's response at EOS or at the last column."""
  b, n = state.tokens.shape
  row = jnp.where(valid, state.prompt[slot], b)  # Out of range: the write is dropped.
  column = state.column[slot]
  at = (row, column)
  ended = column + 1 >= n
  finished = state.finished
  if cfg.eos_id is not None:
    ended |= token == cfg.eos_id
    finished = finished.at[row].set(token == cfg.eos_id, mode="drop")
  slot = jnp.where(valid, slot, state.prompt.shape[0])
  return state.replace(
      tokens=state.tokens.at[at].set(token, mode="drop"),
      logprobs=state.logprobs.at[at].set(logprob, mode="drop"),
      response_mask=state.response_mask.at[at].set(1, mode="drop"),
      finished=finished,
      token=state.token.at[slot].set(token, mode="drop"),
      column=state.column.at[slot].add(1, mode="drop"),
      active=state.active.at[slot].set(~ended, mode="drop"))


def _refill(state: _Slots, prompt_cache: models.KVCache, first_logits: jax.Array,
            key: jax.Array, cfg: SamplingConfig, at_most: int) -> _Slots:
  """Gives up to `at_most` idle slots the next prompts in order (while prompts remain): copies
  each one's prompt keys/values and mask into its slot and draws its response column 0 from
  the prefill's logits. A response that ends at column 0 leaves the slot idle again.

  Copying only `at_most` rows (not every slot's prompt region) keeps the per-step cost of
  refilling small; slots that wait are refilled on the next steps.
  """
  b, s, p = first_logits.shape[0], state.prompt.shape[0], prompt_cache.max_len
  # The first `at_most` idle slots (a stable sort puts idle slots first, in slot order).
  slot = jnp.argsort(state.active, stable=True)[:at_most].astype(jnp.int32)
  idle = ~state.active[slot]
  prompt = state.next_prompt + jnp.cumsum(idle.astype(jnp.int32)) - 1
  fill = idle & (prompt < b)
  src = jnp.minimum(prompt, b - 1)
  dst = jnp.where(fill, slot, s)  # Out of range: not written.
  cache = state.cache
  copy = lambda full, prompts: full.at[dst, :, :p].set(prompts[src], mode="drop")
  cache = cache.replace(
      k=tuple(copy(c, pc) for c, pc in zip(cache.k, prompt_cache.k)),
      v=tuple(copy(c, pc) for c, pc in zip(cache.v, prompt_cache.v)),
      # Response slots are hidden until written (the index restarts after the prompt).
      mask=cache.mask.at[dst].set(
          jnp.pad(prompt_cache.mask[src], ((0, 0), (0, cache.max_len - p))), mode="drop"),
      index=cache.index.at[dst].set(p, mode="drop"),
      next_pos=cache.next_pos.at[dst].set(prompt_cache.next_pos[src], mode="drop"))
  state = state.replace(prompt=state.prompt.at[dst].set(src, mode="drop"),
                        column=state.column.at[dst].set(0, mode="drop"), cache=cache,
                        next_prompt=state.next_prompt + jnp.sum(fill, dtype=jnp.int32))
  zero = jnp.zeros_like(src)
  token, logprob = _draw(first_logits[src], _uniforms(key, zero, src, src.shape[0]), zero, cfg)
  return _shard_slots(_record(state, slot, fill, token, logprob, cfg))


def _decode(module, params, state: _Slots, key: jax.Array, cfg: SamplingConfig,
            widths: tuple[int, ...]) -> _Slots:
  """One step of every active slot: feeds its last token, draws its next column. Each layer
  attends to the narrowest of `widths` that holds every active slot's keys (KVCache.widths);
  idle slots write a masked token at slot 0, so they never widen the step."""
  live = state.active.astype(jnp.int32)
  cache = state.cache.replace(index=jnp.where(state.active, state.cache.index, 0),
                              widths=widths)
  logits, cache = module.apply({"params": params}, state.token[:, None], live[:, None],
                               cache=cache)
  cache = cache.replace(index=jnp.where(state.active, cache.index, 0), widths=None)
  s = state.prompt.shape[0]
  token, logprob = _draw(logits[:, -1], _uniforms(key, state.column, state.prompt, s),
                         state.column, cfg)
  return _shard_slots(_record(state.replace(cache=cache), jnp.arange(s, dtype=jnp.int32),
                             state.active, token, logprob, cfg))


def _shard_slots(state: _Slots) -> _Slots:
  """Pins the slot carries (not the per-prompt outputs) to the `batch` axis."""
  pinned = _shard_rows((state.prompt, state.column, state.token, state.active, state.cache))
  return state.replace(**dict(zip(("prompt", "column", "token", "active", "cache"), pinned)))


def _generate_continuous(module, params, ids, mask, key, cfg) -> Samples:
  """Continuous batching over min(cfg.slots, B) slots (see the module docstring)."""
  b, p, n = ids.shape[0], ids.shape[1], cfg.max_new_tokens
  slots = min(cfg.slots, b)
  prompt_cache = _shard_rows(models.init_cache(module.cfg, b, p))
  first_logits, prompt_cache = _prefill(module, params, ids, mask, prompt_cache,
                                        cfg.prefill_chunk)
  cache = models.init_cache(module.cfg, slots, p + n - 1)
  state = _Slots(prompt=jnp.full((slots,), b, jnp.int32), column=jnp.zeros((slots,), jnp.int32),
                 token=jnp.full((slots,), cfg.pad_id, jnp.int32),
                 active=jnp.zeros((slots,), bool), next_prompt=jnp.zeros((), jnp.int32),
                 cache=cache.replace(index=jnp.zeros((slots,), jnp.int32)),
                 tokens=jnp.full((b, n), cfg.pad_id, jnp.int32),
                 logprobs=jnp.zeros((b, n), jnp.float32),
                 response_mask=jnp.zeros((b, n), jnp.int32), finished=jnp.zeros((b,), bool))
  widths = attention_widths(p, n)
  state = _refill(_shard_slots(state), prompt_cache, first_logits, key, cfg, at_most=slots)
  # Responses end about slots / (mean length) per step; a quarter of the slots is headroom.
  per_step = max(1, slots // 4)

  def cond(s: _Slots):
    return jnp.any(s.active) | (s.next_prompt < b)

  def body(s: _Slots):
    # No lax.cond around the decode: a branch that writes the cache makes XLA copy all of it.
    return _refill(_decode(module, params, s, key, cfg, widths), prompt_cache, first_logits,
                   key, cfg, at_most=per_step)

  return _samples(jax.lax.while_loop(cond, body, state))


def sequences(prompt_ids: jax.Array, prompt_mask: jax.Array,
              samples: Samples) -> tuple[jax.Array, jax.Array]:
  """Prompt + response as one batch for scoring: (ids [B, P+N], attention mask [B, P+N]).

  With a left-padded prompt the result is padded on both sides (a right-padded one also has
  PAD inside); every role of the model accepts both, as positions come from the mask. A
  reward model reads it at the last real token, the EOS of finished rows.
  """
  chex.assert_rank([prompt_ids, prompt_mask, samples.tokens], 2)
  ids = jnp.concatenate([prompt_ids.astype(jnp.int32), samples.tokens], axis=1)
  mask = jnp.concatenate([prompt_mask.astype(jnp.int32), samples.response_mask], axis=1)
  return ids, mask


def response_logprobs(module: Transformer, params: Params, prompt_ids: jax.Array,
                      prompt_mask: jax.Array, samples: Samples,
                      temperature: float = 1.0) -> jax.Array:
  """[B, N] float32 log-probs of the sampled tokens from one full forward pass; 0 off-mask.

  What PPO needs for the reference (or the updated policy) on a rollout: with the sampling
  params and temperature it reproduces `samples.logprobs`. Response column 0 is predicted at
  the prompt's last real token, column j > 0 at column P + j - 1.
  """
  ids, mask = sequences(prompt_ids, prompt_mask, samples)
  p = prompt_ids.shape[1]
  logits = module.apply({"params": params}, ids, mask)
  first = _at_last_real(logits[:, :p], prompt_mask)[:, None]
  logits = jnp.concatenate([first, logits[:, p:-1]], axis=1)
  logp = objectives.token_logprobs(logits, samples.tokens, temperature)
  chex.assert_equal_shape([logp, samples.logprobs])
  return jnp.where(samples.response_mask > 0, logp, 0.0)
