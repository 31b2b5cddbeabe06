"""Reproduction (b) of issue 18 (GRPO vs Dr. GRPO vs DAPO on the arithmetic world): the runlocal
variant end to end."""
import json

import numpy as np

from conftest import run_python
from experiments.grpo_variants import run as driver


def test_grpo_variants_runlocal_writes_plot_table_and_json(tmp_path):
  run_python(["-m", "rlhf_jax.main", "--config=experiments/grpo_variants/config.py:runlocal",
              f"--workdir={tmp_path}"])
  assert (tmp_path / "grpo_variants.png").stat().st_size > 10_000
  table = (tmp_path / "results.md").read_text()
  assert "![GRPO variants](grpo_variants.png)" in table
  runs = json.loads((tmp_path / "results.json").read_text())["runs"]
  assert list(runs) == ["grpo", "dr_grpo", "dapo"]
  for name in ("SFT", "GRPO", "Dr. GRPO", "DAPO"):
    assert any(l.startswith(f"| {name} |") for l in table.splitlines()), name
  # Matched prompts per iteration, group size and iterations; DAPO's over-sampled prompts are
  # counted in the samples it drew.
  assert {(r["prompts_per_iter"], r["group_size"], r["iterations"]) for r in runs.values()} == {
      (8, 4, 2)}
  assert [r["oversample"] for r in runs.values()] == [1, 1, 2]
  for r in runs.values():
    expected = r["iterations"] * r["prompts_per_iter"] * r["oversample"] * r["group_size"]
    assert r["samples_drawn"] == expected
    for s in r["seeds"]:
      assert [p["step"] for p in s["curve"]] == [0, 1, 2]
      assert [t["samples_drawn"] for t in s["train"]] == [
          i * r["samples_per_iteration"] for i in (1, 2)]
      assert s["curve"][-1]["samples_drawn"] == r["samples_drawn"]
      assert abs(s["curve"][0]["kl"]) <= 1e-5  # The SFT policy itself.
      for p in s["curve"]:
        assert all(np.isfinite(p[k]) for k in ("gold_reward", "kl", "response_length"))
      for t in s["train"]:
        assert all(np.isfinite(t[k]) for k in ("accuracy", "response_length", "kl"))
  assert runs["dapo"]["samples_drawn"] == 2 * runs["grpo"]["samples_drawn"] == 128
  assert all(t["kept_groups"] is not None for t in runs["dapo"]["seeds"][0]["train"])
  assert all(t["kept_groups"] is None for t in runs["grpo"]["seeds"][0]["train"])
  # The table's verdicts are the measured numbers' (recomputed here, not fixed text).
  g, d = driver.final(runs["grpo"]), driver.final(runs["dr_grpo"])
  se = np.hypot(g["gold_reward_stderr"], d["gold_reward_stderr"])
  matches = abs(d["gold_reward"] - g["gold_reward"]) <= 2 * se
  row = next(l for l in table.splitlines() if l.startswith("| Dr. GRPO matches GRPO's accuracy"))
  assert row.endswith(f"| {'yes' if matches else 'no'} |"), row
  for v in runs:
    f = driver.final(runs[v])
    assert np.isfinite(f["gold_reward"]) and np.isfinite(f["kl"])
