"""DPO-family training: prefix sharing, precomputed references, a short run that learns."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import ragged_pairs, run_python
from rlhf_jax import data, models, objectives, parallel
from rlhf_jax.train import preference as pref
from rlhf_jax.train import scoring
from rlhf_jax.train import step as step_lib

PROMPT, RESPONSE = 6, 5


@pytest.fixture(scope="module")
def setup():
  cfg = models.get_config("tiny", vocab_size=50, d_model=32, n_layers=2, n_heads=4,
                          n_kv_heads=2, mlp_dim=64)
  module = models.build_model(cfg)
  params = parallel.init_params(module, jax.random.key(0), np.ones((1, 4), np.int32))
  params = jax.tree.map(lambda x: x * 2.0, params)  # Sharper distributions.
  pairs, tok = ragged_pairs(6, PROMPT, RESPONSE)
  return module, params, pairs, tok


def test_shared_prefix_logps_and_grads_match_unshared(setup):
  module, params, pairs, tok = setup
  shared = scoring.collate_pairs(pairs, tok, True)
  unshared = scoring.collate_pairs(pairs, tok, False)
  assert shared["ids"].shape == (6, PROMPT + 2 * RESPONSE)

  def total(p, batch, is_shared):
    s_c, s_r, n_c, n_r = scoring.pair_logps(module, p, batch, prompt_len=PROMPT,
                                         shared_prefix=is_shared)
    return jnp.sum(s_c) - 2 * jnp.sum(s_r), (s_c, s_r, n_c, n_r)

  # Jitted: the eager backward pass of a whole model dispatches op by op (tens of seconds).
  grad = jax.jit(jax.value_and_grad(total, has_aux=True), static_argnums=2)
  (va, a), ga = grad(params, shared, True)
  (vb, b), gb = grad(params, unshared, False)
  for x, y in zip(a, b):
    np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(a[2], [len(p.chosen) for p in pairs])
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5)
  # And both equal an independent per-sequence computation.
  for i, p in enumerate(pairs):
    for resp, got in ((p.chosen, a[0][i]), (p.rejected, a[1][i])):
      seq = np.concatenate([p.prompt, resp])[None]
      logits = module.apply({"params": params}, seq)
      lp = objectives.token_logprobs(logits[:, :-1], seq[:, 1:])[0, len(p.prompt) - 1:]
      np.testing.assert_allclose(got, float(jnp.sum(lp)), atol=1e-5)


def test_kto_mismatched_rows_are_the_shifted_examples_and_sum_logps(setup):
  """The step's KL rows (prompt i, completion i+1 mod B), built on device from the batch, equal
  rows padded on the host from the shifted examples; their log-prob sums equal full forwards."""
  module, params, pairs, tok = setup
  unpaired = [data.TokenizedUnpaired(p.prompt, c, good) for p in pairs
              for c, good in ((p.chosen, True), (p.rejected, False))]
  batch = pref.collate_unpaired(unpaired, tok)
  assert set(batch) == {"ids", "mask", "loss_mask", "desirable"}
  successors = pref.stream_successors(len(unpaired), 1)
  np.testing.assert_array_equal(successors, (np.arange(len(unpaired)) + 1) % len(unpaired))
  kl_ids, kl_mask, kl_loss = jax.jit(lambda b: pref.mismatched_rows(b, PROMPT, successors))(
      batch)
  shifted = [data.TokenizedUnpaired(e.prompt, unpaired[(i + 1) % len(unpaired)].completion,
                                    e.desirable) for i, e in enumerate(unpaired)]
  want = data.pad_unpaired(shifted, PROMPT, RESPONSE, tok.pad_id).sequences
  np.testing.assert_array_equal(kl_ids, want.input_ids)
  np.testing.assert_array_equal(kl_mask, want.attention_mask)
  np.testing.assert_array_equal(kl_loss, want.loss_mask)
  sums, counts = scoring.response_sums(module, params, kl_ids, kl_mask, kl_loss, PROMPT)
  for i, e in enumerate(shifted):
    seq = np.concatenate([e.prompt, e.completion])[None]
    logits = module.apply({"params": params}, seq)
    lp = objectives.token_logprobs(logits[:, :-1], seq[:, 1:])[0, len(e.prompt) - 1:]
    np.testing.assert_allclose(sums[i], float(jnp.sum(lp)), atol=1e-5)
    assert counts[i] == len(e.completion)


@pytest.mark.parametrize("processes,local", [(1, 6), (2, 3), (3, 2), (4, 4)])
def test_stream_successors_follow_the_data_iterator(processes, local):
  """Assemble global batches the way multi-process training does (each process's local batch
  from its own DataIterator, in process order): every row's successor holds the next example
  of the single-process stream, so KTO pairs the same examples for every process count."""
  source = list(range(50))
  its = [data.DataIterator(source, data.PaddedBatcher(local, np.asarray), seed=3,
                           process_index=p, process_count=processes) for p in range(processes)]
  whole = data.DataIterator(source, data.PaddedBatcher(local * processes, np.asarray), seed=3,
                            process_index=0, process_count=1)
  successors = pref.stream_successors(local * processes, processes)
  for _ in range(4):
    rows = np.concatenate([next(it) for it in its])
    stream = next(whole)  # The same examples, in stream order.
    np.testing.assert_array_equal(np.sort(rows), np.sort(stream))
    following = {a: b for a, b in zip(stream, np.roll(stream, -1))}
    np.testing.assert_array_equal(rows[successors], [following[x] for x in rows])
  with pytest.raises(ValueError, match="does not split over 4 processes"):
    pref.stream_successors(6, 4)


def _dpo_cfg(**kw):
  cfg = pref.default_config()
  cfg.update(kw)
  return cfg


def test_precomputed_reference_gives_the_same_losses_as_the_model(setup):
  module, params, pairs, tok = setup
  policy = jax.tree.map(lambda x: x * 1.1, params)  # Policy != reference.
  tx = optax.sgd(0.05)
  mesh = parallel.make_mesh({"data": 1})
  losses = {}
  for mode in ("model", "precomputed"):
    cfg = _dpo_cfg(reference=mode, batch_size=6)
    batch = scoring.collate_pairs(pairs, tok, False)
    extra = ()
    state = {"params": policy, "opt": tx.init(policy), "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.key_data(jax.random.key(0))}
    if mode == "model":
      state["ref"], extra = params, ("ref",)
    else:
      ref_c, ref_r = scoring.score_pairs(module, params, pairs, tok, mesh, 6, False)
      batch = {**batch, "ref_chosen": ref_c, "ref_rejected": ref_r}
    step = jax.jit(step_lib.make_train_step(pref.preference_loss_fn(module, cfg, PROMPT), tx,
                                            state_extra=extra))
    out = []
    for _ in range(3):
      state, metrics = step(state, batch)
      out.append(float(metrics["loss"]))
    losses[mode] = out
  np.testing.assert_allclose(losses["precomputed"], losses["model"], rtol=1e-6, atol=0)
  assert losses["model"][2] < losses["model"][0]


def test_reference_cache_is_reused_and_invalidated(setup, tmp_path):
  module, params, pairs, tok = setup
  mesh = parallel.make_mesh({"data": 1})
  cfg = _dpo_cfg(reference="precomputed", batch_size=4)
  path = str(tmp_path / "ref.npz")
  first = pref.cached_reference_logps(path, module, params, pairs, tok, mesh, cfg)
  stamp = (tmp_path / "ref.npz").stat().st_mtime_ns
  again = pref.cached_reference_logps(path, module, params, pairs, tok, mesh, cfg)
  assert (tmp_path / "ref.npz").stat().st_mtime_ns == stamp
  np.testing.assert_array_equal(first[0], again[0])
  other = pref.cached_reference_logps(path, module, params, pairs[:-1], tok, mesh, cfg)
  assert len(other[0]) == len(pairs) - 1


def test_short_dpo_run_learns(tmp_path):
  run_python(["-m", "rlhf_jax.main", "--config=experiments/dpo/review_world.py:runlocal",
              f"--workdir={tmp_path}", "--config.sft.steps=40", "--config.dpo.steps=40",
              "--config.dpo.eval_every=20", "--config.run.log_every=5",
              "--config.task.n_pairs=600", "--config.task.n_sft=1000"])
  logged = [json.loads(l) for l in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
  first, last = logged[0], logged[-1]
  assert last["step"] == 40
  assert np.mean([m["loss"] for m in logged[-3:]]) < first["loss"] < 0.7
  assert last["eval_reward_accuracy"] > 0.55


def test_tr_dpo_sync_moves_the_reference_every_k_steps():
  sync = pref.tr_dpo_sync(every=2, alpha=0.25)
  state = {"params": {"w": jnp.full((2,), 4.0)}, "ref": {"w": jnp.zeros((2,))},
           "step": jnp.asarray(1, jnp.int32)}
  assert float(sync(state)["ref"]["w"][0]) == 0.0  # Step 1: not due.
  state["step"] = jnp.asarray(2, jnp.int32)
  np.testing.assert_allclose(sync(state)["ref"]["w"], 1.0)  # 0.25 * 4 + 0.75 * 0.
