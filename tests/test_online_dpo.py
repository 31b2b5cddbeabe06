"""Online and iterative DPO (train/online_dpo.py): the runlocal config beats SFT on held-out gold
reward; pairs are samples of the current policy, labelled by the configured source; iterative
mode runs its rounds and moves the reference as configured; config errors name their keys; a
stopped run resumes from its saved iteration and ends where an unbroken one does."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY_MODEL, experiment_config, ppo_world
from rlhf_jax import configs, parallel, rng
from rlhf_jax.train import online_dpo, pipeline, sft
from rlhf_jax.train import stage as stage_lib
from rlhf_jax.train import task as task_lib


def longer_is_better(prompt: str, response: str) -> float:
  """A grader for the tests: the number of words of the response."""
  del prompt
  return float(len(response.split()))


def needs_a_reference(prompt: str, response: str, reference: str) -> float:
  del prompt, response, reference
  return 0.0


def _config(stages=("online_dpo",), **overrides):
  """A fresh tiny policy (no SFT: these tests are about the mechanics) and a small online DPO
  section labelled by the gold reward, unlocked for the test to change."""
  c = configs.base_config()
  c.model.update(TINY_MODEL)
  c.task = task_lib.review_world_config()
  c.task.update(n_sft=400, n_eval=32, n_pairs=200, n_eval_pairs=32)
  c.run.update(log_every=1, checkpoint_every=1)
  c.export.enabled = False
  c.online_dpo = online_dpo.default_config()
  c.online_dpo.update(dict(iterations=3, prompts_per_iter=16, rounds=2, prompts_per_round=16,
                           steps_per_round=3, train_prompts=64, max_new_tokens=12,
                           batch_size=8, reward_source="gold", eval_every=0))
  c.online_dpo.optim.lr = 1e-3
  c.online_dpo.update(overrides)
  c.stages = tuple(stages)
  return c


def _trainer(config, **kw):
  task, mesh, module, params, _ = stage_lib.start_policy(config, online_dpo.NAME, None)
  trainer = online_dpo.OnlineDPOTrainer(config, task, mesh, module, **kw)
  state = trainer.init_state(params, params, rng.key(config.seed, online_dpo.NAME))
  return trainer, state, params, online_dpo.prompt_iterator(task, config, 0)


def _logged(workdir):
  return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# The acceptance test: the runlocal config raises held-out gold reward above SFT
# ---------------------------------------------------------------------------------------------


def test_runlocal_online_dpo_beats_sft_on_heldout_gold_reward(tmp_path):
  config = experiment_config("online_dpo/review_world.py", "runlocal", tiny=False)
  config.export.enabled = False
  config.eval.prompts, config.eval.k = 64, 4  # 256 held-out samples: s.e. ~0.02.
  pipeline.validate(config)
  pipeline.preflight(config)
  out = pipeline.run(config, str(tmp_path))
  sft, online = out.evaluation["sft"], out.evaluation["online_dpo"]
  assert sft["samples"] == online["samples"] == 256
  # Same prompts and sampling keys for both; the margin is two standard errors of the
  # difference as if the two were independent (conservative under common random numbers).
  se = float(np.hypot(sft["gold_reward_stderr"], online["gold_reward_stderr"]))
  assert online["gold_reward"] > sft["gold_reward"] + 2 * se, (sft, online)
  assert 0 < online["kl"] < 10
  logged = _logged(tmp_path / "online_dpo")
  assert [m["step"] for m in logged] == list(range(1, config.online_dpo.iterations + 1))
  for m in logged:  # Gold labels: the chosen sample scores higher, every iteration.
    assert m["label/chosen"] > m["label/rejected"] and m["skipped"] == 0
    for key in ("loss", "rewards/accuracies", "rewards/margins", "label/margin", "kl",
                "gold_reward", "informative_pairs", "response_length"):
      assert np.isfinite(m[key]), key
  assert logged[0]["kl"] == 0.0  # The first samples are the reference's own.
  # The stage's own final evaluation is the pipeline's (same prompts, same keys).
  assert logged[-1]["heldout_gold_reward"] == pytest.approx(online["gold_reward"])


# ---------------------------------------------------------------------------------------------
# Pairs: the current policy's samples, labelled by the source
# ---------------------------------------------------------------------------------------------


def test_select_pairs_by_hand():
  r = [np.asarray(x) for x in ([5, 1], [6, 1], [7, 1], [7, 2, 1], [8, 1], [9, 1])]
  # best_worst, k = 2: (1 over 0); a tie (masked); (5 over 4).
  chosen, rejected, ok = online_dpo.select_pairs(
      np.asarray([0.1, 0.5, 0.3, 0.3, 0.2, 0.9]), r, 2, "best_worst")
  assert chosen.tolist() == [1, 2, 5] and rejected.tolist() == [0, 2, 4]
  assert ok.tolist() == [True, False, True]
  # all, k = 3: every pair of each prompt's samples, the higher score chosen.
  chosen, rejected, ok = online_dpo.select_pairs(
      np.asarray([0.1, 0.5, -0.2, 0.4, 0.6, 0.7]), r, 3, "all")
  assert chosen.tolist() == [1, 0, 1, 4, 5, 5] and rejected.tolist() == [0, 2, 2, 3, 3, 4]
  assert ok.tolist() == [True, True, True, True, True, True]
  r[3] = r[2]  # Identical responses say nothing, whatever their scores.
  chosen, rejected, ok = online_dpo.select_pairs(
      np.asarray([0.1, 0.2, 0.3, 0.4]), r[:4], 2, "best_worst")
  assert ok.tolist() == [True, False]
  order = online_dpo.minibatch_order(jax.random.key(0), 8, 3, 4)
  assert order.shape == (3, 4) and sorted(order.ravel()[:8].tolist()) == list(range(8))


def test_pairs_are_samples_of_the_current_policy_labelled_by_gold():
  config = _config()
  trainer, state, sft_params, prompts = _trainer(config)
  world = trainer.task.world
  with parallel.mesh_context(trainer.mesh, config.sharding):
    first = next(prompts)
    key1 = trainer.iteration_key(state, online_dpo.ROLLOUT_STREAM)
    state, m1, r1 = trainer.host_iteration(state, first)
    before = jax.tree.map(jnp.copy, state["params"])
    second = next(prompts)
    key2 = trainer.iteration_key(state, online_dpo.ROLLOUT_STREAM)
    state, m2, r2 = trainer.host_iteration(state, second)
    sft_first = trainer.rollout(sft_params, first, key1)[3]
    current = trainer.rollout(before, second, key2)[3]
    sft_second = trainer.rollout(sft_params, second, key2)[3]
  # Iteration 1 samples the starting policy; iteration 2 the policy iteration 1 left, which
  # differs from the starting policy's samples under the same key.
  np.testing.assert_array_equal(r1["tokens"], sft_first.tokens)
  np.testing.assert_array_equal(r2["tokens"], current.tokens)
  assert (r2["tokens"] != sft_second.tokens).any()
  assert m1["updates"] > 0 and m1["kl"] == 0.0 and m2["kl"] != 0.0
  # Gold labels: the scores are the world's gold reward, the chosen scores higher.
  for r, batch in ((r1, first), (r2, second)):
    rows = [ids[m > 0] for ids, m in zip(batch["ids"], batch["mask"])]
    gold = world.score_ids(rows, list(r["tokens"])).reward
    np.testing.assert_allclose(r["scores"], gold)
    ok = r["informative"]
    assert ok.sum() >= len(ok) // 2 and len(ok) == config.online_dpo.prompts_per_iter
    assert np.all(gold[r["chosen"][ok]] > gold[r["rejected"][ok]])
    # Each pair's two samples answer the same prompt (rows i·k .. i·k + k − 1 of prompt i).
    assert np.all(r["chosen"] // 2 == r["rejected"] // 2)


@pytest.mark.parametrize("source", ["model", "grader"])
def test_labels_follow_the_reward_model_or_the_grader(source):
  config = _config(reward_source=source,
                   grader="test_online_dpo:longer_is_better" if source == "grader" else "",
                   pairs="all", samples_per_prompt=4, prompts_per_iter=8)
  kw = {}
  if source == "model":
    mesh = parallel.make_mesh(config.mesh.to_dict())
    _, _, _, rm_module, rm_params = ppo_world(config, mesh)
    kw["rm"] = (rm_module, rm_params)
  trainer, state, _, prompts = _trainer(config, **kw)
  with parallel.mesh_context(trainer.mesh, config.sharding):
    batch = next(prompts)
    ids, mask, samples, host = trainer.rollout(
        state["params"], batch, trainer.iteration_key(state, online_dpo.ROLLOUT_STREAM))
    expected = (np.asarray(trainer._rm_scores(rm_params, ids, mask, samples))
                if source == "model" else None)
    state, metrics, r = trainer.host_iteration(state, batch)
  if source == "grader":  # Words of each response, up to (not including) its EOS.
    expected = [len(trainer.task.decode(t[:n - f]).split()) for t, n, f in
                zip(host.tokens, host.lengths, host.finished.astype(int))]
  np.testing.assert_allclose(r["scores"], expected, rtol=1e-5)
  ok = r["informative"]
  assert len(ok) == 8 * 6 and ok.any()  # "all" pairs of 4 samples: 6 per prompt.
  assert np.all(r["scores"][r["chosen"][ok]] > r["scores"][r["rejected"][ok]])
  assert metrics["label/margin"] > 0 and metrics["skipped"] == 0


# ---------------------------------------------------------------------------------------------
# Iterative mode, the reference, resume
# ---------------------------------------------------------------------------------------------


def test_iterative_mode_runs_its_rounds(tmp_path):
  config = configs.lock(_config(mode="iterative", reference="last_round"))
  result = online_dpo.run(config, str(tmp_path))
  logged = _logged(tmp_path)
  assert [m["step"] for m in logged] == [1, 2]
  assert all(m["pairs"] == 16 and m["updates"] == 3 for m in logged)
  assert result.metrics["iterations"] == 2 and result.metrics["labelled_pairs"] == 32


@pytest.mark.parametrize("reference", ["fixed", "last_round"])
def test_the_reference_stays_or_moves_to_the_last_round(reference):
  config = _config(mode="iterative", reference=reference, rounds=1)
  trainer, state, sft_params, prompts = _trainer(config)
  with parallel.mesh_context(trainer.mesh, config.sharding):
    state, _, _ = trainer.host_iteration(state, next(prompts))
  expected = state["params"] if reference == "last_round" else sft_params
  jax.tree.map(np.testing.assert_array_equal, state["ref"], expected)
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), state["params"],
                                       sft_params))
  assert any(moved)


def test_a_stopped_run_resumes_from_its_saved_iteration(tmp_path, monkeypatch):
  config = _config(iterations=4)
  config.run.checkpoint_every = 2  # The stop comes after iteration 2's checkpoint.
  config = configs.lock(config)
  straight = online_dpo.run(config, str(tmp_path / "straight"))
  original = online_dpo.OnlineDPOTrainer.iteration

  def stop_at_the_third(self, state, prompts):
    if int(state["iteration"]) == 2:
      raise RuntimeError("stopped")
    return original(self, state, prompts)
  monkeypatch.setattr(online_dpo.OnlineDPOTrainer, "iteration", stop_at_the_third)
  with pytest.raises(RuntimeError, match="stopped"):
    online_dpo.run(config, str(tmp_path / "resumed"))
  assert [m["step"] for m in _logged(tmp_path / "resumed")] == [1, 2]
  monkeypatch.undo()
  resumed = online_dpo.run(config, str(tmp_path / "resumed"))
  assert [m["step"] for m in _logged(tmp_path / "resumed")] == [1, 2, 3, 4]
  assert resumed.metrics["iterations"] == 4
  # The same samples, pairs and updates as the run that was never stopped.
  jax.tree.map(np.testing.assert_array_equal, resumed.params, straight.params)
  for a, b in zip(_logged(tmp_path / "resumed"), _logged(tmp_path / "straight")):
    assert a["label/margin"] == b["label/margin"] and a["loss"] == b["loss"]


# ---------------------------------------------------------------------------------------------
# Config errors name their keys
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, key", [
    (dict(mode="offline"), "config.online_dpo.mode"),
    (dict(reward_source="human"), "config.online_dpo.reward_source"),
    (dict(loss="kto"), "config.online_dpo.loss"),
    (dict(loss="dpo"), "config.online_dpo.loss"),
    (dict(samples_per_prompt=1), "config.online_dpo.samples_per_prompt"),
    (dict(batch_size=12), "config.online_dpo.batch_size"),
    (dict(beta=0.0), "config.online_dpo.beta"),
    (dict(iterations=0), "config.online_dpo.iterations"),
    (dict(mode="iterative", steps_per_round=0), "config.online_dpo.steps_per_round"),
    (dict(reference="last_round"), "config.online_dpo.reference"),
    (dict(reward_source="grader"), "config.online_dpo.grader"),
    (dict(reward_source="grader", grader="no_such_module:fn"), "config.online_dpo.grader"),
    (dict(reward_source="grader", grader="test_online_dpo:needs_a_reference"),
     "config.online_dpo.grader"),
    (dict(grader="test_online_dpo:longer_is_better"), "config.online_dpo.grader"),
    (dict(train_prompts=8), "config.online_dpo.train_prompts"),
])
def test_config_errors_name_their_keys(overrides, key):
  config = _config(**overrides)
  with pytest.raises(ValueError, match=key.replace(".", r"\.")):
    online_dpo.validate(config)


def test_pipeline_refuses_model_labels_without_a_reward_model_and_lora():
  config = _config(stages=("sft", "online_dpo"), reward_source="model")
  config.sft = sft.default_config()
  with pytest.raises(ValueError, match=r"config\.online_dpo\.reward_source='model'"):
    pipeline.validate(config)
  config = _config()
  config.lora.rank = 4
  with pytest.raises(ValueError, match=r"config\.lora\.rank"):
    online_dpo.validate(config)
