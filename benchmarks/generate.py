"""Sampling throughput: rlhf_jax `generate` vs transformers' `generate` on the same weights.

  python benchmarks/generate.py --model tiny     # 16 prompts x 64 tokens, 128 new tokens each
  python benchmarks/generate.py --model small

A BENCHMARK, NOT A TEST: it asserts nothing about speed. Timings are wall-clock medians on
whatever machine runs it; on a shared CPU they move a lot between runs, so the head-to-head
calls alternate ours / transformers and the ratio of medians is reported with the ratio of
the best rounds.

Workload: a batch of random prompts, every row gets exactly --new-tokens new tokens (EOS is
suppressed with min_new_tokens on both sides, so no row stops early), plain sampling at
temperature 1 (no top-k / top-p). The transformers side is a LlamaForCausalLM loaded from our
params exported with `models.save_hf`, run in float32 torch on the CPU threads of this
process, with its own KV cache. "new tokens/s" counts batch x new tokens over the whole call
(prefill included). Our cost is also measured at several response lengths to show it grows
linearly (the per-step cost is the slope of a least-squares line through those points).

Needs torch and transformers (requirements-test.txt) unless --no-hf. Prints one JSON line.
"""
import argparse
import json
import os
import tempfile
import time

import jax
import numpy as np

import common
from rlhf_jax import models, parallel, sampling


def our_generate(module, params, prompt, mask, new_tokens, cfg):
  """(run, compile+first-call seconds): a zero-argument call of one jitted generate."""
  scfg = sampling.SamplingConfig(max_new_tokens=new_tokens, eos_id=cfg.eos_token_id,
                                 pad_id=cfg.pad_token_id, temperature=1.0,
                                 min_new_tokens=new_tokens)
  key = jax.random.key(0)
  run = lambda: sampling.generate(module, params, prompt, mask, key, scfg)
  start = time.perf_counter()
  out = jax.block_until_ready(run())
  first = time.perf_counter() - start
  lengths = np.asarray(out.lengths)
  if not (lengths == new_tokens).all():
    raise RuntimeError(f"expected {new_tokens} new tokens in every row, got {lengths}")
  return run, first


def hf_model(module, params):
  """Our params exported with save_hf, read back by transformers (the parity path)."""
  import torch
  import transformers
  with tempfile.TemporaryDirectory() as tmp:
    models.save_hf(module, params, tmp)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
  return model.eval()


def hf_sampler(model, prompt, *, max_new_tokens, min_new_tokens, eos_id, pad_id):
  """A zero-argument call of transformers' generate: plain sampling at temperature 1 (no
  top-k / top-p), torch seeded once; returns the [B, P + new] output ids."""
  import torch
  import transformers
  gen = transformers.GenerationConfig(
      do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
      min_new_tokens=min_new_tokens, eos_token_id=eos_id, pad_token_id=pad_id)
  ids = torch.from_numpy(np.asarray(prompt, np.int64))
  attn = torch.ones_like(ids)
  torch.manual_seed(0)

  def run():
    with torch.inference_mode():
      return model.generate(input_ids=ids, attention_mask=attn, generation_config=gen)
  return run


def hf_generate(model, prompt, new_tokens, cfg):
  """A zero-argument call of transformers' generate on the same workload (warmed up)."""
  sample = hf_sampler(model, prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                      eos_id=cfg.eos_token_id, pad_id=cfg.pad_token_id)

  def run():
    out = sample()
    if out.shape != (prompt.shape[0], prompt.shape[1] + new_tokens):
      raise RuntimeError(f"transformers returned {tuple(out.shape)}")
    return out

  run()  # Warm-up (first-call allocations).
  return run


def timed(fn) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="tiny", choices=["tiny", "small"])
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--prompt-len", type=int, default=64)
  parser.add_argument("--new-tokens", type=int, default=128)
  parser.add_argument("--scaling", default="64,128,256",
                      help="response lengths at which our cost is measured")
  parser.add_argument("--repeats", type=int, default=3,
                      help="timed calls per scaling length (median reported)")
  parser.add_argument("--rounds", type=int, default=3,
                      help="alternating ours / transformers timed calls (medians reported)")
  parser.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
  parser.add_argument("--torch-threads", type=int, default=0,
                      help="torch intra-op threads (0 = torch's default). On a machine shared "
                           "with other jobs, torch's spinning OpenMP threads can slow it down "
                           "many-fold; 1 thread gives a steadier baseline")
  args = parser.parse_args()
  load_start = round(os.getloadavg()[0], 2)

  cfg = models.get_config(args.model)
  module = models.build_model(cfg)
  rng = np.random.RandomState(0)
  prompt = rng.randint(2, cfg.vocab_size, size=(args.batch, args.prompt_len)).astype(np.int32)
  mask = np.ones_like(prompt)
  params = parallel.init_params(module, jax.random.key(0), prompt[:1], mask[:1])

  lengths = sorted({int(x) for x in args.scaling.split(",")} | {args.new_tokens})
  ours, runs = {}, {}
  for n in lengths:
    runs[n], first = our_generate(module, params, prompt, mask, n, cfg)
    secs = common.median_seconds(runs[n], args.repeats, warmup=0)
    ours[n] = {"seconds": round(secs, 4), "first_call_s": round(first, 2),
               "new_tokens_per_s": round(args.batch * n / secs, 1),
               "ms_per_step": round(1e3 * secs / n, 3)}
  # Linear growth: least-squares fit seconds = a + b * new_tokens and its worst relative error.
  x = np.array(lengths, np.float64)
  y = np.array([ours[n]["seconds"] for n in lengths])
  slope, intercept = np.polyfit(x, y, 1)
  fit = {"ms_per_step": round(1e3 * slope, 3), "intercept_s": round(intercept, 4),
         "max_rel_residual": round(float(np.max(np.abs(intercept + slope * x - y) / y)), 3)}

  result = {
      "benchmark": "generate", "timing": "wall-clock; benchmark, not a test",
      "model": args.model, "params": cfg.num_params(), "batch": args.batch,
      "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
      "sampling": "temperature=1, no top-k/top-p, EOS suppressed (min_new_tokens=new_tokens)",
      "ours_compile_plus_first_call_s": ours[args.new_tokens]["first_call_s"],
      "scaling": {str(n): ours[n] for n in lengths}, "linear_fit": fit,
  }
  if args.no_hf:
    result["ours_new_tokens_per_s"] = ours[args.new_tokens]["new_tokens_per_s"]
  else:
    import torch
    if args.torch_threads:
      torch.set_num_threads(args.torch_threads)
    model = hf_model(module, params)
    # Same weights: the prompts' logits must agree before anything is timed.
    with torch.inference_mode():
      theirs = model(torch.from_numpy(prompt.astype(np.int64))).logits.numpy()
    mine = np.asarray(module.apply({"params": params}, prompt, mask))
    logits_diff = float(np.max(np.abs(theirs - mine)))
    if logits_diff > 1e-3:
      raise RuntimeError(f"transformers' logits differ from ours by {logits_diff}: not the same "
                         "model, so no comparison")
    hf_run = hf_generate(model, prompt, args.new_tokens, cfg)
    # Head to head: alternate the two so that load from other processes hits both alike.
    mine_s, hf_s = [], []
    for _ in range(args.rounds):
      mine_s.append(timed(runs[args.new_tokens]))
      hf_s.append(timed(hf_run))
    tokens = args.batch * args.new_tokens
    med_mine, med_hf = float(np.median(mine_s)), float(np.median(hf_s))
    result.update({
        "ours_seconds": round(med_mine, 4), "ours_new_tokens_per_s": round(tokens / med_mine, 1),
        "hf_seconds": round(med_hf, 4), "hf_new_tokens_per_s": round(tokens / med_hf, 1),
        "speedup_vs_hf": round(med_hf / med_mine, 2),
        "speedup_vs_hf_best_of_rounds": round(min(hf_s) / min(mine_s), 2),
        "rounds": args.rounds, "target_speedup": 3.0,
        "hf_logits_max_abs_diff": logits_diff,
        "torch_threads": torch.get_num_threads(),
    })
  # Other processes on a shared machine are the main source of noise: say how busy it was.
  result["load_avg_1m_start_end"] = [load_start, round(os.getloadavg()[0], 2)]
  print(json.dumps({**result, **common.device_info()}))


if __name__ == "__main__":
  common.run_main(main)
