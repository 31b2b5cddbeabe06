"""What the side-by-side speed targets would need, against what the kernels under each side do.

  python benchmarks/bounds.py --sizes small,tiny --rounds 3
  python benchmarks/bounds.py --quick            # tiny, 1 round, 2 layers: a smoke run

A BENCHMARK, NOT A TEST. `compare.py` measures whole steps; this script takes them apart to
show where the time goes on each side and whether a target is reachable at all with the
matmul kernels that XLA:CPU and torch call. Every workload is the one of `compare.py`.

For each workload it times, interleaved (ours, theirs, our skeleton, their skeleton, ...):
  * the whole step of each side (compare.py's own callables: the same code, the same parity
    check of the first loss / the prompt logits);
  * the *dense skeleton* of that step on each side: the same matmuls in the same order with the
    same shapes (every attention / MLP kernel of every layer and, where the step has one, the
    LM head), forward and backward for W1 / W2, forward only at batch rows for W3's decode
    steps; no attention core, norms, RoPE, softmax, sampling or optimiser. It is written once
    (`_skeleton`) and run by jax.jit and by torch (autograd / inference mode);
  * W3 only: the decode attention over the full fixed-size cache alone (our sampler's einsums).

and reports, per workload, `target_s` = torch's whole step / target speedup, the skeleton
times, each side's time outside its skeleton (`*_rest_s`), and `rest_budget_s` = target_s - our
skeleton: what would be left for everything else if our matmuls ran exactly as fast as they do
alone. A negative budget means no implementation on these kernels meets the target. The
machine's read bandwidth (a jitted sum over 512 MiB) is printed first, for the memory-bound
decode. Prints one JSON line per measurement.
"""
import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import common
import compare
import generate as generate_bench
from rlhf_jax import models, parallel


def _skeleton(layers, head, x, silu, cotangent=None):
  """The dense matmuls of a Llama step in order: per layer q/k/v then o, gate/up then down
  (residual adds and SiLU keep every output live), then the LM head when `head` is given.
  Works on jax and torch arrays alike. With `cotangent`, returns sum(out * cotangent), a linear
  loss whose gradient is the backward pass of exactly these matmuls."""
  h = x
  for w in layers:
    h = h + (h @ w["q"] + h @ w["k"] + h @ w["v"]) @ w["o"]
    h = h + (silu(h @ w["gate"]) * (h @ w["up"])) @ w["down"]
  out = h if head is None else h @ head
  return out if cotangent is None else (out * cotangent).sum()


def _skeleton_weights(cfg, with_head: bool):
  """Random float32 kernels with the shapes of `cfg` (scaled so activations stay finite)."""
  rng = np.random.RandomState(0)
  q_dim, kv_dim = cfg.n_heads * cfg.head_size, cfg.kv_heads * cfg.head_size
  shapes = {"q": (cfg.d_model, q_dim), "k": (cfg.d_model, kv_dim), "v": (cfg.d_model, kv_dim),
            "o": (q_dim, cfg.d_model), "gate": (cfg.d_model, cfg.mlp_dim),
            "up": (cfg.d_model, cfg.mlp_dim), "down": (cfg.mlp_dim, cfg.d_model)}
  # k and v feed the same sum as q, so they must be as wide: true for the named sizes.
  assert kv_dim == q_dim, "the skeleton sums q, k and v: needs kv_heads == n_heads"
  init = lambda shape: (rng.standard_normal(shape) * 0.02).astype(np.float32)
  layers = [{name: init(shape) for name, shape in shapes.items()} for _ in range(cfg.n_layers)]
  head = init((cfg.d_model, cfg.vocab_size)) if with_head else None
  return layers, head


def _torch_tensors(tree, grad: bool):
  import torch
  return jax.tree.map(lambda a: torch.tensor(a, requires_grad=grad), tree)


def train_skeletons(cfg, rows: int, with_head: bool):
  """(ours, theirs, flops): one forward+backward of the dense skeleton over `rows` tokens."""
  import torch
  import torch.nn.functional as F
  layers, head = _skeleton_weights(cfg, with_head)
  rng = np.random.RandomState(1)
  x = rng.standard_normal((rows, cfg.d_model)).astype(np.float32)
  cot = rng.standard_normal((rows, cfg.vocab_size if with_head else cfg.d_model)).astype(
      np.float32)

  grad = jax.jit(jax.grad(lambda p, x, c: _skeleton(p[0], p[1], x, jax.nn.silu, c)))
  jparams, jx, jc = jax.tree.map(jnp.asarray, (layers, head)), jnp.asarray(x), jnp.asarray(cot)
  ours = lambda: grad(jparams, jx, jc)

  tparams = _torch_tensors((layers, head), grad=True)
  tx, tc = torch.from_numpy(x), torch.from_numpy(cot)

  def theirs():
    for t in jax.tree.leaves(tparams):
      t.grad = None
    _skeleton(tparams[0], tparams[1], tx, F.silu, tc).backward()
    return 0

  per_token = sum(w.size for w in jax.tree.leaves(layers)) + (head.size if with_head else 0)
  return ours, theirs, 6 * rows * per_token


def decode_skeletons(cfg, batch: int, steps: int):
  """(ours, theirs, flops): `steps` decode steps of the dense skeleton at `batch` rows (the
  weight matmuls of each step and the LM head; each step's output feeds the next)."""
  import torch
  import torch.nn.functional as F
  layers, head = _skeleton_weights(cfg, with_head=True)
  x = np.random.RandomState(1).standard_normal((batch, cfg.d_model)).astype(np.float32)

  @jax.jit
  def loop(params, x):
    def body(_, carry):
      h, acc = carry
      h = _skeleton(params[0], None, h, jax.nn.silu)
      # Every logit is read (a row max, as sampling reads them all: a slice would let XLA
      # compute one column); the rescaled hidden state stands in for the next embedding.
      return h * 0.5, acc + (h @ params[1]).max(axis=-1).sum()
    return jax.lax.fori_loop(0, steps, body, (x, jnp.float32(0)))
  jparams, jx = jax.tree.map(jnp.asarray, (layers, head)), jnp.asarray(x)
  ours = lambda: loop(jparams, jx)

  tparams = _torch_tensors((layers, head), grad=False)
  tx = torch.from_numpy(x)

  def theirs():
    with torch.inference_mode():
      h, acc = tx, 0.0
      for _ in range(steps):
        h = _skeleton(tparams[0], None, h, F.silu)
        acc += float((h @ tparams[1]).max(dim=-1).values.sum())
        h = h * 0.5
    return acc

  per_token = sum(w.size for w in jax.tree.leaves(layers)) + head.size
  return ours, theirs, 2 * batch * steps * per_token


def decode_attention(cfg, batch: int, cache_len: int, steps: int):
  """Our sampler's decode attention alone: per step and layer, one query row per head against
  every slot of a [B, kv_heads, S, D] cache (scores, softmax, weighted values)."""
  key = jax.random.key(0)
  shape = (batch, cfg.kv_heads, cache_len, cfg.head_size)
  ks = [jax.random.normal(jax.random.fold_in(key, 2 * i), shape) for i in range(cfg.n_layers)]
  vs = [jax.random.normal(jax.random.fold_in(key, 2 * i + 1), shape)
        for i in range(cfg.n_layers)]
  q = jax.random.normal(key, (batch, cfg.kv_heads, cfg.head_size))

  @jax.jit
  def loop(q, ks, vs):
    def body(_, q):
      for k, v in zip(ks, vs):
        probs = jax.nn.softmax(jnp.einsum("bhd,bhsd->bhs", q, k), axis=-1)
        q = q * 0.5 + jnp.einsum("bhs,bhsd->bhd", probs, v) * 0.5
      return q
    return jax.lax.fori_loop(0, steps, body, q)
  return lambda: loop(q, ks, vs)


def read_bandwidth() -> dict:
  x = jnp.ones((128 * 1024 * 1024,), jnp.float32)
  total = jax.jit(jnp.sum)
  secs = common.median_seconds(lambda: total(x), repeats=5)
  return {"benchmark": "bounds", "bound": "read_bandwidth", "bytes": x.nbytes,
          "jax_sum_GB_per_s": round(x.nbytes / secs / 1e9, 1)}


def interleaved(fns: dict, rounds: int) -> dict:
  """Median seconds of each callable, calls alternating between them every round."""
  for fn in fns.values():
    jax.block_until_ready(fn())  # Compile / warm up.
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}


def train_bound(name: str, size: str, args) -> dict:
  cfg = compare.model_config(size, args)
  build = compare.w1_dpo if name == "W1" else compare.w2_reward
  ours, theirs, _, _, shape = build(cfg, args)
  loss_ours, loss_theirs = float(ours()), float(theirs())
  if not np.isclose(loss_ours, loss_theirs, rtol=1e-4, atol=1e-4):
    raise RuntimeError(f"{name} {size}: first-step losses differ ({loss_ours} vs "
                       f"{loss_theirs}): not the same computation")
  rows = 2 * args.pairs * (args.prompt + args.response)
  # W1's head runs on the response columns only (pair_logps / logits_to_keep on both sides),
  # over the batch's 2 * pairs rows: add it as its own skeleton of that many tokens.
  sk_ours, sk_theirs, flops = train_skeletons(cfg, rows, with_head=False)
  fns = {"ours": ours, "theirs": theirs, "ours_skeleton": sk_ours,
         "theirs_skeleton": sk_theirs}
  if name == "W1":
    head_rows = 2 * args.pairs * (args.response + 1)
    h_ours, h_theirs, h_flops = head_skeletons(cfg, head_rows)
    fns.update(ours_head=h_ours, theirs_head=h_theirs)
    flops += h_flops
  t = interleaved(fns, args.rounds)
  ours_sk = t["ours_skeleton"] + t.get("ours_head", 0.0)
  theirs_sk = t["theirs_skeleton"] + t.get("theirs_head", 0.0)
  return report(name, size, compare.TARGETS[name]["speedup"], t["ours"], t["theirs"], ours_sk,
                theirs_sk, flops, {**shape, "skeleton_rows": rows, "raw_s": _rounded(t)})


def head_skeletons(cfg, rows: int):
  """(ours, theirs, flops): forward+backward of the LM head alone over `rows` hidden states."""
  import torch
  rng = np.random.RandomState(2)
  head = (rng.standard_normal((cfg.d_model, cfg.vocab_size)) * 0.02).astype(np.float32)
  x = rng.standard_normal((rows, cfg.d_model)).astype(np.float32)
  cot = rng.standard_normal((rows, cfg.vocab_size)).astype(np.float32)
  grad = jax.jit(jax.grad(lambda w, x, c: ((x @ w) * c).sum(), argnums=(0, 1)))
  jw, jx, jc = jnp.asarray(head), jnp.asarray(x), jnp.asarray(cot)
  tw, tx = torch.tensor(head, requires_grad=True), torch.tensor(x, requires_grad=True)
  tc = torch.from_numpy(cot)

  def theirs():
    tw.grad = tx.grad = None
    ((tx @ tw) * tc).sum().backward()
    return 0
  return (lambda: grad(jw, jx, jc)), theirs, 6 * rows * head.size


def decode_bound(size: str, args) -> dict:
  import torch
  cfg = compare.model_config(size, args)
  module = models.build_model(cfg)
  rng = np.random.RandomState(0)
  prompt = rng.randint(2, cfg.vocab_size, (args.batch, args.prompt_len)).astype(np.int32)
  mask = np.ones_like(prompt)
  params = parallel.init_params(module, jax.random.key(0), prompt[:1], mask[:1])
  ours, _ = generate_bench.our_generate(module, params, prompt, mask, args.new_tokens, cfg)
  model = generate_bench.hf_model(module, params)
  with torch.inference_mode():
    theirs_logits = model(torch.from_numpy(prompt.astype(np.int64))).logits.numpy()
  diff = float(np.max(np.abs(theirs_logits - np.asarray(module.apply({"params": params},
                                                                     prompt, mask)))))
  if diff > 1e-3:
    raise RuntimeError(f"W3 {size}: transformers' logits differ from ours by {diff}")
  theirs = generate_bench.hf_generate(model, prompt, args.new_tokens, cfg)
  steps = args.new_tokens
  sk_ours, sk_theirs, flops = decode_skeletons(cfg, args.batch, steps)
  attention = decode_attention(cfg, args.batch, args.prompt_len + steps - 1, steps)
  t = interleaved({"ours": ours, "theirs": theirs, "ours_skeleton": sk_ours,
                   "theirs_skeleton": sk_theirs, "ours_attention": attention}, args.rounds)
  out = report("W3", size, compare.TARGETS["W3"]["speedup"], t["ours"], t["theirs"],
               t["ours_skeleton"], t["theirs_skeleton"], flops,
               {"batch": args.batch, "prompt_len": args.prompt_len, "new_tokens": steps,
                "hf_logits_max_abs_diff": diff, "raw_s": _rounded(t)})
  per_step = lambda secs: round(1e3 * secs / steps, 3)
  weight_bytes = 4 * (compare.matmul_flops(cfg))
  out.update({
      "ms_per_step": {"ours": per_step(t["ours"]), "theirs": per_step(t["theirs"]),
                      "target": per_step(out["target_s"]),
                      "ours_skeleton": per_step(t["ours_skeleton"]),
                      "theirs_skeleton": per_step(t["theirs_skeleton"]),
                      "ours_attention_full_cache": per_step(t["ours_attention"])},
      "weight_bytes_per_step": weight_bytes,
      "ours_skeleton_GB_per_s": round(weight_bytes * steps / t["ours_skeleton"] / 1e9, 1)})
  return out


def report(name, size, speedup, ours, theirs, ours_sk, theirs_sk, flops, extra) -> dict:
  target = theirs / speedup
  return {"benchmark": "bounds", "workload": name, "name": compare.NAMES[name], "model": size,
          **extra, "target_speedup": speedup, "ours_s": round(ours, 4),
          "theirs_s": round(theirs, 4), "speedup": round(theirs / ours, 3),
          "target_s": round(target, 4), "ours_skeleton_s": round(ours_sk, 4),
          "theirs_skeleton_s": round(theirs_sk, 4),
          "skeleton_speedup": round(theirs_sk / ours_sk, 3),
          "skeleton_gflops": {"ours": round(flops / ours_sk / 1e9, 1),
                              "theirs": round(flops / theirs_sk / 1e9, 1)},
          "ours_rest_s": round(ours - ours_sk, 4), "theirs_rest_s": round(theirs - theirs_sk, 4),
          "rest_budget_s": round(target - ours_sk, 4),
          "reachable_on_these_kernels": bool(target > ours_sk)}


def _rounded(times: dict) -> dict:
  return {k: round(v, 4) for k, v in times.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="small,tiny")
  parser.add_argument("--workloads", default=",".join(compare.WORKLOADS))
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--quick", action="store_true",
                      help="tiny, 1 round, 2 layers and 16 new tokens unless given (a smoke run)")
  parser.add_argument("--pairs", type=int, default=8)
  parser.add_argument("--prompt", type=int, default=128)
  parser.add_argument("--response", type=int, default=128)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--prompt-len", type=int, default=64)
  parser.add_argument("--new-tokens", type=int, default=None, help="default 128 (quick: 16)")
  parser.add_argument("--torch-threads", type=int, default=2)
  parser.add_argument("--n-layers", type=int, default=None,
                      help="override the size's layer count (default: as named; quick: 2)")
  args = parser.parse_args()
  if args.quick:
    args.sizes, args.rounds = "tiny", 1
  if args.new_tokens is None:
    args.new_tokens = 16 if args.quick else 128
  if args.n_layers is None:
    args.n_layers = 2 if args.quick else 0
  import torch
  torch.set_num_threads(args.torch_threads)
  shared = {"torch_threads": torch.get_num_threads(), **common.device_info()}
  print(json.dumps({**read_bandwidth(), **shared}), flush=True)
  for size in args.sizes.split(","):
    for name in args.workloads.split(","):
      load_start = round(os.getloadavg()[0], 2)
      print(f"bounds.py: {name} {size}", file=sys.stderr, flush=True)
      out = decode_bound(size, args) if name == "W3" else train_bound(name, size, args)
      out["load_avg_1m_start_end"] = [load_start, round(os.getloadavg()[0], 2)]
      print(json.dumps({**out, **shared}), flush=True)


if __name__ == "__main__":
  common.run_main(main)
