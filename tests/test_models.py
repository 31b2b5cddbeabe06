"""Backbone invariances (padding, packing, KV cache, remat), heads and size tables."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import models, objectives
from rlhf_jax.parallel import abstract_params, init_params

ARCHS = ("llama", "gpt2", "qwen2")


def small_config(arch="llama", **kw):
  base = dict(arch=arch, vocab_size=97, d_model=64, n_layers=2, n_heads=4,
              n_kv_heads=None if arch == "gpt2" else 2, mlp_dim=96, max_len=64,
              qkv_bias=arch == "qwen2", tie_embeddings=arch == "gpt2")
  return models.get_config("tiny", **{**base, **kw})


@pytest.fixture(scope="module", params=ARCHS)
def policy(request):
  cfg = small_config(request.param)
  module = models.build_model(cfg)
  params = init_params(module, jax.random.key(0), np.ones((1, 8), np.int32))
  # Random init gives near-uniform logits; scale every weight up so differences show.
  params = jax.tree.map(lambda x: x * 3.0, params)
  return module, params


def _apply(module):
  return jax.jit(lambda p, ids, mask, seg=None: module.apply({"params": p}, ids, mask, seg))


def test_padding_side_does_not_change_logits(policy):
  module, params = policy
  rng = np.random.RandomState(0)
  seqs = [rng.randint(2, 97, size=n) for n in (9, 5, 1)]
  alone = [np.asarray(module.apply({"params": params}, s[None]))[0] for s in seqs]
  apply = _apply(module)
  for side in ("left", "right", "both"):
    ids = np.zeros((3, 13), np.int32)
    mask = np.zeros_like(ids)
    for i, s in enumerate(seqs):
      start = {"left": 13 - len(s), "right": 0, "both": (13 - len(s)) // 2}[side]
      ids[i, start:start + len(s)], mask[i, start:start + len(s)] = s, 1
    logits = np.asarray(apply(params, ids, mask))
    assert np.isfinite(logits).all()  # Padding query rows stay finite.
    for i, s in enumerate(seqs):
      np.testing.assert_allclose(logits[i, mask[i] == 1], alone[i], atol=2e-5, rtol=0,
                                 err_msg=side)


def test_packed_equals_unpacked(policy):
  module, params = policy
  rng = np.random.RandomState(1)
  seqs = [rng.randint(2, 97, size=n) for n in (6, 3, 7)]
  ids = np.zeros((1, 20), np.int32)
  seg = np.zeros_like(ids)
  at = 0
  for k, s in enumerate(seqs):
    ids[0, at:at + len(s)], seg[0, at:at + len(s)] = s, k + 1
    at += len(s)
  mask = (seg > 0).astype(np.int32)
  packed = np.asarray(_apply(module)(params, ids, mask, seg))[0]
  at = 0
  for s in seqs:
    alone = np.asarray(module.apply({"params": params}, s[None]))[0]
    np.testing.assert_allclose(packed[at:at + len(s)], alone, atol=2e-5, rtol=0)
    at += len(s)


def test_logits_to_keep_is_the_tail_of_the_full_logits(policy):
  module, params = policy
  ids = np.random.RandomState(3).randint(2, 97, size=(2, 11)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, :4] = 0  # Left padding: positions still come from the mask.
  full = np.asarray(module.apply({"params": params}, ids, mask))
  for keep in (1, 5, 11):
    tail = module.apply({"params": params}, ids, mask, logits_to_keep=keep)
    chex.assert_shape(tail, (2, keep, 97))
    np.testing.assert_allclose(tail, full[:, -keep:], atol=1e-6, rtol=0)
  reward = models.build_model(module.cfg, "reward")
  with pytest.raises(ValueError, match="logits_to_keep=3 needs a role with an LM head"):
    reward.apply({"params": params}, ids, mask, logits_to_keep=3)


def test_kv_cache_decode_equals_full_forward(policy):
  """Prefill a left-padded prompt batch, decode one token at a time; logits must equal a full
  forward pass over prompt + generated tokens."""
  module, params = policy
  cfg = module.cfg
  rng = np.random.RandomState(2)
  prompt = np.zeros((2, 6), np.int32)
  pmask = np.zeros_like(prompt)
  prompt[0, 2:], pmask[0, 2:] = rng.randint(2, 97, size=4), 1  # Left-padded.
  prompt[1], pmask[1] = rng.randint(2, 97, size=6), 1
  steps = 5
  new_tokens = rng.randint(2, 97, size=(2, steps)).astype(np.int32)

  @jax.jit
  def run(params, cache, ids, mask):
    return module.apply({"params": params}, ids, mask, cache=cache)

  cache = models.init_cache(cfg, 2, 6 + steps + 3)  # Spare slots stay masked.
  logits, cache = run(params, cache, prompt, pmask)
  decoded = [logits]
  for t in range(steps):
    logits, cache = run(params, cache, new_tokens[:, t:t + 1], np.ones((2, 1), np.int32))
    decoded.append(logits)
  decoded = np.concatenate([np.asarray(x) for x in decoded], axis=1)
  full_ids = np.concatenate([prompt, new_tokens], axis=1)
  full_mask = np.concatenate([pmask, np.ones_like(new_tokens)], axis=1)
  full = np.asarray(module.apply({"params": params}, full_ids, full_mask))
  real = full_mask == 1
  np.testing.assert_allclose(decoded[real], full[real], atol=2e-5, rtol=0)
  assert int(cache.index) == 6 + steps
  np.testing.assert_array_equal(np.asarray(cache.next_pos), pmask.sum(1) + steps)


def test_remat_gives_identical_gradients():
  cfg = small_config("llama")
  ids = np.random.RandomState(3).randint(2, 97, size=(2, 10)).astype(np.int32)
  params = init_params(models.build_model(cfg), jax.random.key(1), ids)

  def grads(c):
    module = models.build_model(c)
    loss = lambda p: jnp.mean(objectives.token_logprobs(
        module.apply({"params": p}, ids)[:, :-1], ids[:, 1:]))
    return jax.jit(jax.grad(loss))(params)

  chex.assert_trees_all_close(grads(cfg), grads(small_config("llama", remat=True)), atol=1e-6)


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  cfg = small_config("llama", dtype="bfloat16")
  module = models.build_model(cfg)
  ids = np.ones((2, 5), np.int32)
  params = init_params(module, jax.random.key(0), ids)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  logits = module.apply({"params": params}, ids)
  ref = models.build_model(small_config("llama")).apply({"params": params}, ids)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, ref, atol=0.05)


# ------------------------------------------------------------------------------------ heads

def test_token_logprobs_and_entropy_match_log_softmax():
  logits = jax.random.normal(jax.random.key(0), (2, 5, 11)) * 4
  targets = jax.random.randint(jax.random.key(1), (2, 5), 0, 11)
  for temperature in (1.0, 0.7, 2.0):
    ref = jax.nn.log_softmax(logits / temperature, axis=-1)
    picked = jnp.take_along_axis(ref, targets[..., None], axis=-1)[..., 0]
    lp = objectives.token_logprobs(logits, targets, temperature)
    lp2, ent = objectives.logprobs_and_entropy(logits.astype(jnp.bfloat16), targets, temperature)
    chex.assert_trees_all_close(lp, picked, atol=1e-5)
    assert lp2.dtype == ent.dtype == jnp.float32
    ref_bf = jax.nn.log_softmax(logits.astype(jnp.bfloat16).astype(jnp.float32) / temperature)
    chex.assert_trees_all_close(ent, -(jnp.exp(ref_bf) * ref_bf).sum(-1), atol=1e-5)


def test_reward_head_reads_last_real_token_and_value_head_starts_at_zero():
  cfg = small_config("llama", d_model=128, n_heads=4)
  ids = np.random.RandomState(4).randint(2, 97, size=(1, 7)).astype(np.int32)
  policy = models.build_model(cfg)
  policy_params = init_params(policy, jax.random.key(0), ids)
  reward = models.build_model(cfg, "reward")
  reward_params = models.transfer_backbone(
      policy_params, init_params(reward, jax.random.key(1), ids))
  chex.assert_trees_all_equal(reward_params["backbone"], policy_params["backbone"])
  std = float(np.std(reward_params["reward_head"]["kernel"]))
  assert abs(std - 1 / math.sqrt(cfg.d_model + 1)) < 0.25 / math.sqrt(cfg.d_model + 1)

  apply = jax.jit(lambda p, i, m, s=None, n=None: reward.apply({"params": p}, i, m, s,
                                                               max_segments=n),
                  static_argnums=4)
  alone = apply(reward_params, ids, np.ones_like(ids))
  left = np.concatenate([np.zeros((1, 3), np.int32), ids], 1)
  right = np.concatenate([ids, np.zeros((1, 3), np.int32)], 1)
  for padded in (left, right):
    out = apply(reward_params, padded, (padded > 0).astype(np.int32))  # Token ids are >= 2.
    chex.assert_shape(out, (1,))
    np.testing.assert_allclose(out, alone, atol=1e-5)
  # Packed rows: one reward per segment, read at each segment's end.
  packed = np.concatenate([ids, ids[:, :4], np.zeros((1, 2), np.int32)], 1)
  seg = np.array([[1] * 7 + [2] * 4 + [0] * 2])
  out = apply(reward_params, packed, (seg > 0).astype(np.int32), seg, 3)
  short = apply(reward_params, ids[:, :4], np.ones((1, 4), np.int32))
  np.testing.assert_allclose(out[0], [alone[0], short[0], 0.0], atol=1e-5)

  value = models.build_model(cfg, "value")
  values = value.apply({"params": init_params(value, jax.random.key(2), ids)}, ids)
  chex.assert_shape(values, (1, 7))
  assert not np.asarray(values).any()


def test_transfer_backbone_rejects_other_shapes():
  a = init_params(models.build_model(small_config("llama")), jax.random.key(0),
                  np.ones((1, 2), np.int32))
  b = init_params(models.build_model(small_config("llama", d_model=32, n_heads=2), "reward"),
                  jax.random.key(0), np.ones((1, 2), np.int32))
  with pytest.raises(ValueError, match="backbones differ"):
    models.transfer_backbone(a, b)


# ------------------------------------------------------------------------------ size tables

@pytest.mark.parametrize("name,published", [
    ("gpt2", 124_439_808),  # transformers GPT2LMHeadModel.num_parameters().
    ("llama-3.2-1b", 1_235_814_400),  # Llama 3.2 model card (1.24B).
    ("qwen2.5-0.5b", 494_032_768),  # Qwen2.5 model card (0.49B).
    ("tiny", None), ("small", None)])
def test_named_sizes_count_their_params(name, published):
  cfg = models.get_config(name)
  shapes, _ = abstract_params(models.build_model(cfg), jnp.ones((1, 1), jnp.int32))
  counted = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
  assert counted == cfg.num_params()
  if published is not None:
    assert counted == published


def test_config_errors():
  with pytest.raises(ValueError, match="unknown model size"):
    models.get_config("huge")
  with pytest.raises(ValueError, match=r"unknown ModelConfig field\(s\) \['layers'\]"):
    models.get_config("tiny", layers=3)
  with pytest.raises(ValueError, match="not a multiple of n_kv_heads"):
    models.get_config("tiny", n_kv_heads=3)
  with pytest.raises(ValueError, match="unknown model role"):
    models.build_model(models.get_config("tiny"), "critic")
