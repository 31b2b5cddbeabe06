"""The host loop shared by every stage: resume, step, log, evaluate, checkpoint, preempt.

A run is a function of (config, workdir): running it again in the same workdir resumes from
the latest usable checkpoint with the params, optimiser state, step, RNG and data position it
saved, so a killed run continues exactly where its last checkpoint left it.
"""
import dataclasses
import json
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


@dataclasses.dataclass
class LoopConfig:
  total_steps: int
  log_every: int = 1
  eval_every: int = 0  # 0 = only at the end.
  checkpoint_every: int = 100
  keep_checkpoints: int = 2
  max_nonfinite: int = 5  # Consecutive skipped (non-finite) updates before the run stops.


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
  """
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       save_every=loop.checkpoint_every,
                                       keep=loop.keep_checkpoints)
  restored = checkpointer.restore_latest(state_lib.abstract_state(state))
  start, position = 0, 0
  if restored is not None:
    start, state, saved = restored
    position = int(saved["data_position"])
    logging.info("%s: resumed from step %d (data position %d)", desc, start, position)
    # Through JSON, as the checkpoint stored it (tuples become lists).
    current = json.loads(json.dumps((extra or {}).get("config"), default=str))
    changed = _changed_keys(saved.get("config"), current)
    if changed:
      logging.warning("%s: resuming with a config that differs from the checkpoint's in %s; "
                      "the saved data position and optimiser state may not mean the same",
                      desc, ", ".join(changed[:20]))
  iterator = make_iterator(position)
  writer = metrics_lib.MetricWriter(workdir, total_steps=loop.total_steps, initial_step=start)
  guard = metrics_lib.NonFiniteGuard(loop.max_nonfinite)
  if restored is not None and "nonfinite" in saved:
    guard.load_state_dict(saved["nonfinite"])
  extra = dict(extra or {})

  def save(step, force=False):
    checkpointer.maybe_save(step, state, {**extra, "data_position": iterator.position,
                                          "nonfinite": guard.state_dict()}, force=force)

  try:
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
    checkpointer.wait()
    checkpointer.close()
    writer.close()
  return state
