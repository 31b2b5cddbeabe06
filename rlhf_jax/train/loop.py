"""The host loop shared by every stage: resume, step, log, evaluate, checkpoint, preempt.

A run is a function of (config, workdir): running it again in the same workdir resumes from
the latest usable checkpoint with the params, optimiser state, step, RNG and data position it
saved, so a killed run continues exactly where its last checkpoint left it.

What is never checkpointed, so that resuming cannot restart from it:
  * a NaN/Inf anywhere in the state (checkpoint.Checkpointer.maybe_save refuses it);
  * a state whose step exploded while staying finite (lr = 1e30 gives finite weights of
    ~1e30): a step whose |loss| exceeds config.run.max_loss or whose applied update's norm
    exceeds config.run.max_update_norm stops the run with ExplodedError naming the step, the
    value and the key, before that state is saved. The loss of step s is computed on the params
    *before* update s, i.e. on checkpoint s - 1's state: that checkpoint, if it is the newest,
    is moved aside too. The newest checkpoint left is then the last good state.

On resume, a checkpoint whose data position (or skip counter) is unusable falls back to the
previous one like a corrupt file does (Checkpointer.restore_latest's check_extra), and the
non-finite skip counter restarts when the optimiser config changed: a rerun with a lower lr
should not inherit the streak of skipped steps that made it necessary.
"""
import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Iterator

import jax
from absl import logging

from rlhf_jax.train import checkpoint as ckpt_lib
from rlhf_jax.train import metrics as metrics_lib
from rlhf_jax.train import state as state_lib


class Preempted(SystemExit):
  """Raised after a SIGTERM was handled: the checkpoint is written and the process exits with
  status 143 (128 + SIGTERM, as if killed by it), so a scheduler knows to relaunch it."""

  def __init__(self, message: str):
    logging.warning("%s", message)
    print(message, flush=True)
    super().__init__(143)


class ExplodedError(FloatingPointError):
  """A step's loss or update norm went past its bound (config.run.max_loss /
  max_update_norm): the run diverged while staying finite; its state is not checkpointed."""


# Explosion bounds, the defaults of config.run.max_loss / max_update_norm (configs.base_config
# repeats them: configs.py imports nothing from train/). Generous for real runs, yet far below
# an explosion:
#  * |loss| <= 1e6. The losses here are per-token NLLs (ln V at init: <= 12 for V <= 160k),
#    Bradley-Terry and DPO-family log-sigmoids (ln 2 at init), and PPO/GRPO/RLOO surrogates
#    plus value losses on clipped rewards. 1e6 takes logit or reward margins of ~1e6, which no
#    healthy run reaches (bfloat16's spacing there is 4096).
#  * update norm <= 1e4. Adam-family updates are about lr per parameter, so a healthy update's
#    global norm is at most ~lr * sqrt(#params): 70B parameters at lr 1e-3 give ~260, and
#    warm-up, clipping and smaller rates keep real runs far lower. 1e4 leaves ~40x headroom,
#    while lr = 1e30 gives ~1e30 (Inf once squared in float32).
DEFAULT_MAX_LOSS = 1e6
DEFAULT_MAX_UPDATE_NORM = 1e4
_BOUNDS = (("loss", "max_loss"), ("update_norm", "max_update_norm"))


@dataclasses.dataclass
class LoopConfig:
  """The host loop's settings; stage.loop_config builds them from config.<stage> and config.run.

  max_loss, max_update_norm: explosion bounds (0 = off; see DEFAULT_MAX_LOSS above).
  optim: the stage's optimiser config as a dict (config.<stage>.optim.to_dict()). It is stored
    with every checkpoint; resuming with a different one resets the non-finite skip counter.
    None: a changed `*.optim.*` key anywhere in extra["config"] counts instead, other stages'
    sections included (a needless reset only grants max_nonfinite more skips in a row).
  """
  total_steps: int
  log_every: int = 1
  eval_every: int = 0  # 0 = only at the end.
  checkpoint_every: int = 100
  keep_checkpoints: int = 2
  max_nonfinite: int = 5  # Consecutive skipped (non-finite) updates before the run stops.
  max_loss: float = DEFAULT_MAX_LOSS
  max_update_norm: float = DEFAULT_MAX_UPDATE_NORM
  optim: dict[str, Any] | None = None

  def __post_init__(self):
    for _, name in _BOUNDS:
      value = getattr(self, name)
      if (isinstance(value, bool) or not isinstance(value, (int, float))
          or not math.isfinite(value) or value < 0):
        raise ValueError(f"config.run.{name}={value!r}: must be a finite number >= 0 (0 = off)")


def _changed_keys(saved, current, prefix="config") -> list[str]:
  """Dotted keys whose values differ between two config dicts (None: nothing to compare)."""
  if saved is None or current is None:
    return []
  if not isinstance(saved, dict) or not isinstance(current, dict):
    return [] if saved == current else [prefix]
  out = []
  for key in sorted(set(saved) | set(current)):
    out += _changed_keys(saved.get(key), current.get(key), f"{prefix}.{key}") if (
        key in saved and key in current) else [f"{prefix}.{key}"]
  return out


def _jsonable(value):
  """`value` as a checkpoint's JSON gives it back (tuples become lists)."""
  return json.loads(json.dumps(value, default=str))


def _optim_changes(saved: dict, current_config, loop: LoopConfig) -> list[str]:
  """Keys of the optimiser config that differ from the checkpoint's."""
  if loop.optim is not None and "optim" in saved:
    return _changed_keys(saved["optim"], _jsonable(loop.optim), "optim")
  return [k for k in _changed_keys(saved.get("config"), current_config)
          if "optim" in k.split(".")]


def _exploded(step: int, metrics: dict[str, float], loop: LoopConfig
              ) -> tuple[str, str] | None:
  """(metric, what happened) for the first bound `metrics` exceeds, or None."""
  for metric, key in _BOUNDS:
    bound = getattr(loop, key)
    if not bound or metric not in metrics:
      continue
    value = metrics[metric]
    if metric == "loss":
      # A non-finite loss is NonFiniteGuard's business (the update was skipped); a finite one
      # past the bound, either sign, comes from params that are already ruined.
      exceeded = math.isfinite(value) and abs(value) > bound
    else:
      exceeded = not value <= bound  # NaN/Inf too: the applied update overflowed.
    if exceeded:
      return metric, f"step {step}: {metric} = {value:.6g} exceeds config.run.{key} = {bound:g}"
  return None


def _refuse_exploded(checkpointer: ckpt_lib.Checkpointer, desc: str, step: int, metric: str,
                     what: str) -> None:
  """Keeps the exploded state out of the checkpoints and raises ExplodedError."""
  checkpointer.wait()
  if metric == "loss" and step - 1 in checkpointer.steps:
    # The loss of step s is computed on the params after update s - 1: checkpoint s - 1 holds
    # the state whose loss exploded.
    checkpointer.quarantine(step - 1, "exploded", f"{desc}: {what} (the loss of this "
                            "checkpoint's params on the next batch)")
  steps = checkpointer.steps
  newest = f"step {steps[-1]}" if steps else "none (a rerun starts from scratch)"
  raise ExplodedError(
      f"{desc}: {what}; the run diverged, so this state is not checkpointed and the run stops. "
      f"Newest checkpoint: {newest}. Lower the learning rate (or raise the bound if such values "
      "are expected; 0 turns it off) and rerun in the same workdir to resume from it.")


def train_loop(*, workdir: str, state: state_lib.State, step_fn: Callable,
               make_iterator: Callable[[int], Iterator], to_device: Callable[[Any], Any],
               loop: LoopConfig, extra: dict[str, Any] | None = None,
               eval_fn: Callable[[Any], dict[str, float]] | None = None,
               desc: str = "train", schedule: Callable[[int], Any] | None = None,
               count_tokens: Callable[[Any], int] | None = None) -> state_lib.State:
  """Runs `step_fn` (already jitted) until loop.total_steps; returns the final state.

  make_iterator(position) gives the data iterator at a saved position (its `.position` is
  checkpointed). `extra` (e.g. the config as a dict) is stored with every checkpoint.
  Besides the step's metrics every logged step has "step_time_s" (wall time of the step,
  compile included on the first), "lr" (schedule(step - 1): the rate update `step` used) and
  "tokens_per_s" (count_tokens(host batch) / step time; a step may report its own count as
  the metric "tokens" instead). At the end the curves are drawn to workdir/curves.png.

  Raises:
    ExplodedError: a step's loss or update norm exceeded loop.max_loss / max_update_norm.
    metrics.NonFiniteError: loop.max_nonfinite consecutive updates were skipped.
    checkpoint.CheckpointRestoreError: checkpoints exist but none is usable.
  """
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       save_every=loop.checkpoint_every,
                                       keep=loop.keep_checkpoints)
  extra = dict(extra or {})
  if loop.optim is not None:
    extra["optim"] = _jsonable(loop.optim)
  current_config = _jsonable(extra.get("config"))  # As the checkpoint stored it.
  resumed: dict[str, Any] = {}

  def check_extra(saved):
    """Rejects a checkpoint whose data position or skip counter is unusable, so that
    restore_latest falls back to the previous one instead of the run crashing later."""
    position = saved.get("data_position")
    if isinstance(position, bool) or not isinstance(position, int) or position < 0:
      raise ValueError(f"data_position={position!r}: expected an integer >= 0")
    guard = metrics_lib.NonFiniteGuard(loop.max_nonfinite)
    if "nonfinite" in saved:
      guard.load_state_dict(saved["nonfinite"])
    try:
      iterator = make_iterator(position)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"data_position={position}: the data iterator rejects it "
                       f"({type(e).__name__}: {e})") from e
    resumed.update(extra=saved, iterator=iterator, guard=guard)

  writer = None
  try:
    restored = checkpointer.restore_latest(state_lib.abstract_state(state),
                                           check_extra=check_extra)
    start = 0
    if restored is None:
      iterator, guard = make_iterator(0), metrics_lib.NonFiniteGuard(loop.max_nonfinite)
    else:
      start, state, saved = restored
      if resumed.get("extra") is not saved:  # Another process's verdict made it fall back.
        check_extra(saved)
      iterator, guard = resumed["iterator"], resumed["guard"]
      logging.info("%s: resumed from step %d (data position %d)", desc, start, iterator.position)
      changed = _changed_keys(saved.get("config"), current_config)
      if changed:
        logging.warning("%s: resuming with a config that differs from the checkpoint's in %s; "
                        "the saved data position and optimiser state may not mean the same",
                        desc, ", ".join(changed[:20]))
      optim_changed = _optim_changes(saved, current_config, loop)
      if optim_changed:
        logging.info("%s: the optimiser config differs from the checkpoint's (%s): the "
                     "non-finite skip counter restarts from 0 (it stood at %d in a row; %d "
                     "skipped in total, kept).", desc, ", ".join(optim_changed[:10]),
                     guard.consecutive, guard.skipped_total)
        guard.reset()
    writer = metrics_lib.MetricWriter(workdir, total_steps=loop.total_steps, initial_step=start)

    def save(step, force=False):
      checkpointer.maybe_save(step, state, {**extra, "data_position": iterator.position,
                                            "nonfinite": guard.state_dict()}, force=force)

    with ckpt_lib.PreemptionGuard() as preemption:
      for step in range(start + 1, loop.total_steps + 1):
        tic = time.perf_counter()
        batch = next(iterator)
        state, metrics = step_fn(state, to_device(batch))
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        seconds = time.perf_counter() - tic
        tokens = metrics.pop("tokens", None)
        tokens = count_tokens(batch) if tokens is None and count_tokens else tokens
        metrics["step_time_s"] = seconds
        if tokens is not None:
          metrics["tokens_per_s"] = tokens / max(seconds, 1e-9)
        if schedule is not None:
          metrics["lr"] = float(schedule(step - 1))
        guard.update(step, metrics["skipped"] == 0)
        metrics["skipped_total"] = guard.skipped_total
        exploded = _exploded(step, metrics, loop)
        if exploded is not None:
          writer.write(step, metrics)  # The values that tripped the bound stay on record.
          _refuse_exploded(checkpointer, desc, step, *exploded)
        last = step == loop.total_steps
        evaluate = eval_fn is not None and (
            (loop.eval_every and step % loop.eval_every == 0) or last)
        if evaluate:
          metrics.update(eval_fn(state["params"]))
        if step % loop.log_every == 0 or last or evaluate:
          writer.write(step, metrics)
        save(step, force=last)
        if preemption.should_stop(step) and not last:
          save(step, force=True)
          checkpointer.wait()
          raise Preempted(f"{desc}: SIGTERM received; checkpoint saved at step {step}")
      if start == loop.total_steps:
        logging.info("%s: already complete at step %d", desc, start)
    if jax.process_index() == 0:
      metrics_lib.plot_curves(workdir, title=desc)
  finally:
    try:
      checkpointer.close()  # Waits for pending saves and manifests.
    finally:
      if writer is not None:
        writer.close()
  return state
