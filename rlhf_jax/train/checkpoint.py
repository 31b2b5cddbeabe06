"""Checkpointing of the train state with orbax: async periodic saves, keep-k, resume, fallback.

Usage in a host loop::

  ckpt = Checkpointer(workdir / "checkpoints", save_every=500, keep=3)
  step = 0
  restored = ckpt.restore_latest(abstract_state)       # None on a fresh start
  if restored is not None:
    step, state, extra = restored                      # placed by abstract_state's shardings
    data_iter.restore(extra["data"])
  with PreemptionGuard() as preempt:
    for step in range(step + 1, total_steps + 1):
      state, metrics = train_step(state, next(data_iter))
      ckpt.maybe_save(step, state, extra_fn())         # every `save_every` steps, asynchronous
      if preempt.should_stop(step):                    # SIGTERM: save now, exit cleanly
        break
  ckpt.maybe_save(step, state, extra_fn(), force=True) # end or preemption (no-op if just saved)
  ckpt.close()                                         # waits for the last write

What a checkpoint holds (one orbax step directory, two items):
  * `state`: a pytree of jax arrays (e.g. {"params", "opt", "step", "rng"}) written with
    `ocp.args.StandardSave`. Store the RNG as `jax.random.key_data(key)` (raw uint32) and rebuild
    it with `jax.random.wrap_key_data`: raw integers are a plain array to every reader.
  * `extra`: a small JSON dict (`ocp.args.JsonSave`): the data-iterator position, the config
    (`config.to_dict()`; tuples come back as lists), anything else that is small.

Restoring onto another mesh: `abstract_state` is a pytree of `jax.ShapeDtypeStruct` carrying
the shardings of the *target* mesh (e.g. `jax.eval_shape` of the sharded init, or
`abstract_like(fresh_state)`); orbax reads each array's slices straight into those shardings, so
the mesh shape at restore time need not match the one at save time.

Why the extra rules on top of orbax:
  * A non-finite value never reaches a checkpoint: `maybe_save` checks every floating leaf
    (on device, one small jitted reduction) and raises `NonFiniteStateError` instead of saving,
    so resuming can never restart from a poisoned state.
  * Orbax lists a step directory as soon as it has its final name; on a local disk it does not
    check the commit marker, and it restores a step whose step metadata is gone. A step that was
    half-deleted, truncated or never committed must not be the one we resume from, so
    `restore_latest` checks the markers itself, tries the newest step first and falls back to
    older ones with a warning naming the step and the error.
  * Unusable steps newer than the restored one are deleted (through orbax, so multi-host safe):
    orbax cannot write a step whose directory exists, and a step below the latest one would be
    garbage-collected first, so leaving them would block checkpointing when training reaches
    those steps again.

Multi-host: every process calls every method; orbax coordinates the writes (the primary host
writes metadata, every host writes its own shards) and the barriers.
"""
import json
import signal
import threading
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

PyTree = Any

STATE, EXTRA = "state", "extra"
# Written by orbax 0.12.8 when a step is finalised, on every filesystem (step/commit_success.txt
# is written just before the atomic rename; _CHECKPOINT_METADATA carries the commit time).
_COMMIT_MARKER = "commit_success.txt"
_STEP_METADATA = "_CHECKPOINT_METADATA"
_TREE_METADATA = "_METADATA"  # Inside the `state` item: the saved tree's structure.


class NonFiniteStateError(FloatingPointError):
  """A state leaf holds NaN or Inf; checkpointing it would make the poison permanent."""


class CheckpointRestoreError(RuntimeError):
  """Checkpoints exist, but none of them could be restored into the requested state."""


def abstract_like(tree: PyTree) -> PyTree:
  """ShapeDtypeStructs (with shardings) of live arrays: a restore target on their mesh."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      tree)


def _path_str(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


@jax.jit
def _leaves_finite(leaves):
  # Rank-0 outputs are replicated, so every process can read them (multi-host safe).
  return [jnp.all(jnp.isfinite(x)) for x in leaves]


def nonfinite_leaves(state: PyTree) -> list[str]:
  """Paths of the floating leaves of `state` that hold a NaN or an Inf."""
  flat, _ = jax.tree_util.tree_flatten_with_path(state)
  floating = [(p, x) for p, x in flat if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  on_device = [(p, x) for p, x in floating if isinstance(x, jax.Array)]
  on_host = [(p, x) for p, x in floating if not isinstance(x, jax.Array)]
  bad = [p for p, x in on_host if not np.all(np.isfinite(np.asarray(x)))]
  if on_device:
    finite = jax.device_get(_leaves_finite([x for _, x in on_device]))
    bad += [p for (p, _), ok in zip(on_device, finite) if not ok]
  return sorted(_path_str(p) for p in bad)


def _check_json(extra: Mapping[str, Any]) -> None:
  """Fails in the caller's thread, not later in orbax's background writer."""
  if not isinstance(extra, Mapping):
    raise TypeError(f"checkpoint extra must be a dict, got {type(extra).__name__}")
  try:
    json.dumps(extra, allow_nan=False)
  except (TypeError, ValueError) as e:
    raise TypeError(f"checkpoint extra must be plain JSON (dict/list/str/int/float/bool/None, "
                    f"finite floats; convert numpy/jax scalars with int()/float()): {e}") from e


class Checkpointer:
  """Periodic, asynchronous orbax checkpoints of (state pytree, JSON extra) in `directory`.

  Args:
    directory: where step directories are written (created if missing); local or gs://.
    save_every: `maybe_save` writes when `step % save_every == 0` (or when forced).
    keep: how many of the most recent checkpoints to keep; older ones are deleted.
    async_save: write in a background thread. `maybe_save` returns once the arrays have been
      copied off the accelerator, so the caller may donate or overwrite `state` right away.
  """

  def __init__(self, directory: str | epath.PathLike, *, save_every: int, keep: int,
               async_save: bool = True):
    if save_every < 1:
      raise ValueError(f"save_every must be >= 1, got {save_every}")
    if keep < 1:
      raise ValueError(f"keep must be >= 1, got {keep}")
    self.directory = epath.Path(directory)
    self.save_every = int(save_every)
    self.keep = int(keep)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(n=self.keep),
        enable_async_checkpointing=async_save,
        # A save killed mid-write leaves a *.orbax-checkpoint-tmp-* directory; never a step.
        cleanup_tmp_directories=True,
        create=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=(STATE, EXTRA),
        item_handlers={STATE: ocp.StandardCheckpointHandler(),
                       EXTRA: ocp.JsonCheckpointHandler()})

  @property
  def steps(self) -> list[int]:
    """Steps of the checkpoints on disk (as orbax lists them), oldest first."""
    return list(self._manager.all_steps())

  def maybe_save(self, step: int, state: PyTree, extra: Mapping[str, Any], *,
                 force: bool = False) -> bool:
    """Starts saving `state` and `extra` as checkpoint `step` when due; True if it did.

    Due means `step % save_every == 0` or `force`. A step that is already on disk is not
    rewritten (False): e.g. the forced final save right after a periodic one.

    Raises:
      NonFiniteStateError: a floating leaf of `state` is NaN/Inf (nothing is written).
      TypeError: `extra` is not plain JSON.
      ValueError: `step` is below the latest checkpoint (a fresh run in a used directory
        without `restore_latest`: orbax would treat the new checkpoint as the oldest).
    """
    step = int(step)
    if step < 0:
      raise ValueError(f"checkpoint step must be >= 0, got {step}")
    if not force and step % self.save_every:
      return False
    if step in self._manager.all_steps():
      logging.info("Checkpoint for step %d already exists in %s; not saving it again.", step,
                   self.directory)
      return False
    latest = self._manager.latest_step()
    if latest is not None and step < latest:
      raise ValueError(
          f"cannot save step {step}: {self.directory} already holds a checkpoint at step "
          f"{latest}. Resume with restore_latest() or use a fresh directory.")
    _check_json(extra)
    bad = nonfinite_leaves(state)
    if bad:
      raise NonFiniteStateError(
          f"refusing to checkpoint step {step}: non-finite values (NaN/Inf) in {len(bad)} "
          f"state leaves: {', '.join(bad[:10])}{' ...' if len(bad) > 10 else ''}")
    return self._manager.save(
        step, args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                         EXTRA: ocp.args.JsonSave(dict(extra))}), force=True)

  def wait(self) -> None:
    """Blocks until pending saves are written and committed; re-raises their errors."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves, then releases orbax's threads."""
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _incomplete_reason(self, step: int) -> str | None:
    """Why the step directory is not a finished checkpoint, or None if its markers are fine."""
    step_dir = self.directory / str(step)
    if not (step_dir / _COMMIT_MARKER).exists():
      return f"commit marker {_COMMIT_MARKER} is missing (save never finished)"
    for name in (step_dir / _STEP_METADATA, step_dir / STATE / _TREE_METADATA):
      try:
        json.loads(name.read_text())
      except (OSError, ValueError) as e:
        return f"metadata file {name.relative_to(self.directory)} is unreadable: {e!r}"
    return None

  def restore_latest(self, abstract_state: PyTree) -> tuple[int, PyTree, dict] | None:
    """(step, state, extra) of the newest usable checkpoint, or None if there is none.

    `abstract_state` is the restore target: `jax.ShapeDtypeStruct`s with shardings (or live
    arrays, whose shapes, dtypes and shardings are used). Arrays come back in those shardings
    and dtypes, whatever mesh the checkpoint was written from.

    A step whose markers are missing or whose restore fails (truncated or deleted files,
    unreadable metadata) is skipped with a warning naming the step and the error, and the
    previous step is tried. Unusable steps newer than the one restored are then deleted (see
    the module docstring for why).

    Raises:
      CheckpointRestoreError: checkpoints exist but none could be restored and at least one
        failed while reading, which usually means `abstract_state` does not match what was
        saved (a changed model or optimizer); starting from scratch instead would silently
        throw the run away, so this is an error.
      ValueError: a leaf of `abstract_state` carries no sharding.
    """
    target = self._restore_target(abstract_state)
    self._manager.reload()  # Another process (an earlier run) wrote the directory.
    failures: list[tuple[int, str]] = []
    read_errors = 0
    for step in sorted(self._manager.all_steps(), reverse=True):
      reason = self._incomplete_reason(step)
      if reason is None:
        try:
          restored = self._manager.restore(
              step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(target),
                                               EXTRA: ocp.args.JsonRestore()}))
        except Exception as e:  # pylint: disable=broad-except
          # Corruption surfaces as ValueError (tensorstore), FileNotFoundError, KeyError,
          # JSONDecodeError, ...; every one is reported and the next-older step tried.
          reason = f"restore failed: {type(e).__name__}: {e}"
          read_errors += 1
        else:
          self._drop_unusable([s for s, _ in failures])
          logging.info("Restored checkpoint step %d from %s", step, self.directory)
          return step, restored[STATE], dict(restored[EXTRA])
      logging.warning("Checkpoint step %d in %s is unusable, falling back to an older one: %s",
                      step, self.directory, reason)
      failures.append((step, reason))
    if read_errors:
      details = "\n".join(f"  step {s}: {r}" for s, r in failures)
      raise CheckpointRestoreError(
          f"none of the checkpoints in {self.directory} could be restored:\n{details}\n"
          "If the model/optimizer changed, use a new workdir; if they are corrupt, move them "
          "away to start from scratch.")
    self._drop_unusable([s for s, _ in failures])
    return None

  def _drop_unusable(self, steps: Iterable[int]) -> None:
    for step in steps:
      if step in self._manager.all_steps():
        logging.warning("Deleting unusable checkpoint step %d in %s so that step can be saved "
                        "again when training reaches it.", step, self.directory)
        self._manager.delete(step)

  @staticmethod
  def _restore_target(abstract_state: PyTree) -> PyTree:
    def to_struct(path, x):
      if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
      if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is not None:
        return x
      raise ValueError(
          f"abstract_state leaf {_path_str(path)!r} ({type(x).__name__}) needs a sharding: "
          "pass jax.ShapeDtypeStruct(shape, dtype, sharding=...) so the target mesh decides "
          "placement (see abstract_like)")
    return jax.tree_util.tree_map_with_path(to_struct, abstract_state)


class PreemptionGuard:
  """Turns SIGTERM (a preemption notice) into a flag the loop polls, so it can save and exit.

  The signal handler only sets a flag: saving from inside a handler would run orbax and JAX
  at an arbitrary point of the main thread. Use as a context manager (from the main thread,
  where Python allows signal handlers); the previous handlers are restored on exit.

  Call `should_stop(step)` once every step. Single process: True once a signal arrived. Multi
  process (`jax.process_count() > 1`): no Python handler is installed, because JAX's
  distributed runtime already owns SIGTERM and propagates the notice to every host;
  `should_stop` then returns `jax.experimental.multihost_utils.reached_preemption_sync_point`,
  True on all hosts at the same step, so they all enter the forced save together (a host
  saving alone would block in orbax's barriers).
  """

  def __init__(self, signals: Iterable[int] = (signal.SIGTERM,)):
    self._signals = tuple(signals)
    self._previous: dict[int, Any] = {}
    self._event = threading.Event()
    self._multi_process = False
    self._logged = False

  @property
  def requested(self) -> bool:
    """Whether a stop was requested (a signal here, or the multi-host sync point was hit)."""
    return self._event.is_set()

  def _handle(self, signum, frame) -> None:  # pylint: disable=unused-argument
    self._event.set()

  def should_stop(self, step: int) -> bool:
    """Whether the loop should force-save `step`, wait, and exit (call it every step)."""
    if not self._event.is_set() and self._multi_process:
      if multihost_utils.reached_preemption_sync_point(int(step)):
        self._event.set()
    if self._event.is_set() and not self._logged:
      logging.warning("Preemption requested: stopping after step %d.", step)
      self._logged = True
    return self._event.is_set()

  def __enter__(self) -> "PreemptionGuard":
    self._multi_process = jax.process_count() > 1
    if not self._multi_process:
      for sig in self._signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous.clear()
