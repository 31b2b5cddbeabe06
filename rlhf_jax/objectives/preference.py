"""Offline preference objectives: the DPO family, pure functions of per-sequence log-probs.

Notation (every quantity is per pair, [B]):
  Δ_w = log π(y_w|x) − log π_ref(y_w|x)      chosen log-ratio  (summed response log-probs)
  Δ_l = log π(y_l|x) − log π_ref(y_l|x)      rejected log-ratio
  Δ   = Δ_w − Δ_l
  avg = summed log-prob / response tokens     (per-token average, reference-free losses)

Every loss in PREFERENCE_LOSSES has the signature

  fn(logps: PreferenceLogps, *, beta, **hparams) -> (per_example_losses [B] float32, metrics)

and returns per-example losses (not a mean) so the train step can mask padding pairs and
normalise by the global pair count across micro-batches, as `bradley_terry` does. Unknown
hparams are a TypeError, not silently ignored. `beta` (and numeric hparams) may be traced, so a
sweep over β can be one `vmap`. The dict is the registry: configs should hold the function
(or its name as a key of this dict); there is no decorator registry.

Stability: everything is float32; log σ and 1 − σ are written as `jax.nn.log_sigmoid(x)` and
σ(−x), never log(sigmoid(x)) or 1 − sigmoid(x), so values and gradients stay finite for
|βΔ| far beyond float32's exp range (tested up to |Δ| = 1e4).
"""
from typing import Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp

Metrics = dict[str, jax.Array]
LossOutput = tuple[jax.Array, Metrics]


class PreferenceLogps(NamedTuple):
  """Per-pair sequence log-probs, each [B] (cast to float32 by the losses). A pytree (a
  NamedTuple, so no Flax import here); build it with keywords.

  policy_* / ref_*: summed log-probs of the response tokens under the policy / the frozen
  reference (ref_* may be None for the reference-free losses `simpo` and `orpo`).
  *_tokens: number of response tokens (int or float), needed by the length-normalised losses
  (`ipo` by default, `simpo`, `orpo`) and by the RPO NLL term; a count of 0 is read as 1.
  mask: optional, 1 = a real pair, 0 = an empty slot (packed batches hold a fixed number of
  pair slots). Metrics then average over real pairs only and `preference_loss` returns 0 for
  empty slots; their inputs must be finite (log-probs 0 and counts 0 are).
  """
  policy_chosen: jax.Array
  policy_rejected: jax.Array
  ref_chosen: jax.Array | None = None
  ref_rejected: jax.Array | None = None
  chosen_tokens: jax.Array | None = None
  rejected_tokens: jax.Array | None = None
  mask: jax.Array | None = None


# ----------------------------------------------------------------------------------------
# Boundary checks and shared pieces.
# ----------------------------------------------------------------------------------------

def _f32(x: jax.Array | None) -> jax.Array | None:
  return None if x is None else jnp.asarray(x, jnp.float32)


def _prepare(logps: PreferenceLogps, *, need_ref: bool, need_tokens: bool) -> PreferenceLogps:
  """Checks ranks/shapes, that the needed fields exist, and casts everything to float32."""
  if need_ref and (logps.ref_chosen is None or logps.ref_rejected is None):
    raise ValueError("this loss needs the reference log-probs (ref_chosen, ref_rejected)")
  if need_tokens and (logps.chosen_tokens is None or logps.rejected_tokens is None):
    raise ValueError("this loss needs the response token counts (chosen_tokens, "
                     "rejected_tokens)")
  present = jax.tree.leaves(logps)  # the fields that are not None
  chex.assert_rank(present, 1)
  chex.assert_equal_shape(present)
  # Counts of 0 (empty slots of a packed batch) would divide by zero; they are masked anyway.
  count = lambda n: None if n is None else jnp.maximum(_f32(n), 1.0)
  return PreferenceLogps(
      policy_chosen=_f32(logps.policy_chosen), policy_rejected=_f32(logps.policy_rejected),
      ref_chosen=_f32(logps.ref_chosen), ref_rejected=_f32(logps.ref_rejected),
      chosen_tokens=count(logps.chosen_tokens), rejected_tokens=count(logps.rejected_tokens),
      mask=logps.mask)


def _log_ratios(lp: PreferenceLogps) -> tuple[jax.Array, jax.Array]:
  """(Δ_w, Δ_l)."""
  return lp.policy_chosen - lp.ref_chosen, lp.policy_rejected - lp.ref_rejected


def _averages(lp: PreferenceLogps) -> tuple[jax.Array, jax.Array]:
  """(avg_w, avg_l): the policy's per-token average log-probs."""
  return lp.policy_chosen / lp.chosen_tokens, lp.policy_rejected / lp.rejected_tokens


def _check_smoothing(eps, upper: float, name: str):
  """Range check for a concrete label_smoothing (a traced one is the caller's business)."""
  if isinstance(eps, (int, float)) and not 0.0 <= eps < upper:
    raise ValueError(f"{name}: label_smoothing must be in [0, {upper}), got {eps}")


def _mean(x: jax.Array, mask: jax.Array | None) -> jax.Array:
  if mask is None:
    return jnp.mean(x)
  m = jnp.asarray(mask, jnp.float32)
  return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)


def preference_metrics(logps: PreferenceLogps, *, beta, reference_free: bool = False,
                       mask: jax.Array | None = None,
                       chosen_entropy: jax.Array | None = None,
                       rejected_entropy: jax.Array | None = None) -> Metrics:
  """The standard DPO metrics, each a mean over the batch (a scalar float32).

    rewards/chosen    = mean β·Δ_w            (DPO's implicit reward, arXiv:2305.18290)
    rewards/rejected  = mean β·Δ_l
    rewards/margins   = mean β·(Δ_w − Δ_l)
    rewards/accuracies= fraction of pairs with β·Δ_w > β·Δ_l (ties count as wrong)
    logps/chosen, logps/rejected = mean summed policy log-probs

  reference_free=True (SimPO, ORPO) uses β·avg instead of β·Δ (SimPO's reward,
  arXiv:2405.14734; TRL reports the same for ORPO). Means are over all B rows, or over the rows
  where `mask` [B] (default: logps.mask) is 1 (padding pairs of a packed batch); they are
  *means of this batch*, so under gradient accumulation the logged value is that of the
  micro-batch(es) averaged by the caller. chosen_entropy / rejected_entropy [B], if given (the
  per-sequence mean per-token entropy, e.g. from `objectives.logprobs_and_entropy`), add
  entropy/chosen and entropy/rejected.
  """
  lp = _prepare(logps, need_ref=not reference_free, need_tokens=reference_free)
  mask = lp.mask if mask is None else mask
  if reference_free:
    r_w, r_l = _averages(lp)
  else:
    r_w, r_l = _log_ratios(lp)
  r_w, r_l = beta * r_w, beta * r_l
  metrics = {
      "rewards/chosen": _mean(r_w, mask),
      "rewards/rejected": _mean(r_l, mask),
      "rewards/margins": _mean(r_w - r_l, mask),
      "rewards/accuracies": _mean((r_w > r_l).astype(jnp.float32), mask),
      "logps/chosen": _mean(lp.policy_chosen, mask),
      "logps/rejected": _mean(lp.policy_rejected, mask),
  }
  for name, ent in (("entropy/chosen", chosen_entropy), ("entropy/rejected", rejected_entropy)):
    if ent is not None:
      chex.assert_equal_shape([ent, lp.policy_chosen])
      metrics[name] = _mean(_f32(ent), mask)
  return metrics


# ----------------------------------------------------------------------------------------
# Losses with a reference model.
# ----------------------------------------------------------------------------------------

def sigmoid_loss(logps: PreferenceLogps, *, beta, label_smoothing=0.0) -> LossOutput:
  """DPO (Rafailov et al. 2023, arXiv:2305.18290, eq. 7) and conservative DPO.

    L = −(1 − ε)·log σ(βΔ) − ε·log σ(−βΔ)

  ε = 0 is plain DPO; ε > 0 is cDPO (Mitchell 2023, "A note on DPO with noisy preferences &
  relationship to IPO"): the binary cross-entropy against the soft label 1 − ε, i.e. each
  label is assumed flipped with probability ε. Its minimum sits at finite βΔ = log((1−ε)/ε).
  """
  _check_smoothing(label_smoothing, 1.0, "sigmoid")
  lp = _prepare(logps, need_ref=True, need_tokens=False)
  d_w, d_l = _log_ratios(lp)
  x = beta * (d_w - d_l)
  losses = (-(1.0 - label_smoothing) * jax.nn.log_sigmoid(x)
            - label_smoothing * jax.nn.log_sigmoid(-x))
  return losses, preference_metrics(lp, beta=beta)


def robust_loss(logps: PreferenceLogps, *, beta, label_smoothing=0.0) -> LossOutput:
  """Robust DPO, rDPO (Chowdhury et al. 2024, arXiv:2403.00409).

    L = [−(1 − ε)·log σ(βΔ) + ε·log σ(−βΔ)] / (1 − 2ε),   0 ≤ ε < ½

  An unbiased estimate of the clean DPO loss when labels flip with probability ε:
  (1 − ε)·L(Δ) + ε·L(−Δ) = −log σ(βΔ). ε = 0 is plain DPO. Unlike cDPO it is unbounded below
  (≈ −ε·βΔ/(1 − 2ε) for large margins), as in the paper.
  """
  _check_smoothing(label_smoothing, 0.5, "robust")
  lp = _prepare(logps, need_ref=True, need_tokens=False)
  d_w, d_l = _log_ratios(lp)
  x = beta * (d_w - d_l)
  losses = ((-(1.0 - label_smoothing) * jax.nn.log_sigmoid(x)
             + label_smoothing * jax.nn.log_sigmoid(-x)) / (1.0 - 2.0 * label_smoothing))
  return losses, preference_metrics(lp, beta=beta)


def hinge_loss(logps: PreferenceLogps, *, beta) -> LossOutput:
  """SLiC-HF calibration loss (Zhao et al. 2023, arXiv:2305.10425), as used by RSO (Liu et al.
  2023, arXiv:2309.06657, its "hinge" loss), on DPO's log-ratios:

    L = max(0, 1 − βΔ)

  = β·max(0, 1/β − Δ): SLiC's loss with margin δ = 1/β, scaled by β.
  """
  lp = _prepare(logps, need_ref=True, need_tokens=False)
  d_w, d_l = _log_ratios(lp)
  losses = jax.nn.relu(1.0 - beta * (d_w - d_l))
  return losses, preference_metrics(lp, beta=beta)


def ipo_loss(logps: PreferenceLogps, *, beta, length_normalized: bool = True) -> LossOutput:
  """IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
  Preferences", arXiv:2310.12036, the sampled IPO loss), with τ = β:

    L = ((Δ_w/|y_w| − Δ_l/|y_l|) − 1/(2β))²

  length_normalized=True (default) averages the log-ratios over response tokens, as TRL does
  and as works better in practice; False uses the summed log-ratios of the paper:
  L = (Δ − 1/(2β))².
  """
  lp = _prepare(logps, need_ref=True, need_tokens=length_normalized)
  d_w, d_l = _log_ratios(lp)
  if length_normalized:
    d_w, d_l = d_w / lp.chosen_tokens, d_l / lp.rejected_tokens
  losses = jnp.square((d_w - d_l) - 1.0 / (2.0 * beta))
  return losses, preference_metrics(lp, beta=beta)


def sppo_hard_loss(logps: PreferenceLogps, *, beta) -> LossOutput:
  """SPPO with hard labels (Wu et al. 2024, "Self-Play Preference Optimization",
  arXiv:2405.00675; its squared loss with the win probabilities replaced by hard labels
  P(y_w ≻ y_l) = 1, P(y_l ≻ y_w) = 0, and η = 1/β):

    L = (Δ_w − 1/(2β))² + (Δ_l + 1/(2β))²

  Each log-ratio is regressed separately: the chosen one towards +1/(2β), the rejected one
  towards −1/(2β).
  """
  lp = _prepare(logps, need_ref=True, need_tokens=False)
  d_w, d_l = _log_ratios(lp)
  half = 1.0 / (2.0 * beta)
  losses = jnp.square(d_w - half) + jnp.square(d_l + half)
  return losses, preference_metrics(lp, beta=beta)


def nca_pair_loss(logps: PreferenceLogps, *, beta) -> LossOutput:
  """NCA for pairwise preferences (Chen et al. 2024, "Noise Contrastive Alignment of Language
  Models with Explicit Rewards", arXiv:2402.05369; the pairwise-preference form):

    L = −log σ(βΔ_w) − ½·log σ(−βΔ_w) − ½·log σ(−βΔ_l)

  Optimises absolute (not relative) likelihoods: it pushes Δ_w up and Δ_l down separately, so
  the chosen likelihood does not fall as it can under DPO.
  """
  lp = _prepare(logps, need_ref=True, need_tokens=False)
  d_w, d_l = _log_ratios(lp)
  r_w, r_l = beta * d_w, beta * d_l
  losses = (-jax.nn.log_sigmoid(r_w) - 0.5 * jax.nn.log_sigmoid(-r_w)
            - 0.5 * jax.nn.log_sigmoid(-r_l))
  return losses, preference_metrics(lp, beta=beta)


def apo_zero_loss(logps: PreferenceLogps, *, beta) -> LossOutput:
  """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive
  Revisions", arXiv:2408.06266):

    L = (1 − σ(βΔ_w)) + σ(βΔ_l)

  Raises the chosen likelihood and lowers the rejected one (use when chosen outputs are better
  than the model's own). 1 − σ(x) is computed as σ(−x). Bounded in [0, 2].
  """
  lp = _prepare(logps, need_ref=True, need_tokens=False)
  d_w, d_l = _log_ratios(lp)
  losses = jax.nn.sigmoid(-beta * d_w) + jax.nn.sigmoid(beta * d_l)
  return losses, preference_metrics(lp, beta=beta)


def apo_down_loss(logps: PreferenceLogps, *, beta) -> LossOutput:
  """APO-down (D'Oosterlinck et al. 2024, arXiv:2408.06266):

    L = σ(βΔ_w) + (1 − σ(β(Δ_w − Δ_l)))

  Lowers both likelihoods, the rejected one more (use when the model's outputs are better than
  the chosen ones). Bounded in [0, 2].
  """
  lp = _prepare(logps, need_ref=True, need_tokens=False)
  d_w, d_l = _log_ratios(lp)
  losses = jax.nn.sigmoid(beta * d_w) + jax.nn.sigmoid(-beta * (d_w - d_l))
  return losses, preference_metrics(lp, beta=beta)


# ----------------------------------------------------------------------------------------
# Reference-free losses (ref_* may be None and is ignored if given).
# ----------------------------------------------------------------------------------------

def simpo_loss(logps: PreferenceLogps, *, beta, gamma=0.5) -> LossOutput:
  """SimPO (Meng et al. 2024, "Simple Preference Optimization with a Reference-Free Reward",
  arXiv:2405.14734, eq. 6):

    L = −log σ(β·(avg_w − avg_l) − γ)

  with avg the policy's per-token average log-prob and γ a target reward margin (default 0.5,
  TRL's `simpo_gamma`; the paper tunes γ/β ∈ [0.3, 1.6]).
  """
  lp = _prepare(logps, need_ref=False, need_tokens=True)
  avg_w, avg_l = _averages(lp)
  losses = -jax.nn.log_sigmoid(beta * (avg_w - avg_l) - gamma)
  return losses, preference_metrics(lp, beta=beta, reference_free=True)


# An average log-prob of exactly 0 (probability 1) makes the odds p/(1 − p) infinite; the
# ORPO odds use avg clipped to at most this (p ≤ 1 − 1e-6). The NLL term is not clipped.
_ORPO_MAX_AVG_LOGP = -1e-6


def _log1mexp(a: jax.Array) -> jax.Array:
  """log(1 − e^a) for a < 0, accurate everywhere (Mächler 2012, "Accurately computing
  log(1 − exp(−|a|))"): log(−expm1(a)) near 0, log1p(−e^a) further out. Each branch only
  ever sees inputs that are safe for it, so the unused branch cannot leak a NaN gradient."""
  near = a > -jnp.log(2.0)
  a_near = jnp.where(near, a, -1.0)
  a_far = jnp.where(near, -1.0, a)
  return jnp.where(near, jnp.log(-jnp.expm1(a_near)), jnp.log1p(-jnp.exp(a_far)))


def orpo_loss(logps: PreferenceLogps, *, beta) -> LossOutput:
  """ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference
  Model", arXiv:2403.07691, eqs. 6–7), with λ = β:

    L = −avg_w − β·log σ(log odds(y_w) − log odds(y_l))
    log odds(y) = avg − log(1 − e^{avg})

  The first term is the SFT NLL per chosen token. log(1 − e^{avg}) is computed with a stable
  log1mexp on avg clipped to ≤ −1e-6. Extra metrics: orpo/log_odds (mean log odds ratio) and
  orpo/nll (mean −avg_w).
  """
  lp = _prepare(logps, need_ref=False, need_tokens=True)
  avg_w, avg_l = _averages(lp)
  c_w = jnp.minimum(avg_w, _ORPO_MAX_AVG_LOGP)
  c_l = jnp.minimum(avg_l, _ORPO_MAX_AVG_LOGP)
  log_odds = (c_w - c_l) - (_log1mexp(c_w) - _log1mexp(c_l))
  nll = -avg_w
  losses = nll - beta * jax.nn.log_sigmoid(log_odds)
  metrics = preference_metrics(lp, beta=beta, reference_free=True)
  metrics.update({"orpo/log_odds": _mean(log_odds, lp.mask), "orpo/nll": _mean(nll, lp.mask)})
  return losses, metrics


PREFERENCE_LOSSES: dict[str, Callable[..., LossOutput]] = {
    "sigmoid": sigmoid_loss,
    "robust": robust_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
    "sppo_hard": sppo_hard_loss,
    "nca_pair": nca_pair_loss,
    "apo_zero": apo_zero_loss,
    "apo_down": apo_down_loss,
    "simpo": simpo_loss,
    "orpo": orpo_loss,
}


def preference_loss(loss: str | Callable[..., LossOutput], logps: PreferenceLogps, *, beta,
                    nll_weight=0.0, chosen_nll: jax.Array | None = None,
                    **hparams) -> LossOutput:
  """A preference loss (a key of PREFERENCE_LOSSES, or the function itself) plus an optional
  RPO-style NLL term on the chosen responses (Pang et al. 2024, "Iterative Reasoning Preference
  Optimization", arXiv:2404.19733; TRL's `rpo_alpha`):

    L = L_pref + α · NLL(y_w)/|y_w|,    α = nll_weight

  NLL per chosen token defaults to −policy_chosen / chosen_tokens (TRL's normalisation; the
  paper divides by |x| + |y_w|); pass `chosen_nll` [B] to use another one. The term is added
  when nll_weight is not the Python number 0 (a traced weight always adds it), and reported as
  metrics["nll"] (mean over the batch). Returns (per_example_losses [B], metrics); with
  logps.mask, the losses of empty slots are 0.
  """
  fn = PREFERENCE_LOSSES[loss] if isinstance(loss, str) else loss
  losses, metrics = fn(logps, beta=beta, **hparams)
  if not (isinstance(nll_weight, (int, float)) and nll_weight == 0 and chosen_nll is None):
    if chosen_nll is None:
      lp = _prepare(logps, need_ref=False, need_tokens=True)
      chosen_nll = -lp.policy_chosen / lp.chosen_tokens
    chosen_nll = _f32(chosen_nll)
    chex.assert_equal_shape([chosen_nll, losses])
    losses = losses + nll_weight * chosen_nll
    metrics = {**metrics, "nll": _mean(chosen_nll, logps.mask)}
  if logps.mask is not None:
    losses = jnp.where(jnp.asarray(logps.mask) > 0, losses, 0.0)
  return losses, metrics
