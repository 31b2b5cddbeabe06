"""Run as a script with 8 simulated CPU devices (tests/test_sharding.py does).

Computes loss and gradients of a small policy on one device, then under each sharding preset
and mesh shape, and prints one JSON object of relative differences and observed shardings.
"""
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"  # Before jax starts.

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from rlhf_jax import models, objectives, parallel  # noqa: E402

CASES = [("replicated", {"data": 8}), ("fsdp", {"data": 2, "fsdp": 4}), ("fsdp", {"fsdp": 8}),
         ("fsdp_tensor", {"fsdp": 2, "tensor": 4}), ("fsdp_tensor", {"fsdp": 8, "tensor": 1})]


def loss_fn(module, params, ids, mask):
  logp = objectives.token_logprobs(module.apply({"params": params}, ids, mask)[:, :-1], ids[:, 1:])
  weights = (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)
  return -jnp.sum(logp * weights) / jnp.sum(weights)


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main():
  assert jax.device_count() == 8, jax.devices()
  cfg = models.get_config("tiny", vocab_size=128, d_model=64, n_layers=2, n_heads=4,
                          n_kv_heads=2, mlp_dim=128, dtype=sys.argv[1] if len(sys.argv) > 1
                          else "float32")
  module = models.build_model(cfg)
  rng = np.random.RandomState(0)
  ids = rng.randint(2, 128, size=(8, 24)).astype(np.int32)
  mask = np.ones_like(ids)
  for i in range(8):  # Ragged rows, padded on alternating sides.
    n = rng.randint(6, 24)
    if i % 2:
      mask[i, :24 - n] = 0
    else:
      mask[i, n:] = 0
  key = jax.random.key(0)
  grad_fn = jax.value_and_grad(lambda p, i, m: loss_fn(module, p, i, m))

  params = parallel.init_params(module, key, ids[:1], mask[:1])
  ref_loss, ref_grads = jax.jit(grad_fn)(params, ids, mask)
  results = []
  for preset, shape in CASES:
    mesh = parallel.make_mesh(shape)
    sharded = parallel.init_params(module, key, ids[:1], mask[:1], mesh=mesh, rules=preset)
    shardings = jax.tree.map(lambda x: x.sharding, sharded)
    batch = parallel.shard_batch({"ids": ids, "mask": mask}, mesh)
    with parallel.mesh_context(mesh, preset):
      step = jax.jit(grad_fn, out_shardings=(None, shardings))
      loss, grads = step(sharded, batch["ids"], batch["mask"])
    emb = sharded["backbone"]["embed"]["embedding"]
    q = sharded["backbone"]["block_0"]["attn"]["q"]["kernel"]
    results.append({
        "preset": preset, "mesh": dict(mesh.shape),
        "init_rel": max(rel(a, b) for a, b in zip(jax.tree.leaves(sharded),
                                                  jax.tree.leaves(params))),
        "loss_rel": rel(loss, ref_loss),
        "grad_rel": max(rel(a, b) for a, b in zip(jax.tree.leaves(grads),
                                                  jax.tree.leaves(ref_grads))),
        "grads_keep_param_sharding": all(
            g.sharding.is_equivalent_to(p.sharding, g.ndim)
            for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(sharded))),
        "embedding_spec": str(emb.sharding.spec), "q_kernel_spec": str(q.sharding.spec),
        "q_kernel_shard_shape": list(q.addressable_shards[0].data.shape),
        "q_kernel_shape": list(q.shape),
        "batch_spec": str(batch["ids"].sharding.spec),
    })
  print(json.dumps({"ref_loss": float(ref_loss), "cases": results}))


if __name__ == "__main__":
  main()
