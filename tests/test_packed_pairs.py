"""Packed pair rows are a pure layout change: for every pairwise loss, KTO and the reward model,
with and without prefix sharing, the packed loss, count, metrics and gradients equal the padded
layout's on the same pairs (tiny float32 model, 1e-5); plus the host layout itself, micro-batches
with a precomputed reference, the stages with packing on, and the config errors."""
import dataclasses
import json

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from conftest import TINY_MODEL, ragged_pairs
from rlhf_jax import configs, data, models, objectives, parallel
from rlhf_jax.train import preference as pref
from rlhf_jax.train import reward as reward_lib
from rlhf_jax.train import scoring
from rlhf_jax.train import step as step_lib
from rlhf_jax.train import task as task_lib

PROMPT, RESPONSE, N = 6, 5, 6
# 6 ragged pairs fill these rows unevenly (4 + 2 pairs unshared), so empty pair slots are
# masked; KTO's 12 examples need more room.
PACKING = dict(rows=2, length=40, loss_tokens=24)
KTO_PACKING = dict(rows=4, length=48, loss_tokens=24)
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def setup():
  cfg = models.get_config("tiny", vocab_size=50, d_model=32, n_layers=1, n_heads=4,
                          n_kv_heads=2, mlp_dim=64)
  module = models.build_model(cfg)
  params = parallel.init_params(module, jax.random.key(0), np.ones((1, 4), np.int32))
  params = jax.tree.map(lambda x: x * 2.0, params)  # Sharper distributions.
  ref = jax.tree.map(lambda x: x * 1.1, params)  # Policy != reference.
  pairs, tok = ragged_pairs(N, PROMPT, RESPONSE)
  pairs = [dataclasses.replace(p, margin=0.5 * i) for i, p in enumerate(pairs)]
  return module, params, ref, pairs, tok


def _dpo_cfg(loss: str, shared: bool, packing: dict | None, **kw):
  cfg = pref.default_config()
  cfg.update({"loss": loss, "batch_size": N, "shared_prefix": shared,
              "reference": "none" if loss in pref.REFERENCE_FREE else "model", **kw})
  if packing:
    cfg.packing.update(packing)
  return cfg


def _batch(cfg, pairs, tok, reference_logps=None, examples=N):
  """The stage's own collation of the first `examples` stream indices."""
  pack = (scoring.pair_packer(ml_collections.ConfigDict({"dpo": cfg}), "dpo",
                              cfg.shared_prefix) if cfg.packing.rows else None)
  _, collate = pref._collate_fn(cfg, tok, pairs, reference_logps, pack)
  return collate(np.arange(examples))


def _value_and_grad(loss_fn, params, batch, *extra):
  """What the train step makes of a loss_fn: loss, metrics and gradients divided by the count
  (the per-pair means it logs and applies), and the count."""
  (loss, (count, sums)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, batch, None, *extra)
  mean = lambda tree: jax.tree.map(lambda x: x / count, tree)
  return {"loss": loss / count, "count": count, "metrics": mean(sums), "grads": mean(grads)}


# ---------------------------------------------------------------------------------------------
# The host layout
# ---------------------------------------------------------------------------------------------


def test_pack_pair_rows_lays_out_whole_pairs_row_locally():
  a = lambda *x: np.asarray(x, np.int32)
  triples = [(a(11, 12), a(21), a(31, 32)), (a(13), a(22, 23), a(33)), (a(14, 15, 16), a(24), a())]
  kw = dict(rows=2, length=9, loss_tokens=6, pairs_per_row=3, pad_id=0)
  shared = data.pack_pair_rows(triples, shared_prefix=True, **kw)
  # Pairs 0 (5 tokens) and 1 (4) fill row 0; pair 2 (4, an empty second response) row 1.
  np.testing.assert_array_equal(shared.input_ids, [[11, 12, 21, 31, 32, 13, 22, 23, 33],
                                                   [14, 15, 16, 24, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(shared.segment_ids, [[1, 1, 2, 3, 3, 4, 5, 5, 6],
                                                     [1, 1, 1, 2, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(shared.parent_segment_ids, [[0, 0, 1, 1, 1, 0, 4, 4, 4],
                                                            [0, 0, 0, 1, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(shared.positions, [[0, 1, 2, 2, 3, 0, 1, 2, 1],
                                                   [0, 1, 2, 3, 0, 0, 0, 0, 0]])
  # The second response's first token is predicted from the prompt's last column (1, then 5).
  np.testing.assert_array_equal(shared.predictor, [[1, 1, 3, 5, 6, 5], [2, 0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(shared.targets[0], [21, 31, 32, 22, 23, 33])
  np.testing.assert_array_equal(shared.target_slot, [[0, 1, 1, 2, 2, 3], [0, -1, -1, -1, -1, -1]])
  # Last tokens; the empty response reads its prompt's last column (2).
  np.testing.assert_array_equal(shared.last_column, [[2, 4, 7, 8, 0, 0], [3, 2, 0, 0, 0, 0]])
  np.testing.assert_array_equal(shared.pair_index, [[0, 1, -1], [2, -1, -1]])
  np.testing.assert_array_equal(shared.per_pair([0.5, 1.5, 2.5]), [[0.5, 1.5, 0], [2.5, 0, 0]])

  unshared = data.pack_pair_rows(triples, shared_prefix=False, **{**kw, "length": 12})
  assert unshared.parent_segment_ids is None
  np.testing.assert_array_equal(unshared.input_ids[0],
                                [11, 12, 21, 11, 12, 31, 32, 13, 22, 23, 13, 33])
  np.testing.assert_array_equal(unshared.segment_ids[0], [1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 4, 4])
  np.testing.assert_array_equal(unshared.positions[0], [0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 0, 1])
  np.testing.assert_array_equal(unshared.predictor[0], [1, 4, 5, 7, 8, 10])
  np.testing.assert_array_equal(unshared.last_column[0], [2, 6, 9, 11, 0, 0])
  np.testing.assert_array_equal(unshared.pair_index, [[0, 1, -1], [2, -1, -1]])
  with pytest.raises(ValueError, match="3 pairs do not fit 2 rows of 9 tokens"):
    data.pack_pair_rows(triples, shared_prefix=False, **kw)
  with pytest.raises(ValueError, match="6 loss tokens"):  # The LM head's columns are a cap too.
    data.pack_pair_rows(triples, shared_prefix=True, **{**kw, "rows": 1, "length": 20})


# ---------------------------------------------------------------------------------------------
# Packed == padded: the DPO family, KTO, the reward model
# ---------------------------------------------------------------------------------------------

# Every loss, plus DPO with the RPO NLL term and label smoothing (the masked "nll" metric).
VARIANTS = {name: {} for name in objectives.PREFERENCE_LOSSES}
VARIANTS["sigmoid+nll"] = dict(nll_weight=0.3, label_smoothing=0.1)


@pytest.fixture(scope="module", params=[False, True], ids=["unshared", "shared"])
def pairwise(request, setup):
  """{layout: {variant: loss, count, metrics, grads}}: all variants in one jit per layout."""
  module, params, ref, pairs, tok = setup
  shared = request.param
  out = {}
  for layout, packing in (("padded", None), ("packed", PACKING)):
    cfgs = {v: _dpo_cfg(v.split("+")[0], shared, packing, **kw) for v, kw in VARIANTS.items()}
    batch = _batch(cfgs["sigmoid"], pairs, tok)
    fns = {v: pref.preference_loss_fn(module, c, PROMPT) for v, c in cfgs.items()}
    out[layout] = jax.jit(lambda p, b, r: {
        v: _value_and_grad(fn, p, b, *((r,) if cfgs[v].reference == "model" else ()))
        for v, fn in fns.items()})(params, batch, ref)
  return out


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_pairwise_losses_packed_equal_padded(pairwise, variant):
  padded, packed = pairwise["padded"][variant], pairwise["packed"][variant]
  assert float(packed["count"]) == N  # Empty pair slots are not counted.
  assert float(jnp.abs(padded["loss"])) > 1e-3  # A real loss, so agreement means something.
  chex.assert_trees_all_close(packed, padded, **TOL)


def test_precomputed_reference_and_micro_batches_packed_equal_padded(setup):
  """The reference scored once (in pair order) and placed in pair slots on the host; one
  update over 2 micro-batches of packed rows equals the padded single-batch update."""
  module, params, ref, pairs, tok = setup
  mesh = parallel.make_mesh({"data": 1})
  reference_logps = scoring.score_pairs(module, ref, pairs, tok, mesh, N, False)
  tx = optax.sgd(0.1)
  results = []
  for packing, accum in ((None, 1), (PACKING, 2)):
    cfg = _dpo_cfg("sigmoid", True, packing, reference="precomputed")
    batch = _batch(cfg, pairs, tok, reference_logps)
    state = {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.key_data(jax.random.key(0))}
    step = jax.jit(step_lib.make_train_step(pref.preference_loss_fn(module, cfg, PROMPT), tx,
                                            accum_steps=accum))
    state, metrics = step(state, batch)
    results.append((state["params"], {k: metrics[k] for k in ("loss", "count", "grad_norm")}))
  chex.assert_trees_all_close(results[1], results[0], **TOL)


@pytest.mark.parametrize("shared", [False, True], ids=["unshared", "shared"])
def test_kto_packed_equals_padded(setup, shared):
  """Packed KTO (example and KL row in one pair slot, prefix-shared or not) against padded KTO
  (KL rows built in the step, never shared): the same rows, so the same z₀ and losses."""
  module, params, ref, pairs, tok = setup
  out = []
  for packing in (None, KTO_PACKING):
    cfg = _dpo_cfg("kto", shared and packing is not None, packing, batch_size=2 * N)
    batch = _batch(cfg, pairs, tok, examples=2 * N)
    fn = pref.kto_loss_fn(module, cfg, PROMPT)
    out.append(jax.jit(lambda p, b, r: _value_and_grad(fn, p, b, r))(params, batch, ref))
  assert float(out[1]["count"]) == 2 * N
  assert float(out[0]["metrics"]["kl"]) > 0  # z₀ is not clamped away: it is compared too.
  chex.assert_trees_all_close(out[1], out[0], **TOL)


@pytest.mark.parametrize("shared", [False, True], ids=["unshared", "shared"])
def test_reward_model_packed_equals_padded(setup, shared):
  module, _, _, pairs, tok = setup
  rm = models.build_model(module.cfg, "reward")
  params = parallel.init_params(rm, jax.random.key(1), np.ones((1, 4), np.int32))
  padded = reward_lib.pair_arrays(data.pad_preferences(pairs, PROMPT, RESPONSE, tok.pad_id))
  config = ml_collections.ConfigDict({"reward": reward_lib.default_config()})
  config.reward.batch_size = N
  config.reward.packing.update(rows=2, length=40, shared_prefix=shared)
  pack = scoring.pair_packer(config, "reward", shared)
  packed = reward_lib.collate_packed(pairs, pack, tok.pad_id)
  assert "predictor" not in packed  # No LM head: no loss-token entries.
  out = []
  for batch, is_packed in ((padded, False), (packed, True)):
    fn = reward_lib.reward_loss_fn(rm, use_margin=True, center_coef=0.1, packed=is_packed)
    out.append(jax.jit(lambda p, b: _value_and_grad(fn, p, b))(params, batch))
  assert float(out[1]["count"]) == N and float(out[0]["metrics"]["reward_margin"]) != 0
  chex.assert_trees_all_close(out[1], out[0], **TOL)


# ---------------------------------------------------------------------------------------------
# The stages with packing on, and bad configs
# ---------------------------------------------------------------------------------------------


def _stage_config(section: str, stage_cfg):
  c = configs.base_config()
  c.model.update(TINY_MODEL)
  c.task = task_lib.review_world_config()
  c.task.update(n_sft=400, n_eval=32, n_pairs=200, n_eval_pairs=32)
  c.run.update(log_every=1, checkpoint_every=100)
  c[section] = stage_cfg
  c.stages = (section,)
  return c


# Review-world pairs: prompts <= 6 tokens, responses <= 49. Rows of 320 hold any 8 of them.
STAGE_PACKING = dict(rows=4, length=320)


@pytest.mark.parametrize("name,update", [
    ("dpo_precomputed_shared", dict(reference="precomputed", shared_prefix=True)),
    ("kto", dict(loss="kto")),
    ("reward_ensemble_shared", None),
])
def test_stages_run_with_packing(tmp_path, name, update):
  if update is None:
    cfg = reward_lib.default_config()
    cfg.update(steps=3, batch_size=8, eval_every=0, eval_batch_size=32, ensemble_size=2)
    cfg.packing.update(shared_prefix=True, **STAGE_PACKING)
    module, config = reward_lib, _stage_config("reward", cfg)
  else:
    cfg = pref.default_config()
    cfg.update(steps=3, batch_size=8, eval_every=0, **update)
    cfg.packing.update(STAGE_PACKING)
    module, config = pref, _stage_config("dpo", cfg)
  config = configs.lock(config)
  module.validate(config)
  result = module.run(config, str(tmp_path))
  logged = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in logged] == [1, 2, 3]
  assert all(np.isfinite(m["loss"]) and m["count"] == 8 for m in logged)
  assert all(np.isfinite(v) for v in result.metrics.values() if isinstance(v, float))


def _checked(section, stage_cfg, **packing):
  stage_cfg.packing.update(packing)
  config = configs.lock(_stage_config(section, stage_cfg))
  (reward_lib if section == "reward" else pref).validate(config)


@pytest.mark.parametrize("section,packing,update,message", [
    ("dpo", dict(length=64), {}, r"config.dpo.packing sets sizes but config.dpo.packing.rows=0"),
    ("dpo", dict(rows=2, length=64, loss_tokens=65), {},
     r"config.dpo.packing.loss_tokens=65 exceeds config.dpo.packing.length=64"),
    ("dpo", dict(rows=3, length=64), {"optim.accum_steps": 2},
     r"config.dpo.packing.rows=3 must be divisible .* config.dpo.optim.accum_steps=2"),
    ("dpo", dict(rows=2), {}, r"config.dpo.packing.length=0: must be an integer >= 1"),
    ("dpo", {}, dict(loss="kto", shared_prefix=True), r"needs packing \(config.dpo.packing.rows"),
    ("reward", dict(shared_prefix=True), {}, r"config.reward.packing.shared_prefix needs"),
])
def test_bad_packing_configs_name_the_key(section, packing, update, message):
  stage_cfg = (reward_lib if section == "reward" else pref).default_config()
  for key, value in update.items():
    *parents, leaf = key.split(".")
    target = stage_cfg
    for part in parents:
      target = target[part]
    target[leaf] = value
  with pytest.raises(ValueError, match=message):
    _checked(section, stage_cfg, **packing)


def test_pairs_that_cannot_fit_name_the_key(setup):
  _, _, _, pairs, tok = setup
  cfg = _dpo_cfg("sigmoid", False, dict(rows=1, length=16, loss_tokens=5))
  config = ml_collections.ConfigDict({"dpo": cfg})
  with pytest.raises(ValueError, match=r"config.dpo.packing.length=16: a training pair needs "
                                       r"up to 18 tokens"):
    scoring.check_pairs_fit(config, "dpo", False, pairs)
  cfg.packing.update(length=18)
  with pytest.raises(ValueError, match=r"config.dpo.packing.loss_tokens=5: .* up to 6"):
    scoring.check_pairs_fit(config, "dpo", False, pairs)
  cfg.packing.update(length=64, loss_tokens=0)
  scoring.check_pairs_fit(config, "dpo", False, pairs)  # Each pair fits a row alone...
  with pytest.raises(ValueError, match=r"config.dpo.packing: 6 pairs do not fit 1 rows .* "
                                       r"raise config.dpo.packing.rows/length/loss_tokens"):
    _batch(cfg, pairs, tok)  # ...but not all six in one row of 64.
