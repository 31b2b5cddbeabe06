"""Run as a script with 8 simulated CPU devices (tests/test_mesh_presets.py does).

Five reward-model, DPO and PPO train steps of a tiny model on one device, then under each
preset (replicated = data parallel, fsdp, fsdp_tensor) on meshes 2x4, 8x1 and 4x2, from the
same init and batches; and the PPO steps on packed rollouts ("ppo_packed": the same batches,
data.pack_rollouts over 8 groups) on one device and under fsdp 2x4 and fsdp_tensor 4x2. Each step is compiled ahead of time; the FSDP steps' optimised HLO is
searched for the collectives. Prints one JSON object.
"""
import json
import os
import re

# Before jax starts. Backend optimisation level 0: these programs are tiny, and LLVM's
# optimisation passes would dominate the time of 30 compiles.
os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 "
                           "--xla_backend_optimization_level=0")
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

from rlhf_jax import data, models, parallel  # noqa: E402
from rlhf_jax.train import ppo, preference, reward, rl, state as state_lib  # noqa: E402
from rlhf_jax.train import step as step_lib  # noqa: E402

STEPS, ROWS, PROMPT, RESPONSE, VOCAB = 5, 8, 6, 10, 128
# (outer, inner) sizes -> mesh axes, per preset: the batch always spans 8 / (tensor) devices.
AXES = {"replicated": ("data", "fsdp"), "fsdp": ("data", "fsdp"), "fsdp_tensor": ("fsdp", "tensor")}
SHAPES = ((2, 4), (8, 1), (4, 2))
TX = optax.adamw(1e-2)
MODEL = models.get_config("tiny", vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=4,
                          n_kv_heads=2, mlp_dim=64, max_len=32)


def padded_rows(rng, n):
  """[n, P+R] ids and masks: left-padded prompts, right-padded responses, and the loss mask."""
  ids = rng.integers(2, VOCAB, (n, PROMPT + RESPONSE)).astype(np.int32)
  mask = np.ones_like(ids)
  loss = np.zeros_like(ids)
  for i in range(n):
    p, r = rng.integers(2, PROMPT + 1), rng.integers(2, RESPONSE + 1)
    mask[i, :PROMPT - p] = 0
    mask[i, PROMPT + r:] = 0
    loss[i, PROMPT:PROMPT + r] = 1
  return ids * mask, mask, loss


def make_batches(kind, rng):
  out = []
  for _ in range(STEPS):
    if kind in ("rm", "dpo"):
      c_ids, c_mask, c_loss = padded_rows(rng, ROWS)
      r_ids, r_mask, r_loss = padded_rows(rng, ROWS)
      b = {"chosen_ids": c_ids, "chosen_mask": c_mask, "rejected_ids": r_ids,
           "rejected_mask": r_mask}
      if kind == "rm":
        b["margin"] = np.zeros(ROWS, np.float32)
      else:
        b.update(chosen_loss_mask=c_loss, rejected_loss_mask=r_loss)
    else:  # A fixed rollout batch for the PPO update (policy + value head).
      ids, mask, loss = padded_rows(rng, ROWS)
      shape = (ROWS, RESPONSE)
      b = {"prompt_ids": ids[:, :PROMPT], "prompt_mask": mask[:, :PROMPT],
           "tokens": ids[:, PROMPT:], "response_mask": loss[:, PROMPT:],
           "old_logp": rng.normal(-4.0, 0.3, shape).astype(np.float32),
           "ref_logp": rng.normal(-4.0, 0.3, shape).astype(np.float32),
           "advantages": rng.normal(0, 1, shape).astype(np.float32),
           "returns": rng.normal(0, 1, shape).astype(np.float32),
           "values": rng.normal(0, 1, shape).astype(np.float32),
           "loss_weight": np.ones(ROWS, np.float32)}
      if kind == "ppo_packed":  # Rows split over up to 8 batch devices: 8 groups.
        b.update(data.pack_rollouts(b["prompt_ids"], b["prompt_mask"], b["tokens"],
                                    b["response_mask"], groups=8, length=PROMPT + RESPONSE,
                                    pad_id=0))
    out.append(b)
  return out


def objective(kind):
  """(module, step function, state_extra names)."""
  tx = TX
  if kind == "rm":
    module = models.build_model(MODEL, "reward")
    loss = reward.reward_loss_fn(module, use_margin=False, center_coef=0.01)
    return module, step_lib.make_train_step(loss, tx), ()
  if kind == "dpo":
    module = models.build_model(MODEL, "policy")
    cfg = preference.default_config()
    loss = preference.preference_loss_fn(module, cfg, PROMPT)
    return module, step_lib.make_train_step(loss, tx, state_extra=("ref",)), ("ref",)
  module = models.build_model(MODEL, "policy_value")
  cfg = rl.default_config()
  cfg.value = "head"  # The critic is the value head on the policy_value module.
  loss = ppo.ppo_loss_fn(module, None, cfg, PROMPT)
  step = step_lib.make_train_step(lambda p, b, rng, k: loss({"policy": p}, b, rng, k), tx,
                                  state_extra=("kl_coef",))
  return module, step, ("kl_coef",)


def collectives(hlo: str, params) -> dict:
  """Collective ops in optimised HLO, and how many float32 elements are all-reduced against
  how many the sharded params hold (XLA:CPU writes a gradient reduce-scatter as an all-reduce
  of the full gradient + a dynamic-slice, often combined into tuples and reshaped, so shapes
  do not match param by param; GPU and TPU pipelines turn that pair into a reduce-scatter)."""
  count = lambda op: len(re.findall(rf"\s{op}(?:-start)?\(", hlo))
  sharded = [x for x in jax.tree.leaves(params) if not x.sharding.is_fully_replicated]
  reduced = 0
  for line in hlo.splitlines():
    m = re.search(r" all-reduce(?:-start)?\(", line)
    if m and " = " in line[:m.start()]:  # The result type, e.g. (f32[64,32]{1,0}, f32[]).
      for dims in re.findall(r"f32\[([\d,]*)\]", line[:m.start()].split(" = ", 1)[1]):
        reduced += int(np.prod([int(d) for d in dims.split(",") if d]))
  return {"all_gather": count("all-gather"), "reduce_scatter": count("reduce-scatter"),
          "all_reduce": count("all-reduce"), "dynamic_slice": count("dynamic-slice"),
          "sharded_params": len(sharded), "param_leaves": len(jax.tree.leaves(params)),
          "sharded_param_elements": int(sum(x.size for x in sharded)),
          "all_reduced_elements": reduced}


def host_init(kind):
  """Params and optimiser state of `kind`, made once on one device and fetched to the host:
  every case places the very same numbers on its mesh (no per-case init compiles)."""
  module, _, _ = objective(kind)
  ids = jnp.ones((1, 8), jnp.int32)
  params = jax.device_get(parallel.init_params(module, jax.random.key(0), ids, ids))
  return params, jax.device_get(TX.init(params))


def run(kind, mesh, preset, batches, host, want_hlo=False):
  module, step, extra = objective(kind)
  ids = jnp.ones((1, 8), jnp.int32)
  host_params, host_opt = host
  shardings = parallel.param_shardings(module, mesh, preset, ids, ids)
  replicated = NamedSharding(mesh, P())
  params = parallel.place_params(host_params, shardings)
  opt = optax.tree_map_params(TX, lambda x, s: parallel.place_params(x, s), host_opt, shardings,
                              transform_non_params=lambda x: jax.device_put(x, replicated))
  state = {"params": params, "opt": opt,
           "step": jax.device_put(np.zeros((), np.int32), replicated),
           "rng": jax.device_put(jax.random.key_data(jax.random.key(1)), replicated)}
  if "ref" in extra:
    state["ref"] = parallel.place_params(host_params, shardings)
  if "kl_coef" in extra:
    state["kl_coef"] = jax.device_put(np.float32(0.05), replicated)
  losses, hlo = [], None
  with parallel.mesh_context(mesh, preset):
    placed = [parallel.shard_batch(b, mesh) for b in batches]
    compiled = state_lib.jit_step(step, state).lower(state, placed[0]).compile()
    if want_hlo:
      hlo = collectives(compiled.as_text(), state["params"])
    for b in placed:
      state, metrics = compiled(state, b)
      losses.append(float(metrics["loss"]))
  return losses, hlo


def main():
  assert jax.device_count() == 8, jax.devices()
  out = {"cases": [], "hlo": {}}
  kinds = sys.argv[1].split(",") if len(sys.argv) > 1 else ("rm", "dpo", "ppo", "ppo_packed")
  seeds = {"rm": 0, "dpo": 1, "ppo": 2, "ppo_packed": 2}  # Packed: the PPO batches, packed.
  for kind in kinds:
    batches = make_batches(kind, np.random.default_rng(seeds[kind]))
    single = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
    host = host_init(kind)
    ref, _ = run(kind, single, "replicated", batches, host)
    out["cases"].append({"kind": kind, "preset": "single", "mesh": [1], "losses": ref})
    for preset, axes in AXES.items():
      for shape in SHAPES:
        if kind == "ppo_packed" and (preset, shape) not in (("fsdp", (2, 4)),
                                                              ("fsdp_tensor", (4, 2))):
          continue
        mesh = parallel.make_mesh(dict(zip(axes, shape)))
        hlo_wanted = shape == (2, 4) and preset in ("fsdp", "replicated")
        start = time.process_time()
        losses, hlo = run(kind, mesh, preset, batches, host, hlo_wanted)
        print(f"{kind} {preset} {shape}: {time.process_time() - start:.1f} s CPU", file=sys.stderr)
        out["cases"].append({"kind": kind, "preset": preset, "mesh": list(shape),
                             "losses": losses})
        if hlo is not None:
          out["hlo"][f"{kind}/{preset}"] = hlo
  print(json.dumps(out))


if __name__ == "__main__":
  main()
