"""KTO: Kahneman–Tversky Optimisation on unpaired (completion, desirable?) examples.

Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization",
arXiv:2402.01306 (its loss λ_y − v(x, y), written as in TRL):

  Δ    = log π(y|x) − log π_ref(y|x)                       (summed response log-probs)
  z₀   = max(0, mean over the batch of Δ' on mismatched pairs (x, y'))   no gradient
  L(x, y) = λ_D·(1 − σ(β(Δ − z₀)))    if y is desirable
            λ_U·(1 − σ(β(z₀ − Δ)))    if y is undesirable

z₀ estimates KL(π‖π_ref) with completions y' that belong to other prompts in the batch (the
data pipeline builds them, e.g. by shifting completions by one row). It is a reference point,
not a training signal, hence the stop-gradient; it is clamped at 0 because a KL is ≥ 0.
"""
import chex
import jax
import jax.numpy as jnp

Metrics = dict[str, jax.Array]


def _masked_sum_count(x: jax.Array, mask: jax.Array, axis_name) -> tuple[jax.Array, jax.Array]:
  s, n = jnp.sum(x * mask), jnp.sum(mask)
  if axis_name is not None:
    s, n = jax.lax.psum((s, n), axis_name)
  return s, n


def kto_loss(policy_logps: jax.Array, ref_logps: jax.Array, kl_policy_logps: jax.Array,
             kl_ref_logps: jax.Array, desirable: jax.Array, *, beta,
             desirable_weight=1.0, undesirable_weight=1.0, axis_name=None,
             mask: jax.Array | None = None,
             kl_mask: jax.Array | None = None) -> tuple[jax.Array, Metrics]:
  """Per-example KTO losses [B] float32, and metrics (see the module docstring for L).

  policy_logps, ref_logps, desirable [B]: summed response log-probs and the label (bool, or
  1/0). kl_policy_logps, kl_ref_logps [B']: the same for the mismatched completions (B' may
  differ from B). desirable_weight / undesirable_weight are λ_D / λ_U; the paper recommends
  λ_D·n_D / (λ_U·n_U) ∈ [1, 4/3] for imbalanced data.

  The batch KL z₀ is a mean over the *global* batch. Under `jax.jit` with the batch sharded
  over the data axis (our steps), `jnp.mean` of the global array already is global: GSPMD
  inserts the all-reduce, so leave axis_name=None. Inside shard_map / pmap-style code, where
  each device sees only its shard, pass the data axis name(s) as `axis_name` and z₀ (and the
  metrics) become psum(sum)/psum(count) over that axis.

  mask [B] (1 = real example) zeroes the losses of padding rows and drops them from the
  metrics; kl_mask [B'] drops padding rows from z₀. Metrics (means over the global batch):
  kl (z₀), rewards/chosen and rewards/rejected (mean βΔ over desirable / undesirable rows;
  0 if there are none), logps/chosen and logps/rejected (likewise for the policy log-probs),
  count/desirable and count/undesirable.
  """
  chex.assert_rank([policy_logps, ref_logps, desirable, kl_policy_logps, kl_ref_logps], 1)
  chex.assert_equal_shape([policy_logps, ref_logps, desirable])
  chex.assert_equal_shape([kl_policy_logps, kl_ref_logps])
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  delta = f32(policy_logps) - f32(ref_logps)
  kl_delta = f32(kl_policy_logps) - f32(kl_ref_logps)
  good = jnp.asarray(desirable).astype(bool)
  row = jnp.ones_like(delta) if mask is None else f32(mask)
  if mask is not None:
    chex.assert_equal_shape([row, delta])
  kl_row = jnp.ones_like(kl_delta) if kl_mask is None else f32(kl_mask)
  if kl_mask is not None:
    chex.assert_equal_shape([kl_row, kl_delta])

  kl_sum, kl_count = _masked_sum_count(kl_delta, kl_row, axis_name)
  z0 = jax.lax.stop_gradient(jnp.maximum(kl_sum / jnp.maximum(kl_count, 1.0), 0.0))
  # 1 − σ(x) = σ(−x): exact in the tails, where 1 − σ(x) would round to 0 or 1.
  loss_desirable = desirable_weight * jax.nn.sigmoid(-beta * (delta - z0))
  loss_undesirable = undesirable_weight * jax.nn.sigmoid(-beta * (z0 - delta))
  losses = jnp.where(good, loss_desirable, loss_undesirable) * row

  w_good = row * good
  w_bad = row * (~good)
  rewards = beta * delta
  policy = f32(policy_logps)
  metrics = {"kl": z0}
  for name, label, w in (("chosen", "desirable", w_good), ("rejected", "undesirable", w_bad)):
    r_sum, count = _masked_sum_count(rewards, w, axis_name)
    lp_sum, _ = _masked_sum_count(policy, w, axis_name)
    metrics[f"rewards/{name}"] = r_sum / jnp.maximum(count, 1.0)
    metrics[f"logps/{name}"] = lp_sum / jnp.maximum(count, 1.0)
    metrics[f"count/{label}"] = count
  return losses, metrics
