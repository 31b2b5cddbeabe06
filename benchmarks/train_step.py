"""Throughput of a jitted forward + backward + AdamW step of a policy LM.

  python benchmarks/train_step.py --model small     # batch 16 x seq 256, float32

Prints one JSON line: tokens/s, compile time, FLOPs (XLA cost analysis, and 6·N·tokens),
achieved GFLOP/s, and the fraction of the float32 matmul peak taken before and after every
timed step (common.time_against_peak).
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
from rlhf_jax import models, objectives, parallel


def lm_loss(module, params, ids, mask):
  logp = objectives.token_logprobs(module.apply({"params": params}, ids, mask)[:, :-1], ids[:, 1:])
  weights = (mask[:, 1:] * mask[:, :-1]).astype(jnp.float32)
  return -jnp.sum(logp * weights) / jnp.sum(weights)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="tiny", choices=sorted(models.SIZES))
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--remat", action="store_true")
  parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
  args = parser.parse_args()

  cfg = models.get_config(args.model, dtype=args.dtype, remat=args.remat)
  module = models.build_model(cfg)
  rng = np.random.RandomState(0)
  ids = jnp.asarray(rng.randint(0, cfg.vocab_size, size=(args.batch, args.seq)), jnp.int32)
  mask = jnp.ones_like(ids)
  params = parallel.init_params(module, jax.random.key(0), ids[:1], mask[:1])
  tx = optax.adamw(1e-4, weight_decay=0.01)
  state = {"params": params, "opt": tx.init(params)}

  def train_step(state, ids, mask):
    loss, grads = jax.value_and_grad(lambda p: lm_loss(module, p, ids, mask))(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt": opt}, loss

  t0 = time.perf_counter()
  lowered = jax.jit(train_step, donate_argnums=0).lower(state, ids, mask)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()

  holder = {"state": state}

  def run():
    holder["state"], loss = compiled(holder["state"], ids, mask)
    return loss

  peak = common.matmul_peak_meter()
  jax.block_until_ready(run())  # Warm-up.
  stats = common.compiled_stats(compiled)
  timed = common.time_against_peak([run] * args.steps, stats["xla_flops"], peak)
  step_s = statistics.median(timed["seconds"])
  tokens = args.batch * args.seq
  # 6·N·tokens counts matmul params only: the embedding lookup is a gather, not a matmul.
  wpe = 0 if cfg.uses_rope else cfg.max_len * cfg.d_model
  n_matmul = cfg.num_params() - wpe - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)
  flops_6n = 6 * n_matmul * tokens
  attn_flops = 12 * cfg.n_layers * args.seq * cfg.n_heads * cfg.head_size * tokens
  achieved = stats["xla_flops"] / step_s / 1e9
  print(json.dumps({
      "benchmark": "train_step", "model": args.model, "dtype": args.dtype, "remat": args.remat,
      "batch": args.batch, "seq": args.seq, "params": cfg.num_params(),
      "tokens_per_s": round(tokens / step_s, 1), "step_s": round(step_s, 4),
      "trace_lower_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2),
      "flops_xla": stats["xla_flops"], "flops_6n": flops_6n,
      "flops_6n_plus_attention": flops_6n + attn_flops,
      "achieved_gflops": round(achieved, 1),
      "achieved_gflops_6n": round(flops_6n / step_s / 1e9, 1),
      **common.peak_fields(timed),
      "memory": {k: v for k, v in stats.items() if k != "xla_flops"},
      **common.device_info()}))


if __name__ == "__main__":
  common.run_main(main)
