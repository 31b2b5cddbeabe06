"""Padded and packed layouts (hand-written expectations) and the resumable iterator."""
import functools
import itertools
import logging

import jax
import numpy as np
import pytest

from rlhf_jax import data

PAD, EOS = 0, 1


def sft(i, prompt_len=2, response_len=2):
  """Example i: its prompt starts with token 100 + i, so a batch shows which examples it holds."""
  return data.TokenizedSFT(np.asarray([100 + i] + [7] * (prompt_len - 1), np.int32),
                           np.asarray([8] * (response_len - 1) + [EOS], np.int32), f"ex:{i}")


def test_padded_layout():
  seqs = [(np.asarray([11, 12, 13]), np.asarray([21, 22, EOS])), (np.asarray([31]),
                                                                  np.asarray([EOS]))]
  b = data.pad_sequences(seqs, prompt_len=5, response_len=5, pad_id=PAD)
  np.testing.assert_array_equal(b.input_ids, [[0, 0, 11, 12, 13, 21, 22, 1, 0, 0],
                                              [0, 0, 0, 0, 31, 1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(b.attention_mask, [[0, 0, 1, 1, 1, 1, 1, 1, 0, 0],
                                                   [0, 0, 0, 0, 1, 1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(b.loss_mask, [[0, 0, 0, 0, 0, 1, 1, 1, 0, 0],
                                              [0, 0, 0, 0, 0, 1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(b.positions, [[0, 0, 0, 1, 2, 3, 4, 5, 0, 0],
                                              [0, 0, 0, 0, 0, 1, 0, 0, 0, 0]])
  assert all(a.dtype == np.int32 for a in (b.input_ids, b.attention_mask, b.loss_mask,
                                           b.positions))
  with pytest.raises(ValueError, match="more than 2 / 5"):
    data.pad_sequences(seqs, prompt_len=2, response_len=5, pad_id=PAD)


def test_padded_preferences_and_stacking():
  pairs = [data.TokenizedPair(np.asarray([5]), np.asarray([6, EOS]), np.asarray([EOS]), 0.5),
           data.TokenizedPair(np.asarray([7, 8]), np.asarray([EOS]), np.asarray([9, EOS]))]
  b = data.pad_preferences(pairs, prompt_len=2, response_len=2, pad_id=PAD)
  np.testing.assert_array_equal(b.chosen.input_ids, [[0, 5, 6, 1], [7, 8, 1, 0]])
  np.testing.assert_array_equal(b.rejected.input_ids, [[0, 5, 1, 0], [7, 8, 9, 1]])
  np.testing.assert_array_equal(b.margin, np.asarray([0.5, 0.0], np.float32))
  stacked = data.stack_pairs(b)
  np.testing.assert_array_equal(stacked.input_ids, np.concatenate([b.chosen.input_ids,
                                                                   b.rejected.input_ids]))
  unpaired = data.pad_unpaired([data.TokenizedUnpaired(np.asarray([5]), np.asarray([EOS]), True)],
                               prompt_len=1, response_len=1, pad_id=PAD)
  np.testing.assert_array_equal(unpaired.desirable, [True])


def test_packed_layout_first_fit():
  seqs = [(np.asarray([11, 12]), np.asarray([13, 14, EOS])),  # 5 tokens -> row 0 at 0
          (np.asarray([21]), np.asarray([22, 23, EOS])),  # 4 tokens -> row 1 at 0
          (np.asarray([31, 32]), np.asarray([EOS]))]  # 3 tokens -> row 0 at 5 (first fit)
  b = data.pack_sequences(seqs, rows=2, length=8, max_sequences=4, pad_id=PAD)
  np.testing.assert_array_equal(b.input_ids, [[11, 12, 13, 14, 1, 31, 32, 1],
                                              [21, 22, 23, 1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(b.segment_ids, [[1, 1, 1, 1, 1, 2, 2, 2],
                                                [1, 1, 1, 1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(b.positions, [[0, 1, 2, 3, 4, 0, 1, 2],
                                              [0, 1, 2, 3, 0, 0, 0, 0]])
  np.testing.assert_array_equal(b.loss_mask, [[0, 0, 1, 1, 1, 0, 0, 1],
                                              [0, 1, 1, 1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(b.attention_mask, b.segment_ids > 0)
  np.testing.assert_array_equal(b.sequence_ids, [[0, 0, 0, 0, 0, 2, 2, 2],
                                                 [1, 1, 1, 1, -1, -1, -1, -1]])
  np.testing.assert_array_equal(b.sequence_mask, [1, 1, 1, 0])
  np.testing.assert_array_equal(b.sequence_row, [0, 1, 0, 0])
  np.testing.assert_array_equal(b.sequence_segment, [1, 1, 2, 0])
  with pytest.raises(ValueError, match="do not fit 1 rows x 8 tokens"):
    data.pack_sequences(seqs, rows=1, length=8, max_sequences=4, pad_id=PAD)


def test_packed_pairs_are_placed_whole():
  p = np.asarray([5, 6])
  pairs = [data.TokenizedPair(p, np.asarray([7, EOS]), np.asarray([EOS]), 1.5),
           data.TokenizedPair(p, np.asarray([8, 8, 8, EOS]), np.asarray([9, EOS]))]
  b = data.pack_preferences(pairs, rows=2, length=10, max_sequences=6, pad_id=PAD)
  ids = b.tokens.sequence_ids
  # Slots: pair i -> chosen 2i, rejected 2i+1; every slot's tokens are prompt + response.
  for slot, (resp) in enumerate([[7, EOS], [EOS], [8, 8, 8, EOS], [9, EOS]]):
    np.testing.assert_array_equal(b.tokens.input_ids[ids == slot], [5, 6] + resp)
  np.testing.assert_array_equal(b.pair_mask, [1, 1, 0])
  np.testing.assert_array_equal(b.margin, np.asarray([1.5, 0.0, 0.0], np.float32))
  # A packed batcher takes pairs while both halves fit: [4+3] fits row 0 (7 of 8), pair 1
  # needs 6 + 4: row 1 takes 6, and its 4 fit nowhere -> the whole pair waits.
  batcher = data.PackedBatcher(data.pack_preferences, rows=2, length=8, pad_id=PAD,
                               max_sequences=6)
  batch, used = batcher(lambda i: pairs[i], 2)
  assert used == 1 and batch.pair_mask.tolist() == [1, 0, 0]
  assert batch.tokens.segment_ids[1].max() == 0  # Row 1 untouched after the undo.


def _padded_iter(source, batch_size=4, **kw):
  collate = functools.partial(data.pad_sft, prompt_len=3, response_len=3, pad_id=PAD)
  return data.DataIterator(source, data.PaddedBatcher(batch_size, collate),
                           process_index=kw.pop("process_index", 0),
                           process_count=kw.pop("process_count", 1), **kw)


def _ids(batch):
  """Example indices in a batch (prompt token 100 + i)."""
  ids = batch.input_ids
  return sorted(int(t) - 100 for t in ids[ids >= 100])


def test_every_epoch_is_a_permutation():
  source = [sft(i) for i in range(12)]
  it = _padded_iter(source, seed=3)
  epochs = [[i for _ in range(3) for i in _ids(next(it))] for _ in range(2)]
  assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(12))
  assert epochs[0] != epochs[1]  # Reshuffled each epoch.
  # Batch k is a pure function of (seed, position): starting at position 4k gives it.
  again = _padded_iter(source, seed=3)
  assert [_ids(next(again)) for _ in range(6)] == [
      _ids(next(_padded_iter(source, seed=3, position=4 * k))) for k in range(6)]
  plain = _padded_iter(source, shuffle=False)
  assert _ids(next(plain)) == [0, 1, 2, 3]


def test_different_seeds_give_different_orders():
  source = [sft(i) for i in range(12)]
  a = [_ids(next(it)) for it in [_padded_iter(source, seed=0)] for _ in range(3)]
  b = [_ids(next(it)) for it in [_padded_iter(source, seed=1)] for _ in range(3)]
  assert a != b


@pytest.mark.parametrize("packed", [False, True])
def test_resume_gives_identical_batches(packed):
  source = [sft(i, prompt_len=1 + i % 3, response_len=1 + (5 * i) % 4) for i in range(10)]
  if packed:
    batcher = data.PackedBatcher(data.pack_sft, rows=2, length=8, pad_id=PAD, max_sequences=6)
  else:
    batcher = data.PaddedBatcher(3, functools.partial(data.pad_sft, prompt_len=3,
                                                      response_len=4, pad_id=PAD))
  make = functools.partial(data.DataIterator, source, batcher, seed=7, process_index=0,
                           process_count=1)
  it = make()
  for _ in range(5):  # Past the first epoch boundary (10 examples).
    next(it)
  saved = it.position
  assert isinstance(saved, int) and saved > 0
  expected = [next(it) for _ in range(6)]
  resumed = make(position=saved)
  for want in expected:
    got = next(resumed)
    for a, b in zip(jax_leaves(want), jax_leaves(got)):
      np.testing.assert_array_equal(a, b)
  assert resumed.position == it.position and resumed.epoch == it.epoch


def jax_leaves(tree):
  return jax.tree.leaves(tree)


class RecordingSource:
  """A random-access source that records which indices were read."""

  def __init__(self, items):
    self.items = items
    self.read = []

  def __len__(self):
    return len(self.items)

  def __getitem__(self, i):
    self.read.append(i)
    return self.items[i]


def test_each_process_reads_only_its_slice():
  items = [sft(i) for i in range(16)]
  single = [_ids(b) for b in itertools.islice(_padded_iter(items, batch_size=4, seed=5), 4)]
  sources = [RecordingSource(items) for _ in range(2)]
  per_process = []
  for p in range(2):
    it = _padded_iter(sources[p], batch_size=2, seed=5, process_index=p, process_count=2)
    per_process.append([_ids(next(it)) for _ in range(4)])  # One epoch of 16.
  read0, read1 = set(sources[0].read), set(sources[1].read)
  assert not read0 & read1 and read0 | read1 == set(range(16))
  assert len(sources[0].read) == len(read0) == 8  # Nothing read twice or read for others.
  # Together the processes see exactly the global batches a single process would see.
  assert [sorted(a + b) for a, b in zip(*per_process)] == single


def test_finite_epochs_stop_and_report_leftovers(caplog):
  source = [sft(i) for i in range(10)]
  it = _padded_iter(source, batch_size=4, num_epochs=2)
  with caplog.at_level(logging.INFO):
    batches = list(it)
  assert len(batches) == 5  # 20 examples -> 5 full batches, nothing left.
  it = _padded_iter(source, batch_size=3, num_epochs=1)
  with caplog.at_level(logging.INFO):
    assert len(list(it)) == 3
  assert "1 examples (global) were left over" in caplog.text
  with pytest.raises(ValueError, match="different number of batches"):
    data.DataIterator(source, data.PackedBatcher(data.pack_sft, 1, 8, PAD, 4), num_epochs=1,
                      process_index=0, process_count=2)


def test_packed_iterator_covers_each_example_once_per_epoch():
  source = [sft(i, prompt_len=1 + i % 4, response_len=2 + i % 3) for i in range(20)]
  it = data.DataIterator(source, data.PackedBatcher(data.pack_sft, rows=2, length=10,
                                                    pad_id=PAD, max_sequences=8),
                         seed=1, num_epochs=1, process_index=0, process_count=1)
  seen = []
  for b in it:
    assert b.input_ids.shape == (2, 10) and b.sequence_mask.shape == (8,)
    seen += _ids(b)
  assert sorted(seen) == list(range(20))
