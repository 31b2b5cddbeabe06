"""Sampling on ragged rollouts: continuous batching vs the fixed-batch sampler vs `generate`.

  python benchmarks/sampler.py                   # small, 128 rollouts of 8-256 tokens
  python benchmarks/sampler.py --quick --no-hf   # tiny shapes, ours only (a smoke run)

A BENCHMARK, NOT A TEST: it asserts nothing about speed. Issue 17's targets: on the long-tail
workload, continuous batching >= 2x the fixed-batch sampler and >= 3x transformers' `generate`
in useful new tokens/s; its cost per generated token flat (within 20%) from 64 to 512 max new
tokens.

Long-tail workload (the rollouts of one GRPO iteration): 16 prompts x 8 samples = 128 rows of
32 prompt tokens, temperature 1, no top-k/top-p, at least 8 and at most 256 new tokens, on the
`long_tail_policy` weights of benchmarks/rl_iteration.py (an EOS hazard set by construction:
median ~37 tokens, ~4% of the rows reaching 256). Useful new tokens = the sum of the response
lengths (EOS included) each side actually produced; tokens/s divides them by the whole call
(prefill included). Sides alternate over --rounds; medians are reported.

Budget sweep (does cost follow the work or the budget?): the same prompts on weights whose
EOS comes right at --sweep-length tokens (EOS probability 1 - 1e-6 from there on), so every row
has the same length whatever max_new_tokens is; seconds per generated token at max_new_tokens 64 ... 512,
for the fixed batch (its cache and every step's attention span the whole budget) and for
continuous batching (attention spans the live width bucket).

Needs torch and transformers (requirements-test.txt) unless --no-hf. Prints one JSON line.
"""
import argparse
import dataclasses
import json
import os
import statistics
import time

import jax
import numpy as np

import common
import generate as generate_bench
import rl_iteration
from rlhf_jax import models, parallel, sampling


def timed(fn) -> tuple[float, object]:
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return time.perf_counter() - start, out


def hf_lengths(model, prompts, scfg):
  """A zero-argument call of transformers' generate with the budget and special ids of `scfg`
  (temperature 1, unfiltered); returns the response lengths (up to and including the first
  EOS)."""
  sample = generate_bench.hf_sampler(model, prompts, max_new_tokens=scfg.max_new_tokens,
                                     min_new_tokens=scfg.min_new_tokens, eos_id=scfg.eos_id,
                                     pad_id=scfg.pad_id)

  def run():
    resp = sample()[:, prompts.shape[1]:].numpy()
    is_eos = resp == scfg.eos_id
    return np.where(is_eos.any(1), is_eos.argmax(1) + 1, resp.shape[1])
  return run


def our_sampler(module, params, prompts, scfg, key):
  """(zero-argument call returning the response lengths, compile + first call seconds)."""
  mask = np.ones_like(prompts)
  run = lambda: np.asarray(sampling.generate(module, params, prompts, mask, key, scfg).lengths)
  first, _ = timed(run)
  return run, first


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny model, small shapes")
  parser.add_argument("--model", choices=["tiny", "small"], default=None)
  parser.add_argument("--n-layers", type=int, default=0, help="override (smoke runs)")
  parser.add_argument("--prompts", type=int, default=None)
  parser.add_argument("--group", type=int, default=8)
  parser.add_argument("--prompt-len", type=int, default=32)
  parser.add_argument("--max-new-tokens", type=int, default=None)
  parser.add_argument("--min-new-tokens", type=int, default=8)
  parser.add_argument("--slots", default=None, help="comma-separated slot counts")
  parser.add_argument("--budgets", default=None, help="max_new_tokens of the budget sweep")
  parser.add_argument("--sweep-length", type=int, default=None,
                      help="response length of the budget sweep")
  parser.add_argument("--rounds", type=int, default=None)
  parser.add_argument("--no-hf", action="store_true", help="skip transformers' generate")
  parser.add_argument("--torch-threads", type=int, default=2)
  args = parser.parse_args()
  quick = args.quick
  args.model = args.model or ("tiny" if quick else "small")
  args.prompts = args.prompts or (4 if quick else 16)
  args.max_new_tokens = args.max_new_tokens or (48 if quick else 256)
  args.slots = args.slots or ("4,8" if quick else "16,32,64")
  args.budgets = args.budgets or ("32,64" if quick else "64,128,256,512")
  args.sweep_length = args.sweep_length or (16 if quick else 48)
  args.rounds = args.rounds or (1 if quick else 3)
  load_start = round(os.getloadavg()[0], 2)

  overrides = {"n_layers": args.n_layers} if args.n_layers else {}
  cfg = models.get_config(args.model, eos_token_id=rl_iteration.EOS,
                          pad_token_id=rl_iteration.PAD, **overrides)
  module = models.build_model(cfg)
  prompts = np.repeat(rl_iteration.make_prompts(cfg, args.prompts, args.prompt_len),
                      args.group, axis=0)
  init = parallel.init_params(module, jax.random.key(0), prompts[:1], np.ones_like(prompts[:1]))
  params, calibration = rl_iteration.long_tail_policy(
      module, init, prompts, args.max_new_tokens, min_new_tokens=args.min_new_tokens)
  key = jax.random.key(0)
  base = sampling.SamplingConfig(max_new_tokens=args.max_new_tokens, eos_id=rl_iteration.EOS,
                                 pad_id=rl_iteration.PAD, min_new_tokens=args.min_new_tokens)

  # LONG TAIL: ours (fixed batch, each slot count) and generate, alternating.
  variants = {"fixed_batch": base}
  variants.update({f"slots_{s}": dataclasses.replace(base, slots=int(s))
                   for s in args.slots.split(",")})
  runs, first_call = {}, {}
  for name, scfg in variants.items():
    runs[name], first_call[name] = our_sampler(module, params, prompts, scfg, key)
  hf_diff = None
  if not args.no_hf:
    import torch
    torch.set_num_threads(args.torch_threads)
    model = generate_bench.hf_model(module, params)
    with torch.inference_mode():
      theirs = model(torch.from_numpy(prompts[:8].astype(np.int64))).logits.numpy()
    mine = np.asarray(module.apply({"params": params}, prompts[:8]))
    hf_diff = float(np.max(np.abs(theirs - mine)))
    if hf_diff > 1e-3:
      raise RuntimeError(f"transformers' logits differ from ours by {hf_diff}: not the same "
                         "model, so no comparison")
    runs["hf_generate"] = hf_lengths(model, prompts, base)
    first_call["hf_generate"], _ = timed(runs["hf_generate"])
  seconds, tokens = {k: [] for k in runs}, {}
  for _ in range(args.rounds):
    for name, run in runs.items():
      secs, lengths = timed(run)
      seconds[name].append(secs)
      tokens[name] = lengths
  long_tail = {}
  for name in runs:
    secs = statistics.median(seconds[name])
    long_tail[name] = {"seconds": round(secs, 3), "generated_tokens": int(tokens[name].sum()),
                       "new_tokens_per_s": round(float(tokens[name].sum()) / secs, 1),
                       "first_call_s": round(first_call[name], 2),
                       "lengths": rl_iteration.length_stats(tokens[name])}
  best = max((k for k in long_tail if k.startswith("slots_")),
             key=lambda k: long_tail[k]["new_tokens_per_s"])
  rate = lambda k: long_tail[k]["new_tokens_per_s"]
  result = {
      "benchmark": "sampler", "timing": "wall-clock; benchmark, not a test",
      "model": args.model, "params": cfg.num_params(),
      "rollouts": int(prompts.shape[0]), "prompt_len": args.prompt_len,
      "max_new_tokens": args.max_new_tokens, "min_new_tokens": args.min_new_tokens,
      "policy_calibration": calibration, "rounds": args.rounds, "long_tail": long_tail,
      "best_slots": best, "speedup_vs_fixed_batch": round(rate(best) / rate("fixed_batch"), 2),
  }
  if "hf_generate" in long_tail:
    result.update({"speedup_vs_hf_generate": round(rate(best) / rate("hf_generate"), 2),
                   "hf_logits_max_abs_diff": hf_diff})

  # BUDGET SWEEP: identical responses of sweep_length tokens under growing budgets.
  length = args.sweep_length
  # EOS probability 1 - 1e-6 once allowed: a row misses it about once in a million.
  fixed_len, _ = rl_iteration.long_tail_policy(module, init, prompts, length,
                                               hazard=(1 - 1e-6, 1 - 1e-6),
                                               min_new_tokens=length - 1)
  sweep = {}
  for budget in map(int, args.budgets.split(",")):
    row = {}
    for name, slots in (("fixed_batch", None), (best, int(best.split("_")[1]))):
      scfg = dataclasses.replace(base, max_new_tokens=budget, min_new_tokens=length - 1,
                                 slots=slots)
      run, _ = our_sampler(module, fixed_len, prompts, scfg, key)
      times, lengths = [], None
      for _ in range(args.rounds):
        secs, lengths = timed(run)
        times.append(secs)
      secs = statistics.median(times)
      row[name] = {"seconds": round(secs, 3), "generated_tokens": int(lengths.sum()),
                   "us_per_token": round(1e6 * secs / lengths.sum(), 1)}
    sweep[str(budget)] = row
  per_token = lambda name: [r[name]["us_per_token"] for r in sweep.values()]
  spread = lambda xs: round(max(xs) / min(xs) - 1, 3)
  result.update({"budget_sweep": {"response_tokens": length, "by_max_new_tokens": sweep,
                                  "fixed_batch_cost_growth": spread(per_token("fixed_batch")),
                                  "continuous_cost_spread": spread(per_token(best))}})
  result["load_avg_1m_start_end"] = [load_start, round(os.getloadavg()[0], 2)]
  print(json.dumps({**result, **common.device_info()}))


if __name__ == "__main__":
  common.run_main(main)
