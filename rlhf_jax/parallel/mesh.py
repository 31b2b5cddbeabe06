"""A device mesh from config: axes ("data", "fsdp", "tensor"), -1 = all remaining devices.

Pod-shaped meshes: on a multi-slice TPU pod (or a GPU cluster) devices talk fast inside a
slice or host (ICI / NVLink) and slowly across them (DCN). `config.mesh.dcn` says how much of
each axis spans slices: the total size of an axis is ici x dcn, and the mesh is laid out by
`jax.experimental.mesh_utils.create_hybrid_device_mesh` so that each axis's DCN part is its
outer part. Put DCN on `data` (one gradient all-reduce per step crosses the slow network),
perhaps on `fsdp`; never on `tensor`, whose collectives run inside every layer. Granules are
TPU slices where devices carry a `slice_index`, processes (hosts) otherwise; two local CPU
processes stand in for two slices in the tests.
"""
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
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

  `spec` may carry "dcn": {axis: size} (config.mesh.dcn), the across-slice part of each axis;
  when its product is above 1 the mesh is pod-shaped (see `make_hybrid_mesh`).

  Axis types are Auto: linen's logical constraints are sharding hints, which the Explicit
  default of jax.make_mesh would turn into assertions (STACK_NOTES G1).
  """
  if isinstance(spec, Mapping) and "dcn" in spec:
    spec = dict(spec)
    dcn = spec.pop("dcn") or {}
    if math.prod(int(v) for v in dict(dcn).values()) > 1:
      return make_hybrid_mesh(spec, dcn, devices)
  devices = list(devices) if devices is not None else jax.devices()
  shape = mesh_shape(spec if spec is not None else {"data": -1}, len(devices))
  if devices == jax.devices():
    mesh = jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
  else:
    mesh = Mesh(np.asarray(devices).reshape(shape), MESH_AXES,
                axis_types=(AxisType.Auto,) * len(MESH_AXES))
  check_tensor_groups_local(mesh)
  return mesh


def _granule_attr(devices: Sequence[jax.Device]) -> str:
  """"slice_index" where devices carry several slices (multi-slice TPU), else "process_index"."""
  slices = {getattr(d, "slice_index", None) for d in devices}
  return "slice_index" if None not in slices and len(slices) > 1 else "process_index"


def hybrid_shapes(spec: Mapping[str, int], dcn: Mapping[str, int], num_devices: int,
                  num_granules: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(ici shape, dcn shape) in MESH_AXES order: `spec` gives each axis's total size (-1 = the
  rest), `dcn` its across-granule part (missing = 1); ici = total / dcn."""
  unknown = set(dcn) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"config.mesh.dcn: unknown axes {sorted(unknown)}; expected some of "
                     f"{MESH_AXES}")
  dcn_shape = tuple(int(dcn.get(axis, 1)) for axis in MESH_AXES)
  if any(s < 1 for s in dcn_shape):
    raise ValueError(f"config.mesh.dcn={dict(dcn)}: sizes must be >= 1")
  if dcn_shape[MESH_AXES.index("tensor")] != 1:
    raise ValueError("config.mesh.dcn.tensor must be 1: tensor-parallel collectives run in "
                     "every layer and must stay inside a slice/host")
  if math.prod(dcn_shape) != num_granules:
    raise ValueError(f"config.mesh.dcn={dict(dcn)} spans {math.prod(dcn_shape)} slices/hosts, "
                     f"but the devices belong to {num_granules}")
  total = mesh_shape(spec, num_devices)
  for axis, t, d in zip(MESH_AXES, total, dcn_shape):
    if t % d:
      raise ValueError(f"config.mesh.{axis}={t} is not divisible by config.mesh.dcn.{axis}={d}")
  return tuple(t // d for t, d in zip(total, dcn_shape)), dcn_shape


def make_hybrid_mesh(spec: Mapping[str, int], dcn: Mapping[str, int],
                     devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A pod-shaped mesh: each axis = (dcn part across slices/hosts) x (ici part inside one),
  via create_hybrid_device_mesh, so that a slice/host holds a contiguous block of every axis
  and tensor-parallel groups never leave it."""
  devices = list(devices) if devices is not None else jax.devices()
  attr = _granule_attr(devices)
  granules = len({getattr(d, attr) for d in devices})
  ici_shape, dcn_shape = hybrid_shapes(spec, dict(dcn), len(devices), granules)
  array = mesh_utils.create_hybrid_device_mesh(
      ici_shape, dcn_shape, devices, process_is_granule=attr == "process_index")
  mesh = Mesh(array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
  check_tensor_groups_local(mesh)
  return mesh


def check_tensor_groups_local(mesh: Mesh) -> None:
  """Every tensor-parallel group (devices along `tensor`) lives in one process: its per-layer
  collectives must not cross the host network. Raises naming config.mesh.tensor otherwise."""
  if jax.process_count() == 1 or "tensor" not in mesh.axis_names:
    return
  axis = mesh.axis_names.index("tensor")
  groups = np.moveaxis(mesh.devices, axis, -1).reshape(-1, mesh.devices.shape[axis])
  for group in groups:
    if len({d.process_index for d in group}) > 1:
      raise ValueError(f"config.mesh.tensor={mesh.shape['tensor']}: a tensor-parallel group "
                       f"spans processes {sorted({d.process_index for d in group})}; use a "
                       "tensor size that divides the devices of one host")
