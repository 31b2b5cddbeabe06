"""IPO vs DPO on deterministic preferences (Azar et al. 2024, "A General Theoretical Paradigm to
Understand Learning from Human Preferences", arXiv:2310.12036, sections 4.2 and 5.1).

  python -m rlhf_jax.main --config=experiments/ipo_vs_dpo/config.py --workdir=DIR
  python -m rlhf_jax.main --config=experiments/ipo_vs_dpo/config.py:runlocal --workdir=DIR

A bandit: a tabular softmax policy over a handful of one-token responses, starting at a
non-uniform reference policy. Every response of the `winners` set is compared with every other
(losing) response, and the comparison is deterministic (the winner is always preferred). The paper's
argument: with P(y_w ≻ y_l) = 1 the Bradley–Terry reward gap is infinite, so DPO's optimum
sends the losers' probability to 0 whatever β (the KL regulariser is ignored); IPO regresses
the log-ratio margin h = log π(y_w)π_ref(y_l) / (π(y_l)π_ref(y_w)) onto 1/(2τ) and keeps a
finite, τ-controlled solution. Both losses are the library's (objectives.PREFERENCE_LOSSES
"sigmoid" and "ipo"); each sweep over β (τ) is one vmapped, scanned program.

Optimiser: sign descent (each logit moves by ±lr, the sign of its gradient) with a cosine decay
of lr to 0. It asks only where the objective points, not how steeply: DPO's gradient keeps its
sign for every finite margin (there is no minimiser), so the margin keeps growing; IPO's
gradient changes sign at its fixed point, where the decaying steps settle. Magnitude-based
optimisers tell the same story, slower at large β (DPO's gradient is ∝ β·σ(−βh), which
vanishes exponentially in βh; Adam's second-moment memory then shrinks its steps too, so with
Adam β = 5 had only reached loser mass 0.40 after 1000 steps).
Expected cost: a few seconds (two compiles); runlocal the same with fewer steps.
"""
import ml_collections

from rlhf_jax import configs


def get_config(arg=None):
  arg = configs.parse_arg(arg, runlocal=False)
  c = ml_collections.ConfigDict()
  c.driver = "experiments.ipo_vs_dpo.run:run"  # No library stages: a bandit of its own.
  c.seed = 0
  c.bandit = ml_collections.ConfigDict(dict(
      # π_ref over 5 responses; responses 0 and 1 beat every other response.
      ref_probs=(0.05, 0.15, 0.2, 0.25, 0.35), winners=(0, 1),
      betas=(0.05, 0.1, 0.5, 1.0, 5.0),  # DPO β and IPO τ (the same sweep for both).
      steps=4000, lr=0.05, log_every=10,
      # Checks: DPO's final loser mass must be below this; IPO's margin within this of 1/(2τ).
      dpo_loser_mass_below=1e-3, ipo_margin_tol=1e-3))
  if arg.runlocal:
    c.bandit.steps, c.bandit.log_every = 1000, 5
  return configs.lock(c)
