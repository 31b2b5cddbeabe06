"""PPO for language models: GAE, KL estimators and controllers, clipped losses, masked stats.

Shapes: per-token tensors are [B, T] (T = response buffer length), `mask` [B, T] is 1 on the
real response tokens (EOS included) and 0 on padding. Everything is computed in float32.

  GAE (Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage
  Estimation", arXiv:1506.02438, eq. 16):
      δ_t = r_t + γ·V_{t+1} − V_t            (V after the last real token is 0)
      A_t = δ_t + γλ·A_{t+1}                 returns R_t = A_t + V_t
  Clipped surrogate (Schulman et al. 2017, "Proximal Policy Optimization Algorithms",
  arXiv:1707.06347, eq. 7), with DAPO's clip-higher (Yu et al. 2025, arXiv:2503.14476, eq. 10):
      ρ_t = π_θ(a_t|s_t) / π_old(a_t|s_t)
      L_t = max(−A_t·ρ_t, −A_t·clip(ρ_t, 1 − ε_low, 1 + ε_high))
  KL estimators (Schulman 2020, "Approximating KL Divergence",
  http://joschu.net/blog/kl-approx.html), with samples x ~ π and r = π_ref(x)/π(x):
      k1 = −log r          k2 = ½(log r)²          k3 = (r − 1) − log r
  KL in the reward and the adaptive KL controller: Ziegler et al. 2019, "Fine-Tuning Language
  Models from Human Preferences", arXiv:1909.08593, §2.2.

Positions where mask == 0 never contribute, and the functions are written with `jnp.where`
(not multiplication) so that garbage — even inf/NaN — in padding positions cannot leak.
"""
from typing import Callable

import chex
import jax
import jax.numpy as jnp

Metrics = dict[str, jax.Array]


def _f32(x) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def _valid(mask: jax.Array) -> jax.Array:
  return jnp.asarray(mask) > 0


# ----------------------------------------------------------------------------------------
# Masked reductions.
# ----------------------------------------------------------------------------------------

def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
  """num / den, and 0 where den == 0 (with finite gradients: the divisor is never 0)."""
  ok = den != 0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
  """Σ mask·x / Σ mask over `axis` (all axes if None); 0 where the mask is empty.

  `mask` broadcasts to x's shape and may hold weights (not only 0/1). float32.
  """
  x = _f32(x)
  w = jnp.broadcast_to(_f32(mask), x.shape)
  num = jnp.sum(jnp.where(w != 0, x * w, 0.0), axis=axis)
  return _safe_div(num, jnp.sum(w, axis=axis))


def masked_var(x: jax.Array, mask: jax.Array, unbiased: bool = True, axis=None) -> jax.Array:
  """Masked variance: masked_mean((x − masked_mean(x))²), times n/(n − 1) if `unbiased`.

  n = Σ mask. Bessel's correction needs n > 1; with n ≤ 1 the biased value (0) is returned
  rather than a NaN, since this runs under jit where raising is not possible.
  """
  x = _f32(x)
  w = jnp.broadcast_to(_f32(mask), x.shape)
  mean = masked_mean(x, w, axis=axis)
  centred = x - (mean if axis is None else jnp.expand_dims(mean, axis))
  var = masked_mean(jnp.square(centred), w, axis=axis)
  if unbiased:
    n = jnp.sum(w, axis=axis)
    var = jnp.where(n > 1, var * n / jnp.where(n > 1, n - 1, 1.0), var)
  return var


def masked_whiten(x: jax.Array, mask: jax.Array, shift_mean: bool = True,
                  eps: float = 1e-8) -> jax.Array:
  """(x − μ)/√(σ² + eps) with μ, σ² the masked mean and (unbiased) variance over all entries.

  shift_mean=False adds μ back (rescale only; used for advantages by some implementations).
  Masked-out entries are set to 0 in the output (not left untouched), so the result can be
  summed or fed to a loss without re-masking.
  """
  x = _f32(x)
  valid = jnp.broadcast_to(_valid(mask), x.shape)
  mean = masked_mean(x, valid)
  var = masked_var(x, valid, unbiased=True)
  out = (x - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return jnp.where(valid, out, 0.0)


def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
  """1 − Var[R − V] / Var[R] over the masked tokens: 1 = perfect critic, 0 = no better than a
  constant, < 0 = worse. NaN when Var[R] = 0 (undefined). A diagnostic, float32 scalar."""
  chex.assert_equal_shape([values, returns, mask])
  v, r = _f32(values), _f32(returns)
  valid = _valid(mask)
  var_r = masked_var(jnp.where(valid, r, 0.0), valid, unbiased=False)
  var_err = masked_var(jnp.where(valid, r - v, 0.0), valid, unbiased=False)
  return jnp.where(var_r > 0, 1.0 - var_err / jnp.where(var_r > 0, var_r, 1.0), jnp.nan)


# ----------------------------------------------------------------------------------------
# GAE.
# ----------------------------------------------------------------------------------------

def gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, *, gamma,
        lam) -> tuple[jax.Array, jax.Array]:
  """Generalised advantage estimation: (advantages, returns), both [B, T] float32.

  rewards, values, mask [B, T]. A reverse `lax.scan` over T computes, per row,

      δ_t = r_t + γ·V_{t+1}·m_{t+1} − V_t
      A_t = (δ_t + γλ·A_{t+1}·m_{t+1})·m_t        R_t = (A_t + V_t)·m_t

  i.e. every position with mask == 0 is terminal: the value (and advantage) after the last
  real token is 0, and those positions get A = R = 0 whatever their rewards/values hold.
  Masks are normally a prefix of ones per row; a 0 inside a row simply splits it into
  independent episodes (so packed rows work as long as segments are separated by a 0).
  λ = 1 gives Monte-Carlo returns minus V; λ = 0 gives one-step TD errors.
  gamma and lam may be traced. No gradient flows out: advantages and returns are targets.
  """
  chex.assert_rank([rewards, values, mask], 2)
  chex.assert_equal_shape([rewards, values, mask])
  valid = _valid(mask)
  r = jnp.where(valid, _f32(rewards), 0.0)
  v = jnp.where(valid, _f32(values), 0.0)
  gamma, lam = _f32(gamma), _f32(lam)

  def step(carry, xs):
    next_value, next_adv = carry            # both 0 after the end of an episode
    r_t, v_t, m_t = xs
    delta = r_t + gamma * next_value - v_t
    adv = jnp.where(m_t, delta + gamma * lam * next_adv, 0.0)
    return (v_t, adv), adv                  # v_t is already 0 where m_t is 0

  zeros = jnp.zeros(r.shape[0], jnp.float32)
  # Scan over time: transpose to [T, B] and walk it backwards.
  _, adv_t = jax.lax.scan(step, (zeros, zeros), (r.T, v.T, valid.T), reverse=True)
  advantages = adv_t.T
  returns = jnp.where(valid, advantages + v, 0.0)
  return jax.lax.stop_gradient(advantages), jax.lax.stop_gradient(returns)


# ----------------------------------------------------------------------------------------
# KL estimators, KL-shaped rewards, KL controllers.
# ----------------------------------------------------------------------------------------

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(logp: jax.Array, ref_logp: jax.Array, kind: str = "k1") -> jax.Array:
  """Elementwise estimate of KL(π‖π_ref) from tokens sampled from π, float32.

  With d = ref_logp − logp (= log r):
    k1 = logp − ref_logp = −d          unbiased, high variance, can be negative
    k2 = ½(logp − ref_logp)² = ½d²     biased (second-order accurate near π = π_ref), ≥ 0
    k3 = exp(d) − d − 1                unbiased, ≥ 0, low variance (GRPO's "kl" term)
  k3 is computed as expm1(d) − d (a Taylor series for |d| < 0.1). It is not clamped: for
  d ≳ 88 it overflows to inf (clamp the log-ratio yourself if your policy can drift that far).
  """
  chex.assert_equal_shape([logp, ref_logp])
  d = _f32(ref_logp) - _f32(logp)
  if kind == "k1":
    return -d
  if kind == "k2":
    return 0.5 * jnp.square(d)
  if kind == "k3":
    # expm1(d) − d cancels for small |d|; there the Taylor series (error < d⁶/720) is exact
    # to float32 precision, and both branches are finite so the gradient is too.
    small = jnp.abs(d) < 0.1
    series = jnp.square(d) * (0.5 + d * (1 / 6 + d * (1 / 24 + d / 120)))
    return jnp.where(small, series, jnp.expm1(d) - d)
  raise ValueError(f"unknown KL estimator {kind!r}; expected one of {KL_ESTIMATORS}")


def _last_token(valid: jax.Array) -> jax.Array:
  """[B, T] bool, True at the last position of each row where valid is True (none if empty)."""
  T = valid.shape[-1]
  last = T - 1 - jnp.argmax(valid[:, ::-1], axis=-1)
  return (jnp.arange(T)[None, :] == last[:, None]) & jnp.any(valid, axis=-1, keepdims=True)


def shape_rewards(score: jax.Array, logp: jax.Array, ref_logp: jax.Array, mask: jax.Array, *,
                  kl_coef, kind: str = "k1") -> tuple[jax.Array, jax.Array]:
  """Per-token rewards with the KL penalty folded in (Ziegler et al. 2019, eq. 2; Ouyang et al.
  2022, eq. 2): (token_rewards [B, T], kl [B, T]), both float32 and 0 where mask == 0.

      r_t = −β·k_t            on every real token
      r_T += score            at the last real token (EOS) of the row

  score [B] is the sequence-level reward; k_t = kl_penalty(logp, ref_logp, kind); β = kl_coef
  (scalar, may be traced). A row with an empty mask receives nothing.
  """
  chex.assert_rank([score, logp, ref_logp, mask], [1, 2, 2, 2])
  chex.assert_equal_shape([logp, ref_logp, mask])
  chex.assert_equal_shape_prefix([score, mask], 1)
  valid = _valid(mask)
  kl = jnp.where(valid, kl_penalty(logp, ref_logp, kind), 0.0)
  rewards = -_f32(kl_coef) * kl
  rewards = rewards + jnp.where(_last_token(valid), _f32(score)[:, None], 0.0)
  return rewards, kl


def update_kl_coef(kl_coef, observed_kl, n_steps, *, target, horizon) -> jax.Array:
  """Adaptive KL controller (Ziegler et al. 2019, §2.2, arXiv:1909.08593):

      e   = clip(KL_observed / KL_target − 1, −0.2, 0.2)
      β' = β · (1 + e · n_steps / horizon)

  n_steps is the number of samples (or steps) since the last update, as in the paper's K_β.
  Returns a float32 scalar; works on Python floats or (traced) arrays.
  """
  error = jnp.clip(_f32(observed_kl) / _f32(target) - 1.0, -0.2, 0.2)
  return _f32(kl_coef) * (1.0 + error * _f32(n_steps) / _f32(horizon))


def multiplicative_kl_coef(kl_coef, observed_kl, n_steps=None, *, target, factor=1.5,
                           horizon=None) -> jax.Array:
  """Simple multiplicative controller: β·factor if KL_observed > target, β/factor if
  KL_observed < target, β unchanged if equal ("above/below" compare to the target itself, no
  dead band). n_steps and horizon are accepted (and ignored) so that every controller in
  KL_CONTROLLERS shares one signature. float32 scalar.
  """
  del n_steps, horizon
  beta, kl, target = _f32(kl_coef), _f32(observed_kl), _f32(target)
  return jnp.where(kl > target, beta * factor, jnp.where(kl < target, beta / factor, beta))


def fixed_kl_coef(kl_coef, observed_kl=None, n_steps=None, *, target=None,
                  horizon=None) -> jax.Array:
  """No control: returns β unchanged (float32)."""
  del observed_kl, n_steps, target, horizon
  return _f32(kl_coef)


KL_CONTROLLERS: dict[str, Callable[..., jax.Array]] = {
    "adaptive": update_kl_coef,
    "multiplicative": multiplicative_kl_coef,
    "fixed": fixed_kl_coef,
}


def next_kl_coef(controller: str | Callable[..., jax.Array], kl_coef, observed_kl, n_steps, *,
                 target=None, horizon=None, **hparams) -> jax.Array:
  """The new KL coefficient from a controller named in KL_CONTROLLERS (or the function itself).

  "adaptive" needs target and horizon, "multiplicative" needs target (and takes factor=),
  "fixed" needs neither.
  """
  if isinstance(controller, str):
    if controller not in KL_CONTROLLERS:
      raise ValueError(f"unknown KL controller {controller!r}; expected one of "
                       f"{sorted(KL_CONTROLLERS)}")
    if controller != "fixed" and target is None:
      raise ValueError(f"the {controller!r} KL controller needs a target KL")
    if controller == "adaptive" and horizon is None:
      raise ValueError("the 'adaptive' KL controller needs a horizon")
    controller = KL_CONTROLLERS[controller]
  return controller(kl_coef, observed_kl, n_steps, target=target, horizon=horizon, **hparams)


# ----------------------------------------------------------------------------------------
# Loss aggregation.
# ----------------------------------------------------------------------------------------

LOSS_AGGREGATIONS = {
    "token_mean": "token_mean", "dapo": "token_mean",
    "seq_mean_token_mean": "seq_mean_token_mean", "grpo": "seq_mean_token_mean",
    "seq_mean_token_sum_norm": "seq_mean_token_sum_norm", "dr_grpo": "seq_mean_token_sum_norm",
}


def aggregate_loss(per_token: jax.Array, mask: jax.Array, aggregation: str = "token_mean", *,
                   max_len=None) -> jax.Array:
  """Reduces per-token losses [B, T] to a scalar (float32). `aggregation` (alias in brackets):

    "token_mean" ("dapo")            Σ_{i,t} m·L / Σ_{i,t} m: every token of the batch weighs the
                                     same (DAPO, arXiv:2503.14476, eq. 12). Independent of how
                                     sequences are laid out in rows (packing-invariant).
    "seq_mean_token_mean" ("grpo")   mean_i [Σ_t m·L / Σ_t m]: GRPO as published (Shao et al.
                                     2024, arXiv:2402.03300, eq. 3); long answers weigh less per
                                     token.
    "seq_mean_token_sum_norm"        mean_i [Σ_t m·L / max_len] with a constant max_len (Dr.
      ("dr_grpo")                    GRPO, Liu et al. 2025, arXiv:2503.20783, §3.1), removing
                                     GRPO's length bias; max_len defaults to T (the buffer
                                     length, a constant under static shapes).

  In the "seq_*" modes the mean over sequences is over the rows with at least one real token;
  empty rows (padding rows, or completions zeroed by `grpo.mask_truncated`) are left out.
  Normalisers are over the batch passed in; under jit with a sharded global batch they are
  global already.
  """
  chex.assert_rank([per_token, mask], 2)
  chex.assert_equal_shape([per_token, mask])
  if aggregation not in LOSS_AGGREGATIONS:
    raise ValueError(f"unknown loss aggregation {aggregation!r}; expected one of "
                     f"{sorted(LOSS_AGGREGATIONS)}")
  mode = LOSS_AGGREGATIONS[aggregation]
  w = _f32(mask)
  weighted = jnp.where(w != 0, _f32(per_token) * w, 0.0)
  if mode == "token_mean":
    return _safe_div(jnp.sum(weighted), jnp.sum(w))
  tokens = jnp.sum(w, axis=-1)
  rows = (tokens > 0).astype(jnp.float32)
  if mode == "seq_mean_token_mean":
    per_seq = _safe_div(jnp.sum(weighted, axis=-1), tokens)
  else:
    max_len = per_token.shape[-1] if max_len is None else max_len
    per_seq = jnp.sum(weighted, axis=-1) / _f32(max_len)
  return _safe_div(jnp.sum(per_seq * rows), jnp.sum(rows))


# ----------------------------------------------------------------------------------------
# Losses.
# ----------------------------------------------------------------------------------------

def policy_loss(logp: jax.Array, old_logp: jax.Array, advantages: jax.Array, mask: jax.Array, *,
                clip_eps, clip_eps_high=None, aggregation: str = "token_mean",
                max_len=None) -> tuple[jax.Array, Metrics]:
  """PPO's clipped surrogate loss (to minimise), float32 scalar, and metrics.

      ρ_t = exp(logp_t − old_logp_t)
      L_t = max(−A_t·ρ_t, −A_t·clip(ρ_t, 1 − ε, 1 + ε_high))      ε_high = ε unless given

  then reduced with `aggregate_loss(aggregation, max_len=...)`. logp, old_logp, mask [B, T];
  advantages [B, T] (per token, PPO/GAE) or [B] (per sequence, GRPO/RLOO: broadcast over T).
  old_logp and advantages are wrapped in stop_gradient, so GRPO's single-update case can pass
  old_logp = logp (ρ = 1 with gradient ∇logp). clip_eps_high > clip_eps is DAPO's clip-higher.

  Metrics (always token means over the mask, whatever the aggregation):
    clipfrac   fraction of tokens where the clipped term is the larger one (zero gradient);
    approx_kl  k3 estimate of KL(π_old‖π_θ) = (ρ − 1) − log ρ (tokens are samples of π_old;
               unbiased and ≥ 0, unlike TRL's ½(log ρ)²).
  """
  chex.assert_rank([logp, old_logp, mask], 2)
  chex.assert_equal_shape([logp, old_logp, mask])
  adv = jax.lax.stop_gradient(_f32(advantages))
  if adv.ndim == 1:
    chex.assert_equal_shape_prefix([adv, mask], 1)
    adv = adv[:, None]
  else:
    chex.assert_equal_shape([adv, mask])
  valid = _valid(mask)
  adv = jnp.where(valid, adv, 0.0)
  eps_low = clip_eps
  eps_high = clip_eps if clip_eps_high is None else clip_eps_high
  # Padding can hold anything; keep log ρ = 0 there so no inf/NaN reaches the gradients.
  log_ratio = jnp.where(valid, _f32(logp) - jax.lax.stop_gradient(_f32(old_logp)), 0.0)
  ratio = jnp.exp(log_ratio)
  unclipped = -adv * ratio
  clipped = -adv * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
  per_token = jnp.maximum(unclipped, clipped)
  loss = aggregate_loss(per_token, mask, aggregation, max_len=max_len)
  sg_ratio, sg_log_ratio = jax.lax.stop_gradient(ratio), jax.lax.stop_gradient(log_ratio)
  metrics = {
      "clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), valid),
      "approx_kl": masked_mean(sg_ratio - 1.0 - sg_log_ratio, valid),
  }
  return loss, metrics


def value_loss(values: jax.Array, old_values: jax.Array, returns: jax.Array, mask: jax.Array, *,
               clip_eps, aggregation: str = "token_mean",
               max_len=None) -> tuple[jax.Array, Metrics]:
  """Clipped value loss (PPO as implemented in openai/baselines and TRL), float32 scalar:

      V^clip_t = old_V_t + clip(V_t − old_V_t, −ε, ε)
      L_t      = ½·max((V_t − R_t)², (V^clip_t − R_t)²)

  reduced with `aggregate_loss` (token mean by default). clip_eps=None disables clipping
  (plain ½(V − R)²). old_values and returns are stop_gradient'ed targets.
  Metrics: vf_clipfrac = token fraction where the clipped term is the larger one.
  """
  chex.assert_rank([values, old_values, returns, mask], 2)
  chex.assert_equal_shape([values, old_values, returns, mask])
  valid = _valid(mask)
  v = jnp.where(valid, _f32(values), 0.0)
  old = jnp.where(valid, jax.lax.stop_gradient(_f32(old_values)), 0.0)
  ret = jnp.where(valid, jax.lax.stop_gradient(_f32(returns)), 0.0)
  unclipped = jnp.square(v - ret)
  if clip_eps is None:
    clipped = unclipped
  else:
    clipped = jnp.square(old + jnp.clip(v - old, -clip_eps, clip_eps) - ret)
  per_token = 0.5 * jnp.maximum(unclipped, clipped)
  loss = aggregate_loss(per_token, mask, aggregation, max_len=max_len)
  metrics = {"vf_clipfrac": masked_mean((clipped > unclipped).astype(jnp.float32), valid)}
  return loss, metrics


def entropy_from_logits(logits: jax.Array) -> jax.Array:
  """Per-position entropy H = −Σ_v p_v log p_v of softmax(logits) over the last axis, float32."""
  logits = _f32(logits)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def entropy_bonus(entropy: jax.Array, mask: jax.Array, aggregation: str = "token_mean", *,
                  max_len=None) -> jax.Array:
  """The aggregated per-token entropy [B, T] → scalar (≥ 0), reduced like the policy loss.

  A bonus, not a loss: use `loss = pg_loss − ent_coef · entropy_bonus(entropy, mask)`.
  """
  return aggregate_loss(entropy, mask, aggregation, max_len=max_len)
