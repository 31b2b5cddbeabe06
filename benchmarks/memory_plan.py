"""Memory plan on paper: bytes per device of DPO and PPO train steps, lowered and compiled for a
simulated mesh but never run (no parameter is ever materialised).

  python benchmarks/memory_plan.py                          # small + llama-3.2-1b, 8 devices
  python benchmarks/memory_plan.py --results benchmarks/RESULTS.md   # also write the table
  python benchmarks/memory_plan.py --models tiny --presets fsdp --remat off --shrink
  python benchmarks/memory_plan.py --from-jsonl a.jsonl b.jsonl --results benchmarks/RESULTS.md

Every combination of model x step (dpo, ppo) x sharding preset (replicated, fsdp,
fsdp_tensor) x rematerialisation (off, on) x LoRA (off, rank --lora-rank on attention and MLP)
prints one JSON line with XLA's per-device `memory_analysis()` of the compiled step: argument,
output, temp and generated-code bytes, and total = argument + output − aliased (donated) +
temp + generated code, the step's peak footprint on one device as XLA plans it.

Steps (float32 params and Adam moments, the stages' own loss functions and train step):
  dpo: 8 pairs of prompt 128 + response 128 (W1), reference model in the step (full
       fine-tuning keeps a frozen copy in the state; LoRA's reference is the base itself).
  ppo: one minibatch update of 8 rollouts of prompt 128 + response 128 with a value head on the
       policy (config.ppo.value = "head"), KL in the reward.
Meshes over N devices: replicated = data N; fsdp = fsdp N; fsdp_tensor = fsdp N/2 x tensor 2.
"""
import argparse
import json
import os
import sys
import time

PRESET_MESHES = {"replicated": lambda n: {"data": n}, "fsdp": lambda n: {"fsdp": n},
                 "fsdp_tensor": lambda n: {"fsdp": n // 2, "tensor": 2}}
FIELDS = ("argument", "output", "alias", "temp", "generated_code")
SECTION = "## Memory plan"


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="small,llama-3.2-1b")
  parser.add_argument("--steps", default="dpo,ppo")
  parser.add_argument("--presets", default=",".join(PRESET_MESHES))
  parser.add_argument("--remat", default="both", choices=("both", "on", "off"))
  parser.add_argument("--lora", default="both", choices=("both", "on", "off"))
  parser.add_argument("--lora-rank", type=int, default=16)
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--batch", type=int, default=8, help="pairs (dpo) / rollouts (ppo)")
  parser.add_argument("--prompt", type=int, default=128)
  parser.add_argument("--response", type=int, default=128)
  parser.add_argument("--shrink", action="store_true",
                      help="1 layer, d_model 64, vocab 512: a seconds-long check of this script")
  parser.add_argument("--results", default="",
                      help="markdown file whose '## Memory plan' section gets the table")
  parser.add_argument("--from-jsonl", nargs="*", default=[],
                      help="build the table from these saved outputs instead of compiling")
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  if args.from_jsonl:  # Several runs (e.g. one per model, side by side) into one table.
    rows = [json.loads(line) for path in args.from_jsonl for line in open(path)
            if line.startswith("{")]
    if args.results:
      write_section(args.results, markdown_table(rows))
    return rows
  # Simulated devices: XLA reads the flag once, when JAX starts, so set it before importing.
  if "jax" in sys.modules:
    raise RuntimeError("memory_plan.main must run before jax is imported (XLA_FLAGS)")
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={args.devices}")
  import jax  # noqa: F401  (after XLA_FLAGS)
  rows = []
  for model in args.models.split(","):
    for step in args.steps.split(","):
      for preset in args.presets.split(","):
        for remat in {"both": (False, True), "on": (True,), "off": (False,)}[args.remat]:
          for lora in {"both": (False, True), "on": (True,), "off": (False,)}[args.lora]:
            row = plan(model, step, preset, remat, args.lora_rank if lora else 0, args)
            print(json.dumps(row), flush=True)
            rows.append(row)
  if args.results:
    write_section(args.results, markdown_table(rows))
  return rows


def plan(model_name, step, preset, remat, lora_rank, args) -> dict:
  """Lowers and compiles one train step on abstract, sharded inputs; its memory analysis."""
  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import NamedSharding, PartitionSpec as P

  from rlhf_jax import models, parallel
  from rlhf_jax.train import ppo as ppo_lib
  from rlhf_jax.train import preference as pref
  from rlhf_jax.train import rl
  from rlhf_jax.train import state as state_lib
  from rlhf_jax.train import step as step_lib

  shrink = dict(d_model=64, n_layers=1, n_heads=2, n_kv_heads=None, head_dim=None,
                mlp_dim=128, vocab_size=512) if args.shrink else {}
  cfg = models.get_config(model_name, remat=remat, **shrink)
  mesh = parallel.make_mesh(PRESET_MESHES[preset](args.devices))
  role = "policy" if step == "dpo" else "policy_value"
  module = models.build_model(cfg, role)
  shapes, specs = parallel.abstract_params(module, jnp.ones((1, 8), jnp.int32))
  with_sharding = lambda tree, shardings: jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings)
  params = with_sharding(shapes, parallel.logical_to_shardings(specs, shapes, mesh, preset))
  replicated = NamedSharding(mesh, P())
  scalar = lambda dtype, shape=(): jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)
  tx = optax.adamw(1e-5)
  lora_cfg = models.LoRAConfig(rank=lora_rank) if lora_rank else None
  if lora_cfg is None:
    trainable = params
  else:
    base_policy = {k: v for k, v in params.items() if k != "value_head"}
    adapters = models.lora.adapter_shapes(base_policy, lora_cfg)
    adapters = with_sharding(adapters, models.lora.shardings(
        models.build_model(cfg, "policy"), base_policy, lora_cfg, mesh, preset))
    trainable = adapters
  if step == "ppo":
    trainable = ({"policy": trainable} if lora_cfg is None else
                 {"policy": {"lora": trainable, "value_head": params["value_head"]}})
  # The optimiser state as the stages create it: moments sharded like their params.
  opt = with_sharding(jax.eval_shape(tx.init, trainable),
                      state_lib.opt_shardings(tx, trainable, mesh))
  state = {"params": trainable, "opt": opt, "step": scalar(jnp.int32),
           "rng": scalar(jnp.uint32, (2,))}

  b, p, r = args.batch, args.prompt, args.response
  rows = lambda dtype, width: jax.ShapeDtypeStruct((b, width), dtype,
                                                   sharding=parallel.batch_sharding(mesh, 2))
  if step == "dpo":
    dpo = pref.default_config()
    batch = {f"{side}_{k}": rows(jnp.int32, p + r) for side in ("chosen", "rejected")
             for k in ("ids", "mask", "loss_mask")}
    loss_fn = pref.preference_loss_fn(module, dpo, p)
    if lora_cfg is None:
      state["ref"] = params  # A frozen copy of the initial policy in the state.
      extra, frozen = ("ref",), None
    else:
      loss_fn = models.lora.lora_loss_fn(loss_fn, lora_cfg.scale, base_is_reference=True)
      extra, frozen = ("base",), params
  else:
    ppo = rl.default_config()
    ppo.value = "head"
    batch = {"prompt_ids": rows(jnp.int32, p), "prompt_mask": rows(jnp.int32, p),
             "tokens": rows(jnp.int32, r), "response_mask": rows(jnp.int32, r),
             **{k: rows(jnp.float32, r) for k in ("old_logp", "ref_logp", "values", "returns",
                                                   "advantages")},
             "loss_weight": jax.ShapeDtypeStruct((b,), jnp.float32,
                                                 sharding=parallel.batch_sharding(mesh, 1))}
    state["kl_coef"] = scalar(jnp.float32)
    inner = ppo_lib.ppo_loss_fn(module, None, ppo, p)
    if lora_cfg is None:
      loss_fn, extra, frozen = inner, ("kl_coef",), None
    else:  # As PPOTrainer.effective: the adapters folded into the base, plus the value head.
      def loss_fn(trainable, batch, rng, kl_coef, base):
        policy = {**models.apply_lora(base, trainable["policy"]["lora"], lora_cfg.scale),
                  "value_head": trainable["policy"]["value_head"]}
        return inner({"policy": policy}, batch, rng, kl_coef)
      extra, frozen = ("kl_coef", "base"), base_policy
  train_step = step_lib.make_train_step(loss_fn, tx, state_extra=extra)
  out_shardings = (jax.tree.map(lambda s: s.sharding, state), None)
  t0 = time.perf_counter()
  with parallel.mesh_context(mesh, preset):
    if frozen is None:
      lowered = jax.jit(train_step, donate_argnums=0, out_shardings=out_shardings).lower(
          state, batch)
    else:
      lowered = jax.jit(models.lora.with_frozen(train_step, "base"), donate_argnums=0,
                        out_shardings=out_shardings).lower(state, batch, frozen)
    compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  got = {f: int(getattr(mem, f"{f}_size_in_bytes")) for f in FIELDS}
  total = (got["argument"] + got["output"] - got["alias"] + got["temp"]
           + got["generated_code"])
  n_params = sum(x.size for x in jax.tree.leaves(shapes))
  trainable_n = sum(x.size for x in jax.tree.leaves(trainable))
  return {"benchmark": "memory_plan", "model": model_name + ("(shrunk)" if args.shrink else ""),
          "step": step, "preset": preset, "mesh": PRESET_MESHES[preset](args.devices),
          "remat": remat, "lora_rank": lora_rank, "params": n_params,
          "trainable_params": trainable_n,
          **{f"{f}_bytes": v for f, v in got.items()}, "total_bytes": total,
          "compile_s": round(compile_s, 2), "devices": args.devices,
          "batch": b, "prompt": p, "response": r}


def _mib(x: int) -> str:
  return f"{x / 2**20:,.1f}"


def markdown_table(rows: list[dict]) -> str:
  """One line per (model, step, preset, remat): full fine-tuning vs LoRA, MiB per device."""
  by_key = {}
  for row in rows:
    key = (row["model"], row["step"], row["preset"], row["remat"])
    by_key.setdefault(key, {})["lora" if row["lora_rank"] else "full"] = row
  first = rows[0]
  rank = max(row["lora_rank"] for row in rows)
  lines = [
      f"Per-device bytes from `memory_analysis()` of the compiled (never run) train step on "
      f"{first['devices']} simulated CPU devices, float32 params and AdamW moments; "
      f"{first['batch']} pairs (dpo) / rollouts (ppo) of prompt {first['prompt']} + response "
      f"{first['response']}; LoRA rank {rank} on attention and MLP kernels, applied "
      "unmerged (x W + s·(x A) B: no merged kernels, no kernel-sized gradients). "
      "total = argument + output − aliased + temp + generated code (MiB). Written by:",
      "",
      "```bash",
      "python benchmarks/memory_plan.py --results benchmarks/RESULTS.md",
      "```",
      "",
      "| model | step | preset | remat | full: args | full: temp | full: total | "
      "LoRA: args | LoRA: temp | LoRA: total | LoRA / full |",
      "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|"]
  for (model, step, preset, remat), pair in by_key.items():
    cells = []
    for kind in ("full", "lora"):
      row = pair.get(kind)
      cells += ([_mib(row["argument_bytes"]), _mib(row["temp_bytes"]),
                 _mib(row["total_bytes"])] if row else ["", "", ""])
    ratio = (f"{pair['lora']['total_bytes'] / pair['full']['total_bytes']:.2f}"
             if len(pair) == 2 else "")
    lines.append(f"| {model} | {step} | {preset} | {'on' if remat else 'off'} | "
                 + " | ".join(cells) + f" | {ratio} |")
  return "\n".join(lines) + "\n"


def write_section(path: str, body: str) -> None:
  """Replaces (or appends) the '## Memory plan' section of `path`, leaving the others as
  they are (other scripts write the other sections)."""
  text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
  lines = text.splitlines(keepends=True)
  start = next((i for i, line in enumerate(lines) if line.rstrip() == SECTION), None)
  section = f"{SECTION}\n\n{body}"
  if start is None:
    new = text.rstrip("\n") + "\n\n" + section
  else:
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
               len(lines))
    rest = "".join(lines[end:])
    new = "".join(lines[:start]) + section + ("\n" + rest if rest else "")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(new)
  os.replace(tmp, path)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main()
