"""Reproduction 4 (RLOO / GRPO vs PPO with matched samples): the runlocal variant end to end."""
import json

from conftest import run_python


def test_critic_free_runlocal_writes_plot_and_table(tmp_path):
  out = run_python(["-m", "rlhf_jax.main",
                    "--config=experiments/critic_free/review_world.py:runlocal",
                    f"--workdir={tmp_path}"])
  assert "| RLOO matches or beats PPO's gold reward at matched samples |" in out
  assert (tmp_path / "critic_free.png").stat().st_size > 10_000
  table = (tmp_path / "results.md").read_text()
  assert "![critic-free vs PPO](critic_free.png)" in table
  runs = json.loads((tmp_path / "results.json").read_text())["runs"]
  assert list(runs) == ["ppo", "rloo", "grpo"]
  # Matched samples: the same rollouts per iteration (PPO 32 prompts × 1, the others 8 × 4).
  assert {r["rollouts_per_iteration"] for r in runs.values()} == {32}
  assert [runs[a]["epochs"] for a in runs] == [2, 1, 1]
  for r in runs.values():
    curve = r["seeds"][0]["curve"]
    assert [p["step"] for p in curve] == [0, 1, 2]
    assert abs(curve[0]["kl"]) <= 1e-5  # The SFT policy itself (sampler vs full-forward log-probs).
    m = r["memory"]
    assert m["peak_bytes"] == (m["argument_bytes"] + m["output_bytes"] + m["temp_bytes"]
                               - m["alias_bytes"]) > 0
  # PPO carries a value network (params, moments, forward/backward): more memory than either.
  assert runs["ppo"]["memory"]["peak_bytes"] > runs["rloo"]["memory"]["peak_bytes"]
  assert runs["ppo"]["memory"]["peak_bytes"] > runs["grpo"]["memory"]["peak_bytes"]
