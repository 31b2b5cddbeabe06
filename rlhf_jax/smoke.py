"""Foundation smoke run: a tiny policy trained for a few steps on a mesh, exported to HF.

  python -m rlhf_jax.smoke --workdir=/tmp/rlhf_smoke

Builds the `tiny` Llama-style policy with sharded init over every local device (fsdp preset),
takes `--steps` AdamW steps of next-token loss on a fixed random batch (the loss must fall),
exports the params with save_hf, loads them back with load_hf and checks the logits agree.
The quickstart experiment on the embedded task replaces this as the main job.
"""
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from rlhf_jax import models, objectives, parallel

_WORKDIR = flags.DEFINE_string("workdir", "/tmp/rlhf_jax_smoke", "Where the HF export goes.")
_STEPS = flags.DEFINE_integer("steps", 3, "AdamW steps to take.")
_MODEL = flags.DEFINE_string("model", "tiny", "Named model size.")
_PRESET = flags.DEFINE_enum("sharding", "fsdp", sorted(parallel.PRESETS), "Sharding preset.")


def next_token_loss(module, params, ids, mask):
  logp = objectives.token_logprobs(module.apply({"params": params}, ids, mask)[:, :-1], ids[:, 1:])
  weights = (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)
  return -jnp.sum(logp * weights) / jnp.sum(weights)


def main(argv):
  del argv
  cfg = models.get_config(_MODEL.value)
  module = models.build_model(cfg)
  mesh = parallel.make_mesh({"data": -1})
  batch_size = 2 * jax.device_count()
  ids = np.random.RandomState(0).randint(2, cfg.vocab_size, size=(batch_size, 64)).astype(np.int32)
  mask = np.ones_like(ids)
  params = parallel.init_params(module, jax.random.key(0), ids[:1], mask[:1], mesh=mesh,
                                rules=_PRESET.value)
  tx = optax.adamw(3e-3)
  with parallel.mesh_context(mesh, _PRESET.value):  # Optimizer state is born on the mesh too.
    state = {"params": params, "opt": jax.jit(tx.init)(params)}
  batch = parallel.shard_batch({"ids": ids, "mask": mask}, mesh)

  def train_step(state, batch):
    loss, grads = jax.value_and_grad(
        lambda p: next_token_loss(module, p, batch["ids"], batch["mask"]))(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt": opt}, loss

  # Outputs pinned to the inputs' shardings, so step 2 reuses step 1's executable.
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  with parallel.mesh_context(mesh, _PRESET.value):
    step = jax.jit(train_step, donate_argnums=0, out_shardings=(state_shardings, None))
    losses = []
    for i in range(_STEPS.value):
      start = time.perf_counter()
      state, loss = step(state, batch)
      losses.append(float(loss))
      print(json.dumps({"step": i + 1, "loss": round(losses[-1], 4),
                        "seconds": round(time.perf_counter() - start, 3)}), flush=True)
  if _STEPS.value > 1 and not losses[-1] < losses[0]:
    raise SystemExit(f"smoke run failed: loss did not fall ({losses})")

  export = os.path.join(_WORKDIR.value, "hf_export")
  models.save_hf(module, state["params"], export)
  module2, params2 = models.load_hf(export)
  diff = float(jnp.max(jnp.abs(module.apply({"params": state["params"]}, ids[:2])
                               - module2.apply({"params": params2}, ids[:2]))))
  print(json.dumps({"model": _MODEL.value, "params": cfg.num_params(),
                    "devices": jax.device_count(), "mesh": dict(mesh.shape),
                    "first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4),
                    "hf_export": export, "export_max_abs_logit_diff": diff}))
  if diff > 1e-5:
    raise SystemExit(f"smoke run failed: exported logits differ by {diff}")


if __name__ == "__main__":
  app.run(main)
