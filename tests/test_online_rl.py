"""Short online-RL runs on the embedded task: the gold reward rises over SFT."""
import json

import pytest

from conftest import run_python


def test_ppo_on_gold_reward_beats_sft(tmp_path):
  run_python(["-m", "rlhf_jax.main", "--config=experiments/ppo/review_world.py:runlocal,"
              "reward=gold", f"--workdir={tmp_path}", "--config.ppo.iterations=12",
              "--config.ppo.optim.lr=3e-4", "--config.sft.steps=60", "--config.eval.prompts=64",
              "--config.eval.k=4"])
  results = json.loads((tmp_path / "results.json").read_text())["evaluation"]
  sft, ppo = results["sft"], results["ppo"]
  assert sft["samples"] == ppo["samples"] == 256
  assert ppo["gold_reward"] > sft["gold_reward"] + 2 * ppo["gold_reward_stderr"]
  assert 0 < ppo["kl"] < 10
  logged = [json.loads(l) for l in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in logged] == list(range(1, 13))
  for key in ("kl", "kl_coef", "entropy", "policy/clipfrac", "policy/approx_kl",
              "value/explained_variance", "response_length", "no_eos_fraction", "distinct_2",
              "gold_reward"):
    assert key in logged[-1], key
  assert "sft_heldout_perplexity" in logged[2]  # eval_every = 3 in runlocal.


@pytest.mark.parametrize("algo, slots", [("grpo", 0), ("rloo", 8)])
def test_critic_free_methods_run(tmp_path, algo, slots):
  """RLOO samples its rollouts with continuous batching (8 slots) and scores and updates on
  packed rollouts."""
  run_python(["-m", "rlhf_jax.main", f"--config=experiments/ppo/review_world.py:runlocal,"
              f"algo={algo},reward=gold", f"--workdir={tmp_path}", "--config.ppo.iterations=2",
              "--config.sft.steps=20", "--config.eval.prompts=8", f"--config.ppo.slots={slots}",
              f"--config.ppo.packing.enabled={bool(slots)}"])
  results = json.loads((tmp_path / "results.json").read_text())["evaluation"]
  assert results[algo]["samples"] == 16
  logged = [json.loads(l) for l in (tmp_path / algo / "metrics.jsonl").read_text().splitlines()]
  assert len(logged) == 2 and all(m["skipped"] == 0 for m in logged)
