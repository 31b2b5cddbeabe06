"""Train state: a plain dict {"params", "opt", "step", "rng"} created directly on the mesh."""
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rlhf_jax import parallel

State = dict[str, Any]


def opt_shardings(tx: optax.GradientTransformation, params, mesh: Mesh):
  """Shardings of tx.init(params) (params: arrays or ShapeDtypeStructs with shardings): the
  params-shaped moments shard like the params, the rest (step counts) is replicated. A plain
  jit(tx.init) replicates the moments: zeros_like's outputs do not inherit the inputs'
  shardings, which would keep a full copy of every moment on each device under FSDP."""
  replicated = NamedSharding(mesh, P())
  return optax.tree_map_params(tx, lambda _, sharding: sharding, jax.eval_shape(tx.init, params),
                               jax.tree.map(lambda x: x.sharding, params),
                               transform_non_params=lambda _: replicated)


def state_from_params(params, tx: optax.GradientTransformation, rng: jax.Array, mesh: Mesh,
                      rules) -> State:
  """A fresh state around existing (sharded) params: optimiser state born on the mesh."""
  replicated = NamedSharding(mesh, P())
  with parallel.mesh_context(mesh, rules):
    opt = jax.jit(tx.init, out_shardings=opt_shardings(tx, params, mesh))(params)
  return {"params": params, "opt": opt,
          "step": jax.device_put(jnp.zeros((), jnp.int32), replicated),
          "rng": jax.device_put(jax.random.key_data(rng), replicated)}


def abstract_state(state: State) -> State:
  """ShapeDtypeStructs with shardings: the restore target for orbax on this mesh."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      state)


def shardings(state: State) -> State:
  return jax.tree.map(lambda x: x.sharding, state)


def jit_step(step_fn, state: State):
  """jit with the state donated and its output pinned to the input shardings (STACK_NOTES G3:
  otherwise XLA may pick other shardings and every next call recompiles)."""
  return jax.jit(step_fn, donate_argnums=0, out_shardings=(shardings(state), None))
