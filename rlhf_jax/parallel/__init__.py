"""Meshes, logical-axis-rule presets, sharded init and batch placement."""
from rlhf_jax.parallel.mesh import make_mesh, mesh_shape
from rlhf_jax.parallel.rules import MESH_AXES, PRESETS, axis_rules
from rlhf_jax.parallel.sharding import (abstract_params, batch_sharding, init_params,
                                        logical_to_shardings, mesh_context, param_shardings,
                                        place_params, shard_batch)
