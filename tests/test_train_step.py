"""Objectives against hand-computed values; gradient accumulation; non-finite skipping;
optimiser schedule; config errors."""
import math

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from rlhf_jax import configs, models, objectives
from rlhf_jax.parallel import init_params
from rlhf_jax.train import optim, step as step_lib
from rlhf_jax.train.sft import sft_loss_fn


def _log_sigmoid(x):
  return -math.log1p(math.exp(-x))


def test_bradley_terry_hand_computed():
  r_c, r_r = jnp.array([2.0, 0.5]), jnp.array([1.0, 1.0])
  loss, sums = objectives.bradley_terry(r_c, r_r)
  np.testing.assert_allclose(loss, -_log_sigmoid(1.0) - _log_sigmoid(-0.5), rtol=1e-6)
  assert float(sums["accuracy"]) == 1.0 and float(sums["pairs"]) == 2.0
  np.testing.assert_allclose(sums["margin"], 0.5, rtol=1e-6)
  loss, _ = objectives.bradley_terry(r_c, r_r, margin=jnp.array([0.5, 0.0]))
  np.testing.assert_allclose(loss, -_log_sigmoid(0.5) - _log_sigmoid(-0.5), rtol=1e-6)
  loss, _ = objectives.bradley_terry(r_c, r_r, center_coef=0.1)
  np.testing.assert_allclose(loss, -_log_sigmoid(1.0) - _log_sigmoid(-0.5) + 0.1 * (9 + 2.25),
                             rtol=1e-6)
  loss, sums = objectives.bradley_terry(r_c, r_r, weights=jnp.array([1.0, 0.0]))
  np.testing.assert_allclose(loss, -_log_sigmoid(1.0), rtol=1e-6)
  assert float(sums["pairs"]) == 1.0
  big, _ = objectives.bradley_terry(jnp.array([-1e4]), jnp.array([1e4]))
  assert np.isfinite(big) and float(big) == pytest.approx(2e4)


def test_next_token_nll_hand_computed():
  logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]]))
  ids = jnp.array([[0, 1, 2]])
  nll, count = objectives.next_token_nll(logits, ids, jnp.array([[0, 1, 1]]))
  np.testing.assert_allclose(nll, -math.log(0.25) - math.log(0.1), rtol=1e-6)
  assert float(count) == 2.0
  nll, count = objectives.next_token_nll(logits, ids, jnp.array([[0, 0, 1]]))
  np.testing.assert_allclose(nll, -math.log(0.1), rtol=1e-6)


@pytest.fixture(scope="module")
def tiny_lm():
  cfg = models.get_config("tiny", vocab_size=64, d_model=32, n_layers=1, n_heads=2,
                          mlp_dim=64)
  module = models.build_model(cfg)
  params = init_params(module, jax.random.key(0), np.ones((1, 4), np.int32))
  return module, params


def _uneven_batch(rows=8, width=12, seed=0):
  rng = np.random.RandomState(seed)
  ids = rng.randint(3, 64, size=(rows, width)).astype(np.int32)
  mask = np.ones_like(ids)
  loss_mask = np.zeros_like(ids)
  for i in range(rows):  # Response lengths from 1 to 9 tokens: very uneven micro-batches.
    n = 1 + (i * 5) % 9
    loss_mask[i, width - n:] = 1
  return {"input_ids": ids, "attention_mask": mask, "loss_mask": loss_mask}


def test_gradient_accumulation_normalises_by_global_token_count(tiny_lm):
  module, params = tiny_lm
  loss_fn = sft_loss_fn(module)
  batch = _uneven_batch()
  key = jax.random.key(0)
  full = step_lib.accumulate(loss_fn, params, batch, key, 1)
  acc = jax.jit(lambda p, b: step_lib.accumulate(loss_fn, p, b, key, 4))(params, batch)
  g_full = jax.tree.map(lambda g: g / full[1], full[3])
  g_acc = jax.tree.map(lambda g: g / acc[1], acc[3])
  assert float(acc[1]) == float(full[1]) == batch["loss_mask"][:, 1:].sum()
  for a, b in zip(jax.tree.leaves(g_acc), jax.tree.leaves(g_full)):
    assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) <= 1e-6
  np.testing.assert_allclose(acc[0] / acc[1], full[0] / full[1], rtol=1e-6)
  # The per-micro-batch mean of means differs: the test above can tell the two apart.
  means = []
  for i in range(4):
    micro = jax.tree.map(lambda x: x[2 * i:2 * i + 2], batch)
    s, (c, _) = loss_fn(params, micro, key)
    means.append(float(s / c))
  assert abs(np.mean(means) - float(full[0] / full[1])) > 1e-4


def test_train_step_skips_non_finite_updates(tiny_lm):
  module, params = tiny_lm
  tx = optax.adamw(1e-2)

  def loss_fn(p, batch, rng):
    s, aux = sft_loss_fn(module)(p, batch, rng)
    return s * batch["scale"][0], aux

  step = jax.jit(step_lib.make_train_step(loss_fn, tx))
  state = {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32),
           "rng": jax.random.key_data(jax.random.key(0))}
  batch = {**_uneven_batch(), "scale": np.ones((8,), np.float32)}
  bad = {**batch, "scale": np.full((8,), np.inf, np.float32)}
  new, metrics = step(state, bad)
  assert int(metrics["skipped"]) == 1 and int(new["step"]) == 1
  assert float(metrics["update_norm"]) == 0.0  # Nothing was applied.
  chex.assert_trees_all_equal(new["params"], params)
  chex.assert_trees_all_equal(new["opt"], state["opt"])
  before = jax.tree.map(np.asarray, new["params"])
  new, metrics = step(new, batch)
  assert int(metrics["skipped"]) == 0
  # The norm of the update applied: the parameters' change.
  delta = np.sqrt(sum(np.sum(np.square(np.asarray(a, np.float64) - b)) for a, b in
                      zip(jax.tree.leaves(new["params"]), jax.tree.leaves(before))))
  assert metrics["update_norm"].dtype == jnp.float32
  np.testing.assert_allclose(float(metrics["update_norm"]), delta, rtol=1e-4)
  assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(new["params"]))
  assert not all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(new["params"]),
                                                      jax.tree.leaves(params)))


def test_update_norm_of_an_exploding_lr_is_inf_not_nan(tiny_lm):
  """lr = 1e30 leaves finite params (|p| ~ 1e30) that no NaN check catches; the update norm
  (float32 squares overflow) reads Inf, which the loop's bound refuses."""
  module, params = tiny_lm
  tx = optax.adam(1e30)
  step = jax.jit(step_lib.make_train_step(sft_loss_fn(module), tx))
  state = {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32),
           "rng": jax.random.key_data(jax.random.key(0))}
  new, metrics = step(state, _uneven_batch())
  assert int(metrics["skipped"]) == 0 and float(metrics["update_norm"]) == np.inf
  assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(new["params"]))


def test_schedule_warmup_then_cosine_and_linear():
  cfg = optim.default_optim_config()
  cfg.lr, cfg.warmup_steps, cfg.end_lr_fraction = 1.0, 10, 0.1
  sched = optim.make_schedule(cfg, 110)
  assert float(sched(0)) == 0.0 and float(sched(5)) == pytest.approx(0.5)
  assert float(sched(10)) == pytest.approx(1.0)
  assert float(sched(60)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-5)  # Cosine midpoint.
  assert float(sched(110)) == pytest.approx(0.1, rel=1e-5)
  cfg.schedule = "linear"
  assert float(optim.make_schedule(cfg, 110)(60)) == pytest.approx(0.55, rel=1e-5)
  cfg.schedule = "exponential"
  with pytest.raises(ValueError, match="config.optim.schedule='exponential'"):
    optim.make_schedule(cfg, 10)


def test_weight_decay_skips_vectors():
  cfg = optim.default_optim_config()
  cfg.lr, cfg.weight_decay, cfg.warmup_steps, cfg.grad_clip = 0.1, 0.5, 0, 0.0
  tx, _ = optim.make_optimizer(cfg, 10)
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  assert float(updates["b"][0]) == 0.0
  np.testing.assert_allclose(updates["w"], -0.1 * 0.5, rtol=1e-6)


def test_parse_arg_and_required_values():
  arg = configs.parse_arg("size=small,runlocal,steps=3", size="tiny", runlocal=False, steps=1)
  assert (arg.size, arg.runlocal, arg.steps) == ("small", True, 3)
  with pytest.raises(ValueError, match="unknown config argument 'sise'"):
    configs.parse_arg("sise=small", size="tiny")
  with pytest.raises(ValueError, match="steps='many': expected a int"):
    configs.parse_arg("steps=many", steps=1)
  cfg = configs.lock(ml_collections.ConfigDict({"a": configs.required(int),
                                                "b": {"c": configs.required(str)}}))
  with pytest.raises(ValueError, match=r"unset: config.a, config.b.c"):
    configs.check_required(cfg)
  with pytest.raises(AttributeError, match="nope"):
    cfg.nope = 1
