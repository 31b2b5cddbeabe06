"""Host-side metric logging (TensorBoard + metrics.jsonl + a progress bar) and non-finite guard.

`MetricWriter(workdir, total_steps=..., initial_step=restored_step)` writes each logged step:
  * to `workdir/metrics.jsonl`, one JSON object per line: {"step": 12, "loss": 0.53, ...}.
    Plain JSON, so pandas/jq/plot scripts read it without any TensorBoard code. Non-finite
    values are written as null (strict JSON has no NaN/Inf). The timing fields the loop adds
    (TIMING_KEYS: step time, tokens/s) are the only ones that are not a function of the run:
    without them a straight-through run and a killed-and-resumed one produce identical files.
  * to TensorBoard event files in `workdir/tensorboard/` through tensorboardX. tensorboardX is
    pure Python and writes the same event protobufs TensorBoard reads; the alternatives
    (tf.summary, clu/flax metric writers) need TensorFlow, about 1.4 GB we do not otherwise
    install. TensorBoard itself is only needed to view the files.
  * to a tqdm progress bar (rate and ETA; the latest metrics as its postfix) on stderr.

Resume: a killed run may have logged steps after its last checkpoint; those steps are redone
after resuming from the checkpoint at `initial_step`. So on construction, lines with
step > initial_step are dropped from metrics.jsonl (the file is rewritten atomically, then
appended to), and the TensorBoard writer starts with a purge marker at initial_step + 1, which
makes TensorBoard hide the killed run's events for those steps. Convention: log step s after
update s has been applied (steps 1, 2, ...), and checkpoint the state after update s as step s;
then a run that resumes from checkpoint s redoes exactly the steps whose lines were dropped.

Only process 0 writes (the `enabled` default): on multi-host every process computes the same
replicated metrics.

`NonFiniteGuard` is the host-side half of skipping bad updates: the jitted step skips an update
whose loss or gradients are not finite (e.g. `optax.apply_if_finite` or a `jnp.where` on the
update) and reports `is_finite`; the guard counts skipped updates and stops the run with a clear
`NonFiniteError` after `max_consecutive` in a row, since by then the run has diverged rather
than hit a one-off bad batch. (Finite explosions are train/loop.py's bounds on the loss and the
update norm.)
"""
import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging
from tensorboardX import SummaryWriter

JSONL_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CURVES_NAME = "curves.png"
TIMING_KEYS = ("step_time_s", "tokens_per_s")  # Wall-clock metrics (train/loop.py).


def _scalar(name: str, value: Any) -> float:
  array = np.asarray(value)  # Fetches a jax array; fine once per logged step.
  if array.shape != ():
    raise ValueError(f"metric {name!r} must be a scalar, got shape {array.shape}")
  # jnp.issubdtype also knows ml_dtypes (bfloat16), which numpy does not count as numbers.
  if not (jnp.issubdtype(array.dtype, jnp.number) or array.dtype == np.bool_):
    raise TypeError(f"metric {name!r} must be numeric, got dtype {array.dtype}")
  return float(array)


def truncate_jsonl(path: str | os.PathLike, last_step: int) -> int:
  """Drops the lines of a metrics.jsonl whose "step" is > last_step; returns how many.

  The file is rewritten to a temporary file and renamed over the original, so a crash here
  leaves either the old or the new file. A final line cut short by a kill mid-write is dropped
  with a warning; an unparsable line elsewhere means the file was damaged otherwise, an error.
  """
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  kept, dropped = [], 0
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError) as e:
      if i == len(lines) - 1:
        logging.warning("%s: dropping a partial last line (the run was killed while "
                        "writing it): %r", path, line[:200])
        dropped += 1
        continue
      raise ValueError(f"{path}:{i + 1} is not a metrics line with a 'step' ({e}): "
                       f"{line[:200]!r}") from e
    if step > last_step:
      dropped += 1
    else:
      kept.append(line)
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.writelines(line + "\n" for line in kept)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
  return dropped


class MetricWriter:
  """Writes scalar metrics per step to metrics.jsonl, TensorBoard and a progress bar.

  Args:
    workdir: the run directory (created if missing).
    total_steps: the last step of the run, for the bar's ETA.
    initial_step: the step the run resumes from (0 for a fresh start); logged lines and
      TensorBoard events of later steps are dropped/hidden (see the module docstring).
    enabled: whether this process writes anything; default: only process 0.
  """

  def __init__(self, workdir: str | os.PathLike, *, total_steps: int, initial_step: int = 0,
               enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else bool(enabled)
    self.jsonl_path = os.path.join(os.fspath(workdir), JSONL_NAME)
    self.tensorboard_dir = os.path.join(os.fspath(workdir), TENSORBOARD_DIR)
    self._last_step = int(initial_step)
    self._jsonl = self._tb = self._bar = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if os.path.exists(self.jsonl_path):
      dropped = truncate_jsonl(self.jsonl_path, self._last_step)
      if dropped:
        logging.info("%s: dropped %d lines after step %d (they will be logged again).",
                     self.jsonl_path, dropped, self._last_step)
    self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
    # Event files are named by the second they were opened; the suffix keeps a quick restart
    # from overwriting (tensorboardX opens with "wb") the file of the run it resumes.
    self._tb = SummaryWriter(self.tensorboard_dir, purge_step=self._last_step + 1,
                             filename_suffix=f".{os.getpid()}.{time.time_ns()}")
    self._bar = tqdm.tqdm(total=total_steps, initial=self._last_step, unit="step",
                          dynamic_ncols=True, smoothing=0.1)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Logs the scalar `metrics` of `step` (python/numpy/jax scalars).

    Give all metrics of a step in one call: steps must strictly increase, so that
    metrics.jsonl holds each step once.
    """
    step = int(step)
    if step <= self._last_step:
      raise ValueError(f"metrics for step {step} logged after step {self._last_step}: steps "
                       "must increase, or metrics.jsonl would hold a step twice")
    if "step" in metrics:
      raise ValueError("'step' is the step argument of write(), not a metric name")
    if not self.enabled:
      self._last_step = step
      return
    if self._jsonl is None:
      raise RuntimeError(f"MetricWriter for {self.jsonl_path} is closed")
    values = {name: _scalar(name, v) for name, v in metrics.items()}
    record = {"step": step, **{k: v if math.isfinite(v) else None for k, v in values.items()}}
    self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
    self._jsonl.flush()
    for name, value in values.items():
      self._tb.add_scalar(name, value, global_step=step)
    # Flushed every step: events up to the last checkpoint must survive a kill, since the
    # resumed run will not log those steps again. The cost is one small write per step.
    self._tb.flush()
    self._bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)
    self._bar.update(step - self._last_step)
    self._last_step = step

  def close(self) -> None:
    """Flushes and closes the files and the bar (idempotent)."""
    if self._jsonl is not None:
      self._jsonl.close()
      self._tb.close()
      self._bar.close()
      self._jsonl = self._tb = self._bar = None

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class NonFiniteError(FloatingPointError):
  """Too many consecutive updates had a non-finite loss or gradient: the run diverged."""


class NonFiniteGuard:
  """Counts skipped (non-finite) updates; raises after `max_consecutive` in a row.

  Save `state_dict()` in the checkpoint's JSON extra and `load_state_dict` it on resume, so the
  counts continue across a restart.
  """

  def __init__(self, max_consecutive: int):
    if max_consecutive < 1:
      raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
    self.max_consecutive = int(max_consecutive)
    self.consecutive = 0
    self.skipped_total = 0

  def update(self, step: int, is_finite: Any) -> None:
    """Records whether `step`'s loss and gradients were finite (its update was applied).

    Raises:
      NonFiniteError: this is the `max_consecutive`-th non-finite step in a row.
    """
    if bool(is_finite):
      self.consecutive = 0
      return
    self.consecutive += 1
    self.skipped_total += 1
    logging.warning("step %d: non-finite loss or gradients, update skipped (%d in a row, %d "
                    "in total).", step, self.consecutive, self.skipped_total)
    if self.consecutive >= self.max_consecutive:
      raise NonFiniteError(
          f"step {step}: {self.consecutive} consecutive steps with a non-finite loss or "
          f"gradients (limit {self.max_consecutive}; {self.skipped_total} skipped in total); "
          "stopping. The last checkpoint holds finite values: lower the learning rate, check "
          "the data, or compute the loss in float32.")

  def reset(self) -> None:
    """Restarts the consecutive count (e.g. the optimiser changed on resume: the streak of
    skipped updates says nothing about the new one); the total is the run's history, kept."""
    self.consecutive = 0

  def state_dict(self) -> dict[str, int]:
    return {"consecutive": self.consecutive, "skipped_total": self.skipped_total}

  def load_state_dict(self, state: Mapping[str, int]) -> None:
    """Raises ValueError for anything but integers 0 <= consecutive <= skipped_total (a
    corrupt checkpoint), so the caller can fall back instead of counting from garbage."""
    try:
      consecutive, total = state["consecutive"], state["skipped_total"]
    except (KeyError, TypeError) as e:
      raise ValueError(f"non-finite guard state {state!r} lacks {e}") from None
    if (not all(isinstance(v, int) and not isinstance(v, bool) for v in (consecutive, total))
        or not 0 <= consecutive <= total):
      raise ValueError(f"non-finite guard state {dict(state)!r}: expected integers "
                       "0 <= consecutive <= skipped_total")
    self.consecutive, self.skipped_total = consecutive, total


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  """The rows of a metrics.jsonl (one JSON object per logged step), in order."""
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


# Bookkeeping, not curves: the step's example count and the skip counters.
_NOT_PLOTTED = ("step", "count", "skipped", "skipped_total")


def plot_curves(workdir: str | os.PathLike, *, title: str = "",
                max_panels: int = 28) -> str | None:
  """Draws every metric of workdir/metrics.jsonl against the step into workdir/curves.png
  (loss and held-out metrics first, bookkeeping left out); returns its path, or None when
  nothing was logged. Drawn on an Agg canvas without pyplot, so no global backend is
  touched."""
  path = os.path.join(os.fspath(workdir), JSONL_NAME)
  if not os.path.exists(path):
    return None
  rows = read_jsonl(path)
  keys = list(dict.fromkeys(k for r in rows for k in r if k not in _NOT_PLOTTED))
  if not keys:
    return None
  first = lambda k: (k != "loss", not k.startswith("eval_"), k in TIMING_KEYS, k == "lr")
  keys = sorted(keys, key=first)[:max_panels]
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  cols = min(4, len(keys))
  nrows = -(-len(keys) // cols)
  fig = Figure(figsize=(3.6 * cols, 2.6 * nrows), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(nrows, cols, squeeze=False).ravel()
  for ax, key in zip(axes, keys):
    points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    if points:
      xs, ys = zip(*points)
      ax.plot(xs, ys, marker="." if len(xs) < 40 else None, lw=1)
    ax.set_title(key, fontsize=9)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
  for ax in axes[len(keys):]:
    ax.axis("off")
  if title:
    fig.suptitle(title)
  out = os.path.join(os.fspath(workdir), CURVES_NAME)
  fig.savefig(out, dpi=70)
  return out
