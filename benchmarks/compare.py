"""Side-by-side benchmarks against PyTorch + transformers, one process, interleaved runs.

  python benchmarks/compare.py                 # tiny and small; W1, W2, W3; 5 rounds each
  python benchmarks/compare.py --quick         # tiny only, 1 round (a smoke run)

A BENCHMARK, NOT A TEST: it asserts nothing about speed. Both sides run the same math on the
same weights (ours exported with `models.save_hf`, read back by transformers'
LlamaForCausalLM), float32, on this process's CPU threads (torch gets --torch-threads, 2 by
default: XLA:CPU uses both cores too):

  W1  DPO step: 8 pairs of prompt 128 + response 128; one forward over chosen and rejected
      concatenated on the batch axis, summed response log-probs, the sigmoid loss against
      precomputed reference log-probs (the same numbers on both sides), backward, AdamW.
      Ours: train.preference.preference_loss_fn in train.step.make_train_step (jitted, state
      donated). Theirs: a plain torch loop (forward, log_softmax + gather, loss, backward,
      torch.optim.AdamW.step). Both build logits only at the columns that predict response
      tokens (ours: scoring.pair_logps; theirs: transformers' `logits_to_keep`).
  W2  Reward-model step: the same pairs, Bradley-Terry loss on a scalar head read at the
      last token, backward, AdamW. Theirs: transformers' LlamaModel + a torch Linear head.
  W3  Generation: 16 prompts x 64 tokens, exactly 128 new tokens per row (EOS suppressed),
      temperature 1. Ours: rlhf_jax.sampling.generate. Theirs: transformers' generate (the
      helpers of benchmarks/generate.py).

Before timing, each workload checks that the two sides agree (W1/W2: the loss of the first
step; W3: the prompt logits), so the comparison is between the same computations. Timed
calls alternate ours, theirs, ours, theirs... so load from other processes hits both alike,
each timed call right after an untimed one of its own side (see `interleave`);
medians are reported with the per-side spread ((max - min) / median) as the noise figure.
FLOPs are XLA's cost analysis of our compiled step (W1/W2; both sides do this math) or an
analytic count (W3: a while loop, which cost analysis counts once); "fraction of peak"
divides achieved GFLOP/s by the best jitted float32 square matmul (2048² or 4096²) measured
in the same run right before the workload. Prints one JSON line per (workload, size) as soon
as it is measured.
"""
import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import common
import generate as generate_bench
from rlhf_jax import data, models, parallel
from rlhf_jax.train import preference as pref
from rlhf_jax.train import reward as reward_lib
from rlhf_jax.train import scoring
from rlhf_jax.train import step as step_lib

WORKLOADS = ("W1", "W2", "W3")
NAMES = {"W1": "dpo_step", "W2": "reward_step", "W3": "generate"}
# Targets from issue 9, for the `small` shape: speedup over the PyTorch side and fraction of
# the same-run matmul peak.
TARGETS = {"W1": {"speedup": 1.05, "fraction_of_peak": 0.65},
           "W2": {"speedup": 1.1, "fraction_of_peak": 0.65},
           "W3": {"speedup": 3.0}}
BETA = 0.1
# One optimiser setting on both sides (optax.adamw and torch.optim.AdamW: decoupled decay).
LR, B1, B2, EPS, WD = 1e-6, 0.9, 0.999, 1e-8, 0.01


# ---------------------------------------------------------------------------------------------
# Shared pieces
# ---------------------------------------------------------------------------------------------

def pair_batch(cfg, pairs: int, prompt: int, response: int):
  """Pair rows (train.scoring layout) of random full-length prompts and responses: no
  padding, so both sides see the same positions without position-id plumbing."""
  rng = np.random.RandomState(0)
  examples = [data.TokenizedPair(rng.randint(2, cfg.vocab_size, prompt).astype(np.int32),
                                 rng.randint(2, cfg.vocab_size, response).astype(np.int32),
                                 rng.randint(2, cfg.vocab_size, response).astype(np.int32))
              for _ in range(pairs)]
  tok = data.TokenizeConfig(eos_id=cfg.eos_token_id, pad_id=cfg.pad_token_id,
                            max_prompt_len=prompt, max_response_len=response)
  return scoring.collate_pairs(examples, tok, shared_prefix=False)


def torch_llama(module, params):
  """transformers' LlamaForCausalLM holding `params` (export + load: the HF parity path)."""
  return generate_bench.hf_model(module, params).train()


def jax_state(params, tx):
  return {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32),
          "rng": jax.random.key_data(jax.random.key(0))}


def compiled_runner(step, state, batch):
  """(run, compiled, holder): run() does one donated step and returns its loss; the current
  state is holder["state"] (the `state` passed in is donated by the first call)."""
  compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile()
  holder = {"state": state}

  def run():
    holder["state"], metrics = compiled(holder["state"], batch)
    return metrics["loss"]
  return run, compiled, holder


def model_config(size, args):
  """The named size, with fewer layers when --n-layers asks (smoke runs only)."""
  return models.get_config(size, **({"n_layers": args.n_layers} if args.n_layers else {}))


def matmul_flops(cfg) -> int:
  """Parameters that take part in matmuls (the embedding lookup is a gather)."""
  return cfg.num_params() - cfg.vocab_size * cfg.d_model * (0 if cfg.tie_embeddings else 1)


def interleave(ours, theirs, rounds: int):
  """Alternating timed calls, each right after an untimed call of its own side; lists of
  seconds for each side. The untimed call keeps one side's memory traffic out of the other's
  timing. With the system's malloc every small W2 step of ours took ~560k page faults (its
  2.2 GB temp buffer, which rlhf_jax.host_memory now keeps): timed right after a torch step
  they cost 4.3-12.3 s of system time, right after a step of its own 1.2-2.7 s, as in a
  training loop where steps run back to back."""
  mine, other = [], []
  for _ in range(rounds):
    for fn, out in ((ours, mine), (theirs, other)):
      jax.block_until_ready(fn())
      start = time.perf_counter()
      jax.block_until_ready(fn())
      out.append(time.perf_counter() - start)
  return mine, other


# ---------------------------------------------------------------------------------------------
# W1: DPO step
# ---------------------------------------------------------------------------------------------

def w1_dpo(cfg, args):
  import torch
  import torch.nn.functional as F
  module = models.build_model(cfg)
  batch = pair_batch(cfg, args.pairs, args.prompt, args.response)
  params = parallel.init_params(module, jax.random.key(0), batch["chosen_ids"][:1])
  # Reference log-probs: the policy's own plus a spread, so the first loss is not log 2 and
  # the parity check below is a real check.
  s_c, s_r = jax.jit(lambda p, b: scoring.pair_logps(module, p, b, prompt_len=args.prompt,
                                                     shared_prefix=False)[:2])(params, batch)
  noise = np.random.RandomState(1).normal(0, 3, (2, args.pairs)).astype(np.float32)
  batch["ref_chosen"] = np.asarray(s_c) + noise[0]
  batch["ref_rejected"] = np.asarray(s_r) + noise[1]

  model = torch_llama(module, params)
  opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD)
  ids = torch.from_numpy(np.concatenate([batch["chosen_ids"], batch["rejected_ids"]])).long()
  attn = torch.from_numpy(np.concatenate([batch["chosen_mask"], batch["rejected_mask"]])).long()
  # Both sides build logits only where a response token is predicted (columns prompt - 1
  # onwards): ours through pair_logps, theirs through transformers' `logits_to_keep`.
  keep = args.response + 1
  weights = torch.from_numpy(np.concatenate(
      [batch["chosen_loss_mask"], batch["rejected_loss_mask"]])[:, -args.response:]
      .astype(np.float32))
  ref_c, ref_r = torch.from_numpy(batch["ref_chosen"]), torch.from_numpy(batch["ref_rejected"])

  def theirs():
    opt.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, attention_mask=attn, logits_to_keep=keep).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(
        -1, ids[:, -args.response:, None])[..., 0]
    pol_c, pol_r = (logp * weights).sum(-1).chunk(2)
    loss = -F.logsigmoid(BETA * ((pol_c - ref_c) - (pol_r - ref_r))).mean()
    loss.backward()
    opt.step()
    return loss.item()

  dpo = pref.default_config()
  dpo.loss, dpo.beta, dpo.reference, dpo.shared_prefix = "sigmoid", BETA, "precomputed", False
  tx = optax.adamw(LR, b1=B1, b2=B2, eps=EPS, weight_decay=WD)
  step = step_lib.make_train_step(pref.preference_loss_fn(module, dpo, args.prompt), tx)
  ours, compiled, _ = compiled_runner(step, jax_state(params, tx), batch)
  tokens = 2 * args.pairs * (args.prompt + args.response)
  return ours, theirs, compiled, tokens, {"pairs": args.pairs, "prompt": args.prompt,
                                          "response": args.response}


# ---------------------------------------------------------------------------------------------
# W2: reward-model step
# ---------------------------------------------------------------------------------------------

def w2_reward(cfg, args):
  import torch
  import torch.nn.functional as F
  module = models.build_model(cfg, "reward")
  rows = pair_batch(cfg, args.pairs, args.prompt, args.response)
  batch = {k: rows[k] for k in ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask")}
  batch["margin"] = np.zeros((args.pairs,), np.float32)
  params = parallel.init_params(module, jax.random.key(0), batch["chosen_ids"][:1])

  # The torch side: our reward backbone exported through a policy model (save_hf exports
  # causal LMs), transformers' LlamaModel of it, and a Linear head holding our head's weights.
  policy = models.build_model(cfg)
  policy_params = models.transfer_backbone(
      params, parallel.init_params(policy, jax.random.key(1), batch["chosen_ids"][:1]))
  backbone = torch_llama(policy, policy_params).model
  head = torch.nn.Linear(cfg.d_model, 1)
  with torch.no_grad():
    head.weight.copy_(torch.from_numpy(np.array(params["reward_head"]["kernel"]).T))
    head.bias.copy_(torch.from_numpy(np.array(params["reward_head"]["bias"])))
  trainable = list(backbone.parameters()) + list(head.parameters())
  opt = torch.optim.AdamW(trainable, lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD)
  ids = torch.from_numpy(np.concatenate([batch["chosen_ids"], batch["rejected_ids"]])).long()
  attn = torch.from_numpy(np.concatenate([batch["chosen_mask"], batch["rejected_mask"]])).long()

  def theirs():
    opt.zero_grad(set_to_none=True)
    hidden = backbone(input_ids=ids, attention_mask=attn).last_hidden_state
    r_c, r_r = head(hidden[:, -1]).squeeze(-1).chunk(2)  # No padding: the last column.
    loss = -F.logsigmoid(r_c - r_r).mean()
    loss.backward()
    opt.step()
    return loss.item()

  tx = optax.adamw(LR, b1=B1, b2=B2, eps=EPS, weight_decay=WD)
  step = step_lib.make_train_step(
      reward_lib.reward_loss_fn(module, use_margin=False, center_coef=0.0), tx)
  ours, compiled, _ = compiled_runner(step, jax_state(params, tx), batch)
  tokens = 2 * args.pairs * (args.prompt + args.response)
  return ours, theirs, compiled, tokens, {"pairs": args.pairs, "prompt": args.prompt,
                                          "response": args.response}


def train_workload(name, size, args, peak_gflops):
  """W1 / W2: parity of the first step's loss, then interleaved timed steps."""
  cfg = model_config(size, args)
  build = w1_dpo if name == "W1" else w2_reward
  t0 = time.perf_counter()
  ours, theirs, compiled, tokens, shape = build(cfg, args)
  setup_s = time.perf_counter() - t0
  # Warm-up calls double as the parity check: same weights, same batch, same first loss.
  loss_ours, loss_theirs = float(ours()), float(theirs())
  if not np.isclose(loss_ours, loss_theirs, rtol=1e-4, atol=1e-4):
    raise RuntimeError(f"{name} {size}: first-step loss {loss_ours} (ours) vs {loss_theirs} "
                       "(torch): not the same computation, so no comparison")
  mine, other = interleave(ours, theirs, args.rounds)
  flops = common.compiled_stats(compiled)["xla_flops"]
  return timings(name, size, mine, other, tokens, flops, peak_gflops, {
      **shape, "setup_s": round(setup_s, 2), "first_loss_ours": loss_ours,
      "first_loss_torch": loss_theirs, "flops_source": "xla_cost_analysis"})


# ---------------------------------------------------------------------------------------------
# W3: generation
# ---------------------------------------------------------------------------------------------

def generate_workload(size, args, peak_gflops):
  import torch
  cfg = model_config(size, args)
  module = models.build_model(cfg)
  rng = np.random.RandomState(0)
  prompt = rng.randint(2, cfg.vocab_size, (args.batch, args.prompt_len)).astype(np.int32)
  mask = np.ones_like(prompt)
  params = parallel.init_params(module, jax.random.key(0), prompt[:1], mask[:1])
  ours, first_call_s = generate_bench.our_generate(module, params, prompt, mask,
                                                   args.new_tokens, cfg)
  model = generate_bench.hf_model(module, params)
  with torch.inference_mode():
    their_logits = model(torch.from_numpy(prompt.astype(np.int64))).logits.numpy()
  logits_diff = float(np.max(np.abs(their_logits - np.asarray(
      module.apply({"params": params}, prompt, mask)))))
  if logits_diff > 1e-3:
    raise RuntimeError(f"W3 {size}: transformers' logits differ from ours by {logits_diff}")
  theirs = generate_bench.hf_generate(model, prompt, args.new_tokens, cfg)  # Warmed up.
  jax.block_until_ready(ours())
  mine, other = interleave(ours, theirs, args.rounds)
  # Analytic FLOPs of prefill + decode: 2 per matmul param per token, plus attention scores
  # and values (4 * heads * head_dim per attended position per layer).
  b, p, n = args.batch, args.prompt_len, args.new_tokens
  attended = b * (p * (p + 1) // 2 + sum(p + i for i in range(1, n)))
  flops = 2 * matmul_flops(cfg) * b * (p + n - 1) + 4 * cfg.n_layers * cfg.n_heads * (
      cfg.head_size * attended)
  new_tokens = b * n
  out = timings("W3", size, mine, other, new_tokens, flops, peak_gflops, {
      "batch": b, "prompt_len": p, "new_tokens": n,
      "ours_compile_plus_first_call_s": round(first_call_s, 2),
      "hf_logits_max_abs_diff": logits_diff, "flops_source": "analytic"})
  out["ours_new_tokens_per_s"] = out.pop("ours_tokens_per_s")
  out["theirs_new_tokens_per_s"] = out.pop("theirs_tokens_per_s")
  return out


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def spread(xs) -> float:
  return round((max(xs) - min(xs)) / statistics.median(xs), 3)


def timings(name, size, mine, other, tokens, flops, peak_gflops, extra):
  med_mine, med_other = statistics.median(mine), statistics.median(other)
  ours_gflops, theirs_gflops = flops / med_mine / 1e9, flops / med_other / 1e9
  out = {"benchmark": "compare", "workload": name, "name": NAMES[name], "model": size,
         "theirs": "torch+transformers", **extra,
         "ours_s": round(med_mine, 4), "theirs_s": round(med_other, 4),
         "speedup": round(med_other / med_mine, 3),
         "speedup_best_of_rounds": round(min(other) / min(mine), 3),
         "ours_rounds_s": [round(x, 4) for x in mine],
         "theirs_rounds_s": [round(x, 4) for x in other],
         "ours_spread": spread(mine), "theirs_spread": spread(other), "rounds": len(mine),
         "ours_tokens_per_s": round(tokens / med_mine, 1),
         "theirs_tokens_per_s": round(tokens / med_other, 1),
         "flops": flops, "ours_gflops": round(ours_gflops, 1),
         "theirs_gflops": round(theirs_gflops, 1), "peak_gflops": round(peak_gflops, 1),
         "ours_fraction_of_peak": round(ours_gflops / peak_gflops, 3),
         "theirs_fraction_of_peak": round(theirs_gflops / peak_gflops, 3)}
  target = TARGETS[name]
  out["target"] = {**target, "applies_to": "small"}
  met = out["speedup"] >= target["speedup"]
  if "fraction_of_peak" in target:
    met = met and out["ours_fraction_of_peak"] >= target["fraction_of_peak"]
  out["target_met"] = met if size == "small" else None
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="tiny,small")
  parser.add_argument("--workloads", default=",".join(WORKLOADS))
  parser.add_argument("--rounds", type=int, default=5,
                      help="timed calls per side, alternating (medians reported)")
  parser.add_argument("--quick", action="store_true",
                      help="tiny only, 1 round, a 1024² peak (a smoke run, not a measurement)")
  parser.add_argument("--pairs", type=int, default=8)
  parser.add_argument("--prompt", type=int, default=128, help="W1/W2 prompt tokens")
  parser.add_argument("--response", type=int, default=128, help="W1/W2 response tokens")
  parser.add_argument("--batch", type=int, default=16, help="W3 prompts")
  parser.add_argument("--prompt-len", type=int, default=64, help="W3 prompt tokens")
  parser.add_argument("--new-tokens", type=int, default=128, help="W3 new tokens per row")
  parser.add_argument("--torch-threads", type=int, default=2)
  parser.add_argument("--n-layers", type=int, default=0,
                      help="override the size's layer count (0 = as named; smoke runs only)")
  parser.add_argument("--peak-sizes", default="2048,4096",
                      help="square float32 matmul sizes whose best GFLOP/s is the peak")
  args = parser.parse_args()
  if args.quick:
    args.sizes, args.rounds, args.peak_sizes = "tiny", 1, "1024"
  sizes = args.sizes.split(",")
  workloads = args.workloads.split(",")
  for name, given, known in (("--sizes", sizes, ("tiny", "small")),
                             ("--workloads", workloads, WORKLOADS)):
    bad = sorted(set(given) - set(known))
    if bad:
      parser.error(f"{name}: unknown {bad}; expected some of {list(known)}")

  import torch
  import transformers
  torch.set_num_threads(args.torch_threads)
  shared = {"torch_threads": torch.get_num_threads(), "versions": {
                "jax": jax.__version__, "torch": torch.__version__,
                "transformers": transformers.__version__, "python": sys.version.split()[0]},
            "timing": "wall-clock medians; benchmark, not a test",
      "n_layers_override": args.n_layers or None, **common.device_info()}
  for size in sizes:
    for name in workloads:
      # The peak is measured right before each workload (the same run, the same load), and
      # the load average is reported: on a shared machine both move during a long run.
      load_start = os.getloadavg()[0]
      peak_all = common.matmul_peak(tuple(int(n) for n in args.peak_sizes.split(",")))
      peak = max(peak_all.values())
      print(f"compare.py: {name} {size}, matmul peak {peak:.1f} GFLOP/s", file=sys.stderr,
            flush=True)
      if name == "W3":
        result = generate_workload(size, args, peak)
      else:
        result = train_workload(name, size, args, peak)
      result["peak_gflops_by_size"] = {k: round(v, 1) for k, v in peak_all.items()}
      result["load_avg_1m_start_end"] = [round(load_start, 2), round(os.getloadavg()[0], 2)]
      print(json.dumps({**result, **shared}), flush=True)

if __name__ == "__main__":
  common.run_main(main)
