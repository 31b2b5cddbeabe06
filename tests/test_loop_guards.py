"""The host loop's guards around checkpoints: an exploded (finite) state is never saved, the
skip counter restarts when the optimiser changed, a corrupt data position falls back, and a
directory whose every commit marker is gone is refused rather than thrown away."""
import json
import logging
import pathlib

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from rlhf_jax import configs, models, parallel
from rlhf_jax.train import checkpoint as ckpt_lib
from rlhf_jax.train import loop as loop_lib
from rlhf_jax.train import metrics as metrics_lib
from rlhf_jax.train import state as state_lib
from rlhf_jax.train import step as step_lib
from rlhf_jax.train.sft import sft_loss_fn

IDS = np.random.RandomState(0).randint(3, 64, size=(2, 8)).astype(np.int32)


@pytest.fixture(scope="module")
def module():
  cfg = models.get_config("tiny", vocab_size=64, d_model=32, n_layers=1, n_heads=2, mlp_dim=64)
  return models.build_model(cfg)


class Batches:
  """Deterministic batches by position; positions in `poisoned` make the loss infinite, and
  positions past `limit` are refused (as a finite-epoch DataIterator does)."""

  def __init__(self, position, poisoned=(), limit=1000):
    if not 0 <= position <= limit:
      raise ValueError(f"position={position} outside [0, {limit}]")
    self.position, self.poisoned = position, set(poisoned)

  def __next__(self):
    self.position += 1
    rng = np.random.RandomState(self.position)
    ids = rng.randint(3, 64, size=IDS.shape).astype(np.int32)
    scale = np.inf if self.position in self.poisoned else 1.0
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids),
            "scale": np.full((2,), scale, np.float32)}


def run(module, workdir, *, lr=1e-2, poisoned=(), extra=None, **loop_kwargs):
  """train_loop on a fresh state (the previous one was donated); returns the final state."""
  mesh = parallel.make_mesh({"data": 1})
  tx = optax.adam(lr)

  def loss_fn(params, batch, rng):
    s, aux = sft_loss_fn(module)(params, batch, rng)
    return s * batch["scale"][0], aux

  params = parallel.init_params(module, jax.random.key(0), IDS, mesh=mesh)
  state = state_lib.state_from_params(params, tx, jax.random.key(1), mesh, "fsdp")
  step_fn = state_lib.jit_step(step_lib.make_train_step(loss_fn, tx), state)
  loop = loop_lib.LoopConfig(**{"total_steps": 8, "checkpoint_every": 2, "keep_checkpoints": 10,
                                "max_nonfinite": 3, **loop_kwargs})
  with parallel.mesh_context(mesh, "fsdp"):
    return loop_lib.train_loop(workdir=str(workdir), state=state, step_fn=step_fn,
                               make_iterator=lambda p: Batches(p, poisoned),
                               to_device=lambda b: b, loop=loop, extra=extra)


def steps_on_disk(workdir):
  d = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit())


def quarantined(workdir):
  d = pathlib.Path(workdir) / "checkpoints.quarantine"
  return sorted(p.name for p in d.iterdir()) if d.exists() else []


def logged(workdir, timing=False):
  rows = metrics_lib.read_jsonl(pathlib.Path(workdir) / "metrics.jsonl")
  return rows if timing else [{k: v for k, v in r.items() if k not in metrics_lib.TIMING_KEYS}
                              for r in rows]


def final_params(workdir, step=8):
  return ocp.StandardCheckpointer().restore(
      pathlib.Path(workdir) / "checkpoints" / str(step) / "state")["params"]


def assert_params_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def test_defaults_agree_with_the_config_and_bounds_are_checked():
  run_cfg = configs.base_config().run
  loop = loop_lib.LoopConfig(total_steps=1)
  assert (run_cfg.max_loss, run_cfg.max_update_norm) == (loop.max_loss, loop.max_update_norm)
  assert loop_lib.LoopConfig(total_steps=1, max_loss=0, max_update_norm=0).max_loss == 0
  for bad in (-1.0, float("inf"), float("nan"), True):
    with pytest.raises(ValueError, match="config.run.max_update_norm"):
      loop_lib.LoopConfig(total_steps=1, max_update_norm=bad)


def test_exploded_update_is_never_checkpointed_and_a_lower_lr_resumes(module, tmp_path):
  run(module, tmp_path, total_steps=4)
  assert steps_on_disk(tmp_path) == [2, 4]
  # lr = 1e30: finite but ruined weights after step 5's update; its norm overflows to Inf.
  with pytest.raises(loop_lib.ExplodedError,
                     match=r"step 5: update_norm = inf exceeds config.run.max_update_norm = "
                     r"10000.*Newest checkpoint: step 4"):
    run(module, tmp_path, lr=1e30, optim={"lr": 1e30})
  assert steps_on_disk(tmp_path) == [2, 4] and quarantined(tmp_path) == []
  rows = logged(tmp_path)
  assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[-1]["update_norm"] is None
  assert all(0 < r["update_norm"] < 10 for r in rows[:4])
  # The rerun with a sane lr resumes from step 4 and finishes.
  state = run(module, tmp_path, lr=1e-2, optim={"lr": 1e-2})
  assert steps_on_disk(tmp_path) == [2, 4, 6, 8] and int(state["step"]) == 8
  assert all(np.isfinite(x).all() and np.abs(x).max() < 10
             for x in jax.tree.leaves(final_params(tmp_path)))


def test_exploded_loss_moves_the_state_it_was_measured_on_aside(module, tmp_path):
  run(module, tmp_path, total_steps=4, max_loss=0)  # Off: the loss here is about 4.2.
  with pytest.raises(loop_lib.ExplodedError,
                     match=r"step 5: loss = 4\.\d+ exceeds config.run.max_loss = 1\b.*"
                     r"Newest checkpoint: step 2"):
    run(module, tmp_path, max_loss=1.0)
  # Step 5's loss is computed on checkpoint 4's params: that state goes too (moved, kept).
  assert steps_on_disk(tmp_path) == [2]
  assert quarantined(tmp_path) == ["4-exploded"]


def test_skip_counter_restarts_when_the_optimiser_changed(module, tmp_path, caplog):
  run(module, tmp_path, total_steps=4, poisoned={3, 4}, optim={"lr": 1e-2})
  assert json.loads((tmp_path / "checkpoints" / "4" / "extra" / "metadata").read_text())[
      "nonfinite"] == {"consecutive": 2, "skipped_total": 2}
  # Same optimiser: the streak continues, and one more bad batch makes it 3 in a row.
  with pytest.raises(metrics_lib.NonFiniteError, match="step 5: 3 consecutive"):
    run(module, tmp_path, poisoned={5}, optim={"lr": 1e-2})
  # Another optimiser: the streak restarts (the total is history, kept).
  with caplog.at_level(logging.INFO):
    run(module, tmp_path, lr=5e-3, poisoned={5}, optim={"lr": 5e-3})
  assert "optimiser config differs from the checkpoint's (optim.lr)" in caplog.text
  assert "restarts from 0 (it stood at 2 in a row" in caplog.text
  assert [r["skipped_total"] for r in logged(tmp_path)][-4:] == [3, 3, 3, 3]


def test_skip_counter_restarts_on_an_optim_key_of_the_saved_config(module, tmp_path, caplog):
  """Without LoopConfig.optim, a changed *.optim.* key of extra["config"] counts."""
  config = {"sft": {"optim": {"lr": 1e-2}, "steps": 8}, "dpo": {"beta": 0.1}}
  run(module, tmp_path, total_steps=4, poisoned={3, 4}, extra={"config": config})
  config = {"sft": {"optim": {"lr": 5e-3}, "steps": 8}, "dpo": {"beta": 0.1}}
  with caplog.at_level(logging.INFO):
    run(module, tmp_path, poisoned={5}, extra={"config": config})
  assert "(config.sft.optim.lr)" in caplog.text and "restarts from 0" in caplog.text


@pytest.fixture(scope="module")
def straight(module, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("straight")
  run(module, workdir)
  return workdir


@pytest.mark.parametrize("manifest,position", [
    (True, -3), (False, -3), (False, "12"), (False, None), (False, 10**9)])
def test_corrupt_data_position_falls_back(module, straight, tmp_path, caplog, position,
                                          manifest):
  run(module, tmp_path, total_steps=6)
  step_dir = tmp_path / "checkpoints" / "6"
  extra_file = step_dir / "extra" / "metadata"
  saved = json.loads(extra_file.read_text())
  if position is None:
    del saved["data_position"]
  else:
    saved["data_position"] = position  # 10**9: past the iterator's range.
  extra_file.write_text(json.dumps(saved))
  if not manifest:  # Then the manifest cannot catch it; the loop's own check must.
    (step_dir / ckpt_lib.INTEGRITY_FILE).unlink()
  with caplog.at_level(logging.WARNING):
    run(module, tmp_path)
  assert "step 6" in caplog.text
  assert ("integrity check failed: file extra/metadata" if manifest else "data_position"
          ) in caplog.text
  assert quarantined(tmp_path) == ["6-corrupt" if manifest else "6-invalid-extra"]
  assert logged(tmp_path) == logged(straight)
  assert_params_equal(final_params(tmp_path), final_params(straight))


def test_every_commit_marker_missing_refuses_to_start_over(module, tmp_path):
  run(module, tmp_path, total_steps=4)
  for step in (2, 4):
    (tmp_path / "checkpoints" / str(step) / "commit_success.txt").unlink()
  with pytest.raises(ckpt_lib.CheckpointRestoreError, match="2 steps lack their commit marker"):
    run(module, tmp_path)
  assert steps_on_disk(tmp_path) == [2, 4] and quarantined(tmp_path) == []
  assert [r["step"] for r in logged(tmp_path)] == [1, 2, 3, 4]  # Nothing rewritten either.
