"""Run as a script with 8 simulated CPU devices (tests/test_checkpoint.py does), twice:

  checkpoint_mesh_restore.py save DIR     # params + adam state sharded with fsdp on {"fsdp": 8}
  checkpoint_mesh_restore.py restore DIR  # onto {"data": 2, "fsdp": 2, "tensor": 2}, fsdp_tensor

`save` also writes the saved values to DIR/expected.npz. `restore` prints one JSON object:
whether every value matches bitwise and every leaf landed in the target sharding.
Separate processes, so nothing but the files on disk carries over.
"""
import functools
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"  # Before jax starts.

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from rlhf_jax import models, parallel  # noqa: E402
from rlhf_jax.train.checkpoint import Checkpointer, abstract_like  # noqa: E402

STEP = 4


def build(mesh, rules, seed):
  cfg = models.get_config("tiny", vocab_size=128, d_model=64, n_layers=2, n_heads=4,
                          n_kv_heads=2, mlp_dim=128)
  module = models.build_model(cfg)
  ids = np.zeros((2, 8), np.int32)
  params = parallel.init_params(module, jax.random.key(seed), ids, np.ones_like(ids), mesh=mesh,
                                rules=rules)
  tx = optax.adam(1e-2)
  # Adam's mu/nu are sharded like the params, its count replicated (optax.tree_map_params is
  # the idiomatic way to derive optimizer-state shardings from the param shardings).
  replicated = NamedSharding(mesh, P())
  opt_shardings = optax.tree_map_params(
      tx, lambda _, sharding: sharding, jax.eval_shape(tx.init, params),
      jax.tree.map(lambda p: p.sharding, params), transform_non_params=lambda _: replicated)
  opt = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  return {"params": params, "opt": opt,
          "step": jax.device_put(np.int32(STEP), replicated),
          "rng": jax.device_put(jax.random.key_data(jax.random.key(seed)), replicated)}, tx


def flat(tree):
  return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def save(directory):
  mesh = parallel.make_mesh({"fsdp": 8})
  state, tx = build(mesh, "fsdp", seed=0)
  # A few Adam updates, so mu/nu/count are not their trivial initial values.
  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def update(params, opt):
    grads = jax.tree.map(lambda p: 0.1 * p + 0.01, params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt

  for _ in range(3):
    state["params"], state["opt"] = update(state["params"], state["opt"])
  np.savez(os.path.join(directory, "expected.npz"),
           **{k: np.asarray(v) for k, v in flat(state).items()})
  specs = {k: str(v.sharding.spec) for k, v in flat(state).items()}
  with Checkpointer(os.path.join(directory, "ckpt"), save_every=STEP, keep=2) as ckpt:
    assert ckpt.maybe_save(STEP, state, {"mesh": {"fsdp": 8}})
  print(json.dumps({"saved_specs": specs}))


def restore(directory):
  mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  fresh, _ = build(mesh, "fsdp_tensor", seed=1)  # Other values: only the layout is used.
  target = abstract_like(fresh)
  del fresh
  with Checkpointer(os.path.join(directory, "ckpt"), save_every=STEP, keep=2) as ckpt:
    step, state, extra = ckpt.restore_latest(target)
  expected = np.load(os.path.join(directory, "expected.npz"))
  got, want_sharding = flat(state), flat(target)
  assert sorted(got) == sorted(expected.files), (sorted(got), expected.files)
  mismatched = [k for k in got if not (np.array_equal(np.asarray(got[k]), expected[k])
                                      and np.asarray(got[k]).dtype == expected[k].dtype)]
  wrong_sharding = [k for k in got if not got[k].sharding.is_equivalent_to(
      want_sharding[k].sharding, got[k].ndim)]
  kernel = [k for k in got if k.startswith("['params']") and k.endswith("['gate']['kernel']")][0]
  mu_kernel = [k for k in got if "mu" in k and k.endswith("['gate']['kernel']")][0]
  print(json.dumps({
      "step": step, "extra": extra, "num_leaves": len(got), "mismatched": mismatched,
      "wrong_sharding": wrong_sharding,
      "kernel_spec": str(got[kernel].sharding.spec),
      "kernel_shard_shape": list(got[kernel].addressable_shards[0].data.shape),
      "kernel_shape": list(got[kernel].shape),
      "mu_kernel_spec": str(got[mu_kernel].sharding.spec),
      "mesh": dict(got[kernel].sharding.mesh.shape),
  }))


if __name__ == "__main__":
  assert jax.device_count() == 8, jax.devices()
  {"save": save, "restore": restore}[sys.argv[1]](sys.argv[2])
