"""The README's main job, shrunk: every quickstart stage runs and the table is written."""
import json

from conftest import run_python


def test_quickstart_runlocal_end_to_end(tmp_path):
  out = run_python(["-m", "rlhf_jax.main", "--config=experiments/quickstart/config.py:runlocal",
                    f"--workdir={tmp_path}", "--config.sft.steps=40", "--config.reward.steps=20",
                    "--config.dpo.steps=10", "--config.ppo.iterations=2",
                    "--config.sampling.train_prompts=32", "--config.sampling.eval_prompts=16",
                    "--config.eval.prompts=16", "--config.task.n_sft=1000"])
  results = json.loads((tmp_path / "quickstart_results.json").read_text())
  assert "| RM | held-out accuracy vs gold labels" in out
  assert "| PPO | KL(π‖π_SFT)" in out and "| DPO | KL(π‖π_SFT)" in out
  assert (tmp_path / "quickstart_results.md").read_text().startswith("| stage |")
  # The plot (gold reward vs KL, training curves) and the report that embeds it.
  assert (tmp_path / "quickstart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "](quickstart.png)" in (tmp_path / "results.md").read_text()
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["driver"] == "experiments.quickstart.run:run"
  assert saved["stages"] == ["sft", "pairs", "reward", "dpo", "ppo"]
  # 40 SFT steps already beat a uniform guess over the 274-word vocabulary by far.
  assert results["sft"]["eval_perplexity"] < 60
  # The reward model learns (20 steps are too few for a held-out accuracy worth asserting).
  logged = [json.loads(l) for l in (tmp_path / "reward" / "metrics.jsonl").read_text().splitlines()]
  assert logged[-1]["loss"] < logged[0]["loss"] - 0.05
  assert results["reward_model"]["eval_pairs"] > 0 and results["reward_model"]["train_pairs"] > 0
  assert results["sft"]["samples"] == 32  # 16 prompts x k = 2.
  for policy in ("dpo", "ppo"):
    assert results[policy]["kl"] >= -0.5 and results[policy]["samples"] == 32
  for stage, steps in (("sft", 40), ("reward", 20), ("dpo", 10), ("ppo", 2)):
    lines = (tmp_path / stage / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == steps
    # Every stage ends with its HF export and its curves.
    assert (tmp_path / stage / "hf" / "config.json").exists()
    assert (tmp_path / stage / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_foundation_smoke_run(tmp_path):
  out = run_python(["-m", "rlhf_jax.smoke", f"--workdir={tmp_path}", "--steps=2"])
  summary = json.loads(out.strip().splitlines()[-1])
  assert summary["last_loss"] < summary["first_loss"]
  assert summary["export_max_abs_logit_diff"] <= 1e-5
