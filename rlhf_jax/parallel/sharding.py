"""Sharded initialisation and placement of params and batches on a mesh.

Sharded init follows flax lm1b / big_vision: eval_shape -> logical partition specs -> mesh
shardings -> jit(init, out_shardings). No parameter is ever materialised whole on one device.
"""
import contextlib
import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rlhf_jax.parallel.rules import axis_rules

PyTree = Any
BATCH_AXES = ("data", "fsdp")


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules):
  """Sets the mesh and the logical axis rules for tracing, jitting and running."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules(rules)):
    yield


def _fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Drops the mesh axes of any dimension they do not divide (e.g. GPT-2's vocab of 50257).

  Such a dimension is then replicated instead of failing; the others keep their sharding.
  """
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    size = math.prod(mesh.shape[a] for a in names)
    fitted.append(axes if dim % size == 0 else None)
  return P(*fitted)


def logical_to_shardings(logical_specs: PyTree, shapes: PyTree, mesh: Mesh, rules) -> PyTree:
  """NamedShardings for a tree of logical PartitionSpecs and the matching array shapes."""
  mesh_specs = nn.logical_to_mesh(logical_specs, axis_rules(rules))
  return jax.tree.map(lambda spec, s: NamedSharding(mesh, _fit_spec(spec, s.shape, mesh)),
                      mesh_specs, shapes, is_leaf=lambda x: isinstance(x, P))


def abstract_params(module: nn.Module, *sample_args, **sample_kwargs) -> tuple[PyTree, PyTree]:
  """(shapes, logical specs) of `module`'s params, without allocating them."""
  boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), *sample_args,
                                             **sample_kwargs))["params"]
  return nn.unbox(boxed), nn.get_partition_spec(boxed)


def param_shardings(module: nn.Module, mesh: Mesh, rules, *sample_args, **sample_kwargs) -> PyTree:
  """NamedShardings of `module`'s params under `rules`."""
  shapes, specs = abstract_params(module, *sample_args, **sample_kwargs)
  return logical_to_shardings(specs, shapes, mesh, rules)


def init_params(module: nn.Module, key: jax.Array, *sample_args, mesh: Mesh | None = None,
                rules="fsdp", **sample_kwargs) -> PyTree:
  """Plain (unboxed) float32 params; created directly in their shards when `mesh` is given.

  `sample_args` are example inputs (e.g. input_ids, attention_mask); only shapes matter.
  """
  def init(k):
    return nn.unbox(module.init(k, *sample_args, **sample_kwargs)["params"])

  if mesh is None:
    return jax.jit(init)(key)
  shardings = param_shardings(module, mesh, rules, *sample_args, **sample_kwargs)
  with mesh_context(mesh, rules):
    return jax.jit(init, out_shardings=shardings)(key)


def place_params(params: PyTree, shardings: PyTree) -> PyTree:
  """Puts host (numpy) params onto their shardings, each device receiving only its slice."""
  def place(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
  return jax.tree.map(place, params, shardings)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) axis split over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *(None,) * (ndim - 1)))


def put_process_local(x, sharding: NamedSharding) -> jax.Array:
  """A global array from this process's part of it: the whole array on one process, this
  process's slice of the sharded axes on multi-host."""
  x = np.asarray(x)
  if jax.process_count() > 1:
    return jax.make_array_from_process_local_data(sharding, x)
  return jax.device_put(x, sharding)


def stack_placed(trees) -> PyTree:
  """One tree with a new leading axis over `trees` (identical structure); each leaf placed like
  its members with the new axis unsharded (stacked ensembles and vmapped sweeps keep their
  FSDP shardings)."""
  def stack(*xs):
    out = jax.numpy.stack(xs)
    sharding = getattr(xs[0], "sharding", None)
    if isinstance(sharding, NamedSharding):
      out = jax.device_put(out, NamedSharding(sharding.mesh, P(None, *sharding.spec)))
    return out
  return jax.tree.map(stack, *trees)


def shard_batch(batch: PyTree, mesh: Mesh) -> PyTree:
  """Places a host batch (global on one process, or this process's slice on multi-host)."""
  return jax.tree.map(lambda x: put_process_local(x, batch_sharding(mesh, np.ndim(x))), batch)
