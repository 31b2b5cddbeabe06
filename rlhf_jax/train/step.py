"""The generic update: gradient accumulation normalised by a global count, skip if non-finite.

Every objective supplies `loss_fn(params, batch, rng) -> (loss_sum, (count, metric_sums))`:
sums, not means, so that the update over A micro-batches is exactly
    grad( Σ_micro loss_sum ) / Σ_micro count
(e.g. the NLL over the global number of response tokens), independent of how unevenly the
tokens fall into micro-batches. Metrics are normalised by the same global count.
"""
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

State = dict[str, Any]  # {"params", "opt", "step": int32 [], "rng": uint32 [2] key data}
LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, tuple[jax.Array, dict[str, jax.Array]]]]


def _split_micro(batch, accum_steps: int):
  def split(x):
    if x.shape[0] % accum_steps:
      raise ValueError(f"batch dimension {x.shape[0]} is not divisible by "
                       f"accum_steps={accum_steps}")
    return x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:])
  return jax.tree.map(split, batch)


def accumulate(loss_fn: LossFn, params, batch, rng: jax.Array, accum_steps: int, *extra):
  """(loss_sum, count, metric_sums, grad_sum) over `accum_steps` micro-batches (a scan).

  `extra` (e.g. a frozen reference model's params) is passed to every loss_fn call as is.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if accum_steps == 1:
    (loss_sum, (count, sums)), grads = grad_fn(params, batch, rng, *extra)
    return loss_sum, count, sums, grads
  micro = _split_micro(batch, accum_steps)

  def body(carry, xs):
    mb, i = xs
    (loss_sum, (count, sums)), grads = grad_fn(params, mb, jax.random.fold_in(rng, i), *extra)
    return jax.tree.map(jnp.add, carry, (loss_sum, count, sums, grads)), None

  first = jax.tree.map(lambda x: x[0], micro)
  shapes = jax.eval_shape(lambda: grad_fn(params, first, rng, *extra))
  (loss_shape, (count_shape, sums_shape)), grads_shape = shapes
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                       (loss_shape, count_shape, sums_shape, grads_shape))
  out, _ = jax.lax.scan(body, zeros, (micro, jnp.arange(accum_steps)))
  return out


def _global_norm_f32(tree) -> jax.Array:
  """sqrt(sum of squares) over every leaf, accumulated in float32 (bf16 updates included)."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation, *,
                    accum_steps: int = 1, state_extra: tuple[str, ...] = (),
                    post_update: Callable[[State], State] | None = None
                    ) -> Callable[[State, Any], tuple[State, dict]]:
  """step(state, batch) -> (state, metrics). A non-finite loss or gradient leaves params and
  optimiser state unchanged (metrics["skipped"] = 1); the step counter still advances.

  metrics["update_norm"] is the global L2 norm of the update actually applied to the params
  (0 when skipped), in float32: the host loop refuses to checkpoint a state whose update
  exploded (config.run.max_update_norm). Finite weights can still be ruined (lr = 1e30 gives
  ~1e30-sized, finite params), which no NaN check sees; the update norm does. Its squares
  overflow to Inf for such updates, which only makes the verdict clearer.

  state_extra: names of frozen state entries (e.g. "ref", a reference model's params) passed to
    loss_fn after the rng; they are neither differentiated nor micro-batched.
  post_update: state -> state after the update (e.g. TR-DPO's reference sync).
  """

  def step(state: State, batch) -> tuple[State, dict]:
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    extra = tuple(state[name] for name in state_extra)
    loss_sum, count, sums, grad_sum = accumulate(loss_fn, state["params"], batch, rng,
                                                 accum_steps, *extra)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grad_sum)
    loss = loss_sum / denom
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    update_norm = jnp.where(finite, _global_norm_f32(updates), 0.0)
    new_state = {**state, "params": keep(params, state["params"]), "opt": keep(opt, state["opt"]),
                 "step": state["step"] + 1}
    if post_update is not None:
      new_state = post_update(new_state)
    metrics = {"loss": loss, "grad_norm": grad_norm, "update_norm": update_norm, "count": count,
               "skipped": 1 - finite.astype(jnp.int32),
               **{k: v / denom for k, v in sums.items()}}
    return new_state, metrics

  return step
