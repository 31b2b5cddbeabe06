"""PPO's one-jit iteration: equal to the host-driven one, and vmappable over a scalar sweep."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import experiment_config, ppo_world
from rlhf_jax import models, parallel
from rlhf_jax.train import ppo as ppo_lib


@pytest.fixture(scope="module")
def trainer_and_state():
  config = experiment_config("ppo/review_world.py")
  config.ppo.update(dict(prompts_per_iter=8, minibatch_size=4, max_new_tokens=6, epochs=2))
  mesh = parallel.make_mesh({"data": 1})
  task, policy, sft, rm_module, rm_params = ppo_world(config, mesh, rm_members=2)
  value = models.build_model(policy.cfg, "value")
  params = {"policy": sft, "value": models.transfer_backbone(
      sft, parallel.init_params(value, jax.random.key(2), jnp.ones((1, 4), jnp.int32),
                                mesh=mesh))}
  trainer = ppo_lib.PPOTrainer(config, task, mesh, policy_module=policy, value_module=value,
                               ref_params=sft, reward_module=rm_module, rm_params=rm_params)
  prompts = next(ppo_lib.prompt_iterator(task, config, 0))
  return trainer, params, prompts


def _fresh_state(trainer, params, kl_coef=None, seed=3):
  state = trainer.init_state(jax.tree.map(jnp.copy, params), jax.random.key(seed))
  if kl_coef is not None:
    state["kl_coef"] = jnp.asarray(kl_coef, jnp.float32)
  return state


def test_fused_iteration_equals_host_iteration(trainer_and_state):
  trainer, params, prompts = trainer_and_state
  ids, mask = jnp.asarray(prompts["ids"]), jnp.asarray(prompts["mask"])
  with parallel.mesh_context(trainer.mesh, "fsdp"):
    fused, out_f = jax.jit(trainer.fused_iteration)(_fresh_state(trainer, params), ids, mask,
                                                    trainer.ref_params, trainer.rm_params)
    host, out_h = trainer.host_iteration(_fresh_state(trainer, params), ids, mask, None)
  np.testing.assert_array_equal(out_f["samples"].tokens, out_h["samples"].tokens)
  chex.assert_trees_all_close(fused["params"], host["params"], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(fused["kl_coef"], host["kl_coef"], rtol=1e-6)
  assert int(fused["step"]) == int(host["step"]) == 2 * 2  # epochs x minibatches.
  np.testing.assert_allclose(out_f["metrics"]["loss"], out_h["metrics"]["loss"], atol=1e-5)


@pytest.mark.parametrize("sweep_over", ["kl_coef", "seed"])
def test_vmap_over_a_scalar_is_one_program(trainer_and_state, sweep_over):
  trainer, params, prompts = trainer_and_state
  ids, mask = jnp.asarray(prompts["ids"]), jnp.asarray(prompts["mask"])
  # At the first iteration policy == reference, so the KL coefficient only changes the
  # controller's output; the seed changes the samples and hence the update.
  variants = ([dict(kl_coef=c) for c in (0.01, 0.5)] if sweep_over == "kl_coef" else
              [dict(seed=s) for s in (3, 4)])
  with parallel.mesh_context(trainer.mesh, "fsdp"):
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs),
                           *[_fresh_state(trainer, params, **v) for v in variants])
    sweep = jax.jit(jax.vmap(trainer.fused_iteration, in_axes=(0, None, None, None, None)))
    swept, _ = sweep(stacked, ids, mask, trainer.ref_params, trainer.rm_params)
    single = jax.jit(trainer.fused_iteration)
    for i, v in enumerate(variants):
      alone, _ = single(_fresh_state(trainer, params, **v), ids, mask, trainer.ref_params,
                        trainer.rm_params)
      chex.assert_trees_all_close(jax.tree.map(lambda x: x[i], swept["params"]),
                                  alone["params"], atol=1e-5, rtol=1e-5)
      np.testing.assert_allclose(swept["kl_coef"][i], alone["kl_coef"], rtol=1e-6)
  if sweep_over == "seed":  # Different samples, different policies.
    a, b = (jax.tree.map(lambda x: x[i], swept["params"]["policy"]) for i in (0, 1))
    assert any(not np.allclose(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  else:
    assert float(swept["kl_coef"][0]) != float(swept["kl_coef"][1])
