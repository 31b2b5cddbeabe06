"""Jitted autoregressive sampling from a policy with a fixed-size KV cache.

One call of `generate` is one XLA program: a prefill of the (padded) prompt batch, then a
`lax.while_loop` that feeds one token per step into a cache of exactly
`prompt_len + max_new_tokens - 1` slots (the last sampled token is never fed back), and stops as
soon as every row has emitted EOS. All buffers have fixed shapes; finished rows keep running
through the loop, but their new cache slots are masked and their outputs overwritten with PAD.

Log-probs. `Samples.logprobs` is log softmax(logits / temperature)[token]: the temperature-scaled
distribution *before* top-k / top-p filtering and EOS suppression (`min_new_tokens`). That is
the quantity PPO recomputes from a full forward pass with the sampling temperature, so the
ratio pi_new / pi_old starts at exactly 1; it is *not* the probability under the truncated
distribution the token was drawn from (which is 0 for filtered tokens and would not match any
full-forward recomputation).

Randomness. Column i is drawn with `fold_in(key, i)` over the whole batch at once, so one key
gives one result, independent of how the batch is sharded over the mesh (threefry bits do not
depend on sharding). Rows draw different numbers, so repeated prompts give different samples.
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


def sampling_config(settings, eos_id: int | None, pad_id: int) -> SamplingConfig:
  """A SamplingConfig from a config section holding max_new_tokens and temperature (and top_k,
  top_p, greedy, min_new_tokens when it has them) and the task's special ids."""
  optional = ("top_k", "top_p", "greedy", "min_new_tokens")
  return SamplingConfig(max_new_tokens=settings.max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                        temperature=settings.temperature,
                        **{k: settings[k] for k in optional if k in settings})


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


def _inverse_cdf_draw(logits: jax.Array, key: jax.Array) -> jax.Array:
  """One token per row from softmax(logits) [B, V] by inversion: the first token whose
  cumulative probability exceeds u ~ U(0, total).

  Exact in distribution (a token of probability 0, e.g. filtered to -inf, can never be drawn:
  its cumulative value equals its predecessor's). It needs one uniform per row instead of one
  Gumbel per vocabulary entry, whose generation dominated a small model's decode step on
  XLA:CPU (2.3 ms of ~6 ms at batch 16, vocab 8192).
  """
  cdf = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=-1)
  u = jax.random.uniform(key, (logits.shape[0], 1), jnp.float32) * cdf[:, -1:]
  return jnp.minimum(jnp.sum(cdf <= u, axis=-1), logits.shape[-1] - 1)


def _draw(logits: jax.Array, key: jax.Array, step: jax.Array,
          cfg: SamplingConfig) -> tuple[jax.Array, jax.Array]:
  """One column: (token [B] int32, its unfiltered temperature-scaled log-prob [B] float32)."""
  scaled = logits.astype(jnp.float32) / jnp.float32(cfg.temperature)
  sampling = scaled
  if cfg.eos_id is not None and cfg.min_new_tokens > 0:
    is_eos = jnp.arange(scaled.shape[-1]) == cfg.eos_id
    sampling = jnp.where(is_eos[None, :] & (step < cfg.min_new_tokens), -jnp.inf, sampling)
  if cfg.greedy:
    token = jnp.argmax(sampling, axis=-1)
  else:
    sampling = filter_logits(sampling, cfg.top_k, cfg.top_p)
    token = _inverse_cdf_draw(sampling, jax.random.fold_in(key, step))
  token = token.astype(jnp.int32)
  logprob = objectives.token_logprobs(logits[:, None, :], token[:, None], cfg.temperature)[:, 0]
  return token, logprob


def _emit(state: _Loop, logits: jax.Array, key: jax.Array, cfg: SamplingConfig) -> _Loop:
  """Samples column `state.step` from `logits` [B, V] and writes it; finished rows get PAD."""
  token, logprob = _draw(logits, key, state.step, cfg)
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
    return _generate_traced(module, params, prompt_ids, prompt_mask, key, cfg)


def _generate_traced(module, params, prompt_ids, prompt_mask, key, cfg) -> Samples:
  chex.assert_rank([prompt_ids, prompt_mask], 2)
  chex.assert_equal_shape([prompt_ids, prompt_mask])
  chex.assert_type([prompt_ids, prompt_mask], int)
  vocab = module.cfg.vocab_size
  for name in ("pad_id", "eos_id"):
    value = getattr(cfg, name)
    if value is not None and not 0 <= value < vocab:
      raise ValueError(f"SamplingConfig.{name}={value} is outside the vocab [0, {vocab})")
  b, n = prompt_ids.shape[0], cfg.max_new_tokens
  ids, mask = prompt_ids.astype(jnp.int32), prompt_mask.astype(jnp.int32)
  if cfg.prefill_chunk is not None:
    width = -(-ids.shape[1] // cfg.prefill_chunk) * cfg.prefill_chunk
    ids, mask = _left_pad(ids, mask, width, cfg.pad_id)
  ids, mask = _shard_rows((ids, mask))

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

  state = jax.lax.while_loop(cond, body, state)
  out = Samples(tokens=state.tokens, logprobs=state.logprobs, response_mask=state.response_mask,
                lengths=jnp.sum(state.response_mask, axis=1, dtype=jnp.int32),
                finished=state.finished)
  chex.assert_shape([out.tokens, out.logprobs, out.response_mask], (b, n))
  chex.assert_type([out.logprobs], jnp.float32)
  return out


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
