"""Packed rollouts (config.ppo.packing): the layout of data.pack_rollouts, and scoring passes,
losses, gradients and a whole host-driven iteration equal to the padded layout's."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import experiment_config, ppo_world
from rlhf_jax import data, models, parallel, sampling
from rlhf_jax.data.batching import _bucket
from rlhf_jax.train import ppo as ppo_lib
from rlhf_jax.train import rl

PAD = 0


def ragged_rollouts(rng, rows, prompt_len, new_tokens, vocab=60):
  """Left-padded prompts of 1..prompt_len tokens and responses of 1..new_tokens tokens (a
  prefix of each row, PAD after it), as the sampler gives them."""
  plen = rng.integers(1, prompt_len + 1, rows)
  rlen = rng.integers(1, new_tokens + 1, rows)
  prompt_mask = (np.arange(prompt_len)[None] >= prompt_len - plen[:, None]).astype(np.int32)
  response_mask = (np.arange(new_tokens)[None] < rlen[:, None]).astype(np.int32)
  prompt_ids = rng.integers(3, vocab, (rows, prompt_len)).astype(np.int32) * prompt_mask
  tokens = rng.integers(3, vocab, (rows, new_tokens)).astype(np.int32) * response_mask
  return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "tokens": tokens,
          "response_mask": response_mask}


def test_bucket_ladder():
  assert [_bucket(n) for n in range(1, 19)] == [1, 2, 3, 4, 5, 6, 7, 8, 10, 10, 12, 12, 14, 14,
                                               16, 16, 20, 20]
  assert _bucket(0) == 1 and _bucket(33) == 40 and _bucket(100) == 112


@pytest.mark.parametrize("groups, splits", [(1, 1), (4, 2), (4, 4)])
def test_pack_rollouts_layout(groups, splits):
  rng = np.random.default_rng(groups + splits)
  r = ragged_rollouts(rng, 16, 6, 9)
  b, n = r["tokens"].shape
  length = 15
  packed = data.pack_rollouts(**r, groups=groups, splits=splits, length=length, pad_id=PAD)
  rows = packed["ids"].shape[0]
  assert rows % groups == 0 and packed["ids"].shape[1] == length
  per_row, per_split = rows // groups, b // splits
  seen = np.zeros((b, n), np.int32)
  for row in range(rows):
    for e in np.flatnonzero(packed["source"][row] < per_split * n):
      local, j = divmod(int(packed["source"][row, e]), n)
      rollout = (row // (rows // splits)) * per_split + local  # Its split, then its index.
      assert (rollout // (b // groups)) == row // per_row  # Rows of its own group only.
      col = packed["predictor"][row, e]
      assert packed["targets"][row, e] == r["tokens"][rollout, j] == packed["ids"][row, col + 1]
      assert packed["segment_ids"][row, col] == packed["segment_ids"][row, col + 1] > 0
      seen[rollout, j] += 1
  np.testing.assert_array_equal(seen, r["response_mask"])  # Every response token, once.
  # Each rollout is one segment: its real prompt tokens then its response, positions from 0.
  for row in range(rows):
    for k in np.flatnonzero(packed["last_source"][row] < per_split):
      rollout = (row // (rows // splits)) * per_split + int(packed["last_source"][row, k])
      seg = packed["segment_ids"][row, packed["last_column"][row, k]]
      cols = np.flatnonzero(packed["segment_ids"][row] == seg)
      want = np.concatenate([r["prompt_ids"][rollout][r["prompt_mask"][rollout] > 0],
                             r["tokens"][rollout][r["response_mask"][rollout] > 0]])
      np.testing.assert_array_equal(packed["ids"][row, cols], want)
      np.testing.assert_array_equal(packed["positions"][row, cols], np.arange(len(want)))
      assert cols[-1] == packed["last_column"][row, k] and np.all(np.diff(cols) == 1)
  assert np.all(packed["mask"] == (packed["segment_ids"] > 0))
  assert packed["mask"].sum() == r["prompt_mask"].sum() + r["response_mask"].sum()
  with pytest.raises(ValueError, match="cannot fit a packed row of 10"):
    data.pack_rollouts(**r, groups=groups, splits=splits, length=10, pad_id=PAD)


# ---------------------------------------------------------------------------------------------
# Losses and gradients: packed == padded
# ---------------------------------------------------------------------------------------------

PROMPT, NEW, ROWS = 6, 9, 8
MODEL = models.get_config("tiny", vocab_size=64, d_model=32, n_layers=2, n_heads=4,
                          n_kv_heads=2, mlp_dim=64, max_len=32)


def update_batch(rng, adv_per_token: bool):
  r = ragged_rollouts(rng, ROWS, PROMPT, NEW)
  shape = (ROWS, NEW)
  m = r["response_mask"]
  return {**r, "old_logp": (rng.normal(-4.0, 0.3, shape) * m).astype(np.float32),
          "ref_logp": (rng.normal(-4.0, 0.3, shape) * m).astype(np.float32),
          "advantages": (rng.normal(0, 1, shape if adv_per_token else shape[:1])
                         ).astype(np.float32) * (m if adv_per_token else 1),
          "returns": (rng.normal(0, 1, shape) * m).astype(np.float32),
          "values": (rng.normal(0, 1, shape) * m).astype(np.float32),
          "loss_weight": np.ones(ROWS, np.float32)}


@pytest.mark.parametrize("algorithm, critic, aggregation", [
    ("ppo", "separate", "token_mean"), ("ppo", "head", "seq_mean_token_mean"),
    ("grpo", None, "seq_mean_token_sum_norm")])
def test_packed_loss_and_grads_equal_padded(algorithm, critic, aggregation):
  cfg = rl.default_config()
  cfg.update(dict(algorithm=algorithm, value=critic or "separate", loss_aggregation=aggregation,
                  kl_in_reward=algorithm == "ppo", ent_coef=0.01, max_new_tokens=NEW))
  key = jax.random.key(0)
  sample = jnp.ones((1, 4), jnp.int32)
  policy = models.build_model(MODEL, "policy_value" if critic == "head" else "policy")
  mesh = parallel.make_mesh({"data": 1})
  params = {"policy": parallel.init_params(policy, key, sample, mesh=mesh)}
  value = None
  if critic == "separate":
    value = models.build_model(MODEL, "value")
    params["value"] = parallel.init_params(value, jax.random.key(1), sample, mesh=mesh)
  # A non-zero value head, so the value loss and its gradient are not trivial.
  heads = [p for p in (params["policy"], params.get("value")) if p and "value_head" in p]
  for p in heads:
    p["value_head"]["kernel"] = 0.1 * jax.random.normal(jax.random.key(2),
                                                        p["value_head"]["kernel"].shape)
  loss_fn = ppo_lib.ppo_loss_fn(policy, value, cfg, PROMPT)
  batch = update_batch(np.random.default_rng(3), adv_per_token=algorithm == "ppo")
  packed = {**batch, **data.pack_rollouts(
      batch["prompt_ids"], batch["prompt_mask"], batch["tokens"], batch["response_mask"],
      groups=2, length=PROMPT + NEW, pad_id=PAD)}
  assert packed["mask"].size < batch["prompt_mask"].size + batch["response_mask"].size
  grad = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(p, b, None, 0.1), has_aux=True))
  (loss_a, (_, metrics_a)), grads_a = grad(params, batch)
  (loss_b, (_, metrics_b)), grads_b = grad(params, packed)
  np.testing.assert_allclose(loss_b, loss_a, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(metrics_b, metrics_a, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(grads_b, grads_a, rtol=1e-5, atol=1e-6)
  assert float(optax.tree.norm(grads_a)) > 0


# ---------------------------------------------------------------------------------------------
# The trainer: scoring passes and a whole iteration
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trainer_setup():
  """A PPO trainer with a separate critic (random value head), an RM ensemble of 2 and two
  micro-batches per update, on the review world's prompts; ragged synthetic samples."""
  config = experiment_config("ppo/review_world.py")
  config.ppo.update(dict(prompts_per_iter=8, minibatch_size=4, max_new_tokens=NEW, epochs=1))
  config.ppo.optim.accum_steps = 2
  mesh = parallel.make_mesh({"data": 1})
  task, policy, sft, rm_module, rm_params = ppo_world(config, mesh, rm_members=2)
  value = models.build_model(policy.cfg, "value")
  params = {"policy": sft, "value": models.transfer_backbone(
      sft, parallel.init_params(value, jax.random.key(2), jnp.ones((1, 4), jnp.int32),
                                mesh=mesh))}
  head = params["value"]["value_head"]
  head["kernel"] = 0.1 * jax.random.normal(jax.random.key(5), head["kernel"].shape)
  trainer = ppo_lib.PPOTrainer(config, task, mesh, policy_module=policy, value_module=value,
                               ref_params=sft, reward_module=rm_module, rm_params=rm_params)
  prompts = next(ppo_lib.prompt_iterator(task, config, 0))
  return trainer, params, prompts


def test_packed_scoring_equals_padded(trainer_setup):
  trainer, params, prompts = trainer_setup
  rng = np.random.default_rng(0)
  b = prompts["ids"].shape[0]
  rlen = rng.integers(1, NEW + 1, b)
  response_mask = (np.arange(NEW)[None] < rlen[:, None]).astype(np.int32)
  tokens = rng.integers(3, 200, (b, NEW)).astype(np.int32) * response_mask
  samples = sampling.Samples(tokens=jnp.asarray(tokens), logprobs=jnp.zeros((b, NEW)),
                             response_mask=jnp.asarray(response_mask),
                             lengths=jnp.asarray(rlen, jnp.int32),
                             finished=jnp.asarray(rlen < NEW))
  packed = trainer.pack({"prompt_ids": prompts["ids"], "prompt_mask": prompts["mask"],
                         "tokens": tokens, "response_mask": response_mask})
  ids, mask = jnp.asarray(prompts["ids"]), jnp.asarray(prompts["mask"])
  args = (params, trainer.ref_params, trainer.rm_params, ids, mask, samples)
  padded, packed_out = trainer._score(*args, None), trainer._score(*args, packed)
  chex.assert_trees_all_close(packed_out, padded, rtol=1e-5, atol=2e-6)
  for key in ("old_logp", "values", "rm_score"):  # Non-trivial numbers were compared.
    assert float(jnp.max(jnp.abs(padded[key]))) > 0.1, key


def test_packed_host_iteration_equals_padded(trainer_setup):
  trainer, params, prompts = trainer_setup
  ids, mask = jnp.asarray(prompts["ids"]), jnp.asarray(prompts["mask"])
  results = []
  for enabled in (False, True):
    trainer.cfg.packing.enabled = enabled
    state = trainer.init_state(jax.tree.map(jnp.copy, params), jax.random.key(3))
    with parallel.mesh_context(trainer.mesh, "fsdp"):
      results.append(trainer.host_iteration(state, ids, mask, None))
  trainer.cfg.packing.enabled = False
  (padded, out_a), (packed, out_b) = results
  np.testing.assert_array_equal(out_a["samples"].tokens, out_b["samples"].tokens)
  chex.assert_trees_all_close(packed["params"], padded["params"], rtol=1e-5, atol=1e-6)
  for key in ("loss", "policy_loss", "value_loss", "entropy", "grad_norm"):
    np.testing.assert_allclose(out_b["metrics"][key], out_a["metrics"][key], rtol=1e-5,
                               atol=1e-6)


def test_packing_config_errors(trainer_setup):
  trainer, _, _ = trainer_setup
  config = experiment_config("ppo/review_world.py")
  config.ppo.packing.enabled, config.ppo.fused = True, True
  with pytest.raises(ValueError, match="config.ppo.packing.enabled=True .*config.ppo.fused=False"):
    rl.validate(config)
  config.ppo.fused, config.ppo.packing.length = False, -1
  with pytest.raises(ValueError, match="config.ppo.packing.length"):
    rl.validate(config)
  config = trainer.config.copy_and_resolve_references()
  config.ppo.packing.length = trainer.prompt_len + NEW - 1
  with pytest.raises(ValueError, match=r"config.ppo.packing.length=\d+: a rollout can need"):
    ppo_lib.PPOTrainer(config, trainer.task, trainer.mesh, policy_module=trainer.policy_module,
                       value_module=trainer.value_module, ref_params=trainer.ref_params)
