"""The IPO vs DPO bandit reproduction: its predictions, and the runlocal variant end to end."""
import json

import numpy as np

from conftest import run_python
from experiments.ipo_vs_dpo import run as ipo_dpo


def test_pairs_and_ipo_prediction():
  chosen, rejected = ipo_dpo.preference_pairs(4, (0,))
  assert list(zip(chosen, rejected)) == [(0, 1), (0, 2), (0, 3)]
  ref = np.asarray([0.1, 0.2, 0.3, 0.4])
  margins, policy = ipo_dpo.ipo_prediction(ref, chosen, rejected, tau=0.25)
  np.testing.assert_allclose(margins, 2.0)  # 1/(2τ), reachable exactly on this pair graph.
  # By hand: log-ratio s_0 − s_l = 2 for every loser l, so π ∝ (0.1 e², 0.2, 0.3, 0.4).
  want = np.asarray([0.1 * np.exp(2), 0.2, 0.3, 0.4])
  np.testing.assert_allclose(policy, want / want.sum(), rtol=1e-12)


def test_runlocal_end_to_end(tmp_path):
  run_python(["-m", "rlhf_jax.main",
              "--config=experiments/ipo_vs_dpo/config.py:runlocal", f"--workdir={tmp_path}"])
  for name in ("ipo_vs_dpo.png", "results.md", "results.json"):
    assert (tmp_path / name).stat().st_size > 0, name
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["all_checks_pass"]
  # The limits themselves, from the trajectories: DPO's loser mass falls below 1e-3 for every
  # β; IPO's mean margin sits at 1/(2τ).
  assert np.all(np.exp(np.asarray(results["dpo"]["log_loser_mass"])[:, -1]) < 1e-3)
  final = np.asarray(results["ipo"]["mean_margin"])[:, -1]
  np.testing.assert_allclose(final, 1 / (2 * np.asarray(results["betas"])), rtol=1e-3)
  assert "| IPO | τ = 0.5 | margin" in (tmp_path / "results.md").read_text()
