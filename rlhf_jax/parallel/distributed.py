"""Multi-host (multi-controller) runs: start-up, per-process data slices, gathering, seeds.

JAX's multi-controller model: every process runs the same program on its own devices, and a
jitted function over global arrays (one logical array spread over every process's devices)
runs as one SPMD program across all of them. What differs per process is only what touches the
host: which rows of a batch it feeds, what it reads back, what it logs and writes.

Start-up, `initialize(config.distributed)`, in this order:
  1. config.distributed.coordinator_address set: explicit (num_processes, process_id from the
     config), e.g. a hand-launched job or a test on localhost;
  2. else the environment: RLHF_JAX_COORDINATOR (host:port), RLHF_JAX_NUM_PROCESSES,
     RLHF_JAX_PROCESS_ID, e.g. exported by a launcher script per process;
  3. else config.distributed.enabled: JAX's own detection (TPU pod metadata, SLURM, Open MPI,
     Kubernetes, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID);
  4. else a single process (nothing to do).
It must run before anything touches a JAX backend (jax.devices(), any array), which is why
rlhf_jax.main calls it first.

Data: the offline stages read per-process slices of the example stream (data.DataIterator
splits it by process; each process collates batch_size / process_count rows) and build the
global batch with `parallel.shard_batch`. Batches every process holds whole (evaluation sets,
PPO prompts) go through `shard_global` instead: each process feeds only the rows its own
devices hold. Results come back to every host with `gather`.
"""
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from rlhf_jax.parallel.sharding import batch_sharding

PyTree = Any
ENV_COORDINATOR = "RLHF_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "RLHF_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "RLHF_JAX_PROCESS_ID"
DEFAULT_TIMEOUT_S = 300


def _get(cfg, key: str, default):
  if cfg is None:
    return default
  value = cfg.get(key, default) if isinstance(cfg, Mapping) or hasattr(cfg, "get") else default
  return default if value is None else value


def _env_int(name: str) -> int:
  raw = os.environ.get(name)
  if raw is None:
    raise ValueError(f"{ENV_COORDINATOR} is set, so {name} must be set too")
  try:
    return int(raw)
  except ValueError as e:
    raise ValueError(f"{name}={raw!r}: expected an integer") from e


def initialize(cfg=None) -> bool:
  """Joins the multi-process job described by `cfg` (config.distributed) or the environment.

  Returns True if this is a multi-process run. Safe to call twice. Keys of `cfg` (all
  optional): enabled, coordinator_address, num_processes, process_id, initialization_timeout
  (seconds the processes wait for each other at start-up). Processes other than 0 log only
  warnings and errors (absl), so a job prints its progress once.
  """
  if jax.distributed.is_initialized():
    return jax.process_count() > 1
  timeout = int(_get(cfg, "initialization_timeout", DEFAULT_TIMEOUT_S))
  address = str(_get(cfg, "coordinator_address", ""))
  if address:
    num_processes, process_id = int(_get(cfg, "num_processes", 1)), int(_get(cfg, "process_id", 0))
    source = "config.distributed"
  elif os.environ.get(ENV_COORDINATOR):
    address = os.environ[ENV_COORDINATOR]
    num_processes, process_id = _env_int(ENV_NUM_PROCESSES), _env_int(ENV_PROCESS_ID)
    source = f"${ENV_COORDINATOR}"
  elif bool(_get(cfg, "enabled", False)):
    try:
      jax.distributed.initialize(initialization_timeout=timeout)
    except (ValueError, RuntimeError) as e:
      raise RuntimeError(
          "config.distributed.enabled=True but JAX detected no cluster to join; set "
          "config.distributed.coordinator_address/num_processes/process_id or "
          f"${ENV_COORDINATOR}/${ENV_NUM_PROCESSES}/${ENV_PROCESS_ID}: {e}") from e
    _quiet_non_main()
    return jax.process_count() > 1
  else:
    return False
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise ValueError(f"{source}: process_id={process_id} must be in [0, num_processes="
                     f"{num_processes})")
  jax.distributed.initialize(coordinator_address=address, num_processes=num_processes,
                             process_id=process_id, initialization_timeout=timeout)
  _quiet_non_main()
  logging.info("distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return jax.process_count() > 1


def _quiet_non_main() -> None:
  if not is_main_process():
    logging.set_verbosity(logging.WARNING)


def is_main_process() -> bool:
  """Process 0: the one that logs, prints and writes the run's single-copy files."""
  return jax.process_index() == 0


def process_seed(seed: int) -> int:
  """A host seed of its own for this process (e.g. host-side augmentation or shuffling that
  should differ per process). Device randomness needs none: a jitted function draws from one
  global key and each device computes its own part of the global random array."""
  return int(np.random.SeedSequence([int(seed), jax.process_index()]).generate_state(1)[0])


def fold_in_process(key: jax.Array) -> jax.Array:
  """`key` folded with this process's index: a distinct stream per process."""
  return jax.random.fold_in(key, jax.process_index())


def local_batch_size(global_size: int, name: str) -> int:
  """Rows each process collates of a global batch of `global_size` (config key `name`)."""
  count = jax.process_count()
  if global_size % count:
    raise ValueError(f"{name}={global_size} must be divisible by the number of processes "
                     f"({count}): each process feeds an equal share of the global batch")
  return global_size // count


def local_rows(sharding: NamedSharding, global_rows: int) -> slice:
  """The rows of a global batch of `global_rows` that this process's devices hold under
  `sharding` (leading axis): the slice it feeds. A contiguous range on every mesh this package
  builds (processes own contiguous blocks of the batch axes)."""
  covered = set()
  for index in sharding.addressable_devices_indices_map((global_rows,)).values():
    covered.update(range(*index[0].indices(global_rows)))
  lo, hi = min(covered), max(covered) + 1
  if len(covered) != hi - lo:
    raise ValueError(f"this process's rows under {sharding.spec} are not contiguous")
  return slice(lo, hi)


def shard_global(batch: PyTree, mesh: Mesh) -> PyTree:
  """Places a host batch that every process holds whole (same values everywhere): leading
  axis over data x fsdp, each process transferring only the rows its devices hold. With one
  process this is parallel.shard_batch."""
  def put(x):
    x = np.asarray(x)
    sharding = batch_sharding(mesh, x.ndim)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(put, batch)


def gather(tree: PyTree) -> PyTree:
  """Host numpy copies of (possibly multi-process) arrays, whole, on every process."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree.map(get, tree)
