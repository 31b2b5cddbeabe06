"""Reproduction 5 (online vs offline DPO at matched labelled samples): the runlocal variant end
to end."""
import json

import numpy as np

from conftest import run_python
from experiments.online_dpo import run as driver


def test_online_dpo_runlocal_writes_plot_and_table(tmp_path):
  run_python(["-m", "rlhf_jax.main", "--config=experiments/online_dpo/config.py:runlocal",
              f"--workdir={tmp_path}", "--config.export.enabled=False"])
  assert (tmp_path / "online_dpo.png").stat().st_size > 10_000
  table = (tmp_path / "results.md").read_text()
  assert "![online vs offline DPO](online_dpo.png)" in table
  results = json.loads((tmp_path / "results.json").read_text())
  runs = results["runs"]
  assert list(runs) == ["offline", "iterative", "online"]
  # Matched: 64 prompts' pairs and 16 updates for every method.
  assert results["labelled_samples"] == 128 and results["updates"] == 16
  for method, curves in runs.items():
    curve = curves[0]
    # The SFT policy itself (sampler vs full-forward log-probs: not exactly 0).
    assert curve[0]["updates"] == 0 and abs(curve[0]["kl"]) <= 1e-4
    assert curve[-1]["updates"] == 16 and curve[-1]["labelled_pairs"] == 64
    assert curve[0]["gold_reward"] == runs["offline"][0][0]["gold_reward"]  # Same keys.
    assert 0 < curve[-1]["informative_pairs"] <= 64
  assert [p["labelled_pairs"] for p in runs["online"][0]] == [0, 16, 32, 48, 64]
  assert [p["labelled_pairs"] for p in runs["iterative"][0]] == [0, 32, 64]
  # Each verdict of the table is the measured numbers' (recomputed here, not fixed text).
  offline = driver.final(runs["offline"])
  for method in ("online", "iterative"):
    f = driver.final(runs[method])
    se = np.hypot(f["gold_reward_stderr"], offline["gold_reward_stderr"])
    beats = f["gold_reward"] - offline["gold_reward"] > 2 * se
    row = next(l for l in table.splitlines() if l.startswith(
        f"| {driver.LABELS[method]} beats offline DPO's final gold reward"))
    assert row.endswith(f"| {'yes' if beats else 'no'} |"), row
  # Every stage the driver ran left its metrics and resumable checkpoints.
  for mode in ("online", "iterative"):
    logged = (tmp_path / f"{mode}_dpo_seed0" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(logged[-1])["heldout_gold_reward"] == runs[mode][0][-1]["gold_reward"]
