"""The scoring passes an RL iteration skips (ppo.log_prob_passes): with one update per
iteration the update's own log-probs are the old ones, and with kl_coef 0, a fixed controller
and config.ppo.monitor_kl=False there is no reference pass. Each skip must leave the update
(params, losses) and the measured KL what the full passes give."""
import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import experiment_config, ppo_world
from rlhf_jax import parallel
from rlhf_jax.train import ppo as ppo_lib

NEW = 10


def passes(updates=1, **overrides):
  cfg = ml_collections.ConfigDict(dict(monitor_kl=True, kl_coef=0.1, kl_controller="fixed",
                                       kl_in_reward=False))
  cfg.update(overrides)
  return ppo_lib.log_prob_passes(cfg, updates)


def test_log_prob_passes():
  assert passes() == (False, True)  # GRPO, one update: the update's old log-probs.
  assert passes(updates=2) == (True, True)  # The policy moves between updates.
  assert passes(kl_in_reward=True) == (True, True)  # The reward reads the rollout's KL.
  assert passes(kl_coef=0.0) == (False, True)  # monitor_kl: the KL is still logged.
  # A zero-weight KL in the reward is not read before the update: the update measures it.
  assert passes(kl_coef=0.0, kl_in_reward=True) == (False, True)
  assert passes(kl_coef=0.0, monitor_kl=False) == (False, False)  # TRL at beta = 0.
  assert passes(kl_coef=0.0, monitor_kl=False, updates=2) == (True, False)
  # Nothing reads the KL in the reward at coefficient 0: no old pass is needed for it.
  assert passes(kl_coef=0.0, monitor_kl=False, kl_in_reward=True) == (False, False)
  # An adaptive controller can move a zero coefficient's target: the reference stays.
  assert passes(kl_coef=0.0, monitor_kl=False, kl_controller="adaptive") == (False, True)


@pytest.fixture(scope="module")
def grpo_world():
  """GRPO on the review world: 4 prompts x 4 samples, one update of two micro-batches."""
  config = experiment_config("ppo/review_world.py", "algo=grpo,runlocal")
  config.ppo.update(dict(prompts_per_iter=4, minibatch_size=16, epochs=1, max_new_tokens=NEW,
                         kl_coef=0.3))
  config.ppo.optim.accum_steps = 2
  mesh = parallel.make_mesh({"data": 1})
  task, policy, sft, rm_module, rm_params = ppo_world(config, mesh)
  # A policy away from the reference, so that the KL and its gradient are not zero.
  moved = jax.tree.map(lambda x: x + 0.02 * jax.random.normal(jax.random.key(7), x.shape,
                                                              x.dtype), sft)
  prompts = next(ppo_lib.prompt_iterator(task, config, 0))
  return config, mesh, task, policy, sft, moved, rm_module, rm_params, prompts


def iterate(world, *, packing=False, old_pass=None, fused=False, **ppo):
  """(trainer, state, out) of one iteration; `old_pass` forces the separate old pass."""
  config, mesh, task, policy, sft, moved, rm_module, rm_params, prompts = world
  config = config.copy_and_resolve_references()
  config.ppo.update(ppo)
  config.ppo.packing.enabled = packing
  trainer = ppo_lib.PPOTrainer(config, task, mesh, policy_module=policy, value_module=None,
                               ref_params=sft, reward_module=rm_module, rm_params=rm_params)
  if old_pass is not None:  # Read when _score is first traced, below.
    trainer.old_pass = old_pass
  state = trainer.init_state({"policy": jax.tree.map(jnp.copy, moved)}, jax.random.key(3))
  ids, mask = jnp.asarray(prompts["ids"]), jnp.asarray(prompts["mask"])
  with parallel.mesh_context(mesh, "fsdp"):
    if fused:
      state, out = jax.jit(trainer.fused_iteration)(state, ids, mask, trainer.ref_params,
                                                    trainer.rm_params)
    else:
      state, out = trainer.host_iteration(state, ids, mask, None)
  return trainer, state, out


@pytest.mark.parametrize("packing", [False, True])
def test_update_log_probs_as_old_equal_the_old_pass(grpo_world, packing):
  skip, s_skip, out_skip = iterate(grpo_world, packing=packing)
  full, s_full, out_full = iterate(grpo_world, packing=packing, old_pass=True)
  assert (skip.old_pass, skip.ref_pass) == (False, True)
  assert "old_logp" not in out_skip["batch"] and "old_logp" in out_full["batch"]
  np.testing.assert_array_equal(out_skip["samples"].tokens, out_full["samples"].tokens)
  chex.assert_trees_all_close(s_skip["params"], s_full["params"], rtol=1e-5, atol=1e-6)
  for key in ("loss", "policy_loss", "kl_loss", "grad_norm", "entropy"):
    np.testing.assert_allclose(out_skip["metrics"][key], out_full["metrics"][key], rtol=1e-5,
                               atol=1e-6)
  # The rollout KL measured inside the update is the scoring pass's (mean summed k3 here).
  assert float(out_full["kl"]) > 1e-3
  np.testing.assert_allclose(float(out_skip["kl"]), float(out_full["kl"]), rtol=1e-5)
  assert "rollout_kl" not in out_skip["metrics"]  # Reported as the iteration's kl only.
  assert out_skip["metrics"]["policy/clipfrac"] == 0.0  # ρ = 1 exactly.


def test_update_log_probs_drive_the_adaptive_controller(grpo_world):
  """The controller moves the coefficient from the update-measured KL as from the pass's,
  in the host-driven and the one-program iteration."""
  ppo = dict(kl_controller="adaptive", kl_target=0.01, kl_horizon=16)
  _, s_host, out_host = iterate(grpo_world, **ppo)
  _, s_fused, out_fused = iterate(grpo_world, fused=True, **ppo)
  _, s_full, _ = iterate(grpo_world, old_pass=True, **ppo)
  assert float(s_full["kl_coef"]) > 0.3  # Moved (the KL is above its target).
  for state in (s_host, s_fused):
    np.testing.assert_allclose(float(state["kl_coef"]), float(s_full["kl_coef"]), rtol=1e-5)
  np.testing.assert_allclose(float(out_fused["kl"]), float(out_host["kl"]), rtol=1e-5)


def test_no_reference_pass_without_a_reader(grpo_world):
  """kl_coef 0, fixed controller, monitor_kl=False: no reference log-probs, no KL logged,
  and the same update as with the reference pass (whose KL term has coefficient 0)."""
  trainer, bare, out = iterate(grpo_world, kl_coef=0.0, monitor_kl=False, packing=True)
  _, monitored, out_kl = iterate(grpo_world, kl_coef=0.0, packing=True)
  assert (trainer.old_pass, trainer.ref_pass) == (False, False)
  assert "ref_logp" not in out["batch"] and out["kl"] is None
  assert "kl_loss" not in out["metrics"] and float(out_kl["kl"]) > 1e-3
  chex.assert_trees_all_close(bare["params"], monitored["params"], rtol=1e-5, atol=1e-6)
  # The loop's metrics: no kl key rather than a made-up number.
  prompts = grpo_world[-1]
  state = trainer.init_state({"policy": jax.tree.map(jnp.copy, grpo_world[5])},
                             jax.random.key(3))
  with parallel.mesh_context(trainer.mesh, "fsdp"):
    _, metrics = trainer.iteration(state, prompts)
  assert "kl" not in metrics and np.isfinite(metrics["loss"])
