"""PPO / GRPO maths (rlhf_jax.objectives.ppo, .grpo) against plain-Python references, exact
expectations over small categoricals, hand-computed values, and layout invariances."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import objectives as obj



def prefix_mask(lengths, T):
  return (np.arange(T)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


# ----------------------------------------------------------------------------------------
# GAE.
# ----------------------------------------------------------------------------------------

def gae_loop(rewards, values, mask, gamma, lam):
  """The textbook backward recursion, row by row in float64; mask == 0 is terminal."""
  B, T = rewards.shape
  adv, ret = np.zeros((B, T)), np.zeros((B, T))
  for b in range(B):
    next_v = next_a = 0.0
    for t in reversed(range(T)):
      if mask[b, t] == 0:
        next_v = next_a = 0.0
        continue
      delta = rewards[b, t] + gamma * next_v - values[b, t]
      a = delta + gamma * lam * next_a
      adv[b, t], ret[b, t] = a, a + values[b, t]
      next_v, next_a = values[b, t], a
  return adv, ret


_gae_jit = jax.jit(obj.gae)


@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (1.0, 1.0), (1.0, 0.95), (0.9, 1.0),
                                       (0.8, 0.0), (0.0, 0.7)])
def test_gae_matches_python_loop(gamma, lam):
  rng = np.random.default_rng(1)
  B, T = 6, 9
  lengths = [0, 1, 4, 9, 7, 2]
  mask = prefix_mask(lengths, T)
  rewards = rng.normal(size=(B, T)).astype(np.float32)
  values = rng.normal(size=(B, T)).astype(np.float32)
  want_adv, want_ret = gae_loop(rewards, values, mask, gamma, lam)
  # Garbage (even NaN/inf) after the end of each response must not matter.
  rewards_g = np.where(mask > 0, rewards, np.nan).astype(np.float32)
  values_g = np.where(mask > 0, values, np.inf).astype(np.float32)
  adv, ret = _gae_jit(rewards_g, values_g, mask, gamma=gamma, lam=lam)
  assert adv.dtype == ret.dtype == jnp.float32 and adv.shape == ret.shape == (B, T)
  np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)
  assert np.all(np.asarray(adv)[mask == 0] == 0) and np.all(np.asarray(ret)[mask == 0] == 0)


def test_gae_closed_forms():
  """λ = 1: A_t = Σ_k γ^k r_{t+k} − V_t (Monte Carlo); λ = 0: A_t = δ_t; γ = λ = 1: returns
  are the plain sums of future rewards."""
  rng = np.random.default_rng(2)
  T, gamma = 5, 0.9
  r = rng.normal(size=(1, T)).astype(np.float32)
  v = rng.normal(size=(1, T)).astype(np.float32)
  m = np.ones((1, T), np.float32)
  adv, ret = obj.gae(r, v, m, gamma=gamma, lam=1.0)
  mc = [sum(gamma ** k * r[0, t + k] for k in range(T - t)) for t in range(T)]
  np.testing.assert_allclose(adv[0], np.array(mc) - v[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ret[0], mc, rtol=1e-5, atol=1e-5)
  adv0, _ = obj.gae(r, v, m, gamma=gamma, lam=0.0)
  v_next = np.append(v[0, 1:], 0.0)                # value after the last token is 0
  np.testing.assert_allclose(adv0[0], r[0] + gamma * v_next - v[0], rtol=1e-5, atol=1e-5)
  _, ret11 = obj.gae(r, v, m, gamma=1.0, lam=1.0)
  np.testing.assert_allclose(ret11[0], np.cumsum(r[0][::-1])[::-1], rtol=1e-5, atol=1e-5)


def test_gae_zero_inside_a_row_splits_episodes():
  """A 0 inside the mask is terminal: [1 1 0 1 1] equals the two episodes run separately."""
  rng = np.random.default_rng(3)
  r = rng.normal(size=(1, 5)).astype(np.float32)
  v = rng.normal(size=(1, 5)).astype(np.float32)
  adv, ret = obj.gae(r, v, np.array([[1, 1, 0, 1, 1]], np.float32), gamma=0.95, lam=0.9)
  one = np.ones((1, 2), np.float32)
  a1, r1 = obj.gae(r[:, :2], v[:, :2], one, gamma=0.95, lam=0.9)
  a2, r2 = obj.gae(r[:, 3:], v[:, 3:], one, gamma=0.95, lam=0.9)
  np.testing.assert_allclose(adv, np.concatenate([a1, [[0.0]], a2], 1), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ret, np.concatenate([r1, [[0.0]], r2], 1), rtol=1e-6, atol=1e-6)


def test_gae_has_no_gradient():
  r = jnp.ones((1, 3))
  g = jax.grad(lambda v: jnp.sum(obj.gae(r, v, jnp.ones((1, 3)), gamma=1.0, lam=1.0)[0]))(
      jnp.ones((1, 3)))
  np.testing.assert_array_equal(g, 0.0)


# ----------------------------------------------------------------------------------------
# KL estimators.
# ----------------------------------------------------------------------------------------

def categorical_pair(n, scale, seed):
  rng = np.random.default_rng(seed)
  logp = rng.normal(size=n)
  logp -= np.log(np.sum(np.exp(logp)))
  logq = logp + scale * rng.normal(size=n)
  logq -= np.log(np.sum(np.exp(logq)))
  return logp, logq


def expectation(kind, logp, logq):
  """E_{x~p}[k(x)] computed exactly by enumerating the support."""
  k = np.asarray(obj.kl_penalty(logp.astype(np.float32), logq.astype(np.float32), kind),
                 np.float64)
  return float(np.sum(np.exp(logp) * k))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_k1_k3_are_unbiased_exactly(seed):
  logp, logq = categorical_pair(6, 1.0, seed)
  kl = float(np.sum(np.exp(logp) * (logp - logq)))
  assert kl > 0.05
  assert expectation("k1", logp, logq) == pytest.approx(kl, rel=1e-5)
  assert expectation("k3", logp, logq) == pytest.approx(kl, rel=1e-5)


def test_k2_is_second_order_accurate():
  """E_p[k2] − KL(p‖q) = O(ε³) when log q = log p + O(ε): halving ε divides the error by ~8."""
  errors = []
  for scale in (0.2, 0.1, 0.05):
    logp, logq = categorical_pair(6, scale, 3)
    kl = float(np.sum(np.exp(logp) * (logp - logq)))
    errors.append(abs(expectation("k2", logp, logq) - kl))
    assert expectation("k2", logp, logq) == pytest.approx(kl, rel=0.2)
  for big, small in zip(errors, errors[1:]):
    assert small < big / 5


def test_kl_estimators_hand_values_and_signs():
  logp, ref = jnp.array([-1.0, -2.0, -1.0]), jnp.array([-2.0, -1.0, -1.0])
  np.testing.assert_allclose(obj.kl_penalty(logp, ref, "k1"), [1.0, -1.0, 0.0])
  np.testing.assert_allclose(obj.kl_penalty(logp, ref, "k2"), [0.5, 0.5, 0.0])
  np.testing.assert_allclose(obj.kl_penalty(logp, ref, "k3"),
                             [math.exp(-1), math.exp(1) - 2, 0.0], rtol=1e-6)
  # k3 is exact for tiny log-ratios (≈ d²/2), where exp(d) − d − 1 would round to 0.
  tiny = obj.kl_penalty(jnp.array([0.0]), jnp.array([1e-4]), "k3")
  assert float(tiny[0]) == pytest.approx(math.expm1(1e-4) - 1e-4, rel=1e-5)
  assert obj.kl_penalty(logp.astype(jnp.bfloat16), ref, "k3").dtype == jnp.float32
  with pytest.raises(ValueError, match="k4"):
    obj.kl_penalty(logp, ref, "k4")


# ----------------------------------------------------------------------------------------
# KL controllers.
# ----------------------------------------------------------------------------------------

def test_adaptive_kl_controller_hand_values():
  f = lambda kl, n=10: float(obj.update_kl_coef(0.1, kl, n, target=0.1, horizon=100))
  assert f(0.11) == pytest.approx(0.1 * (1 + 0.1 * 10 / 100))       # e = +0.1
  assert f(0.095) == pytest.approx(0.1 * (1 - 0.05 * 10 / 100))     # e = −0.05
  assert f(1.0) == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))        # e = +9 clipped to +0.2
  assert f(0.0) == pytest.approx(0.1 * (1 - 0.2 * 10 / 100))        # e = −1 clipped to −0.2
  assert f(0.1) == pytest.approx(0.1)
  assert f(5.0, n=100) == pytest.approx(0.12)                       # at most ×1.2 per horizon
  traced = jax.jit(lambda kl: obj.update_kl_coef(0.1, kl, 10, target=0.1, horizon=100))(0.11)
  assert float(traced) == pytest.approx(f(0.11))


def test_multiplicative_kl_controller_and_dispatch():
  m = lambda kl: float(obj.multiplicative_kl_coef(0.1, kl, target=0.1))
  assert m(0.2) == pytest.approx(0.15)
  assert m(0.05) == pytest.approx(0.1 / 1.5)
  assert m(0.1) == pytest.approx(0.1)
  assert float(obj.multiplicative_kl_coef(0.1, 0.2, target=0.1, factor=2.0)) == pytest.approx(0.2)
  assert float(obj.next_kl_coef("multiplicative", 0.1, 0.2, 5, target=0.1)) == pytest.approx(0.15)
  assert float(obj.next_kl_coef("adaptive", 0.1, 1.0, 10, target=0.1, horizon=100)) == \
      pytest.approx(0.102)
  assert float(obj.next_kl_coef("fixed", 0.1, 9.0, 10)) == pytest.approx(0.1)
  assert float(obj.next_kl_coef(obj.fixed_kl_coef, 0.1, 9.0, 10)) == pytest.approx(0.1)
  with pytest.raises(ValueError, match="unknown KL controller"):
    obj.next_kl_coef("pid", 0.1, 0.2, 1, target=0.1)
  with pytest.raises(ValueError, match="target"):
    obj.next_kl_coef("adaptive", 0.1, 0.2, 1, horizon=10)
  with pytest.raises(ValueError, match="horizon"):
    obj.next_kl_coef("adaptive", 0.1, 0.2, 1, target=0.1)


# ----------------------------------------------------------------------------------------
# KL-shaped rewards.
# ----------------------------------------------------------------------------------------

def test_shape_rewards_puts_score_at_the_last_real_token():
  mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]], np.float32)
  logp = np.array([[-1.0, -2.0, -0.5, 9.0]] * 3, np.float32)
  ref = np.array([[-1.5, -1.0, -0.5, -9.0]] * 3, np.float32)
  score = np.array([2.0, -1.0, 7.0], np.float32)
  rewards, kl = obj.shape_rewards(score, logp, ref, mask, kl_coef=0.1, kind="k1")
  want_kl = np.array([[0.5, -1.0, 0.0, 0.0], [0.5, -1.0, 0.0, 0.0], [0.0] * 4])
  np.testing.assert_allclose(kl, want_kl)
  want = -0.1 * want_kl
  want[0, 2] += 2.0
  want[1, 1] += -1.0                                      # row 2 is empty: no score anywhere
  np.testing.assert_allclose(rewards, want, rtol=1e-6)
  _, kl3 = obj.shape_rewards(score, logp, ref, mask, kl_coef=0.1, kind="k3")
  np.testing.assert_allclose(kl3, np.where(mask > 0, obj.kl_penalty(logp, ref, "k3"), 0.0))


# ----------------------------------------------------------------------------------------
# GRPO / RLOO advantages, truncation.
# ----------------------------------------------------------------------------------------

def test_rloo_hand_values():
  rng = np.random.default_rng(4)
  got = obj.rloo_advantages(jnp.array([1.0, 2.0, 3.0, 4.0, 0.0, 0.0, 1.0, 1.0]), 4)
  want = [1 - 9 / 3, 2 - 8 / 3, 3 - 7 / 3, 4 - 6 / 3,              # group 1: sums of the others
          0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3, 1 - 1 / 3]              # group 2
  np.testing.assert_allclose(got, want, rtol=1e-6)
  r = rng.normal(size=12).astype(np.float32)                       # = k/(k−1)·(r − mean)
  np.testing.assert_allclose(obj.rloo_advantages(r, 3),
                             1.5 * obj.group_advantages(r, 3, normalize_std=False), rtol=1e-5)


def test_group_advantages_hand_values():
  r = jnp.array([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0])
  centred = np.array([-1.5, -0.5, 0.5, 1.5])
  std1 = math.sqrt((2 * 1.5 ** 2 + 2 * 0.5 ** 2) / 3)              # sample std, ddof = 1
  got = obj.group_advantages(r, 4)
  np.testing.assert_allclose(got[:4], centred / (std1 + 1e-6), rtol=1e-6)
  np.testing.assert_array_equal(got[4:], 0.0)                      # equal rewards: no signal
  np.testing.assert_allclose(obj.group_advantages(r, 4, ddof=0)[:4],
                             centred / (math.sqrt(1.25) + 1e-6), rtol=1e-6)
  np.testing.assert_allclose(obj.group_advantages(r, 4, normalize_std=False),
                             np.concatenate([centred, np.zeros(4)]))   # Dr. GRPO
  assert got.dtype == jnp.float32 and got.shape == (8,)


def test_group_advantage_errors():
  with pytest.raises(ValueError, match="groups of 3"):
    obj.group_advantages(jnp.ones(4), 3)
  with pytest.raises(ValueError, match="ddof"):
    obj.group_advantages(jnp.ones(4), 1)
  with pytest.raises(ValueError, match="RLOO"):
    obj.rloo_advantages(jnp.ones(4), 1)


def test_truncation_masks():
  finished = jnp.array([True, False, True])
  np.testing.assert_array_equal(obj.truncation_mask(finished), [1.0, 0.0, 1.0])
  loss_mask = jnp.ones((3, 4), jnp.int32)
  out = obj.mask_truncated(loss_mask, finished)
  assert out.dtype == jnp.int32
  np.testing.assert_array_equal(out, [[1] * 4, [0] * 4, [1] * 4])
  np.testing.assert_array_equal(obj.mask_truncated(jnp.array([0.5, -1.0, 2.0]), finished),
                                [0.5, 0.0, 2.0])


# ----------------------------------------------------------------------------------------
# Policy loss.
# ----------------------------------------------------------------------------------------

def test_policy_loss_hand_cases():
  """ε = 0.2, one token per case:
      ρ=1.5, A=+1: max(−1.5, −1.2) = −1.2   clipped (no gradient)
      ρ=1.5, A=−1: max( 1.5,  1.2) =  1.5
      ρ=0.5, A=+1: max(−0.5, −0.8) = −0.5
      ρ=0.5, A=−1: max( 0.5,  0.8) =  0.8   clipped (no gradient)
      ρ=1.1, A=+2: inside the clip range   = −2.2
  token mean = −1.6 / 5 = −0.32, clipfrac = 2/5."""
  ratio = np.array([[1.5, 1.5, 0.5, 0.5, 1.1]], np.float32)
  adv = np.array([[1.0, -1.0, 1.0, -1.0, 2.0]], np.float32)
  old = np.full_like(ratio, -1.0)
  logp = old + np.log(ratio)
  mask = np.ones_like(ratio)
  loss, metrics = obj.policy_loss(logp, old, adv, mask, clip_eps=0.2)
  assert float(loss) == pytest.approx(-0.32, rel=1e-5)
  assert float(metrics["clipfrac"]) == pytest.approx(0.4)
  assert float(metrics["approx_kl"]) == pytest.approx(np.mean(ratio - 1 - np.log(ratio)), rel=1e-5)
  grad = jax.grad(lambda lp: obj.policy_loss(lp, old, adv, mask, clip_eps=0.2)[0])(logp)
  # d/dlogp of −A·ρ is −A·ρ; clipped tokens get 0.
  np.testing.assert_allclose(grad, [[0.0, 1.5 / 5, -0.5 / 5, 0.0, -2.2 / 5]], rtol=1e-5)


def test_policy_loss_clip_higher():
  """DAPO's asymmetric clip: ε_low = 0.2, ε_high = 0.28."""
  ratio = np.array([[1.5, 1.25, 0.5]], np.float32)
  adv = np.ones_like(ratio)
  old = np.zeros_like(ratio)
  mask = np.ones_like(ratio)
  loss, m = obj.policy_loss(np.log(ratio), old, adv, mask, clip_eps=0.2, clip_eps_high=0.28)
  assert float(loss) == pytest.approx((-1.28 - 1.25 - 0.5) / 3, rel=1e-5)
  assert float(m["clipfrac"]) == pytest.approx(1 / 3)
  sym, m_sym = obj.policy_loss(np.log(ratio), old, adv, mask, clip_eps=0.2)
  assert float(sym) == pytest.approx((-1.2 - 1.2 - 0.5) / 3, rel=1e-5)
  assert float(m_sym["clipfrac"]) == pytest.approx(2 / 3)


def test_policy_loss_sequence_advantages_and_padding_garbage():
  """[B] advantages broadcast over tokens; NaN/inf in padding reaches neither loss nor grad."""
  rng = np.random.default_rng(5)
  mask = prefix_mask([3, 1], 4)
  logp = rng.normal(size=(2, 4)).astype(np.float32) * 0.1 - 1
  old = logp + rng.normal(size=(2, 4)).astype(np.float32) * 0.1
  adv_seq = np.array([0.7, -1.3], np.float32)
  garbage = lambda x, v: np.where(mask > 0, x, v).astype(np.float32)
  f = lambda lp, ad: obj.policy_loss(lp, garbage(old, np.inf), ad, mask, clip_eps=0.2)[0]
  want = f(logp, np.broadcast_to(adv_seq[:, None], (2, 4)))
  got = f(garbage(logp, np.nan), adv_seq)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  grad = jax.grad(f)(garbage(logp, np.nan), adv_seq)
  assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[mask == 0] == 0)
  # old_logp = logp (GRPO, one update): ρ = 1, the loss is −mean(A), the gradient is −A/N.
  g1 = jax.grad(lambda lp: obj.policy_loss(lp, lp, adv_seq, mask, clip_eps=0.2)[0])(logp)
  np.testing.assert_allclose(g1, -np.broadcast_to(adv_seq[:, None], (2, 4)) * mask / 4,
                             rtol=1e-6)


# ----------------------------------------------------------------------------------------
# Aggregation.
# ----------------------------------------------------------------------------------------

# Per-token losses L (× = padding) on a ragged batch, and the hand-computed reductions:
#   row 0: [1 2 3 ×]   row 1: [4 × × ×]   row 2: empty (a padding row)
#   token_mean              = (1+2+3+4)/4          = 2.5
#   seq_mean_token_mean     = (6/3 + 4/1)/2        = 3.0   (the empty row is left out)
#   seq_mean_token_sum_norm = (6/4 + 4/4)/2        = 1.25  (max_len = T = 4)
#                           = (6/10 + 4/10)/2      = 0.5   (max_len = 10)
AGG_L = np.array([[1, 2, 3, 50], [4, 60, 70, 80], [90, 90, 90, 90]], np.float32)
AGG_MASK = prefix_mask([3, 1, 0], 4)
AGG_CASES = [("token_mean", "dapo", None, 2.5), ("seq_mean_token_mean", "grpo", None, 3.0),
             ("seq_mean_token_sum_norm", "dr_grpo", None, 1.25),
             ("seq_mean_token_sum_norm", "dr_grpo", 10, 0.5)]


@pytest.mark.parametrize("name,alias,max_len,want", AGG_CASES)
def test_aggregation_modes_hand_values(name, alias, max_len, want):
  for agg in (name, alias):
    assert float(obj.aggregate_loss(AGG_L, AGG_MASK, agg, max_len=max_len)) == pytest.approx(want)
    # Through the policy loss: with ρ = 1 the per-token loss is −A, so A = −L gives L back.
    zeros = np.zeros_like(AGG_L)
    loss, _ = obj.policy_loss(zeros, zeros, -AGG_L, AGG_MASK, clip_eps=0.2, aggregation=agg,
                              max_len=max_len)
    assert float(loss) == pytest.approx(want)
    assert float(obj.entropy_bonus(AGG_L, AGG_MASK, agg, max_len=max_len)) == pytest.approx(want)


def test_aggregation_errors_and_empty_batch():
  with pytest.raises(ValueError, match="unknown loss aggregation"):
    obj.aggregate_loss(AGG_L, AGG_MASK, "sum")
  for agg in obj.LOSS_AGGREGATIONS:
    assert float(obj.aggregate_loss(AGG_L, np.zeros_like(AGG_MASK), agg)) == 0.0


def test_token_mean_losses_are_invariant_to_packing():
  """Two sequences (3 and 2 tokens) in two padded rows, or back to back in one row: the
  token_mean policy and value losses, their metrics and gradients are the same, because the
  normaliser is the batch's token count, not a per-row quantity. The per-sequence mean
  ("grpo") is not layout-invariant (it sees one sequence of 5 tokens instead of two)."""
  rng = np.random.default_rng(6)
  n = 5
  logp = (rng.normal(size=n) * 0.3 - 1).astype(np.float32)
  ratio = np.array([1.5, 0.9, 0.6, 1.1, 1.15], np.float32)           # tokens 0 and 2 are clipped
  old = (logp - np.log(ratio)).astype(np.float32)
  adv = np.array([1.0, -1.0, -1.0, 2.0, 0.5], np.float32)
  v, v_old, ret = (rng.normal(size=n).astype(np.float32) for _ in range(3))

  def two_rows(x):
    out = np.zeros((2, 4), np.float32)
    out[0, :3], out[1, :2] = x[:3], x[3:]
    return out

  def one_row(x):
    out = np.zeros((1, 8), np.float32)
    out[0, :5] = x
    return out

  layouts = {"rows": (two_rows, prefix_mask([3, 2], 4)), "packed": (one_row, prefix_mask([5], 8))}
  results = {}
  for name, (lay, mask) in layouts.items():
    pl = lambda lp, agg="token_mean": obj.policy_loss(lp, lay(old), lay(adv), mask, clip_eps=0.2,
                                                      aggregation=agg)
    vl = lambda vv: obj.value_loss(vv, lay(v_old), lay(ret), mask, clip_eps=0.2)
    (loss, m), g = pl(lay(logp)), jax.grad(lambda lp: pl(lp)[0])(lay(logp))
    (vloss, vm), vg = vl(lay(v)), jax.grad(lambda vv: vl(vv)[0])(lay(v))
    unlay = lambda x: np.asarray(x)[mask > 0]                        # back to the 5 tokens
    results[name] = dict(loss=loss, clipfrac=m["clipfrac"], kl=m["approx_kl"], grad=unlay(g),
                         vloss=vloss, vclip=vm["vf_clipfrac"], vgrad=unlay(vg),
                         grpo=pl(lay(logp), "grpo")[0])
  assert float(results["rows"]["clipfrac"]) == pytest.approx(2 / 5)
  for key in ("loss", "clipfrac", "kl", "grad", "vloss", "vclip", "vgrad"):
    np.testing.assert_allclose(results["rows"][key], results["packed"][key], rtol=1e-5,
                               atol=1e-7, err_msg=key)
  assert abs(float(results["rows"]["grpo"]) - float(results["packed"]["grpo"])) > 1e-4


# ----------------------------------------------------------------------------------------
# Value loss.
# ----------------------------------------------------------------------------------------

def test_value_loss_clipping_cases():
  """ε = 0.2, old V = 0:
      V=0.5,  R=1: (0.5)² = 0.25 vs (0.2 − 1)² = 0.64  → 0.64  clipped
      V=0.1,  R=1: inside the clip range: 0.81 both    → 0.81
      V=−0.5, R=1: 2.25 vs (−0.2 − 1)² = 1.44          → 2.25
      V=1.5,  R=1: 0.25 vs (0.2 − 1)² = 0.64           → 0.64  clipped
  loss = ½·mean = ½·4.34/4, vf_clipfrac = 1/2."""
  v = np.array([[0.5, 0.1, -0.5, 1.5, 99.0]], np.float32)
  old = np.zeros_like(v)
  ret = np.array([[1.0, 1.0, 1.0, 1.0, -99.0]], np.float32)
  mask = prefix_mask([4], 5)
  loss, m = obj.value_loss(v, old, ret, mask, clip_eps=0.2)
  assert float(loss) == pytest.approx(0.5 * 4.34 / 4, rel=1e-5)
  assert float(m["vf_clipfrac"]) == pytest.approx(0.5)
  grad = jax.grad(lambda x: obj.value_loss(x, old, ret, mask, clip_eps=0.2)[0])(v)
  np.testing.assert_allclose(grad, [[0.0, (0.1 - 1) / 4, (-0.5 - 1) / 4, 0.0, 0.0]], rtol=1e-5)
  unclipped, m0 = obj.value_loss(v, old, ret, mask, clip_eps=None)
  assert float(unclipped) == pytest.approx(0.5 * (0.25 + 0.81 + 2.25 + 0.25) / 4, rel=1e-5)
  assert float(m0["vf_clipfrac"]) == 0.0


# ----------------------------------------------------------------------------------------
# Masked statistics, whitening, explained variance, entropy.
# ----------------------------------------------------------------------------------------

def test_masked_mean_and_var_match_numpy():
  rng = np.random.default_rng(7)
  x = rng.normal(size=(3, 6)).astype(np.float32)
  mask = prefix_mask([6, 2, 0], 6)
  sel = x[mask > 0]
  xg = np.where(mask > 0, x, np.nan).astype(np.float32)
  assert float(obj.masked_mean(xg, mask)) == pytest.approx(sel.mean(), rel=1e-5)
  assert float(obj.masked_var(xg, mask)) == pytest.approx(sel.var(ddof=1), rel=1e-5)
  assert float(obj.masked_var(xg, mask, unbiased=False)) == pytest.approx(sel.var(), rel=1e-5)
  np.testing.assert_allclose(obj.masked_mean(xg, mask, axis=-1),
                             [x[0].mean(), x[1, :2].mean(), 0.0], rtol=1e-5)
  assert float(obj.masked_var(x, prefix_mask([1, 0, 0], 6))) == 0.0     # n = 1: no NaN
  assert float(obj.masked_mean(x, np.zeros_like(mask))) == 0.0


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten(shift_mean):
  """Over the masked entries: mean 0 (or the original mean with shift_mean=False) and unit
  variance; masked-out entries come back as 0, even if they held NaN."""
  rng = np.random.default_rng(8)
  x = (rng.normal(size=(3, 7)) * 3 + 2).astype(np.float32)
  mask = prefix_mask([7, 4, 1], 7)
  xg = np.where(mask > 0, x, np.nan).astype(np.float32)
  w = np.asarray(obj.masked_whiten(xg, mask, shift_mean=shift_mean))
  sel = w[mask > 0]
  assert sel.mean() == pytest.approx(0.0 if shift_mean else x[mask > 0].mean(), abs=1e-5)
  assert sel.var(ddof=1) == pytest.approx(1.0, rel=1e-4)
  np.testing.assert_array_equal(w[mask == 0], 0.0)


def test_explained_variance():
  rng = np.random.default_rng(9)
  ret = rng.normal(size=(2, 5)).astype(np.float32)
  mask = prefix_mask([5, 3], 5)
  assert float(obj.explained_variance(ret, ret, mask)) == pytest.approx(1.0)
  assert float(obj.explained_variance(np.full_like(ret, 3.0), ret, mask)) == pytest.approx(
      0.0, abs=1e-5)
  sel_r = ret[mask > 0]
  v = ret + 0.5 * rng.normal(size=ret.shape).astype(np.float32)
  want = 1 - np.var(sel_r - v[mask > 0]) / np.var(sel_r)
  assert float(obj.explained_variance(v, ret, mask)) == pytest.approx(want, rel=1e-4)
  assert np.isnan(float(obj.explained_variance(ret, np.ones_like(ret), mask)))


def test_entropy_from_logits():
  logits = jnp.zeros((2, 3, 8)).at[1, 0, 0].set(1e4)
  h = obj.entropy_from_logits(logits)
  np.testing.assert_allclose(h[0], math.log(8), rtol=1e-6)
  assert float(h[1, 0]) == pytest.approx(0.0, abs=1e-6)


def test_losses_jit_with_static_aggregation():
  rng = np.random.default_rng(10)
  mask = prefix_mask([3, 2], 4)
  x = rng.normal(size=(2, 4)).astype(np.float32)
  f = jax.jit(obj.policy_loss, static_argnames=("aggregation",))
  for agg in ("dapo", "grpo", "dr_grpo"):
    got, _ = f(x, x, x, mask, clip_eps=0.2, aggregation=agg)
    want, _ = obj.policy_loss(x, x, x, mask, clip_eps=0.2, aggregation=agg)
    assert float(got) == pytest.approx(float(want), rel=1e-6)
