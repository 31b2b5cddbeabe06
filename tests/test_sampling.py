"""Sampler: log-probs vs a full forward pass, distributions (chi-square), EOS, greedy, sharding.

Every expectation is computed independently of the sampler: full forward passes without a
cache, numpy float64 softmax and a numpy top-k / top-p written the way transformers writes its
logits warpers, and an exhaustive enumeration of a two-token output space.
"""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_python
from sampling_stats import chi_square_pvalue
from rlhf_jax import models, parallel, sampling

PAD = 0


def _policy(arch, vocab, d_model, n_layers, n_heads, scale, seed=0):
  cfg = models.get_config("tiny", arch=arch, vocab_size=vocab, d_model=d_model,
                          n_layers=n_layers, n_heads=n_heads,
                          n_kv_heads=None if arch == "gpt2" else n_heads // 2,
                          mlp_dim=2 * d_model, max_len=64, tie_embeddings=arch == "gpt2")
  module = models.build_model(cfg)
  params = parallel.init_params(module, jax.random.key(seed), np.ones((1, 4), np.int32))
  # Random init gives near-uniform logits; scaling every weight makes them peaky, so that
  # top-k / top-p cut real mass and a misaligned log-prob cannot hide.
  return module, jax.tree.map(lambda x: scale * x, params)


def _log_softmax(z):
  z = np.asarray(z, np.float64)
  m = z.max(-1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def _forward(module):
  return jax.jit(lambda p, ids, mask: module.apply({"params": p}, ids, mask))


def _left_padded_prompts(rng, batch, width, vocab, min_len=2):
  ids = np.full((batch, width), PAD, np.int32)
  mask = np.zeros_like(ids)
  for i in range(batch):
    n = rng.randint(min_len, width + 1)
    ids[i, width - n:], mask[i, width - n:] = rng.randint(2, vocab, size=n), 1
  return ids, mask


def _reference_logprobs(module, params, prompt, pmask, tokens, rmask, temperature):
  """log softmax(logits / T)[token] from one uncached forward over prompt + response."""
  ids = np.concatenate([prompt, tokens], 1)
  mask = np.concatenate([pmask, rmask], 1)
  logits = np.asarray(_forward(module)(params, ids, mask), np.float64)
  p = prompt.shape[1]
  lsm = _log_softmax(logits[:, p - 1:-1] / temperature)
  return np.take_along_axis(lsm, tokens[..., None].astype(np.int64), -1)[..., 0]


# --------------------------------------------------------------------------------------------
# Config and filters.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, match", [
    (dict(eos_id=3, pad_id=3), "PAD must differ"),
    (dict(temperature=0.0), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(min_new_tokens=9), "min_new_tokens"),
    (dict(max_new_tokens=0, min_new_tokens=0), "max_new_tokens"),
    (dict(prefill_chunk=0), "prefill_chunk"),
    (dict(slots=0), "slots"),
])
def test_config_rejects_bad_values(bad, match):
  with pytest.raises(ValueError, match=match):
    sampling.SamplingConfig(**{**dict(max_new_tokens=8, eos_id=1, pad_id=0), **bad})


def _np_filter(z, top_k=0, top_p=1.0):
  """transformers' TopK- then TopPLogitsWarper, in numpy: removed tokens get -inf."""
  z = np.array(z, np.float64)
  if top_k:
    kth = np.sort(z, -1)[..., -top_k][..., None]
    z = np.where(z < kth, -np.inf, z)
  if top_p < 1.0:
    order = np.argsort(z, -1)  # Ascending.
    sorted_z = np.take_along_axis(z, order, -1)
    probs = np.exp(_log_softmax(sorted_z))
    remove_sorted = np.cumsum(probs, -1) <= 1 - top_p
    remove_sorted[..., -1] = False  # Keep at least one token.
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, -1)
    z = np.where(remove, -np.inf, z)
  return z


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (5, 1.0), (0, 0.6), (7, 0.9), (1, 0.5),
                                          (40, 0.3)])
def test_filter_logits_matches_transformers_style_warpers(top_k, top_p):
  z = np.random.RandomState(top_k).normal(size=(6, 40)).astype(np.float32) * 2
  got = np.asarray(sampling.filter_logits(jnp.asarray(z), top_k, top_p))
  want = _np_filter(z, top_k, top_p)
  np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
  np.testing.assert_array_equal(got[np.isfinite(got)], z[np.isfinite(want)])
  assert (np.isfinite(got).sum(-1) >= 1).all()
  if top_k:
    assert (np.isfinite(got).sum(-1) <= top_k).all()


# --------------------------------------------------------------------------------------------
# Log-probs, EOS, determinism, greedy, chunked prefill on a small policy.
# --------------------------------------------------------------------------------------------

BASE = sampling.SamplingConfig(max_new_tokens=10, eos_id=None, pad_id=PAD, temperature=0.7,
                               top_k=12, top_p=0.9)


@pytest.fixture(scope="module")
def rollout():
  """A batch sampled without EOS, and the same key again with EOS = its most common token.

  Llama flavour (RoPE, GQA); the greedy test below covers GPT-2's learned positions."""
  module, params = _policy("llama", 32, 64, 2, 4, 3.0)
  prompt, pmask = _left_padded_prompts(np.random.RandomState(0), 6, 7, 32)
  free = jax.device_get(sampling.generate(module, params, prompt, pmask, jax.random.key(3), BASE))
  counts = np.bincount(free.tokens.ravel(), minlength=32)
  counts[PAD] = 0
  eos = int(counts.argmax())
  stopped = jax.device_get(sampling.generate(module, params, prompt, pmask, jax.random.key(3),
                                             dataclasses.replace(BASE, eos_id=eos)))
  return dict(module=module, params=params, prompt=prompt, pmask=pmask, free=free, eos=eos,
              stopped=stopped)


def test_logprobs_equal_full_forward(rollout):
  r = rollout
  for out in (r["free"], r["stopped"]):
    ref = _reference_logprobs(r["module"], r["params"], r["prompt"], r["pmask"], out.tokens,
                              out.response_mask, BASE.temperature)
    on = out.response_mask == 1
    assert out.logprobs.dtype == np.float32
    assert np.max(np.abs(out.logprobs[on] - ref[on])) <= 1e-5
    assert (out.logprobs[~on] == 0).all()
    assert (out.logprobs[on] <= 0).all()
    helper = jax.jit(sampling.response_logprobs, static_argnums=(0, 5))(
        r["module"], r["params"], r["prompt"], r["pmask"], out, BASE.temperature)
    np.testing.assert_allclose(np.asarray(helper), out.logprobs, atol=1e-5, rtol=0)


def test_eos_stops_rows_and_pads_after(rollout):
  """With EOS set, each row is the EOS-free row cut after its first EOS (same key, same draws)."""
  free, out, eos = rollout["free"], rollout["stopped"], rollout["eos"]
  n = BASE.max_new_tokens
  assert 0 < out.finished.sum() < len(out.finished)  # Both kinds of rows are exercised.
  for i in range(len(out.tokens)):
    hits = np.flatnonzero(free.tokens[i] == eos)
    length = hits[0] + 1 if len(hits) else n
    assert out.finished[i] == bool(len(hits))
    assert out.lengths[i] == length
    np.testing.assert_array_equal(out.tokens[i, :length], free.tokens[i, :length])
    assert (out.tokens[i, length:] == PAD).all()
    np.testing.assert_array_equal(out.response_mask[i], np.arange(n) < length)
    np.testing.assert_allclose(out.logprobs[i, :length], free.logprobs[i, :length], atol=1e-6)
  assert not free.finished.any() and (free.lengths == n).all()
  ids, mask = sampling.sequences(rollout["prompt"], rollout["pmask"], out)
  assert ids.shape == (6, 7 + n) and mask.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(mask).sum(1), rollout["pmask"].sum(1) + out.lengths)


def test_deterministic_for_a_key(rollout):
  r = rollout
  again = sampling.generate(r["module"], r["params"], r["prompt"], r["pmask"], jax.random.key(3),
                            BASE)
  np.testing.assert_array_equal(np.asarray(again.tokens), r["free"].tokens)
  np.testing.assert_array_equal(np.asarray(again.logprobs), r["free"].logprobs)
  other = sampling.generate(r["module"], r["params"], r["prompt"], r["pmask"], jax.random.key(4),
                            BASE)
  assert (np.asarray(other.tokens) != r["free"].tokens).mean() > 0.3


def _right_padded(prompt, pmask):
  ids, mask = np.full_like(prompt, PAD), np.zeros_like(pmask)
  for i, row in enumerate(prompt):
    real = row[pmask[i] == 1]
    ids[i, :len(real)], mask[i, :len(real)] = real, 1
  return ids, mask


def test_padding_side_does_not_change_samples(rollout):
  """Right-padded prompts: same draws (same key), same tokens and log-probs; the first token
  comes from the last real prompt token, not from the trailing PAD column."""
  r = rollout
  ids, mask = _right_padded(r["prompt"], r["pmask"])
  assert (mask[:, -1] == 0).any()
  out = sampling.generate(r["module"], r["params"], ids, mask, jax.random.key(3), BASE)
  np.testing.assert_array_equal(np.asarray(out.tokens), r["free"].tokens)
  np.testing.assert_allclose(np.asarray(out.logprobs), r["free"].logprobs, atol=1e-5, rtol=0)
  helper = jax.jit(sampling.response_logprobs, static_argnums=(0, 5))(
      r["module"], r["params"], ids, mask, out, BASE.temperature)
  np.testing.assert_allclose(np.asarray(helper), r["free"].logprobs, atol=1e-5, rtol=0)


def test_chunked_prefill_matches_one_shot(rollout):
  """Chunks of 3 over a width-7 prompt (left-padded to 9); with right padding, the last
  chunks of short rows hold no real token and the first logits must come from earlier."""
  r = rollout
  assert (r["pmask"].sum(1) < 5).any()  # Right-padded, such a row's last chunk is all PAD.
  chunked_cfg = dataclasses.replace(BASE, prefill_chunk=3)
  for ids, mask in ((r["prompt"], r["pmask"]), _right_padded(r["prompt"], r["pmask"])):
    out = sampling.generate(r["module"], r["params"], ids, mask, jax.random.key(3), chunked_cfg)
    np.testing.assert_array_equal(np.asarray(out.tokens), r["free"].tokens)
    np.testing.assert_allclose(np.asarray(out.logprobs), r["free"].logprobs, atol=1e-5, rtol=0)


def test_greedy_equals_argmax_decoding_and_ignores_padding():
  """Greedy tokens = step-by-step argmax of uncached forward passes; a prompt's padding (and
  the ids under it) changes nothing; with EOS = a token every row reaches, all rows stop and
  the loop's early exit leaves PAD behind. GPT-2 flavour: learned positions, tied head."""
  module, params = _policy("gpt2", 32, 64, 1, 4, 3.0, seed=1)
  x = np.array([7, 3, 9, 21, 5], np.int32)
  prompt = np.array([[0, 0, 0, *x], [30, 11, 2, *x], [4, 8, 15, 16, 23, 4, 2, 6]], np.int32)
  pmask = np.array([[0, 0, 0, 1, 1, 1, 1, 1]] * 2 + [[1] * 8], np.int32)
  n = 6
  scfg = sampling.SamplingConfig(max_new_tokens=n, eos_id=None, pad_id=PAD, greedy=True,
                                 temperature=0.5)
  out = jax.device_get(sampling.generate(module, params, prompt, pmask, jax.random.key(0), scfg))

  forward = _forward(module)
  ids = np.concatenate([prompt, np.zeros((3, n), np.int32)], 1)
  mask = np.concatenate([pmask, np.zeros((3, n), np.int32)], 1)
  for t in range(n):  # Fixed width; the not-yet-generated columns are masked.
    logits = np.asarray(forward(params, ids, mask))
    ids[:, 8 + t] = logits[:, 7 + t].argmax(-1)
    mask[:, 8 + t] = 1
  np.testing.assert_array_equal(out.tokens, ids[:, 8:])
  np.testing.assert_array_equal(out.tokens[0], out.tokens[1])
  ref = _log_softmax(np.asarray(forward(params, ids, mask), np.float64)[:, 7:-1] / 0.5)
  ref = np.take_along_axis(ref, ids[:, 8:, None].astype(np.int64), -1)[..., 0]
  assert np.max(np.abs(out.logprobs - ref)) <= 1e-5

  eos = int([t for t in out.tokens[0, 1:] if t != PAD][0])  # Reached after >= 1 token.
  first = int(np.flatnonzero(out.tokens[0] == eos)[0])
  stop = jax.device_get(sampling.generate(module, params, prompt[:2], pmask[:2],
                                          jax.random.key(0),
                                          dataclasses.replace(scfg, eos_id=eos)))
  assert stop.finished.all() and (stop.lengths == first + 1).all()
  np.testing.assert_array_equal(stop.tokens[:, :first + 1], out.tokens[:2, :first + 1])
  assert (stop.tokens[:, first + 1:] == PAD).all()
  assert (stop.response_mask.sum(1) == first + 1).all()


# --------------------------------------------------------------------------------------------
# Distributions over an enumerable output space: two tokens over a vocab of 12 with EOS.
# --------------------------------------------------------------------------------------------

V, EOS, SAMPLES = 12, 1, 6000
PROMPT = np.array([[5, 9, 3]], np.int32)


@pytest.fixture(scope="module")
def tiny():
  """The policy and its exact next-token logits: after the prompt, and after prompt + a."""
  module, params = _policy("llama", V, 32, 1, 2, 3.0, seed=1)
  ids = np.concatenate([np.repeat(PROMPT, V, 0), np.arange(V, dtype=np.int32)[:, None]], 1)
  logits = np.asarray(_forward(module)(params, ids, np.ones_like(ids)), np.float64)
  return module, params, logits[0, -2], logits[:, -1]


def test_ids_outside_vocab_are_rejected(tiny):
  module, params = tiny[:2]
  scfg = sampling.SamplingConfig(max_new_tokens=2, eos_id=V, pad_id=0)
  with pytest.raises(ValueError, match=f"eos_id={V} is outside the vocab"):
    sampling.generate(module, params, np.ones((1, 3), np.int32), np.ones((1, 3), np.int32),
                      jax.random.key(0), scfg)


def _sequence_probs(first_logits, second_logits, scfg):
  """Exact probability of every outcome a*V + b (EOS first: EOS*V + PAD) under `scfg`."""
  def dist(z, step):
    z = np.array(z, np.float64) / scfg.temperature
    if step < scfg.min_new_tokens:
      z[EOS] = -np.inf
    return np.exp(_log_softmax(_np_filter(z, scfg.top_k, scfg.top_p)))

  probs = np.zeros(V * V)
  q1 = dist(first_logits, 0)
  for a in range(V):
    if a == EOS:
      probs[a * V + PAD] += q1[a]
    else:
      probs[a * V:(a + 1) * V] += q1[a] * dist(second_logits[a], 1)
  return probs


def test_chi_square_helper_has_power():
  rng = np.random.RandomState(0)
  probs = rng.dirichlet(np.ones(30))
  assert chi_square_pvalue(rng.multinomial(5000, probs), probs) > 0.01
  tilted = probs ** 1.3 / np.sum(probs ** 1.3)
  assert chi_square_pvalue(rng.multinomial(5000, tilted), probs) < 1e-6


DIST_CASES = {  # One compile each, so the knobs share cases.
    "temperature": dict(temperature=0.6),
    "top_k": dict(top_k=4, temperature=1.3),
    "top_p_min_new_tokens": dict(top_p=0.75, min_new_tokens=1),
    # Per-prompt keys and the blocked inverse-CDF draw; 7 slots for 6000 prompts of at most 2
    # tokens, so nearly every step refills slots.
    "continuous_top_k": dict(top_k=5, temperature=1.2, slots=7),
    "per_prompt_keys_top_p": dict(top_p=0.8, key_per_prompt=True),
}


@pytest.mark.parametrize("case", sorted(DIST_CASES))
def test_empirical_frequencies_match_model_distribution(tiny, case):
  module, params, first, second = tiny
  scfg = sampling.SamplingConfig(max_new_tokens=2, eos_id=EOS, pad_id=PAD, **DIST_CASES[case])
  seed = sorted(DIST_CASES).index(case)
  prompt = np.repeat(PROMPT, SAMPLES, 0)
  out = jax.device_get(sampling.generate(module, params, prompt, np.ones_like(prompt),
                                         jax.random.key(seed), scfg))
  outcome = out.tokens[:, 0] * V + out.tokens[:, 1]
  observed = np.bincount(outcome, minlength=V * V)
  assert chi_square_pvalue(observed, _sequence_probs(first, second, scfg)) > 1e-3
  # Power: the same draws reject the plain (T=1, unfiltered, EOS allowed) distribution.
  plain = sampling.SamplingConfig(max_new_tokens=2, eos_id=EOS, pad_id=PAD)
  assert chi_square_pvalue(observed, _sequence_probs(first, second, plain)) < 1e-6

  # The reported log-probs are the unfiltered temperature-scaled ones, even for cut tokens.
  t = scfg.temperature
  lp1 = _log_softmax(first / t)[out.tokens[:, 0]]
  lp2 = _log_softmax(second / t)[out.tokens[:, 0], out.tokens[:, 1]]
  np.testing.assert_allclose(out.logprobs[:, 0], lp1, atol=1e-5, rtol=0)
  ended = out.tokens[:, 0] == EOS
  np.testing.assert_allclose(out.logprobs[~ended, 1], lp2[~ended], atol=1e-5, rtol=0)
  assert (out.logprobs[ended, 1] == 0).all() and (out.tokens[ended, 1] == PAD).all()
  np.testing.assert_array_equal(out.lengths, np.where(ended, 1, 2))
  np.testing.assert_array_equal(out.finished, ended | (out.tokens[:, 1] == EOS))


def test_best_of_n_frequencies_match_exact_distribution(tiny):
  """Best-of-4 with the sampler and a reward table vs `best_of_n_distribution` of the model's
  exact sequence distribution (itself checked against Monte Carlo in test_sampling_best_of_n)."""
  module, params, first, second = tiny
  scfg = sampling.SamplingConfig(max_new_tokens=2, eos_id=EOS, pad_id=PAD)
  n, prompts = 4, SAMPLES // 4
  table = jnp.asarray(np.random.RandomState(5).permutation(V * V).astype(np.float32))
  reward_fn = lambda ids, mask, s: table[s.tokens[:, 0] * V + s.tokens[:, 1]]
  prompt = np.repeat(PROMPT, prompts, 0)
  out = jax.device_get(sampling.best_of_n(module, params, prompt, np.ones_like(prompt),
                                          jax.random.key(11), scfg, n, reward_fn))
  assert out.all_rewards.shape == (prompts, n)
  np.testing.assert_array_equal(out.rewards, out.all_rewards.max(1))
  np.testing.assert_array_equal(out.rewards, np.take_along_axis(out.all_rewards,
                                                                out.index[:, None], 1)[:, 0])
  outcome = out.samples.tokens[:, 0] * V + out.samples.tokens[:, 1]
  np.testing.assert_array_equal(np.asarray(table)[outcome], out.rewards)
  probs = _sequence_probs(first, second, scfg)
  support = probs > 0
  bon = np.zeros_like(probs)
  bon[support] = np.asarray(sampling.best_of_n_distribution(probs[support], table[support], n))
  observed = np.bincount(outcome, minlength=V * V)
  assert chi_square_pvalue(observed, bon) > 1e-3
  assert chi_square_pvalue(observed, probs) < 1e-6  # Not the policy itself.


# --------------------------------------------------------------------------------------------
# Continuous batching: the fixed batch's samples, whatever the slot count.
# --------------------------------------------------------------------------------------------


def _assert_same_samples(out, ref):
  for field in ("tokens", "response_mask", "lengths", "finished"):
    np.testing.assert_array_equal(np.asarray(getattr(out, field)), getattr(ref, field), field)
  np.testing.assert_allclose(np.asarray(out.logprobs), ref.logprobs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("greedy", [False, True], ids=["per_prompt_keys", "greedy"])
def test_continuous_batching_equals_fixed_batch(rollout, greedy):
  """2 slots for 6 prompts (every slot refilled, at different steps) and 6 slots (none): the
  fixed batch's tokens, masks and log-probs (per-prompt keys when sampling). 40 new tokens
  over a 7-token prompt: the decode steps use both attention widths (7 + 32 and the whole
  cache), and EOS ends some rows early. The log-probs are those of a full forward pass, so
  PPO's ratio starts at 1."""
  r = rollout
  # EOS 29: with key 5 it ends rows after 4 to 36 tokens and leaves others running to 40.
  scfg = dataclasses.replace(BASE, max_new_tokens=40, eos_id=29, min_new_tokens=2,
                             greedy=greedy, key_per_prompt=True)
  assert sampling.sampler.attention_widths(7, 40) == (39, 46)
  args = (r["module"], r["params"], r["prompt"], r["pmask"], jax.random.key(5))
  ref = jax.device_get(sampling.generate(*args, scfg))
  assert 0 < ref.finished.sum() < 6 and (ref.lengths > 32).any()
  for slots in (2, 6):
    _assert_same_samples(sampling.generate(*args, dataclasses.replace(scfg, slots=slots)), ref)
  helper = jax.jit(sampling.response_logprobs, static_argnums=(0, 5))(
      r["module"], r["params"], r["prompt"], r["pmask"], ref, scfg.temperature)
  np.testing.assert_allclose(np.asarray(helper), ref.logprobs, atol=1e-5, rtol=0)


def test_continuous_batching_with_right_padding_and_chunked_prefill(rollout):
  """Right-padded prompts prefilled in chunks of 3, 4 slots: the left-padded fixed batch's
  samples (per-prompt keys)."""
  r = rollout
  scfg = dataclasses.replace(BASE, eos_id=r["eos"], key_per_prompt=True)
  ref = jax.device_get(sampling.generate(r["module"], r["params"], r["prompt"], r["pmask"],
                                         jax.random.key(3), scfg))
  ids, mask = _right_padded(r["prompt"], r["pmask"])
  out = sampling.generate(r["module"], r["params"], ids, mask, jax.random.key(3),
                          dataclasses.replace(scfg, slots=4, prefill_chunk=3))
  _assert_same_samples(out, ref)


def test_per_prompt_keys_do_not_depend_on_the_batch(rollout):
  """With per-prompt keys, prompt i's sample is the same alone at the end of a batch of 2 as
  at row i of the whole batch: it depends on (key, i), not on its neighbours."""
  r = rollout
  scfg = dataclasses.replace(BASE, key_per_prompt=True)
  full = jax.device_get(sampling.generate(r["module"], r["params"], r["prompt"], r["pmask"],
                                          jax.random.key(3), scfg))
  assert (full.tokens != r["free"].tokens).any()  # Not the batch-keyed draws.
  ids = np.stack([r["prompt"][5], r["prompt"][1]])
  mask = np.stack([r["pmask"][5], r["pmask"][1]])
  pair = jax.device_get(sampling.generate(r["module"], r["params"], ids, mask,
                                          jax.random.key(3), scfg))
  np.testing.assert_array_equal(pair.tokens[1], full.tokens[1])
  assert (pair.tokens[0] != full.tokens[5]).any()  # Row 0 draws prompt 0's numbers.


# --------------------------------------------------------------------------------------------
# Sharding: the same tokens on data meshes of 8 simulated devices (in a subprocess).
# --------------------------------------------------------------------------------------------


def test_sharded_sampling_matches_single_device():
  """Fixed batch and continuous batching (16 prompts, 8 slots) on each mesh preset."""
  out = run_python(["tests/helpers/sampling_sharded.py"])
  report = json.loads(out.strip().splitlines()[-1])
  assert 0 < report["finished"] < 8  # EOS really ends some rows early.
  assert {c["preset"] for c in report["cases"]} == {"replicated", "fsdp", "fsdp_tensor"}
  assert 0 < report["continuous_finished"] < 16
  for case in report["cases"]:
    assert case["tokens_equal"] and case["mask_equal"] and case["finished_equal"], case
    assert case["logprob_max_abs"] <= 1e-5, case
    assert case["continuous_tokens_equal"] and case["continuous_lengths_equal"], case
    assert case["continuous_logprob_max_abs"] <= 1e-5, case
  by = {c["preset"]: c for c in report["cases"]}
  assert by["replicated"]["tokens_spec"] == "P('data',)"  # 8 rows over data=8: one each.
  assert by["replicated"]["tokens_shard_rows"] == 1
  assert by["fsdp"]["tokens_spec"] == "P(('data', 'fsdp'),)"
  assert by["fsdp"]["tokens_shard_rows"] == 1
  assert by["fsdp_tensor"]["tokens_shard_rows"] == 4
  assert by["fsdp_tensor"]["embedding_spec"] == "P('tensor', 'fsdp')"
