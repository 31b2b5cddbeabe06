"""Checkpointer: round trip, keep-k, fallback past corrupt steps, non-finite refusal, integrity
manifests (a flipped byte is caught, the step moved aside, not deleted), a different mesh on
restore (subprocess, 8 simulated devices), SIGTERM -> save -> resume."""
import functools
import hashlib
import json
import logging
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from conftest import REPO_ROOT, run_python
from rlhf_jax.train import checkpoint as ckpt_lib
from rlhf_jax.train.checkpoint import (INTEGRITY_FILE, Checkpointer, CheckpointRestoreError,
                                       NonFiniteStateError, PreemptionGuard, abstract_like)
from rlhf_jax.train.metrics import MetricWriter

TX = optax.adam(1e-2)
EXTRA = {"data": {"epoch": 1, "position": 37}, "config": {"lr": 1e-3, "mesh": [1, 2, 1],
                                                          "name": "dpo", "lora": None,
                                                          "eval": True}}


def make_state(seed: int, n_updates: int = 2):
  """params + Adam state after a few updates (so mu, nu and count are not trivial)."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  params = {"dense": {"kernel": jax.random.normal(k1, (8, 4)), "bias": jnp.zeros(4)},
            "embed": jax.random.normal(k2, (16, 8)).astype(jnp.bfloat16)}
  opt = TX.init(params)
  for i in range(n_updates):
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1 * (i + 1)), params)
    updates, opt = TX.update(grads, opt, params)
    params = optax.apply_updates(params, updates)
  return {"params": params, "opt": opt, "step": jnp.int32(seed),
          "rng": jax.random.key_data(jax.random.key(seed))}


def host_copy(tree):
  return jax.tree.map(np.asarray, tree)


def assert_bitwise_equal(actual, expected):
  chex.assert_trees_all_equal_structs(actual, expected)
  chex.assert_trees_all_equal_dtypes(actual, expected)
  chex.assert_trees_all_equal(host_copy(actual), host_copy(expected))


def save_steps(directory, steps, keep=5):
  states = {}
  with Checkpointer(directory, save_every=1, keep=keep) as ckpt:
    for step in steps:
      states[step] = make_state(step)
      assert ckpt.maybe_save(step, states[step], {**EXTRA, "at": step})
  return states


def test_round_trip_is_bitwise(tmp_path):
  state = make_state(7)
  with Checkpointer(tmp_path, save_every=5, keep=2) as ckpt:
    assert ckpt.restore_latest(abstract_like(state)) is None  # Fresh directory.
    assert ckpt.maybe_save(10, state, EXTRA)
  # A new Checkpointer (as a restarted run would) finds it by itself.
  with Checkpointer(tmp_path, save_every=5, keep=2) as ckpt:
    step, restored, extra = ckpt.restore_latest(abstract_like(make_state(0)))
  assert step == 10
  assert extra == EXTRA
  assert_bitwise_equal(restored, state)
  assert restored["params"]["embed"].dtype == jnp.bfloat16
  assert isinstance(restored["opt"][0], optax.ScaleByAdamState)


def test_async_save_snapshots_before_returning(tmp_path):
  """The loop donates `state` to the next step right after maybe_save returns."""
  state = make_state(3)
  expected = host_copy(state)
  with Checkpointer(tmp_path, save_every=1, keep=1, async_save=True) as ckpt:
    assert ckpt.maybe_save(1, state, {})
    for leaf in jax.tree.leaves(state):
      leaf.delete()  # What donation does to the buffers.
    ckpt.wait()
    _, restored, _ = ckpt.restore_latest(abstract_like(make_state(0)))
  chex.assert_trees_all_equal(host_copy(restored), expected)


def test_schedule_force_and_keep_k(tmp_path):
  state = make_state(1)
  with Checkpointer(tmp_path, save_every=3, keep=2) as ckpt:
    saved = [step for step in range(1, 11) if ckpt.maybe_save(step, state, {})]
    assert saved == [3, 6, 9]
    assert ckpt.maybe_save(10, state, {}, force=True)       # The end of the run.
    assert not ckpt.maybe_save(10, state, {}, force=True)   # Already on disk: not rewritten.
    ckpt.wait()
    assert ckpt.steps == [9, 10]
  assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["10", "9"]


def test_saving_below_the_latest_step_is_an_error(tmp_path):
  save_steps(tmp_path, [5])
  with Checkpointer(tmp_path, save_every=1, keep=5) as ckpt:
    with pytest.raises(ValueError, match="already holds a checkpoint at step 5"):
      ckpt.maybe_save(2, make_state(2), {})


def test_non_finite_state_is_refused(tmp_path):
  state = make_state(1)
  state["params"]["dense"]["kernel"] = state["params"]["dense"]["kernel"].at[0, 0].set(jnp.nan)
  state["opt"][0].nu["embed"] = state["opt"][0].nu["embed"].at[1, 1].set(jnp.inf)
  with Checkpointer(tmp_path, save_every=2, keep=2) as ckpt:
    assert not ckpt.maybe_save(1, state, {})  # Not due: nothing checked, nothing written.
    with pytest.raises(NonFiniteStateError, match=r"step 2: .* 2 state leaves: "
                       r"opt/0/nu/embed, params/dense/kernel"):
      ckpt.maybe_save(2, state, {})
    host = {"w": np.array([1.0, np.nan], np.float32), "n": jnp.int32(0)}  # numpy leaves too
    with pytest.raises(NonFiniteStateError, match="w"):
      ckpt.maybe_save(2, host, {})
    ckpt.wait()
    assert ckpt.steps == []


def test_nonfinite_leaves_ignores_integers_and_keys():
  tree = {"rng": jax.random.key_data(jax.random.key(0)), "step": jnp.int32(3),
          "key": jax.random.key(1), "x": jnp.ones(3, jnp.bfloat16)}
  assert ckpt_lib.nonfinite_leaves(tree) == []
  tree["x"] = tree["x"].at[2].set(-jnp.inf)
  assert ckpt_lib.nonfinite_leaves(tree) == ["x"]


def test_extra_must_be_plain_json(tmp_path):
  with Checkpointer(tmp_path, save_every=1, keep=2) as ckpt:
    with pytest.raises(TypeError, match="plain JSON"):
      ckpt.maybe_save(1, make_state(1), {"position": np.int64(3)})
    with pytest.raises(TypeError, match="plain JSON"):
      ckpt.maybe_save(1, make_state(1), {"loss": float("nan")})


def test_restore_target_needs_shardings(tmp_path):
  save_steps(tmp_path, [1])
  bare = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), make_state(0))
  with Checkpointer(tmp_path, save_every=1, keep=2) as ckpt:
    with pytest.raises(ValueError, match="needs a sharding"):
      ckpt.restore_latest(bare)


def test_mismatched_target_is_an_error_not_a_fresh_start(tmp_path):
  save_steps(tmp_path, [1, 2])
  state = make_state(0)
  state["params"]["dense"]["kernel"] = jnp.zeros((8, 5))  # The model changed shape.
  with Checkpointer(tmp_path, save_every=1, keep=2) as ckpt:
    with pytest.raises(CheckpointRestoreError, match=r"step 2: restore failed(.|\n)*step 1"):
      ckpt.restore_latest(abstract_like(state))
    assert ckpt.steps == [1, 2]  # Nothing deleted on a mismatch.


def _data_files(step_dir):
  return sorted(p for p in (step_dir / "state" / "d").iterdir())


CORRUPTIONS = {
    "truncated_data_file": lambda d: [os.truncate(p, p.stat().st_size // 2)
                                      for p in _data_files(d)],
    "deleted_data_file": lambda d: [p.unlink() for p in _data_files(d)],
    "deleted_array_manifest": lambda d: (d / "state" / "manifest.ocdbt").unlink(),
    "deleted_commit_marker": lambda d: (d / "commit_success.txt").unlink(),
    "deleted_step_metadata": lambda d: (d / "_CHECKPOINT_METADATA").unlink(),
    "garbled_tree_metadata": lambda d: (d / "state" / "_METADATA").write_text("{not json"),
    "deleted_extra": lambda d: (d / "extra" / "metadata").unlink(),
    "deleted_state_item": lambda d: shutil.rmtree(d / "state"),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_latest_falls_back_to_previous(tmp_path, caplog, corruption):
  states = save_steps(tmp_path, [1, 2, 3])
  CORRUPTIONS[corruption](tmp_path / "3")
  with caplog.at_level(logging.WARNING), Checkpointer(tmp_path, save_every=1, keep=5) as ckpt:
    step, restored, extra = ckpt.restore_latest(abstract_like(make_state(0)))
    assert step == 2
    assert extra == {**EXTRA, "at": 2}
    assert_bitwise_equal(restored, states[2])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step 3" in w and "unusable" in w for w in warnings), warnings
    # The unusable step left the directory (moved aside, not deleted), so the resumed run can
    # checkpoint step 3 again.
    assert ckpt.steps == [1, 2]
    (moved,) = _quarantined(tmp_path)
    assert moved.name.startswith("3-") and (moved / "QUARANTINE_REASON.txt").exists()
    assert ckpt.maybe_save(3, make_state(33), {"at": 33})
  with Checkpointer(tmp_path, save_every=1, keep=5) as ckpt:
    step, restored, extra = ckpt.restore_latest(abstract_like(make_state(0)))
  assert (step, extra) == (3, {"at": 33})
  assert_bitwise_equal(restored, make_state(33))


def test_falls_back_over_several_bad_steps(tmp_path, caplog):
  states = save_steps(tmp_path, [1, 2, 3, 4, 5])
  CORRUPTIONS["deleted_commit_marker"](tmp_path / "5")
  CORRUPTIONS["truncated_data_file"](tmp_path / "4")       # Caught by the manifest.
  (tmp_path / "3" / INTEGRITY_FILE).unlink()               # Unverified: orbax must notice.
  CORRUPTIONS["truncated_data_file"](tmp_path / "3")
  with caplog.at_level(logging.WARNING), Checkpointer(tmp_path, save_every=1, keep=5) as ckpt:
    step, restored, _ = ckpt.restore_latest(abstract_like(make_state(0)))
  assert step == 2
  assert_bitwise_equal(restored, states[2])
  text = caplog.text
  assert "step 5" in text and "commit marker" in text
  assert "step 4" in text and "integrity check failed" in text and "truncated" in text
  assert "step 3" in text and "restore failed" in text
  assert sorted(p.name for p in _quarantined(tmp_path)) == ["3-unreadable", "4-corrupt",
                                                            "5-uncommitted"]


def test_only_checkpoint_uncommitted_means_fresh_start(tmp_path, caplog):
  save_steps(tmp_path, [5])
  CORRUPTIONS["deleted_commit_marker"](tmp_path / "5")
  with caplog.at_level(logging.WARNING), Checkpointer(tmp_path, save_every=1, keep=5) as ckpt:
    assert ckpt.restore_latest(abstract_like(make_state(0))) is None
    assert ckpt.maybe_save(1, make_state(1), {})  # Not blocked by the leftover step 5.
  assert "never committed" in caplog.text and "starting from scratch" in caplog.text
  (moved,) = _quarantined(tmp_path)  # Moved aside, not deleted.
  assert moved.name == "5-uncommitted" and (moved / "state").is_dir()


# --- Integrity manifests.


def _quarantined(directory):
  q = pathlib.Path(f"{directory}.quarantine")
  return sorted(q.iterdir()) if q.exists() else []


def _largest_file(step_dir):
  """The largest array data file (tensorstore's OCDBT puts them in .../d/)."""
  return max((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
             key=lambda p: p.stat().st_size)


def flip_byte(path, offset=None):
  data = bytearray(path.read_bytes())
  offset = len(data) // 2 if offset is None else offset
  data[offset] ^= 0x01
  path.write_bytes(bytes(data))


@pytest.mark.parametrize("async_save", [True, False])
def test_every_step_gets_a_manifest_of_its_files(tmp_path, async_save):
  with Checkpointer(tmp_path, save_every=1, keep=2, async_save=async_save) as ckpt:
    for step in (1, 2, 3):
      assert ckpt.maybe_save(step, make_state(step), {"at": step})
  for step in (2, 3):  # Step 1 went to keep-k.
    step_dir = tmp_path / str(step)
    manifest = json.loads((step_dir / INTEGRITY_FILE).read_text())
    listed = set(manifest["files"])
    on_disk = {str(p.relative_to(step_dir)) for item in ("state", "extra")
               for p in (step_dir / item).rglob("*") if p.is_file()}
    assert listed == on_disk and any(n.startswith("state/d/") for n in listed)
    assert "extra/metadata" in listed
    for name, entry in manifest["files"].items():
      data = (step_dir / name).read_bytes()
      assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
  assert not list(tmp_path.rglob(f"{INTEGRITY_FILE}.tmp"))


def test_manifest_follows_the_commit_without_a_wait(tmp_path):
  """The loop calls maybe_save every step: once orbax has committed an async save, a later
  call starts its manifest, without waiting for the next save or the end of the run."""
  with Checkpointer(tmp_path, save_every=100, keep=2) as ckpt:
    assert ckpt.maybe_save(100, make_state(1), {})
    step, manifest, deadline = 101, tmp_path / "100" / INTEGRITY_FILE, time.time() + 60
    while not manifest.exists() and time.time() < deadline:
      ckpt.maybe_save(step, make_state(1), {})  # Not due: polls and returns.
      step += 1
      time.sleep(0.01)
    assert manifest.exists()


def test_flipped_byte_falls_back_and_is_moved_aside(tmp_path, caplog):
  states = save_steps(tmp_path, [1, 2, 3])
  target = _largest_file(tmp_path / "3")
  flip_byte(target)
  name = str(target.relative_to(tmp_path / "3"))
  with caplog.at_level(logging.WARNING), Checkpointer(tmp_path, save_every=1, keep=5) as ckpt:
    step, restored, extra = ckpt.restore_latest(abstract_like(make_state(0)))
    assert (step, extra) == (2, {**EXTRA, "at": 2})
    assert_bitwise_equal(restored, states[2])
    assert ckpt.steps == [1, 2]
  warning = next(r.getMessage() for r in caplog.records if "step 3" in r.getMessage()
                 and "unusable" in r.getMessage())
  assert name in warning and "sha256" in warning, warning
  (moved,) = _quarantined(tmp_path)
  assert moved.name == "3-corrupt"
  assert not target.exists() and (moved / name).exists()  # Moved with its bytes.
  assert name in (moved / "QUARANTINE_REASON.txt").read_text()
  assert f"moved unusable checkpoint step 3 to {moved}".lower() in caplog.text.lower()


def test_step_without_manifest_is_restored_unverified(tmp_path, caplog):
  states = save_steps(tmp_path, [1, 2])
  (tmp_path / "2" / INTEGRITY_FILE).unlink()  # E.g. saved by an older version.
  with caplog.at_level(logging.WARNING), Checkpointer(tmp_path, save_every=1, keep=5) as ckpt:
    step, restored, _ = ckpt.restore_latest(abstract_like(make_state(0)))
  assert step == 2
  assert_bitwise_equal(restored, states[2])
  assert "step 2" in caplog.text and "restored unverified" in caplog.text


@pytest.mark.parametrize("damage", ["garbled", "wrong_size", "missing_file"])
def test_damaged_manifest_or_listed_file_is_corrupt(tmp_path, caplog, damage):
  save_steps(tmp_path, [1, 2])
  manifest_path = tmp_path / "2" / INTEGRITY_FILE
  manifest = json.loads(manifest_path.read_text())
  name = sorted(manifest["files"])[0]
  if damage == "garbled":
    manifest_path.write_text(manifest_path.read_text()[:40])
  elif damage == "wrong_size":
    manifest["files"][name]["size"] += 1
    manifest_path.write_text(json.dumps(manifest))
  else:
    manifest["files"]["state/d/not_there"] = {"size": 1, "sha256": "0" * 64}
    manifest_path.write_text(json.dumps(manifest))
  with caplog.at_level(logging.WARNING), Checkpointer(tmp_path, save_every=1, keep=5) as ckpt:
    assert ckpt.restore_latest(abstract_like(make_state(0)))[0] == 1
  expected = {"garbled": "unreadable", "wrong_size": name, "missing_file": "not_there"}[damage]
  assert expected in caplog.text
  assert [p.name for p in _quarantined(tmp_path)] == ["2-corrupt"]


def test_restored_non_finite_state_is_corrupt(tmp_path, caplog):
  """maybe_save never writes a NaN, so one read back means the bytes changed (here written
  behind its back, without a manifest, as an older checkpoint could be)."""
  states = save_steps(tmp_path, [1])
  bad = make_state(2)
  bad["params"]["dense"]["bias"] = bad["params"]["dense"]["bias"].at[0].set(jnp.nan)
  with Checkpointer(tmp_path, save_every=1, keep=5) as ckpt:
    ckpt._manager.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave(bad),
                                                  extra=ocp.args.JsonSave({})))
    ckpt._manager.wait_until_finished()
  with caplog.at_level(logging.WARNING), Checkpointer(tmp_path, save_every=1, keep=5) as ckpt:
    step, restored, _ = ckpt.restore_latest(abstract_like(make_state(0)))
  assert step == 1
  assert_bitwise_equal(restored, states[1])
  assert "NaN/Inf" in caplog.text and "params/dense/bias" in caplog.text
  assert [p.name for p in _quarantined(tmp_path)] == ["2-corrupt"]


def test_check_extra_rejection_falls_back(tmp_path, caplog):
  save_steps(tmp_path, [1, 2])

  def check(extra):
    if extra["at"] == 2:
      raise ValueError("data_position out of range")

  with caplog.at_level(logging.WARNING), Checkpointer(tmp_path, save_every=1, keep=5) as ckpt:
    step, _, extra = ckpt.restore_latest(abstract_like(make_state(0)), check_extra=check)
  assert (step, extra["at"]) == (1, 1)
  assert "step 2" in caplog.text and "data_position out of range" in caplog.text
  assert [p.name for p in _quarantined(tmp_path)] == ["2-invalid-extra"]


def test_every_commit_marker_missing_is_an_error_and_nothing_moves(tmp_path):
  save_steps(tmp_path, [1, 2, 3])
  for step in (1, 2, 3):
    CORRUPTIONS["deleted_commit_marker"](tmp_path / str(step))
  with Checkpointer(tmp_path, save_every=1, keep=5) as ckpt:
    with pytest.raises(CheckpointRestoreError,
                       match=r"(?s)step 3: commit marker.*3 steps lack their commit marker.*"
                       r"Nothing was moved or deleted.*move .* aside"):
      ckpt.restore_latest(abstract_like(make_state(0)))
    assert ckpt.steps == [1, 2, 3]
  assert _quarantined(tmp_path) == []


def test_no_usable_step_is_an_error_and_nothing_moves(tmp_path):
  save_steps(tmp_path, [1, 2])
  for step in (1, 2):
    flip_byte(_largest_file(tmp_path / str(step)))
  with Checkpointer(tmp_path, save_every=1, keep=5) as ckpt:
    with pytest.raises(CheckpointRestoreError, match=r"(?s)step 2: integrity check failed.*"
                       r"step 1: integrity check failed.*Nothing was moved"):
      ckpt.restore_latest(abstract_like(make_state(0)))
    assert ckpt.steps == [1, 2]
  assert _quarantined(tmp_path) == []


def test_restore_onto_a_different_mesh(tmp_path):
  saved = json.loads(run_python(["tests/helpers/checkpoint_mesh_restore.py", "save", str(tmp_path)])
                     .strip().splitlines()[-1])
  kernel = "['params']['backbone']['block_0']['mlp']['gate']['kernel']"
  assert saved["saved_specs"][kernel] == "P('fsdp', None)"
  report = json.loads(run_python(["tests/helpers/checkpoint_mesh_restore.py", "restore", str(tmp_path)])
                      .strip().splitlines()[-1])
  assert report["step"] == 4 and report["extra"] == {"mesh": {"fsdp": 8}}
  assert report["num_leaves"] == 66
  assert report["mismatched"] == []
  assert report["wrong_sharding"] == []
  assert report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
  assert report["kernel_spec"] == "P('fsdp', 'tensor')"
  assert report["kernel_shape"] == [64, 128] and report["kernel_shard_shape"] == [32, 64]
  assert report["mu_kernel_spec"] == "P('fsdp', 'tensor')"


def test_preemption_guard_sets_flag_and_restores_handler():
  previous = signal.getsignal(signal.SIGTERM)
  with PreemptionGuard() as guard:
    assert not guard.requested and not guard.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)  # Python runs the handler before the next bytecode.
    assert guard.requested
    assert guard.should_stop(2)
  assert signal.getsignal(signal.SIGTERM) is previous


def test_preemption_on_one_host_stops_and_saves_on_all(tmp_path):
  """Two processes (G8: own port, timeouts); SIGTERM reaches process 1 only."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen(
      ["timeout", "60", sys.executable, "tests/helpers/checkpoint_preempt_multiprocess.py", str(i),
       str(port), str(tmp_path / "ckpt")], cwd=REPO_ROOT, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=90) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, f"exit {p.returncode}\nSTDOUT:\n{out[-3000:]}\nSTDERR:\n{err[-6000:]}"
  reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
  stopped = {r["stopped_at"] for r in reports}
  assert len(stopped) == 1 and None not in stopped, reports  # The same step on both hosts.
  (step,) = stopped
  for r in reports:
    assert r["restored_step"] == step and r["extra"] == {"step": step}
    assert r["local_values"] == [10.0 * step + r["process"]] * 4  # Each host's own shard.


def test_corrupt_step_on_a_multi_host_job_falls_back_on_every_host(tmp_path):
  """Two processes (G8): process 0 verifies, both agree, both restore the previous step."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen(
      ["timeout", "90", sys.executable, "tests/helpers/checkpoint_integrity_multiprocess.py",
       str(i), str(port), str(tmp_path / "ckpt")], cwd=REPO_ROOT, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=120) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, f"exit {p.returncode}\nSTDOUT:\n{out[-3000:]}\nSTDERR:\n{err[-6000:]}"
  reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
  assert "integrity check failed: file state/" in outputs[0][1]
  for r in reports:
    assert r["manifests"] == ["1", "2", "3"]
    assert r["restored_step"] == 2 and r["extra"] == {"step": 2} and r["steps"] == [1, 2]
    assert r["local_values"] == [20.0 + r["process"]]  # Each host's own shard of step 2.
    assert r["quarantined"] == ["3-corrupt"]


# --- The loop protocol end to end: straight through vs preempted (SIGTERM) and hard-killed.

TOTAL = 12


@functools.partial(jax.jit, donate_argnums=0)
def _train_step(state):
  key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
  grads = jax.tree.map(lambda p: jax.random.normal(key, p.shape, p.dtype), state["params"])
  updates, opt = TX.update(grads, state["opt"], state["params"])
  new = {**state, "params": optax.apply_updates(state["params"], updates), "opt": opt,
         "step": state["step"] + 1}
  loss = jnp.sum(jnp.square(new["params"]["dense"]["kernel"]))
  return new, {"loss": loss, "grad_norm": optax.tree.norm(grads)}


class _HardKill(Exception):
  pass


def _run(workdir: pathlib.Path, *, sigterm_at=None, crash_after=None):
  """A miniature host loop, as rlhf_jax/train stages will write it."""
  ckpt = Checkpointer(workdir / "checkpoints", save_every=4, keep=2)
  state = make_state(0, n_updates=0)
  state["step"] = jnp.int32(0)
  start, restored = 0, ckpt.restore_latest(abstract_like(state))
  if restored is not None:
    start, state, extra = restored
    assert extra["data"]["position"] == start  # The data iterator would seek here.
  writer = MetricWriter(workdir, total_steps=TOTAL, initial_step=start)
  try:
    with PreemptionGuard() as guard:
      for step in range(start + 1, TOTAL + 1):
        state, metrics = _train_step(state)
        writer.write(step, metrics)
        extra = {"data": {"position": step}}
        ckpt.maybe_save(step, state, extra)
        if step == sigterm_at:
          os.kill(os.getpid(), signal.SIGTERM)
        if step == crash_after:
          raise _HardKill  # Killed without any chance to save.
        if guard.should_stop(step):
          ckpt.maybe_save(step, state, extra, force=True)
          return "preempted", step
      ckpt.maybe_save(TOTAL, state, extra, force=True)
      return "done", TOTAL
  finally:
    writer.close()
    ckpt.close()


def _final_state(workdir):
  with Checkpointer(workdir / "checkpoints", save_every=4, keep=2) as ckpt:
    return ckpt.restore_latest(abstract_like(make_state(0, n_updates=0)))


def test_preempted_and_killed_runs_resume_to_the_same_result(tmp_path):
  straight, preempted, killed = tmp_path / "straight", tmp_path / "preempted", tmp_path / "killed"
  assert _run(straight) == ("done", TOTAL)

  assert _run(preempted, sigterm_at=6) == ("preempted", 6)
  assert _final_state(preempted)[0] == 6
  assert _run(preempted) == ("done", TOTAL)

  with pytest.raises(_HardKill):
    _run(killed, crash_after=10)  # Logged steps 9, 10 after the step-8 checkpoint.
  assert len((killed / "metrics.jsonl").read_text().splitlines()) == 10
  assert _run(killed) == ("done", TOTAL)

  step, expected, _ = _final_state(straight)
  assert step == TOTAL
  for workdir in (preempted, killed):
    got_step, got, _ = _final_state(workdir)
    assert got_step == TOTAL
    assert_bitwise_equal(got, expected)
    assert (workdir / "metrics.jsonl").read_bytes() == (straight / "metrics.jsonl").read_bytes()
  lines = [json.loads(l) for l in (straight / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == list(range(1, TOTAL + 1))
