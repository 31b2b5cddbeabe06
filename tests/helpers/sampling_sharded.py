"""Run as a script with 8 simulated CPU devices (tests/test_sampling.py does).

Samples from a small policy on one device, then with the batch sharded over data meshes
(8x1, 2x4) and a data x tensor mesh, with the same key; prints one JSON object comparing the
tokens, masks and log-probs to the single-device result and reporting the output sharding.
"""
import dataclasses
import json
import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"  # Before jax starts.

import jax  # noqa: E402
import numpy as np  # noqa: E402

from rlhf_jax import models, parallel, sampling  # noqa: E402

CASES = [("replicated", {"data": 8}), ("fsdp", {"data": 2, "fsdp": 4}),
         ("fsdp_tensor", {"data": 2, "tensor": 4})]


def main():
  assert jax.device_count() == 8, jax.devices()
  # Vocab 16 at init and temperature 1.5: near-uniform next-token distributions, so EOS ends
  # several rows early; 16 also divides the tensor axis, so the vocab really is split.
  cfg = models.get_config("tiny", vocab_size=16, d_model=64, n_layers=1, n_heads=4,
                          n_kv_heads=2, mlp_dim=96, max_len=64)
  module = models.build_model(cfg)
  rng = np.random.RandomState(0)
  ids = rng.randint(3, 16, size=(8, 7)).astype(np.int32)
  mask = np.ones_like(ids)
  for i in range(8):  # Ragged, left-padded prompts.
    pad = rng.randint(0, 5)
    ids[i, :pad], mask[i, :pad] = 0, 0
  host_params = jax.device_get(parallel.init_params(module, jax.random.key(0), ids[:1], mask[:1]))
  scfg = sampling.SamplingConfig(max_new_tokens=16, eos_id=1, pad_id=0, temperature=1.5,
                                 top_k=12, top_p=0.95, min_new_tokens=2)
  ref = jax.device_get(sampling.generate(module, host_params, ids, mask, jax.random.key(7), scfg))
  # Continuous batching: 16 prompts through 8 slots (refilled as rows end), one per device.
  ids16, mask16 = np.concatenate([ids, ids[::-1]]), np.concatenate([mask, mask[::-1]])
  cont_cfg = dataclasses.replace(scfg, slots=8)
  cont_ref = jax.device_get(sampling.generate(module, host_params, ids16, mask16,
                                              jax.random.key(7), cont_cfg))

  results = []
  for preset, shape in CASES:
    mesh = parallel.make_mesh(shape)
    shardings = parallel.param_shardings(module, mesh, preset, ids[:1], mask[:1])
    sharded = parallel.place_params(host_params, shardings)
    batch = parallel.shard_batch({"ids": ids, "mask": mask}, mesh)
    with parallel.mesh_context(mesh, preset):
      out = sampling.generate(module, sharded, batch["ids"], batch["mask"], jax.random.key(7),
                              scfg)
    host = jax.device_get(out)
    batch16 = parallel.shard_batch({"ids": ids16, "mask": mask16}, mesh)
    with parallel.mesh_context(mesh, preset):
      cont = jax.device_get(sampling.generate(module, sharded, batch16["ids"], batch16["mask"],
                                              jax.random.key(7), cont_cfg))
    results.append({
        "preset": preset, "mesh": dict(mesh.shape),
        "tokens_equal": bool(np.array_equal(host.tokens, ref.tokens)),
        "mask_equal": bool(np.array_equal(host.response_mask, ref.response_mask)),
        "finished_equal": bool(np.array_equal(host.finished, ref.finished)),
        "logprob_max_abs": float(np.max(np.abs(host.logprobs - ref.logprobs))),
        "tokens_spec": str(out.tokens.sharding.spec),
        "tokens_shard_rows": int(out.tokens.addressable_shards[0].data.shape[0]),
        "embedding_spec": str(sharded["backbone"]["embed"]["embedding"].sharding.spec),
        "continuous_tokens_equal": bool(np.array_equal(cont.tokens, cont_ref.tokens)),
        "continuous_lengths_equal": bool(np.array_equal(cont.lengths, cont_ref.lengths)),
        "continuous_logprob_max_abs": float(np.max(np.abs(cont.logprobs - cont_ref.logprobs))),
    })
  print(json.dumps({"finished": int(ref.finished.sum()),
                    "continuous_finished": int(cont_ref.finished.sum()),
                    "lengths": ref.lengths.tolist(), "cases": results}))


if __name__ == "__main__":
  main()
