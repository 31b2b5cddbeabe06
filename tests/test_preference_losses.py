"""Preference losses (DPO family) and KTO against values computed here with Python's math
module, at huge margins, through gradients, and in their documented limits."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import objectives
from rlhf_jax.objectives import PREFERENCE_LOSSES, PreferenceLogps, kto_loss


# ----------------------------------------------------------------------------------------
# Independent scalar references (Python floats, math only).
# ----------------------------------------------------------------------------------------

def ls(x):
  """log σ(x), stable for any float."""
  return x - math.log1p(math.exp(x)) if x < 0 else -math.log1p(math.exp(-x))


def sig(x):
  return math.exp(ls(x))


def ref_sigmoid(pc, pr, rc, rr, ct, rt, beta, label_smoothing=0.0):
  x = beta * ((pc - rc) - (pr - rr))
  return -(1 - label_smoothing) * ls(x) - label_smoothing * ls(-x)


def ref_robust(pc, pr, rc, rr, ct, rt, beta, label_smoothing=0.0):
  x = beta * ((pc - rc) - (pr - rr))
  e = label_smoothing
  return (-(1 - e) * ls(x) + e * ls(-x)) / (1 - 2 * e)


def ref_hinge(pc, pr, rc, rr, ct, rt, beta):
  return max(0.0, 1 - beta * ((pc - rc) - (pr - rr)))


def ref_ipo(pc, pr, rc, rr, ct, rt, beta, length_normalized=True):
  if length_normalized:
    h = (pc - rc) / ct - (pr - rr) / rt
  else:
    h = (pc - rc) - (pr - rr)
  return (h - 1 / (2 * beta)) ** 2


def ref_sppo_hard(pc, pr, rc, rr, ct, rt, beta):
  return ((pc - rc) - 0.5 / beta) ** 2 + ((pr - rr) + 0.5 / beta) ** 2


def ref_nca_pair(pc, pr, rc, rr, ct, rt, beta):
  a, b = beta * (pc - rc), beta * (pr - rr)
  return -ls(a) - 0.5 * ls(-a) - 0.5 * ls(-b)


def ref_apo_zero(pc, pr, rc, rr, ct, rt, beta):
  return (1 - sig(beta * (pc - rc))) + sig(beta * (pr - rr))


def ref_apo_down(pc, pr, rc, rr, ct, rt, beta):
  return sig(beta * (pc - rc)) + (1 - sig(beta * ((pc - rc) - (pr - rr))))


def ref_simpo(pc, pr, rc, rr, ct, rt, beta, gamma=0.5):
  return -ls(beta * (pc / ct - pr / rt) - gamma)


def ref_orpo(pc, pr, rc, rr, ct, rt, beta):
  aw, al = pc / ct, pr / rt
  log_odds = (aw - al) - (math.log(-math.expm1(aw)) - math.log(-math.expm1(al)))
  return -aw - beta * ls(log_odds)


REFERENCES = {
    "sigmoid": (ref_sigmoid, [{}, {"label_smoothing": 0.1}, {"label_smoothing": 0.3}]),
    "robust": (ref_robust, [{}, {"label_smoothing": 0.1}, {"label_smoothing": 0.3}]),
    "hinge": (ref_hinge, [{}]),
    "ipo": (ref_ipo, [{}, {"length_normalized": False}]),
    "sppo_hard": (ref_sppo_hard, [{}]),
    "nca_pair": (ref_nca_pair, [{}]),
    "apo_zero": (ref_apo_zero, [{}]),
    "apo_down": (ref_apo_down, [{}]),
    "simpo": (ref_simpo, [{}, {"gamma": 0.0}, {"gamma": 1.2}]),
    "orpo": (ref_orpo, [{}]),
}

# (policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens)
CASES = {
    "small": ([-1.0, -2.0], [-3.0, -1.0], [-1.5, -2.0], [-2.0, -2.0], [2, 3], [4, 1]),
    "mixed": ([-10.0, -0.5, -7.25], [-4.0, -6.0, -7.0], [-12.0, -1.0, -7.0],
              [-3.0, -5.5, -8.5], [5, 1, 8], [3, 2, 7]),
}
# Δ = ±(2e4 − 2): far past float32's exp range for every β below.
HUGE = ([-1.0, -1e4, -1e4], [-1e4, -1.0, -1e4], [-1e4, -1.0, -1.0], [-1.0, -1e4, -1.0],
        [1, 1, 1], [1, 1, 1])


def make(case, **overrides) -> PreferenceLogps:
  pc, pr, rc, rr, ct, rt = case
  fields = dict(policy_chosen=jnp.array(pc), policy_rejected=jnp.array(pr),
                ref_chosen=jnp.array(rc), ref_rejected=jnp.array(rr),
                chosen_tokens=jnp.array(ct), rejected_tokens=jnp.array(rt))
  fields.update(overrides)
  return PreferenceLogps(**fields)


def expected(ref_fn, case, beta, hparams):
  return np.array([ref_fn(*row, beta, **hparams) for row in zip(*case)])


def test_registry_names():
  assert set(PREFERENCE_LOSSES) == set(REFERENCES) == {
      "sigmoid", "robust", "hinge", "ipo", "sppo_hard", "nca_pair", "apo_zero", "apo_down",
      "simpo", "orpo"}


@pytest.mark.parametrize("name", sorted(REFERENCES))
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_hand_computed(name, case, beta):
  ref_fn, hparam_sets = REFERENCES[name]
  for hparams in hparam_sets:
    losses, metrics = PREFERENCE_LOSSES[name](make(CASES[case]), beta=beta, **hparams)
    assert losses.dtype == jnp.float32 and losses.shape == (len(CASES[case][0]),)
    np.testing.assert_allclose(losses, expected(ref_fn, CASES[case], beta, hparams),
                               rtol=2e-5, atol=1e-6, err_msg=f"{name} {hparams}")
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
            "logps/chosen", "logps/rejected"} <= set(metrics)


def test_hand_computed_literals():
  # A few values worked out on paper, pair 0 of "small": Δ_w = 0.5, Δ_l = −1, Δ = 1.5,
  # |y_w| = 2, |y_l| = 4; β = 0.1.
  lp = make(CASES["small"])
  assert float(PREFERENCE_LOSSES["hinge"](lp, beta=0.1)[0][0]) == pytest.approx(0.85)
  # ((0.5/2 + 1/4) − 5)² = 4.5²
  assert float(PREFERENCE_LOSSES["ipo"](lp, beta=0.1)[0][0]) == pytest.approx(20.25)
  # (0.5 − 5)² + (−1 + 5)² = 20.25 + 16
  assert float(PREFERENCE_LOSSES["sppo_hard"](lp, beta=0.1)[0][0]) == pytest.approx(36.25)
  # Δ = 0 at pair 1 → DPO loss log 2.
  zero = make(CASES["small"], policy_chosen=jnp.array([-1.0, -2.0]),
              policy_rejected=jnp.array([-3.0, -2.0]))
  assert float(PREFERENCE_LOSSES["sigmoid"](zero, beta=0.1)[0][1]) == pytest.approx(math.log(2))


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_huge_margins_values_and_gradients_finite(name):
  ref_fn, hparam_sets = REFERENCES[name]
  fn = PREFERENCE_LOSSES[name]
  for beta in (0.1, 1.0):
    for hparams in hparam_sets:
      for case in (HUGE, tuple(HUGE[i] for i in (1, 0, 3, 2, 5, 4))):  # and chosen ⇄ rejected
        losses, metrics = fn(make(case), beta=beta, **hparams)
        assert np.all(np.isfinite(losses)), (beta, hparams, losses)
        assert all(np.isfinite(v) for v in metrics.values())
        np.testing.assert_allclose(losses, expected(ref_fn, case, beta, hparams), rtol=1e-5,
                                   atol=1e-4)

        def total(pc, pr, rc, rr):
          lp = make(case, policy_chosen=pc, policy_rejected=pr, ref_chosen=rc, ref_rejected=rr)
          return jnp.sum(fn(lp, beta=beta, **hparams)[0])

        grads = jax.grad(total, argnums=(0, 1, 2, 3))(*(jnp.array(x) for x in case[:4]))
        for g in grads:
          assert np.all(np.isfinite(g)), (beta, hparams, grads)


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_gradients_finite_and_jit_vmap_over_beta(name):
  fn = PREFERENCE_LOSSES[name]
  lp = make(CASES["mixed"])

  def total(policy_chosen, policy_rejected, beta):
    return jnp.sum(fn(lp._replace(policy_chosen=policy_chosen,
                                  policy_rejected=policy_rejected), beta=beta)[0])

  grads = jax.jit(jax.vmap(jax.grad(total, argnums=(0, 1)), in_axes=(None, None, 0)))(
      lp.policy_chosen, lp.policy_rejected, jnp.array([0.05, 0.1, 1.0]))
  assert grads[0].shape == (3, 3) and all(np.all(np.isfinite(g)) for g in grads)
  # A traced β gives the same losses as a Python β.
  per_beta = jax.vmap(lambda b: fn(lp, beta=b)[0])(jnp.array([0.1, 0.5]))
  np.testing.assert_allclose(per_beta[1], fn(lp, beta=0.5)[0], rtol=1e-6)


def test_sigmoid_gradient_matches_analytic():
  # d/dπ_w of −(1−ε) log σ(x) − ε log σ(−x), x = βΔ, is β·(σ(x) − (1 − ε)).
  lp, beta, eps = make(CASES["mixed"]), 0.3, 0.2
  grad = jax.grad(lambda pc: jnp.sum(PREFERENCE_LOSSES["sigmoid"](
      lp._replace(policy_chosen=pc), beta=beta, label_smoothing=eps)[0]))(lp.policy_chosen)
  want = [beta * (sig(beta * ((pc - rc) - (pr - rr))) - (1 - eps))
          for pc, pr, rc, rr, *_ in zip(*CASES["mixed"])]
  np.testing.assert_allclose(grad, want, rtol=1e-5)


# ----------------------------------------------------------------------------------------
# Documented limits and invariances.
# ----------------------------------------------------------------------------------------

def swapped(lp: PreferenceLogps) -> PreferenceLogps:
  return PreferenceLogps(lp.policy_rejected, lp.policy_chosen, lp.ref_rejected, lp.ref_chosen,
                         lp.rejected_tokens, lp.chosen_tokens)


@pytest.mark.parametrize("case", sorted(CASES))
def test_label_smoothing_limits(case):
  lp, beta = make(CASES[case]), 0.2
  dpo = PREFERENCE_LOSSES["sigmoid"](lp, beta=beta)[0]
  np.testing.assert_array_equal(PREFERENCE_LOSSES["sigmoid"](lp, beta=beta,
                                                             label_smoothing=0.0)[0], dpo)
  np.testing.assert_array_equal(PREFERENCE_LOSSES["robust"](lp, beta=beta)[0], dpo)
  for eps in (0.1, 0.4):
    # rDPO is unbiased: averaged over a label flip with probability ε it is the clean DPO loss.
    rob = PREFERENCE_LOSSES["robust"](lp, beta=beta, label_smoothing=eps)[0]
    rob_flip = PREFERENCE_LOSSES["robust"](swapped(lp), beta=beta, label_smoothing=eps)[0]
    np.testing.assert_allclose((1 - eps) * rob + eps * rob_flip, dpo, rtol=1e-5)
    # cDPO is the BCE with soft label 1 − ε: flipping the pair is ε → 1 − ε.
    np.testing.assert_allclose(
        PREFERENCE_LOSSES["sigmoid"](swapped(lp), beta=beta, label_smoothing=eps)[0],
        PREFERENCE_LOSSES["sigmoid"](lp, beta=beta, label_smoothing=1 - eps)[0], rtol=1e-5)


def test_other_limits():
  lp, beta = make(CASES["mixed"]), 0.25
  ones = jnp.ones(3, jnp.int32)
  unit = lp._replace(chosen_tokens=ones, rejected_tokens=ones)
  # IPO: averaging over one token is the paper's summed form.
  np.testing.assert_allclose(PREFERENCE_LOSSES["ipo"](unit, beta=beta)[0],
                             PREFERENCE_LOSSES["ipo"](lp, beta=beta, length_normalized=False)[0],
                             rtol=1e-6)
  # SimPO with γ = 0 and one token is DPO with a zero reference; SimPO ignores the reference.
  zero_ref = unit._replace(ref_chosen=jnp.zeros(3), ref_rejected=jnp.zeros(3))
  np.testing.assert_allclose(PREFERENCE_LOSSES["simpo"](unit, beta=beta, gamma=0.0)[0],
                             PREFERENCE_LOSSES["sigmoid"](zero_ref, beta=beta)[0], rtol=1e-6)
  no_ref = lp._replace(ref_chosen=None, ref_rejected=None)
  for name in ("simpo", "orpo"):
    np.testing.assert_array_equal(PREFERENCE_LOSSES[name](no_ref, beta=beta)[0],
                                  PREFERENCE_LOSSES[name](lp, beta=beta)[0])
  # Hinge is zero once βΔ ≥ 1; APO losses lie in [0, 2].
  sure = lp._replace(policy_chosen=lp.ref_chosen + 2 / beta, policy_rejected=lp.ref_rejected)
  np.testing.assert_array_equal(PREFERENCE_LOSSES["hinge"](sure, beta=beta)[0], 0.0)
  for name in ("apo_zero", "apo_down"):
    for case in (lp, make(HUGE), swapped(make(HUGE))):
      v = PREFERENCE_LOSSES[name](case, beta=beta)[0]
      assert np.all((v >= 0) & (v <= 2))
  # SPPO-hard is zero at its targets Δ_w = 1/(2β), Δ_l = −1/(2β).
  target = lp._replace(policy_chosen=lp.ref_chosen + 2.0, policy_rejected=lp.ref_rejected - 2.0)
  np.testing.assert_allclose(PREFERENCE_LOSSES["sppo_hard"](target, beta=beta)[0], 0.0,
                             atol=1e-10)


def test_orpo_certain_response_finite():
  # avg log-prob 0 (probability 1) would make the odds infinite; the clip keeps it finite.
  lp = make(CASES["small"], policy_chosen=jnp.array([0.0, -1e4]),
            policy_rejected=jnp.array([-1e4, 0.0]))
  losses, metrics = PREFERENCE_LOSSES["orpo"](lp, beta=0.1)
  grads = jax.grad(lambda pc, pr: jnp.sum(PREFERENCE_LOSSES["orpo"](
      lp._replace(policy_chosen=pc, policy_rejected=pr), beta=0.1)[0]), argnums=(0, 1))(
          lp.policy_chosen, lp.policy_rejected)
  assert np.all(np.isfinite(losses)) and all(np.all(np.isfinite(g)) for g in grads)
  assert np.isfinite(metrics["orpo/log_odds"])


def test_orpo_log_odds_accurate_near_certainty():
  # 1 − e^{avg} for avg → 0 loses every digit in float32 unless computed as −expm1(avg).
  case = ([-1e-5, -2e-4], [-3.0, -1e-3], [0.0, 0.0], [0.0, 0.0], [1, 2], [2, 1])
  metrics = PREFERENCE_LOSSES["orpo"](make(case), beta=0.1)[1]
  want = np.mean([(pc / ct - pr / rt) - (math.log(-math.expm1(pc / ct))
                                         - math.log(-math.expm1(pr / rt)))
                  for pc, pr, _, _, ct, rt in zip(*case)])
  assert float(metrics["orpo/log_odds"]) == pytest.approx(want, rel=1e-4)


def test_bad_input():
  lp = make(CASES["small"])
  with pytest.raises(ValueError, match="reference"):
    PREFERENCE_LOSSES["sigmoid"](lp._replace(ref_chosen=None), beta=0.1)
  with pytest.raises(ValueError, match="token counts"):
    PREFERENCE_LOSSES["simpo"](lp._replace(chosen_tokens=None), beta=0.1)
  with pytest.raises(ValueError, match="label_smoothing"):
    PREFERENCE_LOSSES["robust"](lp, beta=0.1, label_smoothing=0.5)
  with pytest.raises(ValueError, match="label_smoothing"):
    PREFERENCE_LOSSES["sigmoid"](lp, beta=0.1, label_smoothing=-0.1)
  with pytest.raises(TypeError):
    PREFERENCE_LOSSES["hinge"](lp, beta=0.1, label_smoothing=0.1)  # not a hinge hparam
  with pytest.raises(AssertionError):
    PREFERENCE_LOSSES["sigmoid"](lp._replace(policy_chosen=jnp.zeros(3)), beta=0.1)
  # Integer log-probs are cast to float32 at entry.
  ints = lp._replace(policy_chosen=jnp.array([-1, -2]), ref_chosen=jnp.array([-2, -2]))
  assert PREFERENCE_LOSSES["sigmoid"](ints, beta=0.1)[0].dtype == jnp.float32


# ----------------------------------------------------------------------------------------
# NLL term and metrics.
# ----------------------------------------------------------------------------------------

def test_preference_loss_with_nll():
  lp, beta = make(CASES["mixed"]), 0.1
  base, base_metrics = objectives.preference_loss("sigmoid", lp, beta=beta)
  assert "nll" not in base_metrics
  np.testing.assert_array_equal(base, PREFERENCE_LOSSES["sigmoid"](lp, beta=beta)[0])
  losses, metrics = objectives.preference_loss("sigmoid", lp, beta=beta, nll_weight=0.5,
                                               label_smoothing=0.1)
  nll = [-pc / ct for pc, ct in zip(CASES["mixed"][0], CASES["mixed"][4])]  # 2, 0.5, 0.90625
  want = expected(ref_sigmoid, CASES["mixed"], beta, {"label_smoothing": 0.1}) + 0.5 * np.array(nll)
  np.testing.assert_allclose(losses, want, rtol=1e-6)
  assert float(metrics["nll"]) == pytest.approx(np.mean(nll))
  # A function instead of a name, and a caller-supplied NLL.
  custom = jnp.array([1.0, 2.0, 3.0])
  losses, metrics = objectives.preference_loss(PREFERENCE_LOSSES["ipo"], lp, beta=beta,
                                               nll_weight=2.0, chosen_nll=custom)
  np.testing.assert_allclose(losses, PREFERENCE_LOSSES["ipo"](lp, beta=beta)[0] + 2 * custom,
                             rtol=1e-6)
  assert float(metrics["nll"]) == pytest.approx(2.0)


def test_preference_metrics():
  lp, beta = make(CASES["small"]), 0.5
  # β·Δ_w = [0.25, 0], β·Δ_l = [−0.5, 0.5].
  m = objectives.preference_metrics(lp, beta=beta)
  assert float(m["rewards/chosen"]) == pytest.approx(0.125)
  assert float(m["rewards/rejected"]) == pytest.approx(0.0)
  assert float(m["rewards/margins"]) == pytest.approx((0.75 - 0.5) / 2)
  assert float(m["rewards/accuracies"]) == pytest.approx(0.5)
  assert float(m["logps/chosen"]) == pytest.approx(-1.5)
  assert float(m["logps/rejected"]) == pytest.approx(-2.0)
  # Masking drops pair 1; the metrics of a loss are those of the helper.
  m = objectives.preference_metrics(lp, beta=beta, mask=jnp.array([1, 0]),
                                    chosen_entropy=jnp.array([1.0, 3.0]),
                                    rejected_entropy=jnp.array([2.0, 4.0]))
  assert float(m["rewards/margins"]) == pytest.approx(0.75)
  assert float(m["rewards/accuracies"]) == 1.0
  assert float(m["entropy/chosen"]) == 1.0 and float(m["entropy/rejected"]) == 2.0
  # Reference-free: β · average log-probs, β·avg_w = [−0.25, −1/3], β·avg_l = [−0.375, −0.5].
  m = PREFERENCE_LOSSES["simpo"](lp._replace(ref_chosen=None, ref_rejected=None), beta=beta)[1]
  assert float(m["rewards/chosen"]) == pytest.approx((-0.25 - 1 / 3) / 2)
  assert float(m["rewards/accuracies"]) == 1.0


# ----------------------------------------------------------------------------------------
# KTO.
# ----------------------------------------------------------------------------------------

def ref_kto(pol, ref, kl_pol, kl_ref, desirable, beta, wd=1.0, wu=1.0):
  z0 = max(0.0, sum(p - r for p, r in zip(kl_pol, kl_ref)) / len(kl_pol))
  out = []
  for p, r, d in zip(pol, ref, desirable):
    delta = p - r
    out.append(wd * (1 - sig(beta * (delta - z0))) if d else wu * (1 - sig(beta * (z0 - delta))))
  return np.array(out), z0


KTO_CASES = {
    # mean KL = (1 + 2 − 0.5 + 1.5)/4 = 1.0
    "positive_kl": ([-3.0, -5.0, -2.0, -8.0], [-4.0, -4.5, -2.0, -6.0],
                    [-6.0, -7.0, -3.0, -2.5], [-7.0, -9.0, -2.5, -4.0], [1, 0, 1, 0]),
    # mean KL = (−2 − 1 + 0.5)/3 < 0 → z₀ = 0
    "negative_kl": ([-1.0, -9.0, -4.0], [-3.0, -2.0, -4.5], [-5.0, -6.0, -2.0],
                    [-3.0, -5.0, -2.5], [0, 1, 1]),
}


@pytest.mark.parametrize("case", sorted(KTO_CASES))
@pytest.mark.parametrize("beta,wd,wu", [(0.1, 1.0, 1.0), (0.5, 1.33, 0.75)])
def test_kto_hand_computed(case, beta, wd, wu):
  pol, ref, kl_pol, kl_ref, des = KTO_CASES[case]
  losses, metrics = kto_loss(jnp.array(pol), jnp.array(ref), jnp.array(kl_pol),
                             jnp.array(kl_ref), jnp.array(des, bool), beta=beta,
                             desirable_weight=wd, undesirable_weight=wu)
  want, z0 = ref_kto(pol, ref, kl_pol, kl_ref, des, beta, wd, wu)
  np.testing.assert_allclose(losses, want, rtol=1e-5)
  assert float(metrics["kl"]) == pytest.approx(z0, abs=1e-6)
  assert z0 == (1.0 if case == "positive_kl" else 0.0)  # clamped at 0
  good = [beta * (p - r) for p, r, d in zip(pol, ref, des) if d]
  assert float(metrics["rewards/chosen"]) == pytest.approx(np.mean(good))
  assert float(metrics["count/desirable"]) == len(good)


def test_kto_no_gradient_through_z0():
  pol, ref, kl_pol, kl_ref, des = (jnp.array(x) for x in KTO_CASES["positive_kl"])
  beta = 0.5

  def total(pol, kl_pol):
    return jnp.sum(kto_loss(pol, ref, kl_pol, kl_ref, des.astype(bool), beta=beta)[0])

  g_pol, g_kl = jax.grad(total, argnums=(0, 1))(pol, kl_pol)
  np.testing.assert_array_equal(g_kl, 0.0)
  # With z₀ a constant (1.0): d/dΔ σ(−β(Δ − z₀)) = −β σ(x)σ(−x), x = β(Δ − z₀); for undesirable
  # rows d/dΔ σ(−β(z₀ − Δ)) = +β σ(x)σ(−x), x = β(z₀ − Δ).
  want = []
  for p, r, d in zip(*KTO_CASES["positive_kl"][:2], KTO_CASES["positive_kl"][4]):
    x = beta * ((p - r) - 1.0) if d else beta * (1.0 - (p - r))
    want.append((-1 if d else 1) * beta * sig(x) * sig(-x))
  np.testing.assert_allclose(g_pol, want, rtol=1e-5)


def test_kto_axis_name_is_global_mean():
  # Four "devices" of two rows each (vmap with an axis name stands in for shard_map/pmap):
  # every shard must see the global z₀ and the global metrics.
  rng = np.random.default_rng(0)
  pol, ref, kl_pol, kl_ref = (jnp.array(rng.normal(-5, 2, 8), jnp.float32) for _ in range(4))
  kl_pol = kl_pol + 1.0  # positive mean KL, so z₀ is not clamped
  des = jnp.array([1, 0, 0, 1, 1, 1, 0, 0], bool)
  global_losses, global_metrics = kto_loss(pol, ref, kl_pol, kl_ref, des, beta=0.3)
  assert float(global_metrics["kl"]) > 0
  shard = lambda x: x.reshape(4, 2)
  losses, metrics = jax.vmap(
      lambda *a: kto_loss(*a, beta=0.3, axis_name="data"), axis_name="data")(
          *(shard(x) for x in (pol, ref, kl_pol, kl_ref, des)))
  np.testing.assert_allclose(losses.reshape(-1), global_losses, rtol=1e-6)
  for key, value in global_metrics.items():
    np.testing.assert_allclose(metrics[key], np.full(4, value), rtol=1e-5, err_msg=key)
  # Without the axis name each shard would use its own mean: the test above is not vacuous.
  local = jax.vmap(lambda *a: kto_loss(*a, beta=0.3)[1]["kl"])(
      *(shard(x) for x in (pol, ref, kl_pol, kl_ref, des)))
  assert not np.allclose(local, global_metrics["kl"])


def test_kto_masks_and_huge_values():
  pol, ref, kl_pol, kl_ref, des = (jnp.array(x) for x in KTO_CASES["positive_kl"])
  des = des.astype(bool)
  pad = lambda x, v: jnp.concatenate([x, jnp.array([v], x.dtype)])
  mask = jnp.array([1, 1, 1, 1, 0])
  padded, metrics = kto_loss(pad(pol, 0.0), pad(ref, -1e4), pad(kl_pol, 1e4), pad(kl_ref, -1e4),
                             pad(des, True), beta=0.1, mask=mask, kl_mask=mask)
  plain, plain_metrics = kto_loss(pol, ref, kl_pol, kl_ref, des, beta=0.1)
  np.testing.assert_allclose(padded[:4], plain, rtol=1e-6)
  assert float(padded[4]) == 0.0
  for key, value in plain_metrics.items():
    np.testing.assert_allclose(metrics[key], value, rtol=1e-6, err_msg=key)
  # |Δ| = 1e4 for both labels and a huge z₀: finite values and gradients.
  big = jnp.array([0.0, -1e4, 0.0, -1e4])
  small = jnp.array([-1e4, 0.0, -1e4, 0.0])
  for kl_shift in (0.0, 1e4):
    fn = lambda p: jnp.sum(kto_loss(p, small, big + kl_shift, small, des, beta=1.0)[0])
    assert np.isfinite(fn(big))
    assert np.all(np.isfinite(jax.grad(fn)(big)))
    fn = lambda p: jnp.sum(kto_loss(p, big, small, big, des, beta=1.0)[0])
    assert np.isfinite(fn(small)) and np.all(np.isfinite(jax.grad(fn)(small)))
