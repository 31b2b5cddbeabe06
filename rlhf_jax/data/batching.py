"""Fixed-shape batches from tokenised examples: padded (one sequence per row) and packed.

Padded layout, one row per sequence, T = prompt_len + response_len:

    [pad pad p0 p1 p2 | r0 r1 EOS pad pad]      prompt left-padded, response right-padded
     mask  0  0  1  1  1    1  1  1   0   0
     loss  0  0  0  0  0    1  1  1   0   0      1 on response tokens (the prediction targets)
     pos   0  0  0  1  2    3  4  5   0   0

so every response starts at column prompt_len, which is also the layout generation wants.
Packed layout: sequences (prompt + response, no padding between them) are placed first-fit into
`rows` rows of `length` tokens; `segment_ids` number them 1..n within a row (0 = padding),
positions restart at 0 in each segment and `sequence_ids` maps each token to its sequence's
slot in the batch (-1 = padding), so per-sequence sums are one segment_sum away.

`loss_mask` is aligned with `input_ids` (1 where the token is a response token). With the
usual shift (logits[:, :-1] predict input_ids[:, 1:]) use loss_mask[:, 1:]. Prompts are never
empty (tokenisation enforces it), so a segment's first token is never a target and no
prediction crosses a segment boundary.

Packed pair rows (`pack_pair_rows`, for DPO, KTO and reward models): whole pairs (a prompt and
two responses) placed first-fit into `rows` rows of `length` tokens, each pair inside one row,
unshared ([prompt|first], [prompt|second] as two segments) or prefix-shared ([prompt|first|
second], both responses with the prompt as parent segment and positions continuing it). Every
index in them is row-local (a pair's slot within its row, a column of its row), so the leading
row axis can be split by micro-batching and data sharding like any other batch axis.

Packed rollouts (`pack_rollouts`, for the RL stages): sampled rollouts (real prompt tokens and
the response, no padding) placed whole into rows, with one entry per response token saying
which column predicts it and where its log-prob goes in the [B, N] response layout, so the
scoring passes and the PPO/GRPO/RLOO losses run on the packed rows and read back exactly the
arrays the padded layout gives.
"""
import dataclasses
from typing import Callable, Sequence

import flax.struct
import numpy as np

from rlhf_jax.data.tokenization import TokenizedPair, TokenizedSFT, TokenizedUnpaired

Seq = tuple[np.ndarray, np.ndarray]  # (prompt ids, response ids)
Triple = tuple[np.ndarray, np.ndarray, np.ndarray]  # (prompt, first response, second response)


@flax.struct.dataclass
class SequenceBatch:
  """Padded sequences, [B, T] int32 each."""
  input_ids: np.ndarray
  attention_mask: np.ndarray
  loss_mask: np.ndarray
  positions: np.ndarray


@flax.struct.dataclass
class PreferenceBatch:
  """Row i of `chosen` and of `rejected` share the same prompt; margin [B] float32."""
  chosen: SequenceBatch
  rejected: SequenceBatch
  margin: np.ndarray


@flax.struct.dataclass
class UnpairedBatch:
  sequences: SequenceBatch
  desirable: np.ndarray  # [B] bool


@flax.struct.dataclass
class PackedBatch:
  """Packed sequences. [R, T] int32: input_ids, segment_ids (1-based, 0 = pad), positions,
  attention_mask, loss_mask, sequence_ids (slot in [0, S), -1 = pad). [S] int32 per slot:
  sequence_mask (1 = slot holds a sequence; S = max_sequences is static so shapes never
  change), sequence_row and sequence_segment (where the slot's sequence lies: a per-segment
  output [R, n_segments], such as packed reward-model scores, is read at
  [sequence_row, sequence_segment - 1]; both 0 for empty slots)."""
  input_ids: np.ndarray
  segment_ids: np.ndarray
  positions: np.ndarray
  attention_mask: np.ndarray
  loss_mask: np.ndarray
  sequence_ids: np.ndarray
  sequence_mask: np.ndarray
  sequence_row: np.ndarray
  sequence_segment: np.ndarray


@flax.struct.dataclass
class PackedPreferenceBatch:
  """Pair i is sequence slot 2i (chosen) and 2i+1 (rejected); margin and pair_mask [S/2]."""
  tokens: PackedBatch
  margin: np.ndarray
  pair_mask: np.ndarray


@flax.struct.dataclass
class PackedPairRows:
  """Pairs packed whole into [R, T] rows (see the module docstring); K = pair slots per row,
  N = loss tokens per row. Pair k of a row has sequence slots 2k (its first response) and
  2k+1 (its second).

  [R, T] int32: input_ids, attention_mask, segment_ids (1-based, 0 = pad), positions,
    parent_segment_ids (prefix-shared rows only, else None).
  [R, N] int32, one entry per response token of the row (the loss tokens): predictor, the
    column whose output predicts it (the previous column, except for a shared row's second
    response, whose first token follows the prompt's last column, not the first response);
    targets, the token itself; target_slot, its sequence slot (-1 = unused entry).
  [R, 2K] int32 last_column: each slot's last token (the prompt's last one for an empty
    response), where a reward model reads its score; 0 for empty slots.
  [R, K] int32 pair_index: the pair's index in the packed list (-1 = empty slot), to place
    per-pair inputs (`per_pair`) and read results back in list order.
  """
  input_ids: np.ndarray
  attention_mask: np.ndarray
  segment_ids: np.ndarray
  positions: np.ndarray
  parent_segment_ids: np.ndarray | None
  predictor: np.ndarray
  targets: np.ndarray
  target_slot: np.ndarray
  last_column: np.ndarray
  pair_index: np.ndarray

  @property
  def pair_mask(self) -> np.ndarray:
    return (self.pair_index >= 0).astype(np.int32)

  def per_pair(self, values, dtype=np.float32) -> np.ndarray:
    """[R, K]: values[i] (one per packed pair, list order) in pair i's slot, 0 in empty ones."""
    values = np.asarray(values, dtype)
    return np.where(self.pair_index >= 0, values[np.maximum(self.pair_index, 0)],
                    0).astype(dtype)


def example_sequences(ex) -> tuple[Seq, ...]:
  """The (prompt, response) sequences one example contributes, in slot order."""
  if isinstance(ex, TokenizedSFT):
    return ((ex.prompt, ex.response),)
  if isinstance(ex, TokenizedPair):
    return ((ex.prompt, ex.chosen), (ex.prompt, ex.rejected))
  if isinstance(ex, TokenizedUnpaired):
    return ((ex.prompt, ex.completion),)
  raise TypeError(f"not a tokenised example: {type(ex).__name__}")


# ---------------------------------------------------------------------------------------------
# Padded
# ---------------------------------------------------------------------------------------------


def pad_sequences(seqs: Sequence[Seq], prompt_len: int, response_len: int,
                  pad_id: int) -> SequenceBatch:
  """Prompt left-padded to prompt_len, response right-padded to response_len."""
  b, t = len(seqs), prompt_len + response_len
  ids = np.full((b, t), pad_id, np.int32)
  mask = np.zeros((b, t), np.int32)
  loss = np.zeros((b, t), np.int32)
  pos = np.zeros((b, t), np.int32)
  for i, (p, r) in enumerate(seqs):
    lp, lr = len(p), len(r)
    if lp > prompt_len or lr > response_len:
      raise ValueError(f"sequence {i} has prompt {lp} / response {lr} tokens, more than "
                       f"{prompt_len} / {response_len}: tokenise with the same lengths")
    lo, hi = prompt_len - lp, prompt_len + lr
    ids[i, lo:prompt_len] = p
    ids[i, prompt_len:hi] = r
    mask[i, lo:hi] = 1
    loss[i, prompt_len:hi] = 1
    pos[i, lo:hi] = np.arange(lp + lr, dtype=np.int32)
  return SequenceBatch(ids, mask, loss, pos)


def pad_sft(examples: Sequence[TokenizedSFT], prompt_len: int, response_len: int,
            pad_id: int) -> SequenceBatch:
  return pad_sequences([(e.prompt, e.response) for e in examples], prompt_len, response_len,
                       pad_id)


def pad_preferences(examples: Sequence[TokenizedPair], prompt_len: int, response_len: int,
                    pad_id: int) -> PreferenceBatch:
  return PreferenceBatch(
      pad_sequences([(e.prompt, e.chosen) for e in examples], prompt_len, response_len, pad_id),
      pad_sequences([(e.prompt, e.rejected) for e in examples], prompt_len, response_len,
                    pad_id),
      np.asarray([e.margin for e in examples], np.float32))


def pad_unpaired(examples: Sequence[TokenizedUnpaired], prompt_len: int, response_len: int,
                 pad_id: int) -> UnpairedBatch:
  return UnpairedBatch(
      pad_sequences([(e.prompt, e.completion) for e in examples], prompt_len, response_len,
                    pad_id),
      np.asarray([e.desirable for e in examples], bool))


def stack_pairs(batch: PreferenceBatch) -> SequenceBatch:
  """[2B, T]: chosen rows then rejected rows, for one forward pass over both."""
  return SequenceBatch(*(np.concatenate([a, b]) for a, b in zip(
      (batch.chosen.input_ids, batch.chosen.attention_mask, batch.chosen.loss_mask,
       batch.chosen.positions),
      (batch.rejected.input_ids, batch.rejected.attention_mask, batch.rejected.loss_mask,
       batch.rejected.positions))))


# ---------------------------------------------------------------------------------------------
# Packed
# ---------------------------------------------------------------------------------------------


class _FirstFit:
  """First-fit placement of whole examples (all their sequences, or none) into rows."""

  def __init__(self, rows: int, length: int, max_sequences: int):
    self.length = length
    self.max_sequences = max_sequences
    self.fill = np.zeros(rows, np.int64)
    self.placements: list[tuple[int, int]] = []  # (row, offset) per sequence slot.

  def try_add(self, lengths: Sequence[int]) -> bool:
    if len(self.placements) + len(lengths) > self.max_sequences:
      return False
    placed = []
    for n in lengths:
      if n > self.length:
        raise ValueError(f"a sequence of {n} tokens cannot fit a packed row of {self.length}")
      rows = np.flatnonzero(self.fill + n <= self.length)
      if not rows.size:
        for (row, _), m in zip(placed, lengths):  # An example is placed whole or not at all.
          self.fill[row] -= m
        return False
      row = int(rows[0])
      placed.append((row, int(self.fill[row])))
      self.fill[row] += n
    self.placements.extend(placed)
    return True


def pack_sequences(seqs: Sequence[Seq], rows: int, length: int, max_sequences: int,
                   pad_id: int, groups: Sequence[int] | None = None) -> PackedBatch:
  """Packs all `seqs` (first-fit, groups placed whole); ValueError if they do not fit.

  `groups` gives how many consecutive sequences form one example (default: 1 each).
  """
  groups = [1] * len(seqs) if groups is None else list(groups)
  ff = _FirstFit(rows, length, max_sequences)
  k = 0
  for g in groups:
    if not ff.try_add([len(p) + len(r) for p, r in seqs[k:k + g]]):
      raise ValueError(f"{len(seqs)} sequences do not fit {rows} rows x {length} tokens with "
                       f"at most {max_sequences} sequences")
    k += g
  ids = np.full((rows, length), pad_id, np.int32)
  seg = np.zeros((rows, length), np.int32)
  pos = np.zeros((rows, length), np.int32)
  loss = np.zeros((rows, length), np.int32)
  sid = np.full((rows, length), -1, np.int32)
  slot_row = np.zeros(max_sequences, np.int32)
  slot_segment = np.zeros(max_sequences, np.int32)
  next_segment = np.ones(rows, np.int32)
  for slot, ((p, r), (row, off)) in enumerate(zip(seqs, ff.placements)):
    n = len(p) + len(r)
    ids[row, off:off + len(p)] = p
    ids[row, off + len(p):off + n] = r
    seg[row, off:off + n] = next_segment[row]
    slot_row[slot], slot_segment[slot] = row, next_segment[row]
    next_segment[row] += 1
    pos[row, off:off + n] = np.arange(n, dtype=np.int32)
    loss[row, off + len(p):off + n] = 1
    sid[row, off:off + n] = slot
  seq_mask = np.zeros(max_sequences, np.int32)
  seq_mask[:len(seqs)] = 1
  return PackedBatch(ids, seg, pos, (seg > 0).astype(np.int32), loss, sid, seq_mask, slot_row,
                     slot_segment)


def pack_sft(examples: Sequence[TokenizedSFT], rows: int, length: int, max_sequences: int,
             pad_id: int) -> PackedBatch:
  return pack_sequences([(e.prompt, e.response) for e in examples], rows, length,
                        max_sequences, pad_id)


def pack_preferences(examples: Sequence[TokenizedPair], rows: int, length: int,
                     max_sequences: int, pad_id: int) -> PackedPreferenceBatch:
  """Chosen and rejected of pair i go to slots 2i and 2i+1 (in any rows)."""
  if max_sequences % 2:
    raise ValueError(f"max_sequences={max_sequences} must be even for pairs")
  seqs = [s for e in examples for s in ((e.prompt, e.chosen), (e.prompt, e.rejected))]
  tokens = pack_sequences(seqs, rows, length, max_sequences, pad_id, [2] * len(examples))
  margin = np.zeros(max_sequences // 2, np.float32)
  margin[:len(examples)] = [e.margin for e in examples]
  return PackedPreferenceBatch(tokens, margin, tokens.sequence_mask[0::2].copy())


def pair_footprint(triple: Triple, shared_prefix: bool) -> tuple[int, int]:
  """(row tokens, loss tokens) of one packed pair: the prompt once or twice, both responses."""
  p, a, b = (len(x) for x in triple)
  return (p if shared_prefix else 2 * p) + a + b, a + b


def pack_pair_rows(triples: Sequence[Triple], *, rows: int, length: int,
                   loss_tokens: int | None, pairs_per_row: int, shared_prefix: bool,
                   pad_id: int) -> PackedPairRows:
  """Packs every (prompt, first, second) whole into one row, first fit over the rows in order,
  within `length` tokens, `loss_tokens` response tokens and `pairs_per_row` pairs per row
  (static sizes, so the batch shape never changes); ValueError if they do not all fit.
  loss_tokens=None: no loss-token entries ([R, 0]; a reward model reads only last_column).

  Unshared, pair k of a row is segments 2k+1 = [prompt|first] and 2k+2 = [prompt|second], each
  with positions from 0. Shared, it is segments 3k+1 = prompt, 3k+2 = first, 3k+3 = second with
  parents 0, 3k+1, 3k+1 and both responses' positions continuing the prompt's.
  """
  loss_cap = np.inf if loss_tokens is None else loss_tokens
  width = 0 if loss_tokens is None else loss_tokens
  fill = np.zeros(rows, np.int64)
  loss_fill = np.zeros(rows, np.int64)
  placed: list[list[tuple[int, int]]] = [[] for _ in range(rows)]  # (pair, offset) per row.
  for i, triple in enumerate(triples):
    n, m = pair_footprint(triple, shared_prefix)
    counts = np.asarray([len(r) for r in placed])
    fits = np.flatnonzero((fill + n <= length) & (loss_fill + m <= loss_cap)
                          & (counts < pairs_per_row))
    if not fits.size:
      raise ValueError(f"{len(triples)} pairs do not fit {rows} rows of {length} tokens, "
                       f"{loss_tokens} loss tokens and {pairs_per_row} pairs each (pair {i} "
                       f"needs {n} tokens, {m} loss tokens)")
    row = int(fits[0])
    placed[row].append((i, int(fill[row])))
    fill[row] += n
    loss_fill[row] += m

  ids = np.full((rows, length), pad_id, np.int32)
  seg = np.zeros((rows, length), np.int32)
  parent = np.zeros((rows, length), np.int32)
  pos = np.zeros((rows, length), np.int32)
  predictor = np.zeros((rows, width), np.int32)
  targets = np.full((rows, width), pad_id, np.int32)
  target_slot = np.full((rows, width), -1, np.int32)
  last_column = np.zeros((rows, 2 * pairs_per_row), np.int32)
  pair_index = np.full((rows, pairs_per_row), -1, np.int32)
  n_loss = np.zeros(rows, np.int64)  # Loss entries written per row.

  def put(row, tokens, col, segment, parent_segment, first_pos):
    cols = slice(col, col + len(tokens))
    ids[row, cols], seg[row, cols], parent[row, cols] = tokens, segment, parent_segment
    pos[row, cols] = first_pos + np.arange(len(tokens), dtype=np.int32)

  def response(row, tokens, col, context_last, slot):
    """A response at columns [col, col + n): its first token is predicted from
    `context_last` (the column it follows in its own sequence), the others from the previous
    column."""
    n = len(tokens)
    last_column[row, slot] = col + n - 1 if n else context_last
    if width and n:
      entries = slice(n_loss[row], n_loss[row] + n)
      predictor[row, entries] = np.arange(col - 1, col + n - 1)
      predictor[row, n_loss[row]] = context_last
      targets[row, entries], target_slot[row, entries] = tokens, slot
      n_loss[row] += n

  for row, pairs in enumerate(placed):
    for k, (i, off) in enumerate(pairs):
      prompt, first, second = triples[i]
      lp, la = len(prompt), len(first)
      pair_index[row, k] = i
      if shared_prefix:
        put(row, prompt, off, 3 * k + 1, 0, 0)
        put(row, first, off + lp, 3 * k + 2, 3 * k + 1, lp)
        put(row, second, off + lp + la, 3 * k + 3, 3 * k + 1, lp)
        response(row, first, off + lp, off + lp - 1, 2 * k)
        response(row, second, off + lp + la, off + lp - 1, 2 * k + 1)
      else:
        for j, (col, resp) in enumerate(((off, first), (off + lp + la, second))):
          put(row, np.concatenate([prompt, resp]), col, 2 * k + 1 + j, 0, 0)
          response(row, resp, col + lp, col + lp - 1, 2 * k + j)
  return PackedPairRows(ids, (seg > 0).astype(np.int32), seg, pos,
                        parent if shared_prefix else None, predictor, targets, target_slot,
                        last_column, pair_index)


# ---------------------------------------------------------------------------------------------
# Packed rollouts (the RL stages' scoring passes and updates)
# ---------------------------------------------------------------------------------------------


def _bucket(n: int) -> int:
  """n rounded up to three significant bits (1..8 exactly, then 10, 12, 14, 16, 20, 24, 28,
  32, 40, ...): packed shapes vary from batch to batch, and this ladder bounds how many
  distinct shapes, and so compilations, a run meets, at most 1/8 of the rows wasted."""
  step = 1 << max(n.bit_length() - 3, 0)
  return max(-(-n // step) * step, 1)


def _first_fit_decreasing(sizes: Sequence[int], length: int) -> list[tuple[int, int]]:
  """(row, offset) per item: longest first, each into the first row with room (new rows as
  needed). Deterministic, so every process packs the same batch the same way."""
  fill: list[int] = []
  placed = [(0, 0)] * len(sizes)
  for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
    row = next((r for r, f in enumerate(fill) if f + sizes[i] <= length), len(fill))
    if row == len(fill):
      fill.append(0)
    placed[i] = (row, fill[row])
    fill[row] += sizes[i]
  return placed


def pack_rollouts(prompt_ids: np.ndarray, prompt_mask: np.ndarray, tokens: np.ndarray,
                  response_mask: np.ndarray, *, groups: int, length: int, pad_id: int,
                  splits: int = 1) -> dict[str, np.ndarray]:
  """Rollouts (prompt [B, P] with its mask, padded anywhere; response [B, N] with its mask, a
  prefix of each row) packed whole, without their padding, into `groups` x r rows of `length`.

  Rollouts [g·B/G, (g+1)·B/G) fill rows [g·r, (g+1)·r) (first fit, longest first), so the row
  axis splits into G equal parts exactly as the rollout axis does: micro-batches and batch
  devices each get the rows of their own rollouts. r (rows per group) and K (sequences per
  row) are rounded up to a ladder (`_bucket`), C (loss entries per row) to eighths of the row,
  to bound recompiles.
  Indices into the response layout are relative to the rollout's split: `splits` (dividing
  `groups`) consecutive equal parts, e.g. the micro-batches, each of which scatters its own
  rows' entries into its own rollouts.

  Returns int32 arrays:
    ids, mask, segment_ids, positions [G·r, length]: the rows (segments 1.. per row, positions
      from 0 in each rollout, 0 = padding);
    predictor, targets, source [G·r, C]: one entry per response token: the column whose output
      predicts it, the token, and where it goes in its split's [S, N] response layout
      (S = B/splits), (b mod S)·N + j for token j of rollout b (S·N = past the end, for
      unused entries);
    last_column, last_source [G·r, K]: each rollout's last column, where a reward model reads
      its score, and b mod S (S for unused entries).
  """
  b, n = tokens.shape
  if b % groups or groups % splits:
    raise ValueError(f"{b} rollouts do not split into {groups} equal groups in {splits} "
                     "equal splits")
  per_group, per_split = b // groups, b // splits
  prompts = [row[m > 0] for row, m in zip(prompt_ids, prompt_mask)]
  lengths = np.asarray(response_mask, np.int64).sum(1)
  sizes = [len(p) + int(k) for p, k in zip(prompts, lengths)]
  if max(sizes, default=0) > length:
    raise ValueError(f"a rollout of {max(sizes)} tokens cannot fit a packed row of {length}")
  placements = [_first_fit_decreasing(sizes[g * per_group:(g + 1) * per_group], length)
                for g in range(groups)]
  r = _bucket(max(max(row for row, _ in p) + 1 for p in placements))
  row_of = lambda g, i: g * r + placements[g][i][0]
  loss_per_row = np.zeros(groups * r, np.int64)
  seqs_per_row = np.zeros(groups * r, np.int64)
  for i in range(b):
    row = row_of(i // per_group, i % per_group)
    loss_per_row[row] += lengths[i]
    seqs_per_row[row] += 1
  # Loss entries per row in eighths of the row: the fullest row sets it, and it barely moves.
  eighth = -(-length // 8)
  c = min(-(-max(int(loss_per_row.max()), 1) // eighth) * eighth, length)
  k = _bucket(int(seqs_per_row.max()))
  rows = groups * r
  out = {name: np.zeros((rows, length), np.int32)
         for name in ("ids", "mask", "segment_ids", "positions")}
  out["ids"][:] = pad_id
  out.update(predictor=np.zeros((rows, c), np.int32), targets=np.full((rows, c), pad_id, np.int32),
             source=np.full((rows, c), per_split * n, np.int32),
             last_column=np.zeros((rows, k), np.int32),
             last_source=np.full((rows, k), per_split, np.int32))
  entries, seqs = np.zeros(rows, np.int64), np.zeros(rows, np.int64)
  for i in range(b):
    g, local = divmod(i, per_group)
    row, off = row_of(g, local), placements[g][local][1]
    p, m = prompts[i], int(lengths[i])
    cols = slice(off, off + len(p) + m)
    out["ids"][row, cols] = np.concatenate([p, tokens[i, :m]])
    out["mask"][row, cols] = 1
    seqs[row] += 1
    out["segment_ids"][row, cols] = seqs[row]
    out["positions"][row, cols] = np.arange(len(p) + m)
    e = slice(entries[row], entries[row] + m)
    # Response token j sits at column off + len(p) + j and is predicted one column before.
    out["predictor"][row, e] = off + len(p) - 1 + np.arange(m)
    out["targets"][row, e] = tokens[i, :m]
    out["source"][row, e] = (i % per_split) * n + np.arange(m)
    entries[row] += m
    out["last_column"][row, seqs[row] - 1] = off + len(p) + m - 1
    out["last_source"][row, seqs[row] - 1] = i % per_split
  return out


# ---------------------------------------------------------------------------------------------
# Batchers: how many stream examples the next batch takes, and how they are assembled
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PaddedBatcher:
  """Exactly `batch_size` examples per batch (per process); `collate(examples) -> batch`."""
  batch_size: int
  collate: Callable

  def local_limit(self, total: int, process_count: int) -> int:
    """Per-process examples usable from a finite stream of `total`: whole global batches
    only, so that every process yields the same number of batches."""
    return total // (self.batch_size * process_count) * self.batch_size

  def __call__(self, get: Callable[[int], object], available: int | None):
    if available is not None and available < self.batch_size:
      return None
    return self.collate([get(i) for i in range(self.batch_size)]), self.batch_size


@dataclasses.dataclass(frozen=True)
class PackedBatcher:
  """As many stream examples as fit, in order: the next example that does not fit (first-fit
  over the rows, or the max_sequences cap) starts the next batch. `pack` is pack_sft or
  pack_preferences."""
  pack: Callable
  rows: int
  length: int
  pad_id: int
  max_sequences: int

  def local_limit(self, total: int, process_count: int) -> int:
    if process_count > 1:
      # Each process packs a different number of examples per batch, so finite streams would
      # end after different numbers of steps and leave the other processes waiting.
      raise ValueError("packed batches with num_epochs on several processes would give each "
                       "process a different number of batches; use num_epochs=None and stop "
                       "after a fixed number of steps")
    return total

  def __call__(self, get: Callable[[int], object], available: int | None):
    ff = _FirstFit(self.rows, self.length, self.max_sequences)
    taken = []
    while available is None or len(taken) < available:
      ex = get(len(taken))
      if not ff.try_add([len(p) + len(r) for p, r in example_sequences(ex)]):
        if not taken:
          raise ValueError(f"{ex.source or 'an example'} does not fit an empty packed batch "
                           f"({self.rows} x {self.length}, {self.max_sequences} sequences)")
        break
      taken.append(ex)
    if not taken:
      return None
    return self.pack(taken, self.rows, self.length, self.max_sequences, self.pad_id), len(taken)
