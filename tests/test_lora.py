"""LoRA: fresh adapters leave the model bitwise unchanged, merged export equals the adapted
forward, only adapters are trained (DPO and PPO), and the compiled step needs less memory."""
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import experiment_config, ppo_world, ragged_pairs
from rlhf_jax import models, parallel
from rlhf_jax.train import pipeline, scoring
from rlhf_jax.train import preference as pref
from rlhf_jax.train import stage as stage_lib
from rlhf_jax.train import step as step_lib

PROMPT, RESPONSE = 6, 5
CFG = models.get_config("tiny", vocab_size=50, d_model=32, n_layers=2, n_heads=4,
                        n_kv_heads=2, mlp_dim=64)


def _kernel_paths(tree):
  return {"/".join(str(k.key) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def base():
  module = models.build_model(CFG)
  params = parallel.init_params(module, jax.random.key(0), np.ones((1, 4), np.int32))
  return module, jax.tree.map(lambda x: x * 2.0, params)  # Sharper distributions.


def _random_b(adapters, seed=1):
  """Adapters with B != 0 (a trained adapter), so the adapted model differs from the base."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(adapters)
  keys = jax.random.split(jax.random.key(seed), len(flat))
  return jax.tree_util.tree_unflatten(treedef, [
      x if str(p[-1].key) == "a" else 0.05 * jax.random.normal(k, x.shape)
      for (p, x), k in zip(flat, keys)])


def test_fresh_adapters_leave_the_forward_bitwise_unchanged(base):
  module, params = base
  cfg = models.LoRAConfig(rank=4, alpha=8.0)
  adapters = models.init_lora(params, cfg, jax.random.key(1))
  assert not any(np.any(x) for p, x in _kernel_paths(adapters).items() if p.endswith("/b"))
  ids = np.random.RandomState(0).randint(2, 50, (3, 11)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[0, :4] = 0  # Left padding too.
  plain = jax.jit(lambda p: module.apply({"params": p}, ids, mask))(params)
  adapted = jax.jit(lambda p, a: module.apply({"params": models.apply_lora(p, a, cfg.scale)},
                                              ids, mask))(params, adapters)
  np.testing.assert_array_equal(np.asarray(adapted), np.asarray(plain))
  # rank 0 (the default config block) is full fine-tuning: no LoRA at all.
  assert models.lora.config_from(models.lora.default_config()) is None


def test_targets_select_kernels_and_apply_matches_hand_computation(base):
  _, params = base
  cfg = models.LoRAConfig(rank=2, alpha=6.0, targets="q,v,down")
  adapters = _random_b(models.init_lora(params, cfg, jax.random.key(2)))
  assert sorted(adapters["backbone"]["block_1"]) == ["attn", "mlp"]
  assert sorted(adapters["backbone"]["block_1"]["attn"]) == ["q", "v"]
  merged = models.lora.fold_lora(params, adapters, cfg.scale)
  before, after = _kernel_paths(params), _kernel_paths(merged)
  assert before.keys() == after.keys()
  for path, w in before.items():
    parts = path.split("/")
    if parts[-1] == "kernel" and parts[-2] in ("q", "v", "down"):
      ad = adapters["backbone"][parts[1]][parts[2]][parts[3]]
      want = np.asarray(w) + 3.0 * np.asarray(ad["a"], np.float64) @ np.asarray(ad["b"])
      np.testing.assert_allclose(after[path], want, rtol=0, atol=1e-6, err_msg=path)
    else:
      np.testing.assert_array_equal(after[path], w, err_msg=path)
  # apply_lora leaves every base array as it is and puts A, B and the scale beside the
  # adapted kernels, which the decoder applies unmerged: the same forward as the folded kernels.
  attached = models.apply_lora(params, adapters, cfg.scale)
  q = attached["backbone"]["block_1"]["attn"]["q"]
  assert q["kernel"] is params["backbone"]["block_1"]["attn"]["q"]["kernel"]
  assert q["lora_a"] is adapters["backbone"]["block_1"]["attn"]["q"]["a"]
  assert float(q["lora_scale"]) == 3.0 and "lora_a" not in attached["backbone"]["block_1"]["attn"]["k"]
  module = models.build_model(CFG)
  ids = np.random.RandomState(4).randint(2, 50, (2, 9)).astype(np.int32)
  forward = jax.jit(lambda p: module.apply({"params": p}, ids))
  np.testing.assert_allclose(np.asarray(forward(attached)), np.asarray(forward(merged)),
                             atol=2e-5, rtol=0)
  with pytest.raises(ValueError, match="config.lora.targets='lm_head'"):
    models.init_lora(params, models.LoRAConfig(rank=2, targets="lm_head"), jax.random.key(0))


def test_merged_export_equals_the_adapted_forward(base, tmp_path):
  """save_hf of the merged params, read back: the adapted forward to 1e-5. (That save_hf
  output loads into transformers with the same logits is tests/test_hf_interop.py's job.)"""
  module, params = base
  cfg = models.LoRAConfig(rank=4, alpha=8.0)
  adapters = _random_b(models.init_lora(params, cfg, jax.random.key(3)))
  ids = np.random.RandomState(1).randint(2, 50, (2, 9)).astype(np.int32)
  forward = jax.jit(lambda p: module.apply({"params": p}, ids))
  adapted = np.asarray(forward(models.apply_lora(params, adapters, cfg.scale)))
  assert np.abs(adapted - np.asarray(forward(params))).max() > 1e-3
  # The attached (unmerged) params have no HF layout: refused, never exported as the base.
  with pytest.raises(models.HFCheckpointError, match=r"no place in the llama HF layout.*merge_lora"):
    models.save_hf(module, models.apply_lora(params, adapters, cfg.scale), tmp_path / "attached")
  models.save_hf(module, models.merge_lora(params, adapters, cfg.scale), tmp_path / "merged")
  loaded_module, loaded = models.load_hf(tmp_path / "merged")
  assert loaded_module.cfg.vocab_size == CFG.vocab_size
  np.testing.assert_allclose(np.asarray(forward(loaded)), adapted, atol=1e-5, rtol=0)


def test_dpo_steps_train_only_the_adapters(base):
  module, params = base
  pairs, tok = ragged_pairs(8, PROMPT, RESPONSE)
  batch = scoring.collate_pairs(pairs, tok, False)
  cfg = models.LoRAConfig(rank=4, alpha=8.0)
  mesh = parallel.make_mesh({"data": 1})
  adapters = models.lora.init_sharded(module, params, cfg, jax.random.key(4), mesh, "fsdp")
  tx = optax.adam(2e-2)
  state = {"params": adapters, "opt": tx.init(adapters), "step": jnp.zeros((), jnp.int32),
           "rng": jax.random.key_data(jax.random.key(0))}
  # The optimiser holds adapter-shaped moments only (no base-sized leaf anywhere).
  adapter_shapes = {x.shape for x in jax.tree.leaves(adapters)}
  assert {x.shape for x in jax.tree.leaves(state["opt"]) if x.ndim} <= adapter_shapes
  assert sum(x.size for x in jax.tree.leaves(state["opt"])) < 3 * models.lora.num_params(
      adapters)
  base_copy = jax.tree.map(np.asarray, params)
  loss_fn = models.lora.lora_loss_fn(pref.preference_loss_fn(module, pref.default_config(),
                                                             PROMPT), cfg.scale, True)
  step = models.lora.jit_frozen_step(step_lib.make_train_step(loss_fn, tx,
                                                              state_extra=("base",)),
                                     "base", state, params)
  losses = []
  for _ in range(5):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert set(state) == {"params", "opt", "step", "rng"}  # The base never enters the state.
  np.testing.assert_allclose(losses[0], np.log(2), rtol=1e-6)  # Policy == reference at first.
  assert losses[-1] < losses[0] - 0.05, losses
  chex.assert_trees_all_equal(jax.tree.map(np.asarray, params), base_copy)  # Base untouched.
  assert any(np.any(x) for p, x in _kernel_paths(state["params"]).items() if p.endswith("/b"))


def test_dpo_stage_with_lora(base, tmp_path):
  module, params = base
  pairs, tok = ragged_pairs(8, PROMPT, RESPONSE)
  config = pipeline.review_world_config()
  config.export.enabled = False  # The tokenizer here is a stand-in; export is tested apart.
  config.lora.update(dict(rank=4, alpha=8.0, targets="attn"))
  config.dpo.update(dict(steps=3, batch_size=8, eval_every=0))
  config.dpo.optim.update(dict(lr=2e-2, warmup_steps=0, schedule="constant"))
  config.run.update(dict(log_every=1, checkpoint_every=3))
  task = types.SimpleNamespace(tokenize_config=tok, vocab_size=tok.vocab_size)
  mesh = parallel.make_mesh({"data": 1})
  policy = stage_lib.StageResult("sft", module, params, task, mesh, {}, str(tmp_path))
  result = pref.run(config, str(tmp_path), policy, pairs=(pairs, pairs))
  merged = result.params
  assert result.metrics["eval_reward_accuracy"] > 0.5
  changed = {p for p, x in _kernel_paths(merged).items()
             if not np.array_equal(x, _kernel_paths(params)[p])}
  assert changed and all("/attn/" in p and p.endswith("/kernel") for p in changed), changed
  # With LoRA the reference is the frozen base: a separate one is refused, not ignored.
  with pytest.raises(ValueError, match=r"a separate reference needs .* and no LoRA"):
    pref.run(config, str(tmp_path / "ref"), policy, pairs=(pairs, pairs), reference=params)


def test_lora_step_needs_less_memory_than_full_fine_tuning():
  """Compiled (not run) DPO steps with the reference in the step, at a shape where the params
  dominate: LoRA drops the optimiser moments, the gradients and the reference copy."""
  cfg = models.get_config("tiny", vocab_size=512, d_model=128, n_layers=2, n_heads=4,
                          mlp_dim=352)
  module = models.build_model(cfg)
  shapes, _ = parallel.abstract_params(module, jnp.ones((1, 8), jnp.int32))
  pairs, length = 2, 16
  batch = {k: jax.ShapeDtypeStruct((pairs, length), jnp.int32) for k in (
      "chosen_ids", "chosen_mask", "chosen_loss_mask", "rejected_ids", "rejected_mask",
      "rejected_loss_mask")}
  dpo = pref.default_config()
  tx = optax.adamw(1e-4)
  loss_fn = pref.preference_loss_fn(module, dpo, 8)

  def scalars():
    return {"step": jax.ShapeDtypeStruct((), jnp.int32),
            "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}

  full_state = {"params": shapes, "opt": jax.eval_shape(tx.init, shapes), "ref": shapes,
                **scalars()}
  full = jax.jit(step_lib.make_train_step(loss_fn, tx, state_extra=("ref",)),
                 donate_argnums=0).lower(full_state, batch).compile().memory_analysis()
  lcfg = models.LoRAConfig(rank=8)
  adapters = models.lora.adapter_shapes(shapes, lcfg)
  lora_state = {"params": adapters, "opt": jax.eval_shape(tx.init, adapters), **scalars()}
  step = models.lora.with_frozen(step_lib.make_train_step(
      models.lora.lora_loss_fn(loss_fn, lcfg.scale, True), tx, state_extra=("base",)), "base")
  lora = jax.jit(step, donate_argnums=0).lower(lora_state, batch,
                                               shapes).compile().memory_analysis()
  used = lambda m: m.argument_size_in_bytes + m.temp_size_in_bytes
  param_bytes = 4 * cfg.num_params()
  assert full.argument_size_in_bytes > 3.9 * param_bytes  # params + 2 moments + reference.
  adapter_bytes = 4 * models.lora.num_params(adapters)
  # The base, the adapters and their two moments (and a few bytes of batch and scalars).
  assert lora.argument_size_in_bytes < param_bytes + 3 * adapter_bytes + 4096
  print({"full": (full.argument_size_in_bytes, full.temp_size_in_bytes),
         "lora": (lora.argument_size_in_bytes, lora.temp_size_in_bytes)})
  assert used(lora) < 0.75 * used(full), (used(lora), used(full))


def test_ppo_iteration_with_lora_trains_the_adapters():
  """PPO with a value head on the LoRA policy: the optimiser holds the adapters and the head;
  the reference is the base (adapters off); one host-driven iteration (the default path) moves
  only the adapted kernels."""
  from rlhf_jax.train import ppo as ppo_lib
  config = experiment_config("ppo/review_world.py", "runlocal,value=head")
  config.ppo.update(dict(prompts_per_iter=8, minibatch_size=4, max_new_tokens=6, epochs=1))
  config.ppo.optim.lr = 1e-2
  config.lora.update(dict(rank=2, alpha=4.0))
  mesh = parallel.make_mesh({"data": 1})
  task, policy, sft, rm_module, rm_params = ppo_world(config, mesh)
  trainer, params = ppo_lib.make_trainer(config, task, mesh, policy=(policy, sft),
                                         rm=(rm_module, rm_params))
  assert trainer.ref_params is sft  # The reference is the base itself: no copy.
  assert sorted(params["policy"]) == ["lora", "value_head"] and "value" not in params
  fresh = lambda: trainer.init_state(jax.tree.map(jnp.copy, params), jax.random.key(3))
  state = fresh()
  assert {x.shape for x in jax.tree.leaves(state["opt"]) if x.ndim} <= {
      x.shape for x in jax.tree.leaves(params)}
  prompts = next(ppo_lib.prompt_iterator(task, config, 0))
  ids, mask = jnp.asarray(prompts["ids"]), jnp.asarray(prompts["mask"])
  with parallel.mesh_context(mesh, "fsdp"):
    host, out = trainer.host_iteration(state, ids, mask, None)
    # The one-program iteration (rollout with the unmerged adapters, scoring, updates) agrees.
    fused, out_f = jax.jit(trainer.fused_iteration)(fresh(), ids, mask, trainer.ref_params,
                                                    trainer.rm_params)
  np.testing.assert_array_equal(out_f["samples"].tokens, out["samples"].tokens)
  chex.assert_trees_all_close(fused["params"], host["params"], atol=1e-5, rtol=1e-5)
  assert int(host["step"]) == 2 and out["metrics"]["skipped"] == 0
  # At the first rollout the adapters are fresh, so the policy equals the reference.
  np.testing.assert_allclose(out["batch"]["old_logp"], out["batch"]["ref_logp"], atol=1e-5)
  merged = trainer.merged_policy(host["params"])
  changed = {p for p, x in _kernel_paths(merged).items()
             if p in _kernel_paths(sft) and not np.array_equal(x, _kernel_paths(sft)[p])}
  assert changed and all(p.endswith("/kernel") and ("/attn/" in p or "/mlp/" in p)
                         for p in changed), changed
