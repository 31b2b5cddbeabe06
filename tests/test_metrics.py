"""MetricWriter (metrics.jsonl, TensorBoard events read back, progress bar, resume truncation)
and NonFiniteGuard."""
import json
import logging
import math

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rlhf_jax.train.metrics import (MetricWriter, NonFiniteError, NonFiniteGuard,
                                    truncate_jsonl)


def metrics_at(step):
  return {"loss": 1.0 / step, "accuracy": step / 100.0}


def read_jsonl(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def read_scalars(workdir, tag):
  acc = EventAccumulator(str(workdir / "tensorboard"))
  acc.Reload()
  return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_jsonl_lines_and_value_types(tmp_path):
  with MetricWriter(tmp_path, total_steps=4) as writer:
    writer.write(1, {"loss": 0.5, "lr": np.float32(1e-3), "kl": jnp.float32(0.25),
                     "acc": jnp.bfloat16(0.75), "skipped": jnp.bool_(False)})
    writer.write(2, {"loss": float("nan"), "grad_norm": jnp.inf})
    writer.write(4, {"loss": 0.125})
  lines = read_jsonl(tmp_path)
  assert lines == [
      {"step": 1, "loss": 0.5, "lr": float(np.float32(1e-3)), "kl": 0.25, "acc": 0.75,
       "skipped": 0.0},
      {"step": 2, "loss": None, "grad_norm": None},  # Strict JSON has no NaN/Inf.
      {"step": 4, "loss": 0.125}]
  assert "NaN" not in (tmp_path / "metrics.jsonl").read_text()


def test_bad_metrics_are_errors(tmp_path):
  with MetricWriter(tmp_path, total_steps=4) as writer:
    with pytest.raises(ValueError, match="must be a scalar"):
      writer.write(1, {"loss": jnp.ones(3)})
    with pytest.raises(TypeError, match="numeric"):
      writer.write(1, {"name": "dpo"})
    with pytest.raises(ValueError, match="'step' is the step argument"):
      writer.write(1, {"step": 1})
    writer.write(1, {"loss": 1.0})
    with pytest.raises(ValueError, match="steps must increase"):
      writer.write(1, {"eval_loss": 2.0})
  with pytest.raises(RuntimeError, match="is closed"):
    writer.write(2, {"loss": 1.0})


def test_tensorboard_events_read_back(tmp_path):
  with MetricWriter(tmp_path, total_steps=5) as writer:
    for step in range(1, 6):
      writer.write(step, metrics_at(step))
  loss = read_scalars(tmp_path, "loss")
  assert [s for s, _ in loss] == [1, 2, 3, 4, 5]
  np.testing.assert_allclose([v for _, v in loss], [1.0 / s for s in range(1, 6)], rtol=1e-6)
  assert [s for s, _ in read_scalars(tmp_path, "accuracy")] == [1, 2, 3, 4, 5]


def test_killed_and_resumed_run_logs_each_step_once(tmp_path):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  with MetricWriter(straight, total_steps=10) as writer:
    for step in range(1, 11):
      writer.write(step, metrics_at(step))

  # The killed run: checkpointed step 5, then logged 6 and 7 (with values the resumed run will
  # not reproduce, e.g. another data order) and died halfway through writing step 8's line.
  writer = MetricWriter(resumed, total_steps=10)
  for step in range(1, 8):
    writer.write(step, metrics_at(step) if step <= 5 else {"loss": 100.0 + step, "accuracy": 0})
  writer.close()
  with open(resumed / "metrics.jsonl", "a") as f:
    f.write('{"step": 8, "lo')

  with MetricWriter(resumed, total_steps=10, initial_step=5) as writer:
    assert [l["step"] for l in read_jsonl(resumed)] == [1, 2, 3, 4, 5]
    for step in range(6, 11):
      writer.write(step, metrics_at(step))

  assert (resumed / "metrics.jsonl").read_bytes() == (straight / "metrics.jsonl").read_bytes()
  # TensorBoard hides the killed run's steps 6, 7 (purge marker at step 6).
  assert read_scalars(resumed, "loss") == read_scalars(straight, "loss")
  assert [s for s, _ in read_scalars(resumed, "accuracy")] == list(range(1, 11))


def test_truncation_keeps_lines_up_to_the_step_and_rejects_damage(tmp_path, caplog):
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps({"step": s, "loss": s}) + "\n" for s in range(1, 6))
                  + '{"step": 6, "lo')
  with caplog.at_level(logging.WARNING):
    assert truncate_jsonl(path, 3) == 3  # Steps 4, 5 and the partial line.
  assert "partial last line" in caplog.text
  assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2, 3]
  path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl:2 is not a metrics line"):
    truncate_jsonl(path, 5)


def test_fresh_start_in_a_used_workdir_drops_old_lines(tmp_path):
  with MetricWriter(tmp_path, total_steps=3) as writer:
    writer.write(1, {"loss": 1.0})
    writer.write(2, {"loss": 2.0})
  with MetricWriter(tmp_path, total_steps=3, initial_step=0) as writer:
    writer.write(1, {"loss": 3.0})
  assert read_jsonl(tmp_path) == [{"step": 1, "loss": 3.0}]


def test_disabled_writer_writes_nothing(tmp_path):
  with MetricWriter(tmp_path / "run", total_steps=3, enabled=False) as writer:
    writer.write(1, {"loss": 1.0})
    with pytest.raises(ValueError, match="steps must increase"):
      writer.write(1, {"loss": 1.0})
  assert not (tmp_path / "run").exists()


def test_progress_bar_shows_position_rate_and_eta(tmp_path, capsys):
  with MetricWriter(tmp_path, total_steps=8, initial_step=3) as writer:
    for step in range(4, 9):
      writer.write(step, {"loss": 0.5})
  err = capsys.readouterr().err
  assert "8/8" in err
  assert "step/s" in err or "s/step" in err  # The rate.
  assert "<" in err                          # tqdm's [elapsed<remaining] ETA.
  assert "loss=0.5" in err


def test_non_finite_guard_counts_and_stops():
  guard = NonFiniteGuard(max_consecutive=3)
  for step, finite in enumerate([True, False, False, True, False, True], start=1):
    guard.update(step, finite)
  assert (guard.skipped_total, guard.consecutive) == (3, 0)
  guard.update(7, jnp.bool_(False))
  guard.update(8, np.False_)
  assert (guard.skipped_total, guard.consecutive) == (5, 2)
  with pytest.raises(NonFiniteError, match=r"step 9: 3 consecutive .* 6 skipped in total"):
    guard.update(9, False)
  assert isinstance(NonFiniteError("x"), FloatingPointError)


def test_non_finite_guard_state_round_trip():
  guard = NonFiniteGuard(max_consecutive=2)
  guard.update(1, False)
  resumed = NonFiniteGuard(max_consecutive=2)
  resumed.load_state_dict(json.loads(json.dumps(guard.state_dict())))
  with pytest.raises(NonFiniteError, match="step 2: 2 consecutive"):
    resumed.update(2, False)
  with pytest.raises(ValueError, match="max_consecutive must be >= 1"):
    NonFiniteGuard(0)
  assert math.isclose(resumed.skipped_total, 2)


def test_non_finite_guard_reset_and_corrupt_state():
  guard = NonFiniteGuard(max_consecutive=2)
  guard.update(1, False)
  guard.reset()  # E.g. the optimiser changed on resume: the streak restarts, the total stays.
  assert (guard.consecutive, guard.skipped_total) == (0, 1)
  guard.update(2, False)  # 1 in a row: no error.
  for bad in ({"consecutive": 1}, {"consecutive": "1", "skipped_total": 2},
              {"consecutive": 3, "skipped_total": 2}, {"consecutive": -1, "skipped_total": 0},
              {"consecutive": True, "skipped_total": 1}, None):
    with pytest.raises(ValueError, match="non-finite guard state"):
      NonFiniteGuard(2).load_state_dict(bad)
