"""The CLI's config errors, the loop's non-finite handling, and the reward-model ensemble."""
import json
import subprocess
import sys

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from conftest import REPO_ROOT
from rlhf_jax import models, parallel
from rlhf_jax.train import loop as loop_lib
from rlhf_jax.train import metrics as metrics_lib
from rlhf_jax.train import reward as reward_lib
from rlhf_jax.train import scoring
from rlhf_jax.train import state as state_lib
from rlhf_jax.train import step as step_lib
from rlhf_jax.train.sft import sft_loss_fn


def _main(*args, timeout=120):
  return subprocess.run([sys.executable, "-m", "rlhf_jax.main", *args], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("override,message", [
    ("--config.sft.stepz=3", "stepz"),
    ("--config.sft.steps=many", "steps"),
    ("--config.model.d_model=1.5", "d_model"),
])
def test_cli_rejects_bad_config_keys_and_types(tmp_path, override, message):
  workdir = tmp_path / "run"
  proc = _main("--config=experiments/quickstart/config.py:runlocal", f"--workdir={workdir}",
               override)
  assert proc.returncode != 0
  assert message in proc.stderr, proc.stderr[-2000:]
  assert not workdir.exists()  # Refused before anything is written.


def test_cli_rejects_unknown_config_argument(tmp_path):
  proc = _main("--config=experiments/quickstart/config.py:runlokal", f"--workdir={tmp_path}")
  assert proc.returncode != 0
  assert "unknown config argument 'runlokal'" in proc.stderr, proc.stderr[-2000:]


@pytest.fixture(scope="module")
def tiny():
  cfg = models.get_config("tiny", vocab_size=64, d_model=32, n_layers=1, n_heads=2, mlp_dim=64)
  return cfg, models.build_model(cfg)


def test_loop_skips_and_counts_non_finite_steps_and_checkpoints_stay_finite(tiny, tmp_path):
  _, module = tiny
  mesh = parallel.make_mesh({"data": 1})
  tx = optax.adamw(1e-2)
  ids = np.random.RandomState(0).randint(3, 64, size=(2, 8)).astype(np.int32)

  def loss_fn(params, batch, rng):
    s, aux = sft_loss_fn(module)(params, batch, rng)
    return s * batch["scale"][0], aux

  params = parallel.init_params(module, jax.random.key(0), ids, mesh=mesh)
  state = state_lib.state_from_params(params, tx, jax.random.key(1), mesh, "fsdp")
  step_fn = state_lib.jit_step(step_lib.make_train_step(loss_fn, tx), state)
  poisoned = {3, 4}  # Steps whose batch makes the loss infinite.

  class Batches:
    def __init__(self, position):
      self.position = position

    def __next__(self):
      self.position += 1
      scale = np.inf if self.position in poisoned else 1.0
      return {"input_ids": ids, "attention_mask": np.ones_like(ids),
              "loss_mask": np.ones_like(ids), "scale": np.full((2,), scale, np.float32)}

  with parallel.mesh_context(mesh, "fsdp"):
    loop_lib.train_loop(workdir=str(tmp_path), state=state, step_fn=step_fn,
                        make_iterator=Batches, to_device=lambda b: b,
                        loop=loop_lib.LoopConfig(total_steps=6, checkpoint_every=2,
                                                 keep_checkpoints=10, max_nonfinite=3))
  logged = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [m["skipped"] for m in logged] == [0, 0, 1, 1, 0, 0]
  assert logged[-1]["skipped_total"] == 2
  for step in (2, 4, 6):
    saved = ocp.StandardCheckpointer().restore(tmp_path / "checkpoints" / str(step) / "state")
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved))

  # Three poisoned steps in a row stop the run with a clear error.
  poisoned.update({7, 8, 9})
  params = parallel.init_params(module, jax.random.key(0), ids, mesh=mesh)  # Were donated.
  state = state_lib.state_from_params(params, tx, jax.random.key(1), mesh, "fsdp")
  step_fn = state_lib.jit_step(step_lib.make_train_step(loss_fn, tx), state)
  with parallel.mesh_context(mesh, "fsdp"), pytest.raises(metrics_lib.NonFiniteError,
                                                          match="3 consecutive"):
    loop_lib.train_loop(workdir=str(tmp_path / "again"), state=state, step_fn=step_fn,
                        make_iterator=lambda p: Batches(6), to_device=lambda b: b,
                        loop=loop_lib.LoopConfig(total_steps=12, checkpoint_every=100,
                                                 max_nonfinite=3))


def test_ensemble_step_equals_each_member_alone_and_heads_normalise(tiny):
  cfg, _ = tiny
  module = models.build_model(cfg, "reward")
  mesh = parallel.make_mesh({"data": 1})
  tx = optax.sgd(0.1)  # Adam would amplify float noise in near-zero gradients.
  k = 3
  params = reward_lib.init_ensemble(module, jax.random.split(jax.random.key(0), k), mesh,
                                    "fsdp")
  state = reward_lib.ensemble_state(params, tx, jax.random.key(1), mesh, "fsdp")
  loss_fn = reward_lib.reward_loss_fn(module, use_margin=False, center_coef=0.0)
  single = step_lib.make_train_step(loss_fn, tx)
  rng = np.random.RandomState(1)
  batch = {"chosen_ids": rng.randint(3, 64, size=(k, 4, 6)).astype(np.int32),
           "rejected_ids": rng.randint(3, 64, size=(k, 4, 6)).astype(np.int32),
           "chosen_mask": np.ones((k, 4, 6), np.int32),
           "rejected_mask": np.ones((k, 4, 6), np.int32), "margin": np.zeros((k, 4), np.float32)}
  new, metrics = jax.jit(reward_lib.ensemble_step(single))(state, batch)
  for i in range(k):
    member = jax.tree.map(lambda x: x[i], state)
    alone, m = jax.jit(single)(member, jax.tree.map(lambda x: x[i], batch))
    for a, b in zip(jax.tree.leaves(alone["params"]),
                    jax.tree.leaves(jax.tree.map(lambda x: x[i], new["params"]))):
      np.testing.assert_allclose(a, b, atol=1e-6)
  # Members start from different heads, so they disagree: the ensemble has a spread.
  ids = batch["chosen_ids"][0]
  rewards = np.asarray(scoring.ensemble_rewards(module, new["params"], ids,
                                                   np.ones_like(ids)))
  assert rewards.shape == (k, 4) and rewards.std(0).min() > 0
  normed, mean, std = reward_lib.normalize_heads(new["params"], rewards)
  after = np.asarray(scoring.ensemble_rewards(module, normed, ids, np.ones_like(ids)))
  np.testing.assert_allclose(after.mean(1), 0.0, atol=1e-5)
  np.testing.assert_allclose(after.std(1), 1.0, atol=1e-4)


def test_bootstrap_resamples_differ_per_member():
  examples = list(range(100))
  assert reward_lib.bootstrap_sources(examples, 1, 0) == [examples]
  members = reward_lib.bootstrap_sources(examples, 3, 0)
  assert len({tuple(m) for m in members}) == 3
  assert all(len(m) == 100 and len(set(m)) < 100 for m in members)  # With replacement.
  assert members == reward_lib.bootstrap_sources(examples, 3, 0)  # Deterministic.
