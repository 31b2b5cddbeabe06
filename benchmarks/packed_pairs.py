"""Packed vs padded preference and reward steps on the real hh-rlhf pairs: pairs/s, token slots,
FLOPs and first-step loss, same pairs in every layout.

  python benchmarks/packed_pairs.py --model small            # the full measurement
  python benchmarks/packed_pairs.py --quick                  # a smoke run (tiny shapes)

The pairs are hh-rlhf's harmless-base test split (../shared/data/hh-rlhf), tokenised with a
byte-level BPE trained on the file (benchmarks/data_pipeline.py), shuffled once; the first
`batches` x `batch_size` pairs are the workload. Layouts: padded (one [prompt | response] row
per sequence, the stages' default), padded_shared (DPO only: one [prompt | chosen | rejected]
row per pair), packed and packed_shared (config.<stage>.packing: each batch's pairs packed
whole into `rows` rows of `length` tokens). Unless given, rows is the fewest that fit every
batch, length (a multiple of 128, attention's query block, from the longest pair's up to 384
more) the one with the fewest token slots, and the DPO loss_tokens cap the largest
response-token count any packed row then holds (rounded up to 16): the values to put in the
config, printed with each result.

Steps: DPO (sigmoid) with a precomputed reference and with the reference model in the step,
and the Bradley–Terry reward step. Each prints one JSON line per layout: pairs/s (all batches,
after a compile and a warm-up pass, median of `repeats` passes), the fraction of computed
token slots that hold real tokens, XLA cost-analysis FLOPs per step, achieved GFLOP/s and its
fraction of the matmul peak (same dtype) measured next to the timed steps (each step against
the mean of the peaks taken just before and after it; the median over steps), also of the
peak measured once at the start, the first step's loss and its relative difference from the
padded layout's (the layouts must compute the same loss), and the speedup over padded. A last
line sums up each step: the best packed speedup, whether the ≥ 1.5x at equal loss target is
met, and whether every layout reaches 0.65 of the adjacent peak.
"""
import argparse
import functools
import json
import math
import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import common
import data_pipeline
from rlhf_jax import data, models, parallel
from rlhf_jax.train import preference as pref
from rlhf_jax.train import reward as reward_lib
from rlhf_jax.train import scoring
from rlhf_jax.train import step as step_lib

TARGET_SPEEDUP = 1.5
TARGET_FRACTION_OF_PEAK = 0.65  # Of the matmul peak measured next to the step.
LOSS_RTOL = 1e-4  # First-step losses of two layouts of the same pairs (float32 sums).


# ---------------------------------------------------------------------------------------------
# Data and packing sizes
# ---------------------------------------------------------------------------------------------


def hh_pairs(args):
  """(tokenised pairs in a fixed shuffled order, TokenizeConfig)."""
  pairs = data.read_preferences(args.path)
  if args.quick:
    pairs = pairs[:400]
  tok = data_pipeline.train_bpe([p.prompt + p.chosen for p in pairs] +
                                [p.rejected for p in pairs], args.vocab_size)
  cfg = data.TokenizeConfig(eos_id=tok.token_to_id("</s>"), pad_id=tok.token_to_id("<pad>"),
                            max_prompt_len=args.max_prompt_len,
                            max_response_len=args.max_response_len,
                            vocab_size=tok.get_vocab_size())
  examples = data.tokenize_preferences(pairs, tok, cfg).examples
  order = np.random.RandomState(0).permutation(len(examples))
  need = args.batches * args.batch_size
  if need > len(examples):
    raise ValueError(f"--batches x --batch_size = {need} pairs, the file has {len(examples)}")
  return [examples[i] for i in order[:need]], cfg


def longest_pair(batches, shared: bool) -> int:
  """Tokens of the longest pair in a row (every pair must fit a row by itself)."""
  return max(data.pair_footprint((p.prompt, p.chosen, p.rejected), shared)[0]
             for b in batches for p in b)


def fit_packing(batches, length: int, shared: bool, with_loss_tokens: bool):
  """(rows, loss_tokens): the fewest rows that fit every batch (first fit, no loss-token
  cap), and the most response tokens a row then holds (rounded up to 16), a cap that never
  binds, so capping changes no placement."""
  if longest_pair(batches, shared) > length:
    raise ValueError(f"--length={length}: a pair needs {longest_pair(batches, shared)} "
                     "tokens in one row")
  triples = [[(p.prompt, p.chosen, p.rejected) for p in b] for b in batches]
  most = max(sum(data.pair_footprint(t, shared)[0] for t in b) for b in triples)
  rows = max(1, math.ceil(most / length))
  while True:
    try:
      packed = [data.pack_pair_rows(b, rows=rows, length=length, loss_tokens=length,
                                    pairs_per_row=len(b), shared_prefix=shared, pad_id=0)
                for b in triples]
      break
    except ValueError:
      rows += 1
  if not with_loss_tokens:
    return rows, None
  fill = max(int((p.target_slot >= 0).sum(axis=1).max()) for p in packed)
  return rows, min(length, 16 * math.ceil(fill / 16))


def stage_config(section: str, batch_size: int, packing: dict | None, **kw):
  """config.<section> as the stage would run it (packing off when `packing` is None)."""
  cfg = (pref if section == "dpo" else reward_lib).default_config()
  cfg.update({"batch_size": batch_size, **kw})
  if packing:
    cfg.packing.update(packing)
  return ml_collections.ConfigDict({section: cfg})


def dpo_batches(batches, tok, layout: str, packing, reference_logps):
  """Host arrays of each batch in `layout`, through the stage's collation pieces."""
  shared = layout.endswith("shared")
  out = []
  if layout.startswith("packed"):
    pack = scoring.pair_packer(stage_config("dpo", len(batches[0]), packing), "dpo", shared)
  for b, ref in zip(batches, reference_logps):
    if layout.startswith("packed"):
      packed = pack([(p.prompt, p.chosen, p.rejected) for p in b], tok.pad_id)
      arrays = scoring.packed_pair_arrays(packed)
      arrays.update(ref_chosen=packed.per_pair(ref[0]), ref_rejected=packed.per_pair(ref[1]))
    else:
      arrays = scoring.collate_pairs(b, tok, shared)
      arrays.update(ref_chosen=ref[0].astype(np.float32),
                    ref_rejected=ref[1].astype(np.float32))
    out.append(arrays)
  return out


def reward_batches(batches, tok, layout: str, packing):
  if layout == "padded":
    return [reward_lib.pair_arrays(data.pad_preferences(b, tok.max_prompt_len,
                                                        tok.max_response_len, tok.pad_id))
            for b in batches]
  config = stage_config("reward", len(batches[0]), packing)
  pack = scoring.pair_packer(config, "reward", config.reward.packing.shared_prefix)
  return [reward_lib.collate_packed(b, pack, tok.pad_id) for b in batches]


def token_slots(arrays) -> tuple[int, int]:
  """(real tokens, token slots the backbone computes) of one host batch."""
  masks = [v for k, v in arrays.items() if k in ("mask", "chosen_mask", "rejected_mask")]
  return int(sum(m.sum() for m in masks)), int(sum(m.size for m in masks))


# ---------------------------------------------------------------------------------------------
# Timing one layout
# ---------------------------------------------------------------------------------------------


def measure(loss_fn, params, batches, *, pairs: int, ref=None, repeats: int, peak) -> dict:
  """Compiles the train step for the batches' shape, then times passes over all batches
  (`pairs` in all), each step against the matmul peak (`peak()`) taken right around it
  (common.time_against_peak; the median of the steps' fractions is reported)."""
  tx = optax.adamw(1e-6)
  params = jax.tree.map(jnp.copy, params)  # Each layout donates its own copy.
  state = {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32),
           "rng": jax.random.key_data(jax.random.key(0))}
  extra = ()
  if ref is not None:
    state["ref"], extra = jax.tree.map(jnp.copy, ref), ("ref",)
  device_batches = [jax.device_put(b) for b in batches]  # Transfers are not timed.
  step = step_lib.make_train_step(loss_fn, tx, state_extra=extra)
  t0 = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=0).lower(state, device_batches[0]).compile()
  compile_s = time.perf_counter() - t0
  holder = {"state": state, "first_loss": None}

  def run(b):
    holder["state"], metrics = compiled(holder["state"], b)
    if holder["first_loss"] is None:
      holder["first_loss"] = float(metrics["loss"])
    return metrics["loss"]

  for b in device_batches:  # Warm-up pass.
    jax.block_until_ready(run(b))
  flops = common.compiled_stats(compiled)["xla_flops"]
  calls = [functools.partial(run, b) for _ in range(repeats) for b in device_batches]
  timed = common.time_against_peak(calls, flops, peak)
  n = len(device_batches)
  pass_s = statistics.median(sum(timed["seconds"][i:i + n])
                             for i in range(0, len(calls), n))
  real, slots = map(sum, zip(*(token_slots(b) for b in batches)))
  return {"pairs_per_s": round(pairs / pass_s, 2), "step_s": round(pass_s / len(batches), 5),
          "compile_s": round(compile_s, 2), "real_token_fraction": round(real / slots, 4),
          "padding_fraction": round(1 - real / slots, 4), "first_loss": holder["first_loss"],
          "xla_flops_per_step": flops,
          "achieved_gflops": round(flops * len(batches) / pass_s / 1e9, 2),
          **common.peak_fields(timed),
          "batch_shape": list(batches[0]["ids" if "ids" in batches[0] else "chosen_ids"].shape)}


def report(step: str, layout: str, result: dict, baseline: dict | None, start_peak: float,
           extra):
  if baseline is not None:
    result["speedup_vs_padded"] = round(result["pairs_per_s"] / baseline["pairs_per_s"], 3)
    result["first_loss_rel_diff_vs_padded"] = abs(result["first_loss"] - baseline["first_loss"]
                                                  ) / max(abs(baseline["first_loss"]), 1e-12)
  result["fraction_of_start_peak"] = round(result["achieved_gflops"] / start_peak, 3)
  print(json.dumps({"benchmark": "packed_pairs", "step": step, "layout": layout, **extra,
                    **result}), flush=True)
  return result


def summary(step: str, results: dict):
  packed = {k: v for k, v in results.items() if k.startswith("packed")}
  equal = all(v["first_loss_rel_diff_vs_padded"] <= LOSS_RTOL for v in packed.values())
  best = max(packed, key=lambda k: packed[k]["speedup_vs_padded"])
  speedup = packed[best]["speedup_vs_padded"]
  print(json.dumps({"benchmark": "packed_pairs", "step": step, "summary": True,
                    "best_packed_layout": best, "speedup_vs_padded": speedup,
                    "losses_equal": equal,
                    "fraction_of_matmul_peak": {k: v["fraction_of_matmul_peak"]
                                                for k, v in results.items()},
                    "target_fraction_of_peak": TARGET_FRACTION_OF_PEAK,
                    "fraction_target_met": all(v["fraction_of_matmul_peak"] >=
                                               TARGET_FRACTION_OF_PEAK
                                               for v in results.values()),
                    "target_speedup": TARGET_SPEEDUP,
                    "target_met": bool(equal and speedup >= TARGET_SPEEDUP)}), flush=True)


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--path", default=str(data_pipeline.DEFAULT_PATH))
  parser.add_argument("--model", default="small", choices=sorted(models.SIZES))
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--vocab_size", type=int, default=8192)
  parser.add_argument("--max_prompt_len", type=int, default=256)
  parser.add_argument("--max_response_len", type=int, default=256)
  parser.add_argument("--batch_size", type=int, default=32, help="pairs per step")
  parser.add_argument("--batches", type=int, default=8, help="steps per timed pass")
  parser.add_argument("--repeats", type=int, default=3, help="timed passes (median)")
  parser.add_argument("--length", type=int, default=0,
                      help="packed row length (0 = the fewest token slots, see above)")
  parser.add_argument("--rows", type=int, default=0, help="packed rows (0 = fewest that fit)")
  parser.add_argument("--steps", default="dpo_precomputed,dpo_model,reward",
                      help="comma-separated: dpo_precomputed, dpo_model, reward")
  parser.add_argument("--quick", action="store_true",
                      help="smoke run: tiny 1-layer model, short rows, few pairs")
  args = parser.parse_args()
  overrides, peak_sizes = {}, (2048, 4096)
  if args.quick:
    args.model, args.vocab_size = "tiny", 512
    args.max_prompt_len = args.max_response_len = 32
    args.batch_size, args.batches, args.repeats = 4, 2, 1
    overrides = dict(n_layers=1, d_model=64, n_heads=2, mlp_dim=128)
    peak_sizes = (256, 512)

  pairs, tok = hh_pairs(args)
  batches = [pairs[i:i + args.batch_size] for i in range(0, len(pairs), args.batch_size)]
  cfg = models.get_config(args.model, vocab_size=tok.vocab_size, dtype=args.dtype, **overrides)
  peak_meter = common.matmul_peak_meter(peak_sizes, dtype=jnp.dtype(args.dtype))
  peak = peak_meter()
  common_fields = {"model": args.model, "dtype": args.dtype, "pairs": len(pairs),
                   "batch_size": args.batch_size, "max_prompt_len": tok.max_prompt_len,
                   "max_response_len": tok.max_response_len, "start_peak_gflops": round(peak, 1),
                   **common.device_info()}

  def packing_for(shared: bool, lm_head: bool) -> dict:
    shortest = 128 * math.ceil(longest_pair(batches, shared) / 128)
    lengths = [args.length] if args.length else range(shortest, shortest + 512, 128)
    fits = {n: fit_packing(batches, n, shared, lm_head) for n in lengths}
    length = min(fits, key=lambda n: (fits[n][0] * n, n))
    rows, loss_tokens = fits[length]
    rows = args.rows or rows
    out = {"rows": rows, "length": length}
    if lm_head:
      out["loss_tokens"] = loss_tokens
    return out

  steps = args.steps.split(",")
  dpo_steps = [s for s in steps if s.startswith("dpo_")]
  if dpo_steps:
    policy = models.build_model(cfg)
    params = parallel.init_params(policy, jax.random.key(0), jnp.ones((1, 8), jnp.int32))
    # The reference: another init, so policy and reference differ and the loss is not log 2.
    ref = parallel.init_params(policy, jax.random.key(1), jnp.ones((1, 8), jnp.int32))
    mesh = parallel.make_mesh({"data": 1})
    ref_logps = scoring.score_pairs(policy, ref, pairs, tok, mesh, args.batch_size, False)
    per_batch = [(ref_logps[0][i:i + args.batch_size], ref_logps[1][i:i + args.batch_size])
                 for i in range(0, len(pairs), args.batch_size)]
    for step_name in dpo_steps:
      reference = step_name.split("_", 1)[1]
      results = {}
      for layout in ("padded", "padded_shared", "packed", "packed_shared"):
        shared = layout.endswith("shared")
        packing = packing_for(shared, True) if layout.startswith("packed") else None
        config = stage_config("dpo", args.batch_size, packing, loss="sigmoid",
                              reference=reference, shared_prefix=shared)
        loss_fn = pref.preference_loss_fn(policy, config.dpo, tok.max_prompt_len)
        host = dpo_batches(batches, tok, layout, packing, per_batch)
        result = measure(loss_fn, params, host, pairs=len(pairs),
                         ref=ref if reference == "model" else None, repeats=args.repeats,
                         peak=peak_meter)
        results[layout] = report(step_name, layout, result, results.get("padded"), peak,
                                 {**common_fields, "packing": packing})
      summary(step_name, results)

  if "reward" in steps:
    rm = models.build_model(cfg, "reward")
    params = parallel.init_params(rm, jax.random.key(0), jnp.ones((1, 8), jnp.int32))
    results = {}
    for layout in ("padded", "packed", "packed_shared"):
      shared = layout.endswith("shared")
      packing = ({**packing_for(shared, False), "shared_prefix": shared}
                 if layout.startswith("packed") else None)
      loss_fn = reward_lib.reward_loss_fn(rm, use_margin=False, center_coef=0.0,
                                          packed=packing is not None)
      result = measure(loss_fn, params, reward_batches(batches, tok, layout, packing),
                       pairs=len(pairs), repeats=args.repeats, peak=peak_meter)
      results[layout] = report("reward", layout, result, results.get("padded"), peak,
                               {**common_fields, "packing": packing})
    summary("reward", results)


if __name__ == "__main__":
  common.run_main(main)
