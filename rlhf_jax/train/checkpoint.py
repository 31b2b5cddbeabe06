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
  * Orbax trusts the bytes it reads: one flipped byte in an array file restores as a slightly
    different weight, silently. So every committed step gets an integrity manifest,
    `<step>/integrity.json` (size and sha256 of every file of its `state` and `extra` items),
    and `restore_latest` verifies it before trusting the step; a mismatch names the step and
    the file and falls back to the previous step. Verifying reads the step's bytes once more
    (on process 0, before orbax reads them; the time is logged): the price of not resuming
    from silently different weights. When the manifest is written: saves are
    asynchronous, and the files are final only once orbax has committed the step, so the
    manifest of step s is written (by process 0, in a background thread, atomically: temporary
    file + rename) as soon as orbax reports the save finished (`is_saving_in_progress()` turns
    false; polled at every `maybe_save`), and at the latest before the next save starts, in
    `wait()` and in `close()`. The next save waits for it, so orbax's keep-k deletion (which
    runs when a later save commits) never races the hashing.
  * A step without a manifest (written before manifests existed, or the run was killed in the
    short window between orbax's commit and the manifest) is restored *unverified*, with a
    warning: orbax committed it, and refusing it would throw away every older checkpoint.
  * A restored state with a NaN/Inf is corrupt by definition (none is ever saved), so it is
    treated like a digest mismatch; `restore_latest(check_extra=...)` lets the caller reject a
    step whose JSON extra is unusable (e.g. a corrupt data position) the same way.
  * Unusable steps are never deleted: they are moved aside to `<directory>.quarantine/
    <step>-<reason>` (with a QUARANTINE_REASON.txt) and a warning names where. Those newer than
    the restored step have to leave the directory (orbax cannot write a step whose directory
    exists, and a step below the latest one would be garbage-collected first, which would block
    checkpointing when training reaches those steps again); moving keeps the bytes for a
    post-mortem. When no step is usable nothing is moved and `restore_latest` raises, naming
    every step and why (see its docstring): restarting from step 0 is the user's decision, not
    a silent fallback. The one exception is a directory whose only step was never committed:
    that is a save interrupted before its first commit (on object stores the final name can
    appear before the marker), so it is moved aside and training starts fresh.

Multi-host: every process calls every method; orbax coordinates the writes (the primary host
writes metadata, every host writes its own shards) and the barriers. Process 0 writes the
manifests, verifies them and moves unusable steps aside; the verdict on each step is agreed by
all processes (an all-gather) before anyone acts on it, so they all restore the same step.
"""
import concurrent.futures
import hashlib
import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping
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
INTEGRITY_FILE = "integrity.json"  # Ours: sha256 and size of every file of the items below.
_HASHED_ITEMS = (STATE, EXTRA)
QUARANTINE_SUFFIX = ".quarantine"  # Unusable steps go to <directory>.quarantine/<step>-<why>.
_QUARANTINE_NOTE = "QUARANTINE_REASON.txt"
_HASH_CHUNK = 8 << 20


class NonFiniteStateError(FloatingPointError):
  """A state leaf holds NaN or Inf; checkpointing it would make the poison permanent."""


class CheckpointRestoreError(RuntimeError):
  """Checkpoints exist, but none of them could be restored into the requested state."""


class IntegrityError(ValueError):
  """A checkpoint file's bytes differ from the digest written when the step was saved."""


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


# ---------------------------------------------------------------------------------------------
# Integrity manifests
# ---------------------------------------------------------------------------------------------


def _item_files(step_dir: epath.Path) -> list[epath.Path]:
  """Every regular file under the step's hashed items (state, extra), in a stable order."""
  out = []

  def walk(directory):
    for child in sorted(directory.iterdir(), key=lambda p: p.name):
      if child.is_dir():
        walk(child)
      else:
        out.append(child)

  for item in _HASHED_ITEMS:
    if (step_dir / item).is_dir():
      walk(step_dir / item)
  return out


def _sha256(path: epath.Path) -> str:
  digest = hashlib.sha256()  # hashlib releases the GIL on large chunks: training continues.
  with path.open("rb") as f:
    while chunk := f.read(_HASH_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def _relative(path: epath.Path, step_dir: epath.Path) -> str:
  return os.fspath(path)[len(os.fspath(step_dir)):].lstrip("/")


def write_manifest(step_dir: str | epath.PathLike) -> dict[str, Any]:
  """Writes <step_dir>/integrity.json: size and sha256 of every file of the step's items.

  Atomic (a temporary file renamed over the final name), so a reader sees either no manifest
  or a whole one. Call only on a committed step: the files must be final.
  """
  step_dir = epath.Path(step_dir)
  files = {_relative(path, step_dir): {"size": path.stat().length, "sha256": _sha256(path)}
           for path in _item_files(step_dir)}
  manifest = {"version": 1, "algorithm": "sha256", "items": list(_HASHED_ITEMS),
              "files": files}
  tmp = step_dir / f"{INTEGRITY_FILE}.tmp"
  tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
  tmp.rename(step_dir / INTEGRITY_FILE)
  return manifest


def verify_manifest(step_dir: str | epath.PathLike) -> dict[str, Any] | None:
  """Checks every file <step_dir>/integrity.json lists; returns the manifest (None: none).

  Sizes are compared first (cheap; catches truncation), then digests.

  Raises:
    IntegrityError: the manifest is unreadable, or a listed file is missing, has another size
      or another sha256; the message names the file (relative to the step directory).
  """
  step_dir = epath.Path(step_dir)
  path = step_dir / INTEGRITY_FILE
  if not path.exists():
    return None
  try:
    manifest = json.loads(path.read_text())
    files = manifest["files"]
    entries = sorted((str(name), int(e["size"]), str(e["sha256"])) for name, e in files.items())
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise IntegrityError(f"{INTEGRITY_FILE} is unreadable: {e!r}") from e
  if not entries:
    raise IntegrityError(f"{INTEGRITY_FILE} lists no files")
  for name, size, _ in entries:
    try:
      actual = (step_dir / name).stat().length
    except OSError:
      raise IntegrityError(f"file {name} listed in {INTEGRITY_FILE} is missing") from None
    if actual != size:
      raise IntegrityError(f"file {name} has {actual} bytes; {INTEGRITY_FILE} recorded {size} "
                           "at save time (truncated or rewritten)")
  for name, _, digest in entries:
    if _sha256(step_dir / name) != digest:
      raise IntegrityError(f"file {name} does not match the sha256 recorded in "
                           f"{INTEGRITY_FILE} at save time: its bytes changed after the save")
  return manifest


def _all_processes(ok: bool) -> bool:
  """Whether `ok` holds on every process (an all-gather; every process must call it), so all
  processes take the same branch (e.g. fall back to the same step) and meet in the same
  orbax barriers."""
  if jax.process_count() == 1:
    return bool(ok)
  return bool(np.all(multihost_utils.process_allgather(np.asarray(bool(ok)))))


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


class Checkpointer:
  """Periodic, asynchronous orbax checkpoints of (state pytree, JSON extra) in `directory`,
  each with an integrity manifest (see the module docstring).

  Args:
    directory: where step directories are written (created if missing); local or gs://.
      Unusable steps are moved to the sibling `<directory>.quarantine/`.
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
    self._pending: int | None = None  # Saved by us, its manifest not yet started.
    self._hashing: concurrent.futures.Future | None = None
    self._executor: concurrent.futures.ThreadPoolExecutor | None = None

  @property
  def steps(self) -> list[int]:
    """Steps of the checkpoints on disk (as orbax lists them), oldest first."""
    return list(self._manager.all_steps())

  @property
  def quarantine_dir(self) -> epath.Path:
    """Where unusable steps are moved: `<directory>.quarantine`, beside the directory (inside
    it, orbax would take the moved steps for its own)."""
    return self.directory.parent / f"{self.directory.name}{QUARANTINE_SUFFIX}"

  def maybe_save(self, step: int, state: PyTree, extra: Mapping[str, Any], *,
                 force: bool = False) -> bool:
    """Starts saving `state` and `extra` as checkpoint `step` when due; True if it did.

    Due means `step % save_every == 0` or `force`. A step that is already on disk is not
    rewritten (False): e.g. the forced final save right after a periodic one. Every call also
    starts the integrity manifest of the previous save once orbax has committed it.

    Raises:
      NonFiniteStateError: a floating leaf of `state` is NaN/Inf (nothing is written).
      TypeError: `extra` is not plain JSON.
      ValueError: `step` is below the latest checkpoint (a fresh run in a used directory
        without `restore_latest`: orbax would treat the new checkpoint as the oldest).
    """
    step = int(step)
    if step < 0:
      raise ValueError(f"checkpoint step must be >= 0, got {step}")
    self._finish_pending(block=False)
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
    # orbax's save waits for the previous one anyway; waiting here first lets its manifest be
    # finished before this save's commit may garbage-collect older steps.
    self._finish_pending(block=True)
    self._join_hashing()
    saved = self._manager.save(
        step, args=ocp.args.Composite(**{STATE: ocp.args.StandardSave(state),
                                         EXTRA: ocp.args.JsonSave(dict(extra))}), force=True)
    if saved:
      self._pending = step
      self._finish_pending(block=False)  # Synchronous saves are committed already.
    return saved

  def _finish_pending(self, *, block: bool) -> None:
    """Starts the manifest of the pending save once it is committed (block: wait for that)."""
    if self._pending is None:
      return
    if block:
      self._manager.wait_until_finished()
    elif self._manager.is_saving_in_progress():
      return
    step, self._pending = self._pending, None
    if jax.process_index() != 0:
      return
    self._join_hashing()
    if self._executor is None:
      self._executor = concurrent.futures.ThreadPoolExecutor(
          max_workers=1, thread_name_prefix="checkpoint_integrity")
    self._hashing = self._executor.submit(self._write_manifest, step)

  def _write_manifest(self, step: int) -> None:
    """The background job: a failure costs the step its verification, not the run."""
    step_dir = self.directory / str(step)
    try:
      if not (step_dir / _COMMIT_MARKER).exists():
        logging.warning("Checkpoint step %d in %s has no commit marker after its save; no "
                        "integrity manifest written.", step, self.directory)
        return
      tic = time.perf_counter()
      manifest = write_manifest(step_dir)
      size = sum(e["size"] for e in manifest["files"].values())
      logging.info("Checkpoint step %d: integrity manifest of %d files (%.1f MB) in %.2f s.",
                   step, len(manifest["files"]), size / 1e6, time.perf_counter() - tic)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("Could not write the integrity manifest of checkpoint step %d in %s "
                      "(%s: %s); the step will be restored unverified.", step, self.directory,
                      type(e).__name__, e)

  def _join_hashing(self) -> None:
    if self._hashing is not None:
      self._hashing.result()  # _write_manifest catches its own errors.
      self._hashing = None

  def wait(self) -> None:
    """Blocks until pending saves are written, committed and have their integrity manifests;
    re-raises the saves' errors."""
    self._manager.wait_until_finished()
    self._finish_pending(block=True)
    self._join_hashing()

  def close(self) -> None:
    """Waits for pending saves and manifests, then releases orbax's and our threads."""
    try:
      self.wait()
    finally:
      if self._executor is not None:
        self._executor.shutdown(wait=True)
        self._executor = None
      self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _incomplete_reason(self, step: int) -> tuple[str, str] | None:
    """(kind, why) if the step directory is not a finished checkpoint; None if its markers
    are fine. kind: "uncommitted" (no commit marker) or "corrupt" (unreadable metadata)."""
    step_dir = self.directory / str(step)
    if not (step_dir / _COMMIT_MARKER).exists():
      return "uncommitted", f"commit marker {_COMMIT_MARKER} is missing (save never finished)"
    for name in (step_dir / _STEP_METADATA, step_dir / STATE / _TREE_METADATA):
      try:
        json.loads(name.read_text())
      except (OSError, ValueError) as e:
        return "corrupt", f"metadata file {_relative(name, self.directory)} is unreadable: {e!r}"
    return None

  def _verify(self, step: int) -> tuple[str | None, bool]:
    """(why the digests fail or None, whether a manifest was checked); process 0 only."""
    if jax.process_index() != 0:
      return None, False
    tic = time.perf_counter()
    try:
      manifest = verify_manifest(self.directory / str(step))
    except IntegrityError as e:
      return f"integrity check failed: {e}", True
    if manifest is not None:
      logging.info("Checkpoint step %d: %d files match their integrity manifest (%.2f s).",
                   step, len(manifest["files"]), time.perf_counter() - tic)
    return None, manifest is not None

  def restore_latest(self, abstract_state: PyTree,
                     check_extra: Callable[[dict], Any] | None = None
                     ) -> tuple[int, PyTree, dict] | None:
    """(step, state, extra) of the newest usable checkpoint, or None if there is none.

    `abstract_state` is the restore target: `jax.ShapeDtypeStruct`s with shardings (or live
    arrays, whose shapes, dtypes and shardings are used). Arrays come back in those shardings
    and dtypes, whatever mesh the checkpoint was written from.

    A step is unusable when its markers are missing, a file differs from its integrity
    manifest, the restore fails (truncated or deleted files, unreadable metadata), the state
    holds a NaN/Inf, or `check_extra(extra)` raises (the caller's check of what it stored,
    e.g. a data position). Each is reported with a warning naming the step and why, and the
    previous step is tried. Unusable steps newer than the one restored are then moved aside
    to `quarantine_dir` (see the module docstring for why; never deleted).

    Raises:
      CheckpointRestoreError: checkpoints exist but none is usable (nothing is moved). A
        failing restore usually means `abstract_state` does not match what was saved (a changed
        model or optimizer); corrupt files or missing commit markers on every step mean damage
        from outside. Starting from scratch instead would silently throw the run away, so the
        message names every step and why, and tells the user what to do. Exception: a
        directory whose only step is uncommitted (a first save interrupted before its commit)
        is moved aside and None returned.
      ValueError: a leaf of `abstract_state` carries no sharding.
    """
    target = self._restore_target(abstract_state)
    self.wait()
    self._manager.reload()  # Another process (an earlier run) wrote the directory.
    failures: list[tuple[int, str, str]] = []  # (step, kind, why), newest first.
    for step in sorted(self._manager.all_steps(), reverse=True):
      kind, reason, verified = self._check_step(step)
      if reason is None:
        kind, reason, restored = self._try_restore(step, target, check_extra)
        if not _all_processes(reason is None):
          reason = reason or "unusable on another process (see process 0's log)"
      if reason is None:
        if jax.process_index() == 0 and not verified:
          logging.warning(
              "Checkpoint step %d in %s has no %s (saved before manifests existed, or the run "
              "stopped between orbax's commit and the manifest): restored unverified.", step,
              self.directory, INTEGRITY_FILE)
        for failed, failed_kind, why in failures:
          self.quarantine(failed, failed_kind, why)
        logging.info("Restored checkpoint step %d from %s", step, self.directory)
        return step, restored[0], restored[1]
      logging.warning("Checkpoint step %d in %s is unusable, falling back to an older one: %s",
                      step, self.directory, reason)
      failures.append((step, kind, reason))
    if not failures:
      return None
    if len(failures) == 1 and failures[0][1] == "uncommitted":
      step, kind, why = failures[0]
      logging.warning("The only checkpoint in %s, step %d, was never committed (%s): a first "
                      "save interrupted before its commit. Moving it aside and starting from "
                      "scratch.", self.directory, step, why)
      self.quarantine(step, kind, why)
      return None
    raise CheckpointRestoreError(self._nothing_usable_message(failures))

  def _check_step(self, step: int) -> tuple[str, str | None, bool]:
    """(kind, why or None, verified) from the markers and the manifest, agreed by all."""
    incomplete = self._incomplete_reason(step)
    if incomplete is not None:
      kind, reason = incomplete
      verified = False
    else:
      kind = "corrupt"
      reason, verified = self._verify(step)
    if not _all_processes(reason is None):
      reason = reason or "failed its checks on another process (see process 0's log)"
    return kind, reason, verified

  def _try_restore(self, step: int, target: PyTree, check_extra
                   ) -> tuple[str, str | None, tuple[PyTree, dict] | None]:
    """(kind, why or None, (state, extra)) of restoring `step` on this process."""
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore(target),
                                           EXTRA: ocp.args.JsonRestore()}))
    except Exception as e:  # pylint: disable=broad-except
      # Corruption surfaces as ValueError (tensorstore), FileNotFoundError, KeyError,
      # JSONDecodeError, ...; every one is reported and the next-older step tried.
      return "unreadable", f"restore failed: {type(e).__name__}: {e}", None
    state, extra = restored[STATE], dict(restored[EXTRA])
    bad = nonfinite_leaves(state)
    if bad:  # maybe_save never writes one: these bytes changed after the save.
      return "corrupt", (f"the restored state holds NaN/Inf in {len(bad)} leaves "
                         f"({', '.join(bad[:5])}), which no checkpoint is saved with"), None
    if check_extra is not None:
      try:
        check_extra(extra)
      except Exception as e:  # pylint: disable=broad-except
        return "invalid-extra", f"its extra is unusable: {type(e).__name__}: {e}", None
    return "", None, (state, extra)

  def _nothing_usable_message(self, failures: list[tuple[int, str, str]]) -> str:
    details = "\n".join(f"  step {s}: {r}" for s, _, r in failures)
    kinds = [k for _, k, _ in failures]
    hints = []
    if kinds.count("uncommitted") > 1:
      hints.append(
          f"{kinds.count('uncommitted')} steps lack their commit marker {_COMMIT_MARKER}; orbax "
          "has at most one save in flight, so this is not an interrupted save but damage from "
          "outside (a copy or sync that dropped files, another orbax version, manual edits).")
    if "unreadable" in kinds or "invalid-extra" in kinds:
      hints.append("If the model, optimizer or data changed, use a new workdir.")
    if "corrupt" in kinds:
      hints.append("Corrupt files: restore them from a copy if you have one.")
    return (f"none of the checkpoints in {self.directory} is usable:\n{details}\n"
            + "".join(h + "\n" for h in hints)
            + f"Nothing was moved or deleted. To start this run from scratch, move "
            f"{self.directory} aside (e.g. into {self.quarantine_dir}).")

  def quarantine(self, step: int, kind: str, reason: str) -> epath.Path | None:
    """Moves step `step` out of the directory, to `quarantine_dir/<step>-<kind>` (a numeric
    suffix if taken), with the reason in QUARANTINE_REASON.txt; never deletes. Every process
    calls it (process 0 moves, then all meet in a barrier and re-list the steps). Returns the
    new location on process 0 (None elsewhere, or if the step was not there)."""
    self.wait()  # Never move a step that is being committed or hashed.
    slug = re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-") or "unusable"
    dest = None
    if jax.process_index() == 0:
      src = self.directory / str(step)
      if src.exists():
        base = self.quarantine_dir / f"{step}-{slug}"
        dest, n = base, 0
        while dest.exists():
          n += 1
          dest = self.quarantine_dir / f"{base.name}.{n}"
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        try:
          src.rename(dest)
        except OSError as e:
          raise CheckpointRestoreError(
              f"checkpoint step {step} in {self.directory} is unusable ({reason}) and could "
              f"not be moved to {dest}: {e}. Move it away by hand and rerun.") from e
        (dest / _QUARANTINE_NOTE).write_text(
            f"Checkpoint step {step}, moved here from {src} on {time.ctime()}:\n{reason}\n")
        logging.warning("Moved unusable checkpoint step %d to %s (%s); it is not deleted.",
                        step, dest, reason)
    _sync(f"rlhf_jax_checkpoint_quarantine_{step}")
    self._manager.reload()
    return dest

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
