"""Throughput of a jitted reward-model train step (Bradley–Terry + AdamW).

  python benchmarks/reward_step.py --model small     # 8 pairs, prompt 128 + response 128

Prints one JSON line: tokens/s (both sequences of every pair), compile time, XLA FLOPs,
achieved GFLOP/s and the fraction of the float32 matmul peak taken before and after every timed
step (common.time_against_peak).
"""
import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import common
from rlhf_jax import models, parallel
from rlhf_jax.train import reward as reward_lib
from rlhf_jax.train import step as step_lib


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="tiny", choices=sorted(models.SIZES))
  parser.add_argument("--pairs", type=int, default=8)
  parser.add_argument("--prompt", type=int, default=128)
  parser.add_argument("--response", type=int, default=128)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--steps", type=int, default=5)
  args = parser.parse_args()

  cfg = models.get_config(args.model, dtype=args.dtype)
  module = models.build_model(cfg, "reward")
  seq = args.prompt + args.response
  rng = np.random.RandomState(0)
  mask = np.ones((args.pairs, seq), np.int32)
  mask[:, :args.prompt // 4] = 0  # Some left padding, as real prompts have.
  batch = {"chosen_ids": rng.randint(0, cfg.vocab_size, (args.pairs, seq)).astype(np.int32),
           "rejected_ids": rng.randint(0, cfg.vocab_size, (args.pairs, seq)).astype(np.int32),
           "chosen_mask": mask, "rejected_mask": mask,
           "margin": np.zeros((args.pairs,), np.float32)}
  params = parallel.init_params(module, jax.random.key(0), batch["chosen_ids"][:1])
  tx = optax.adamw(1e-5)
  state = {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32),
           "rng": jax.random.key_data(jax.random.key(0))}
  step = step_lib.make_train_step(
      reward_lib.reward_loss_fn(module, use_margin=False, center_coef=0.0), tx)

  t0 = time.perf_counter()
  lowered = jax.jit(step, donate_argnums=0).lower(state, batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  holder = {"state": state}

  def run():
    holder["state"], metrics = compiled(holder["state"], batch)
    return metrics["loss"]

  peak = common.matmul_peak_meter()
  jax.block_until_ready(run())  # Warm-up.
  stats = common.compiled_stats(compiled)
  timed = common.time_against_peak([run] * args.steps, stats["xla_flops"], peak)
  step_s = statistics.median(timed["seconds"])
  tokens = 2 * args.pairs * seq
  achieved = stats["xla_flops"] / step_s / 1e9
  print(json.dumps({
      "benchmark": "reward_step", "model": args.model, "dtype": args.dtype,
      "pairs": args.pairs, "seq": seq, "tokens_per_s": round(tokens / step_s, 1),
      "step_s": round(step_s, 4), "trace_lower_s": round(t1 - t0, 2),
      "compile_s": round(t2 - t1, 2), "flops_xla": stats["xla_flops"],
      "achieved_gflops": round(achieved, 1), **common.peak_fields(timed),
      "memory": {k: v for k, v in stats.items() if k != "xla_flops"}, **common.device_info()}))


if __name__ == "__main__":
  common.run_main(main)
