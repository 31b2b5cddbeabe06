"""A device mesh from config: axes ("data", "fsdp", "tensor"), -1 = all remaining devices."""
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from rlhf_jax.parallel.rules import MESH_AXES


def mesh_shape(spec: Mapping[str, int] | Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Resolves per-axis sizes (a dict by axis name or a sequence in MESH_AXES order)."""
  if isinstance(spec, Mapping):
    unknown = set(spec) - set(MESH_AXES)
    if unknown:
      raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected some of {MESH_AXES}")
    sizes = [int(spec.get(axis, 1)) for axis in MESH_AXES]
  else:
    sizes = [int(s) for s in spec]
    if len(sizes) != len(MESH_AXES):
      raise ValueError(f"mesh shape {tuple(sizes)} must have one size per axis {MESH_AXES}")
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh shape {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh shape {dict(zip(MESH_AXES, sizes))}: sizes must be >= 1 or -1")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"mesh shape {dict(zip(MESH_AXES, sizes))}: {num_devices} devices are "
                       f"not divisible by the fixed axes' product {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh shape {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices,"
                     f" but {num_devices} are available")
  return tuple(sizes)


def make_mesh(spec: Mapping[str, int] | Sequence[int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over `devices` (default: all) with axes MESH_AXES.

  Axis types are Auto: linen's logical constraints are sharding hints, which the Explicit
  default of jax.make_mesh would turn into assertions (STACK_NOTES G1).
  """
  devices = list(devices) if devices is not None else jax.devices()
  shape = mesh_shape(spec if spec is not None else {"data": -1}, len(devices))
  if devices == jax.devices():
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
              axis_types=(AxisType.Auto,) * len(MESH_AXES))
