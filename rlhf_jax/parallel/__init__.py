"""Meshes, logical-axis-rule presets, sharded init, batch placement and multi-host helpers."""
from rlhf_jax.parallel import distributed
from rlhf_jax.parallel.batches import map_batches, mesh_batch_size, padded_batches
from rlhf_jax.parallel.mesh import (check_tensor_groups_local, hybrid_shapes, make_hybrid_mesh,
                                    make_mesh, mesh_shape)
from rlhf_jax.parallel.rules import MESH_AXES, PRESETS, axis_rules
from rlhf_jax.parallel.sharding import (abstract_params, batch_sharding, init_params,
                                        logical_to_shardings, mesh_context, param_shardings,
                                        place_params, shard_batch, stack_placed)
