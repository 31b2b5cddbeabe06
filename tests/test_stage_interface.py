"""The uniform stage interface: every stage module imports alone (no stage imports another),
and each runs by itself through default_config() / validate(config) / run(config, workdir)
-> StageResult at a runlocal size, ending with an HF export that reloads to its numbers
(resuming a finished stage is tests/test_resume.py's and the multi-host test's)."""
import importlib
import json

import jax
import numpy as np
import pytest

from conftest import TINY_MODEL, run_python
from rlhf_jax import configs, models
from rlhf_jax.train import stage as stage_lib
from rlhf_jax.train import task as task_lib

STAGE_MODULES = ("sft", "reward", "preference", "rl", "best_of_n")
# Each stage's section and what shrinks it to seconds.
RUNLOCAL = {
    "sft": ("sft", dict(steps=4, rows=4, length=64, eval_every=2, eval_batch_size=16)),
    "reward": ("reward", dict(steps=4, batch_size=8, eval_every=2, eval_batch_size=32,
                              ensemble_size=2)),
    "preference": ("dpo", dict(steps=4, batch_size=8, eval_every=2)),
    "rl": ("ppo", dict(iterations=2, train_prompts=64, prompts_per_iter=8, minibatch_size=8,
                       epochs=1, max_new_tokens=8, eval_every=2, reward_source="gold")),
    "best_of_n": ("best_of_n", dict(n=4, prompts=16, max_new_tokens=12, batch_size=32,
                                    reward_source="gold")),
}


@pytest.mark.parametrize("name", STAGE_MODULES)
def test_each_stage_module_imports_alone(name):
  out = run_python(f"""
import sys
from rlhf_jax.train import {name}
stages = {STAGE_MODULES!r} + ("pipeline",)
print(sorted(m for m in stages if "rlhf_jax.train." + m in sys.modules))
for f in ("default_config", "validate", "run"):
  assert callable(getattr({name}, f)), f
""")
  assert out.strip() == str([name])


def _config(name: str):
  section, shrink = RUNLOCAL[name]
  module = importlib.import_module(f"rlhf_jax.train.{name}")
  c = configs.base_config()
  c.model.update(TINY_MODEL)
  c.task = task_lib.review_world_config()
  c.task.update(n_sft=400, n_eval=32, n_pairs=200, n_eval_pairs=32)
  c.run.update(log_every=1, checkpoint_every=2)
  c[section] = module.default_config()
  c[section].update(shrink)
  c.stages = (section,)
  return module, configs.lock(c)


@pytest.mark.parametrize("name", [m for m in STAGE_MODULES if m != "best_of_n"])
def test_each_stage_runs_alone_through_the_interface(name, tmp_path):
  module, config = _config(name)
  module.validate(config)
  result = module.run(config, str(tmp_path))
  assert isinstance(result, stage_lib.StageResult)
  assert result.workdir == str(tmp_path) and result.hf_dir == str(tmp_path / "hf")
  assert result.metrics and all(np.isfinite(v) for v in result.metrics.values()
                                if isinstance(v, float))
  logged = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert logged[-1]["step"] == (config.ppo.iterations if name == "rl" else
                                config[RUNLOCAL[name][0]].steps)
  ids = np.asarray([[5, 9, 30, 41, 7, 1]], np.int32)
  if name == "reward":  # An ensemble of 2: one export per member.
    for i in range(2):
      loaded_module, loaded = models.load_hf(tmp_path / "hf" / f"member_{i}", role="reward")
      member = jax.tree.map(lambda x: np.asarray(x)[i], result.params)
      np.testing.assert_allclose(loaded_module.apply({"params": loaded}, ids),
                                 result.module.apply({"params": member}, ids), atol=1e-5)
  else:
    loaded_module, loaded = models.load_hf(tmp_path / "hf")
    np.testing.assert_allclose(loaded_module.apply({"params": loaded}, ids),
                               result.module.apply({"params": result.params}, ids), atol=1e-5)


def test_best_of_n_stage_selects_the_best_and_writes_sft_data(tmp_path):
  """Nothing trains: the selection is the result. With the gold reward as the score, the
  selected samples' score is the per-prompt maximum, and the file reads as SFT data."""
  from rlhf_jax import data
  module, config = _config("best_of_n")
  module.validate(config)
  result = module.run(config, str(tmp_path))
  assert isinstance(result, stage_lib.StageResult) and result.hf_dir is None
  m = result.metrics
  assert m["n"] == 4 and m["prompts"] == 16
  np.testing.assert_allclose(m["kl_bound"], np.log(4) - 3 / 4)
  assert m["score_best"] >= m["score_mean"] and m["gold_best"] == m["score_best"]
  rows = [json.loads(l) for l in (tmp_path / "best_of_n.jsonl").read_text().splitlines()]
  assert len(rows) == 16 and all(r["score"] == max(r["scores"]) for r in rows)
  np.testing.assert_allclose(np.mean([r["score"] for r in rows]), m["score_best"])
  examples = data.read_sft(tmp_path / "best_of_n.jsonl")
  assert [e.prompt for e in examples] == [r["prompt"] for r in rows]
  # The selected responses score as recorded under the gold reward.
  world = result.task.world
  gold = [world.score([r["prompt"]], [r["response"]], ended=r["finished"]).reward[0]
          for r in rows]
  np.testing.assert_allclose(gold, [r["score"] for r in rows], rtol=1e-6)


@pytest.mark.parametrize("name", ["rl", "best_of_n"])
def test_policy_stages_refuse_a_reward_model_they_were_not_given(name, tmp_path):
  """reward_source='model' with no reward stage result and no reward_hf_dir names the
  stage's own config keys instead of scoring with nothing."""
  module, config = _config(name)
  section = RUNLOCAL[name][0]
  with config.unlocked():
    config[section].reward_source = "model"
  with pytest.raises(ValueError, match=rf"config\.{section}\.reward_source='model' needs a "
                     rf"reward model.*config\.{section}\.reward_hf_dir"):
    module.run(config, str(tmp_path))
