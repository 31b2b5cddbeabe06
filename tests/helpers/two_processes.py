"""The set-up both two-process checkpoint helpers share: join a 2-process CPU job (one device
each) from `argv` = PROCESS_ID PORT DIR, and a state sharded across the two processes.

Imported first by the helper scripts: jax.distributed must start before any other JAX use.
"""
import sys

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

jax.config.update("jax_num_cpu_devices", 1)
PROCESS_ID, PORT, DIRECTORY = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{PORT}", num_processes=2,
                           process_id=PROCESS_ID, initialization_timeout=60)

MESH = jax.make_mesh((2,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
SHARDING = NamedSharding(MESH, P("fsdp"))


def make_state(step: int, half: int) -> dict:
  """{"w": [2 * half]}, this process's half filled with 10 * step + PROCESS_ID."""
  local = np.full((half,), 10.0 * step + PROCESS_ID, np.float32)
  return {"w": jax.make_array_from_process_local_data(SHARDING, local)}
