"""A deterministic, resumable batch iterator whose whole state is one integer.

The examples form an endless stream: global index g is example perm_e[g % N] of epoch
e = g // N, where perm_e is a permutation drawn from (seed, e) (identity if shuffle=False).
Process p of P owns the stream positions g = i * P + p (i = 0, 1, ...) and touches only those
examples, so on multi-host each process reads only its own slice. `position` = how many of
its own stream positions a process has consumed; saving it and passing it back as
`position=` gives exactly the batches that would have come next.

For padded batches every process consumes the same number per step, so the positions agree;
for packed batches each process's position is its own (save it per process, as orbax does for
per-process data state). Either way, resume with the same seed and process count.
"""
from typing import Callable, Generic, Sequence, TypeVar

import jax
import numpy as np
from absl import logging

B = TypeVar("B")


class DataIterator(Generic[B]):
  """`batcher` decides how many stream examples each batch takes (see batching.py)."""

  def __init__(self, source: Sequence, batcher: Callable, *, seed: int = 0,
               shuffle: bool = True, num_epochs: int | None = None,
               process_index: int | None = None, process_count: int | None = None,
               position: int = 0):
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    if not len(source):
      raise ValueError("the source holds no examples")
    if num_epochs is not None and num_epochs < 1:
      raise ValueError(f"num_epochs={num_epochs}; expected None (endless) or >= 1")
    self._source = source
    self._batcher = batcher
    self._seed = seed
    self._shuffle = shuffle
    self._num_epochs = num_epochs
    self._p = process_index
    self._np = process_count
    self._n = len(source)
    # Own-stream positions this process may consume (None = endless).
    self._limit = (None if num_epochs is None else
                   batcher.local_limit(num_epochs * self._n, process_count))
    if position < 0 or (self._limit is not None and position > self._limit):
      raise ValueError(f"position={position} outside [0, {self._limit}]")
    self._position = position
    self._perms: dict[int, np.ndarray] = {}

  @property
  def position(self) -> int:
    """The resumable state: own-stream examples consumed so far."""
    return self._position

  @property
  def epoch(self) -> int:
    """The epoch of the next example this process will read."""
    return (self._position * self._np + self._p) // self._n

  def _order(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      if len(self._perms) > 2:  # Batches straddle at most two epochs.
        self._perms.pop(min(self._perms))
      self._perms[epoch] = (np.random.default_rng([self._seed, epoch]).permutation(self._n)
                            if self._shuffle else np.arange(self._n))
    return self._perms[epoch]

  def stream_index(self, i: int) -> int:
    """Source index of own-stream position `i`."""
    g = i * self._np + self._p
    return int(self._order(g // self._n)[g % self._n])

  def _get(self, offset: int):
    return self._source[self.stream_index(self._position + offset)]

  def __iter__(self):
    return self

  def __next__(self) -> B:
    available = None if self._limit is None else self._limit - self._position
    out = self._batcher(self._get, available)
    if out is None:
      left = self._num_epochs * self._n - self._position * self._np
      if left:
        logging.info("data iterator finished after %d epochs: %d examples (global) were left "
                     "over, fewer than one batch", self._num_epochs, left)
      raise StopIteration
    batch, consumed = out
    self._position += consumed
    return batch
