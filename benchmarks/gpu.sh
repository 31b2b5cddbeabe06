#!/usr/bin/env bash
# One prepared GPU run (at most 8 minutes) for a single H100 / H200: bf16 DPO step MFU of a ~1B
# Llama shape (models.SIZES["llama-3.2-1b"]), sampler new tokens/s, memory.
#
#   benchmarks/gpu.sh                    # on the GPU machine, from the repository root
#   GPU_SH_TINY=1 benchmarks/gpu.sh      # CPU smoke run with the tiny shape (CI runs this)
#
# Assumes a CUDA jaxlib is already installed in the Python it runs ($PYTHON, default python3):
# the GPU machine cannot reach the network, so nothing is installed here. Prints one JSON line
# per measurement (dpo_step, generate, memory); everything else goes to stderr.
#
# MFU = model FLOPs per second / the card's bf16 dense peak. The peak comes from the card name
# (nvidia-smi, else jax's device_kind) and is printed with the result; a card not in the
# table below gets peak null (set GPU_PEAK_TFLOPS to supply one). Model FLOPs are counted two
# ways: XLA's cost analysis of the compiled step, and the usual 6·N·tokens + attention
# (N = matmul params; the reference log-probs are precomputed, so the step holds no
# reference forward). In tiny mode the "peak" is a bf16 matmul measured on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
LIMIT_S="${GPU_SH_LIMIT_S:-480}"
CARD=""
if [[ -z "${GPU_SH_TINY:-}" ]] && command -v nvidia-smi >/dev/null 2>&1; then
  CARD="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 || true)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >&2 || true
fi
export GPU_SH_CARD="$CARD"
export PYTHONPATH="benchmarks${PYTHONPATH:+:$PYTHONPATH}"

exec timeout --signal=TERM --kill-after=15 "$LIMIT_S" "$PYTHON" - <<'PY'
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
import compare
from rlhf_jax import models, parallel, sampling
from rlhf_jax.train import preference as pref
from rlhf_jax.train import step as step_lib

TINY = bool(os.environ.get("GPU_SH_TINY"))
# bf16 dense tensor-core peaks (TFLOP/s, no sparsity) from NVIDIA's data sheets.
PEAKS = [("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0),
         ("GH200", 989.0), ("A100", 312.0), ("L40S", 362.0)]

platform = jax.devices()[0].platform
if not TINY and platform != "gpu":
  sys.exit(f"gpu.sh: jax sees platform {platform!r}, not a GPU (is a CUDA jaxlib installed?); "
           "set GPU_SH_TINY=1 for the CPU smoke run")
card = os.environ.get("GPU_SH_CARD") or jax.devices()[0].device_kind
if TINY:
  peak = max(common.matmul_peak(sizes=(1024,), dtype=jnp.bfloat16, repeats=3).values()) / 1e3
  peak_source = "measured jitted bf16 1024^2 matmul on this CPU (tiny mode)"
elif os.environ.get("GPU_PEAK_TFLOPS"):
  peak, peak_source = float(os.environ["GPU_PEAK_TFLOPS"]), "GPU_PEAK_TFLOPS"
else:
  peak = next((p for name, p in PEAKS if name.lower() in card.lower()), None)
  peak_source = f"bf16 dense data-sheet peak for {card!r}" if peak else "unknown card"

size = "tiny" if TINY else "llama-3.2-1b"
# Tiny mode is a smoke run of this script, so it keeps the tiny shape but only 2 layers.
cfg = models.get_config(size, dtype="bfloat16", **({"n_layers": 2} if TINY else {}))
shape = (dict(pairs=2, prompt=32, response=32, steps=2, batch=4, prompt_len=16, new_tokens=16)
         if TINY else
         dict(pairs=8, prompt=256, response=256, steps=5, batch=32, prompt_len=128,
              new_tokens=256))
common_fields = {"model": size, "dtype": "bfloat16 compute, float32 params", "card": card,
                 "peak_tflops": peak, "peak_source": peak_source, "tiny_mode": TINY,
                 "jax": jax.__version__, **common.device_info()}


def emit(record):
  print(json.dumps({**record, **common_fields}), flush=True)


def peak_bytes():
  stats = jax.devices()[0].memory_stats()  # None on CPU.
  return None if stats is None else stats.get("peak_bytes_in_use")


# DPO STEP: the W1 step of compare.py (precomputed reference, sigmoid loss, AdamW) in bf16.
module = models.build_model(cfg)
batch = compare.pair_batch(cfg, shape["pairs"], shape["prompt"], shape["response"])
batch["ref_chosen"] = np.zeros((shape["pairs"],), np.float32)
batch["ref_rejected"] = np.zeros((shape["pairs"],), np.float32)
t0 = time.perf_counter()
params = parallel.init_params(module, jax.random.key(0), batch["chosen_ids"][:1])
init_s = time.perf_counter() - t0
dpo = pref.default_config()
dpo.reference, dpo.shared_prefix = "precomputed", False
tx = optax.adamw(1e-6, weight_decay=0.01)
step = step_lib.make_train_step(pref.preference_loss_fn(module, dpo, shape["prompt"]), tx)
t0 = time.perf_counter()
run, compiled, holder = compare.compiled_runner(step, compare.jax_state(params, tx), batch)
compile_s = time.perf_counter() - t0
step_s = common.median_seconds(run, shape["steps"])
stats = common.compiled_stats(compiled)
tokens = 2 * shape["pairs"] * (shape["prompt"] + shape["response"])
seq = shape["prompt"] + shape["response"]
# Causal attention: QK^T and AV, forward + backward (3x), half the positions on average.
attn = 3 * 2 * 2 * cfg.n_layers * cfg.n_heads * cfg.head_size * seq * tokens // 2
flops_6n = 6 * compare.matmul_flops(cfg) * tokens + attn
mfu = lambda flops: None if peak is None else round(flops / step_s / (peak * 1e12), 4)
emit({"benchmark": "gpu_dpo_step", "pairs": shape["pairs"], "prompt": shape["prompt"],
      "response": shape["response"], "tokens_per_step": tokens, "step_s": round(step_s, 4),
      "tokens_per_s": round(tokens / step_s, 1), "init_s": round(init_s, 2),
      "compile_s": round(compile_s, 2), "flops_xla": stats["xla_flops"],
      "flops_6n_plus_attention": flops_6n,
      "achieved_tflops_xla": round(stats["xla_flops"] / step_s / 1e12, 3),
      "mfu_xla_flops": mfu(stats["xla_flops"]), "mfu_6n": mfu(flops_6n),
      "params": cfg.num_params()})
emit({"benchmark": "gpu_memory", "what": "dpo step", "memory_analysis": {
          k: v for k, v in stats.items() if k != "xla_flops"},
      "peak_bytes_in_use_after_dpo": peak_bytes()})
params = holder["state"]["params"]  # The state passed in was donated to the step.
del run, compiled, holder

# SAMPLER: new tokens/s of sampling.generate (EOS suppressed: every row makes new_tokens).
rng = np.random.RandomState(0)
prompt = rng.randint(2, cfg.vocab_size, (shape["batch"], shape["prompt_len"])).astype(np.int32)
mask = np.ones_like(prompt)
scfg = sampling.SamplingConfig(max_new_tokens=shape["new_tokens"], eos_id=cfg.eos_token_id,
                               pad_id=cfg.pad_token_id, temperature=1.0,
                               min_new_tokens=shape["new_tokens"])
key = jax.random.key(0)
gen = lambda: sampling.generate(module, params, prompt, mask, key, scfg)
t0 = time.perf_counter()
out = jax.block_until_ready(gen())
first_s = time.perf_counter() - t0
if not (np.asarray(out.lengths) == shape["new_tokens"]).all():
  sys.exit(f"gpu.sh: expected {shape['new_tokens']} new tokens per row, got {out.lengths}")
gen_s = common.median_seconds(gen, 3, warmup=0)
new = shape["batch"] * shape["new_tokens"]
emit({"benchmark": "gpu_generate", "batch": shape["batch"], "prompt_len": shape["prompt_len"],
      "new_tokens": shape["new_tokens"], "seconds": round(gen_s, 4),
      "new_tokens_per_s": round(new / gen_s, 1),
      "ms_per_decode_step": round(1e3 * gen_s / shape["new_tokens"], 3),
      "compile_plus_first_call_s": round(first_s, 2)})
emit({"benchmark": "gpu_memory", "what": "whole run (the step's state stays alive)",
      "peak_bytes_in_use": peak_bytes(),
      "params_bytes": int(sum(x.nbytes for x in jax.tree.leaves(params)))})
PY
