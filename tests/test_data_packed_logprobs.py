"""Packed batches are a pure layout change: per-sequence log-prob sums of packed and padded
batches agree (tiny model from rlhf_jax.models), for SFT sequences and for DPO pairs, and so
do reward-model scores read at each packed sequence's last token."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import data, models, objectives


@pytest.fixture(scope="module")
def world():
  return data.ReviewWorld(data.WorldConfig(seed=3))


def _model(arch, vocab_size, role="policy"):
  cfg = models.get_config("tiny", arch=arch, vocab_size=vocab_size, d_model=64, n_layers=2,
                          n_heads=4, mlp_dim=128, max_len=128)
  module = models.build_model(cfg, role=role)
  ids = jnp.zeros((1, 8), jnp.int32)
  params = module.init(jax.random.key(0), ids, jnp.ones_like(ids))["params"]
  return module, params


# Sums are taken in float64 on the host: with random weights a sequence scores ~-200 nats,
# where one float32 ulp is 1.5e-5, so float32 accumulation order alone could exceed 1e-5.


def _token_logprobs(module, params, ids, mask, segment_ids=None) -> np.ndarray:
  """log p(ids[:, t+1] | ids[:, :t+1]) [B, T-1], float64 on the host."""
  @jax.jit
  def f(params, ids, mask, segment_ids):
    logits = module.apply({"params": params}, ids, attention_mask=mask, segment_ids=segment_ids)
    return objectives.token_logprobs(logits[:, :-1], ids[:, 1:])
  return np.asarray(f(params, ids, mask, segment_ids), np.float64)


def padded_sums(module, params, b: data.SequenceBatch) -> np.ndarray:
  """Sum over response tokens of log p(token | earlier tokens), one per row."""
  logp = _token_logprobs(module, params, b.input_ids, b.attention_mask)
  return np.sum(logp * b.loss_mask[:, 1:], axis=1)


def packed_sums(module, params, b: data.PackedBatch) -> np.ndarray:
  """The same sums from a packed batch: one per sequence slot, via sequence_ids."""
  logp = _token_logprobs(module, params, b.input_ids, b.attention_mask, b.segment_ids)
  weights = logp * b.loss_mask[:, 1:]
  sums = np.zeros(b.sequence_mask.shape[0])
  real = b.sequence_ids[:, 1:] >= 0
  np.add.at(sums, b.sequence_ids[:, 1:][real], weights[real])
  return sums


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sft_packed_equals_padded(world, arch):
  cfg = world.tokenize_config()
  examples = data.tokenize_sft(world.sample_sft(10, seed=1), world.tokenizer, cfg).examples
  module, params = _model(arch, world.vocab_size)
  padded = data.pad_sft(examples, cfg.max_prompt_len, cfg.max_response_len, cfg.pad_id)
  packed = data.pack_sft(examples, rows=3, length=96, max_sequences=12, pad_id=cfg.pad_id)
  assert packed.segment_ids.max() >= 2  # Several sequences really share a row.
  want = padded_sums(module, params, padded)
  got = packed_sums(module, params, packed)
  assert np.all(want < -1.0)  # Real sums over several tokens, not zeros.
  np.testing.assert_allclose(got[:len(examples)], want, rtol=0, atol=1e-5)
  np.testing.assert_array_equal(got[len(examples):], 0.0)


def test_dpo_pairs_packed_equal_padded(world):
  cfg = world.tokenize_config()
  pairs = data.tokenize_preferences(world.sample_preferences(6, k=3, seed=2), world.tokenizer,
                                    cfg).examples
  module, params = _model("llama", world.vocab_size)
  padded = data.pad_preferences(pairs, cfg.max_prompt_len, cfg.max_response_len, cfg.pad_id)
  packed = data.pack_preferences(pairs, rows=3, length=96, max_sequences=12,
                                 pad_id=cfg.pad_id)
  got = packed_sums(module, params, packed.tokens)
  n = len(pairs)
  np.testing.assert_allclose(got[0:2 * n:2], padded_sums(module, params, padded.chosen),
                             rtol=0, atol=1e-5)
  np.testing.assert_allclose(got[1:2 * n:2], padded_sums(module, params, padded.rejected),
                             rtol=0, atol=1e-5)
  np.testing.assert_array_equal(packed.pair_mask, [1] * n + [0] * (6 - n))


def test_reward_scores_packed_equal_padded(world):
  cfg = world.tokenize_config()
  pairs = data.tokenize_preferences(world.sample_preferences(5, k=3, seed=4), world.tokenizer,
                                    cfg).examples
  module, params = _model("llama", world.vocab_size, role="reward")
  padded = data.stack_pairs(data.pad_preferences(pairs, cfg.max_prompt_len,
                                                 cfg.max_response_len, cfg.pad_id))
  packed = data.pack_preferences(pairs, rows=4, length=96, max_sequences=10,
                                 pad_id=cfg.pad_id).tokens
  want = np.asarray(jax.jit(lambda p, ids, m: module.apply({"params": p}, ids, attention_mask=m))(
      params, padded.input_ids, padded.attention_mask))  # [2n]: chosen rows, then rejected
  slots = packed.sequence_mask.shape[0]
  scores = np.asarray(jax.jit(lambda p, ids, m, seg: module.apply(
      {"params": p}, ids, attention_mask=m, segment_ids=seg, max_segments=slots))(
          params, packed.input_ids, packed.attention_mask, packed.segment_ids))  # [R, slots]
  got = scores[packed.sequence_row, packed.sequence_segment - 1]
  assert np.ptp(want) > 1e-3  # Scores differ between sequences, so a mix-up would show.
  n = len(pairs)
  np.testing.assert_allclose(got[0:2 * n:2], want[:n], rtol=0, atol=1e-5)
  np.testing.assert_allclose(got[1:2 * n:2], want[n:], rtol=0, atol=1e-5)
