"""Exact resume: runs killed with SIGKILL or preempted with SIGTERM, then relaunched, end with
the same metrics.jsonl and bitwise-equal params as a run straight through; so does a run whose
newest checkpoint had one byte flipped (it falls back to the previous checkpoint)."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO_ROOT
from rlhf_jax.train.metrics import TIMING_KEYS

STEPS = 60
ARGS = ["--config=experiments/quickstart/config.py:runlocal", "--config.stages=('sft',)",
        "--config.driver=", "--config.export.enabled=False",
        f"--config.sft.steps={STEPS}", "--config.sft.eval_every=20",
        "--config.run.checkpoint_every=5", "--config.run.log_every=1",
        "--config.run.keep_checkpoints=3",
        "--config.task.n_sft=1500", "--config.task.n_eval=64", "--config.sft.rows=4",
        "--config.sft.length=96", "--config.model.d_model=64", "--config.model.n_layers=1",
        "--config.model.mlp_dim=128", "--config.sft.eval_batch_size=64"]


def _launch(workdir):
  return subprocess.Popen([sys.executable, "-m", "rlhf_jax.main", f"--workdir={workdir}", *ARGS],
                          cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))


def _finish(proc, timeout=300):
  out, _ = proc.communicate(timeout=timeout)
  return proc.returncode, out


def _checkpoints(workdir) -> list[int]:
  d = pathlib.Path(workdir) / "sft" / "checkpoints"
  return sorted(int(p.name) for p in d.glob("*") if p.name.isdigit()) if d.exists() else []


def _interrupt(workdir, sig, checkpoints=1):
  """Starts a run, sends `sig` once `checkpoints` are on disk; returns (code, output)."""
  proc = _launch(workdir)
  deadline = time.time() + 240
  while len(_checkpoints(workdir)) < checkpoints:
    if proc.poll() is not None or time.time() > deadline:
      pytest.fail(f"run ended before its first checkpoint:\n{proc.communicate()[0][-3000:]}")
    time.sleep(0.02)
  proc.send_signal(sig)
  return _finish(proc)


def _metrics(workdir):
  """The logged metrics without the wall-clock ones (the only ones not a function of the run)."""
  lines = (pathlib.Path(workdir) / "sft" / "metrics.jsonl").read_text().splitlines()
  return [{k: v for k, v in json.loads(l).items() if k not in TIMING_KEYS} for l in lines]


def _final_params(workdir):
  path = pathlib.Path(workdir) / "sft" / "checkpoints" / str(STEPS) / "state"
  return ocp.StandardCheckpointer().restore(path)["params"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("straight")
  code, out = _finish(_launch(workdir))
  assert code == 0, out[-3000:]
  return workdir


def _assert_same_run(resumed, straight):
  a, b = _metrics(resumed), _metrics(straight)
  assert [m["step"] for m in a] == list(range(1, STEPS + 1))
  assert "lr" in a[0] and "loss" in a[0]
  assert a == b  # Every logged value, bit for bit (JSON floats round-trip exactly).
  pa, pb = _final_params(resumed), _final_params(straight)
  import jax
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_array_equal(x, y)


def test_sigkill_then_relaunch_resumes_exactly(straight, tmp_path):
  code, out = _interrupt(tmp_path, signal.SIGKILL)
  assert code == -signal.SIGKILL, out[-2000:]
  killed_at = _checkpoints(tmp_path)[-1]
  assert killed_at < STEPS
  code, out = _finish(_launch(tmp_path))
  assert code == 0, out[-3000:]
  _assert_same_run(tmp_path, straight)


def test_sigterm_saves_then_relaunch_resumes_exactly(straight, tmp_path):
  code, out = _interrupt(tmp_path, signal.SIGTERM)
  assert code == 143, out[-2000:]
  assert "SIGTERM received; checkpoint saved at step" in out
  saved = int(out.split("checkpoint saved at step")[1].split()[0])
  assert saved in _checkpoints(tmp_path) and saved < STEPS
  code, out = _finish(_launch(tmp_path))
  assert code == 0, out[-3000:]
  _assert_same_run(tmp_path, straight)


def test_flipped_byte_in_newest_checkpoint_resumes_from_previous(straight, tmp_path):
  code, out = _interrupt(tmp_path, signal.SIGTERM, checkpoints=2)
  assert code == 143, out[-2000:]
  *_, previous, newest = _checkpoints(tmp_path)
  assert newest < STEPS
  step_dir = pathlib.Path(tmp_path) / "sft" / "checkpoints" / str(newest)
  assert (step_dir / "integrity.json").exists()  # Written once the forced save committed.
  # One flipped bit in the largest array file (tensorstore's OCDBT data files live in .../d/).
  target = max((p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"),
               key=lambda p: p.stat().st_size)
  name = str(target.relative_to(step_dir))
  data = bytearray(target.read_bytes())
  data[len(data) // 2] ^= 0x01
  target.write_bytes(bytes(data))

  code, out = _finish(_launch(tmp_path))
  assert code == 0, out[-3000:]
  failure = next(line for line in out.splitlines() if f"step {newest}" in line and "unusable" in line)
  assert name in failure and "sha256" in failure, failure
  assert f"resumed from step {previous}" in out, out[-3000:]
  _assert_same_run(tmp_path, straight)
  moved = pathlib.Path(tmp_path) / "sft" / "checkpoints.quarantine" / f"{newest}-corrupt"
  assert (moved / name).read_bytes() == bytes(data)  # Moved aside with its bytes, not deleted.
  assert f"Moved unusable checkpoint step {newest} to {moved}" in out
