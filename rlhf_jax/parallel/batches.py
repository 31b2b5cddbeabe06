"""The evaluation batch loop, written once: a host dataset -> fixed, mesh-divisible batches ->
placed over the mesh -> a jitted function -> host results.

Every evaluator and scorer (held-out NLL, pair log-probs, reward-model scores, policy samples)
walks a dataset that every process holds whole. Each batch has the same shape (one compile):
the batch size is rounded down to a multiple of the mesh size and the last batch is filled up,
with empty rows (`fill="zeros"`: masks 0, so they carry no loss) or copies of the last row
(`fill="edge"`: valid inputs for samplers and scorers). Each process feeds only the rows its
devices hold (`distributed.shard_global`) and reads every row back (`distributed.gather`).
"""
from typing import Any, Callable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh

from rlhf_jax.parallel import distributed

PyTree = Any
FILLS = ("zeros", "edge")


def mesh_batch_size(batch_size: int, mesh: Mesh) -> int:
  """`batch_size` rounded down to a multiple of the mesh size (at least one row per device)."""
  return max(batch_size // mesh.size, 1) * mesh.size


def _rows(inputs: PyTree) -> int:
  sizes = {np.shape(x)[0] for x in jax.tree.leaves(inputs)}
  if len(sizes) != 1:
    raise ValueError(f"inputs disagree on their number of rows: {sorted(sizes)}")
  return sizes.pop()


def _fill(x: np.ndarray, short: int, fill: str) -> np.ndarray:
  if not short:
    return x
  extra = (np.zeros((short, *x.shape[1:]), x.dtype) if fill == "zeros" else
           np.repeat(x[-1:], short, axis=0))
  return np.concatenate([x, extra])


def padded_batches(inputs: PyTree, mesh: Mesh, batch_size: int, *, fill: str = "edge"
                   ) -> Iterator[tuple[int, PyTree, int]]:
  """Yields (batch index, batch placed over the mesh, number of real rows) over the leading
  axis of `inputs` (a pytree of host arrays with the same number of rows)."""
  if fill not in FILLS:
    raise ValueError(f"fill={fill!r}; expected one of {FILLS}")
  n, size = _rows(inputs), mesh_batch_size(batch_size, mesh)
  for index, start in enumerate(range(0, n, size)):
    chunk = jax.tree.map(lambda x: np.asarray(x)[start:start + size], inputs)
    real = min(size, n - start)
    chunk = jax.tree.map(lambda x: _fill(x, size - real, fill), chunk)
    yield index, distributed.shard_global(chunk, mesh), real


def map_batches(fn: Callable[[PyTree], PyTree], inputs: PyTree, mesh: Mesh, batch_size: int,
                *, fill: str = "edge", axis: int = 0) -> PyTree:
  """fn over every batch of `inputs`; its per-row outputs (rows along `axis`) come back as host
  arrays with the filler rows dropped, concatenated in order."""
  outputs = []
  for _, batch, real in padded_batches(inputs, mesh, batch_size, fill=fill):
    out = distributed.gather(fn(batch))
    outputs.append(jax.tree.map(lambda x: np.take(x, np.arange(real), axis=axis), out))
  return jax.tree.map(lambda *xs: np.concatenate(xs, axis=axis), *outputs)
