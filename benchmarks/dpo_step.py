"""Throughput and FLOPs of a jitted DPO train step, and what precomputed references and prefix
sharing save.

  python benchmarks/dpo_step.py --model small

Variants (8 pairs each): (1) prompt 128 + response 128 with the frozen reference scored in the
step; (2) the same with precomputed reference log-probs; (3)/(4) prompt 384 + response 128,
unshared vs prefix-shared. Prints one JSON line with tokens/s, XLA-counted and analytic FLOPs
(policy 6·N per token + reference 2·N per token, matmul params N, plus attention) and the
fraction of the float32 matmul peak, taken before and after every timed step
(common.time_against_peak: each step against the mean of the peaks around it, the median
reported).
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
from rlhf_jax import data, models, parallel
from rlhf_jax.train import preference as pref
from rlhf_jax.train import scoring
from rlhf_jax.train import step as step_lib


def run_variant(module, params, *, pairs: int, prompt: int, response: int, reference: str,
                shared: bool, steps: int, peak):
  cfg = module.cfg
  rng = np.random.RandomState(0)
  examples = [data.TokenizedPair(rng.randint(2, cfg.vocab_size, prompt).astype(np.int32),
                                 rng.randint(2, cfg.vocab_size, response).astype(np.int32),
                                 rng.randint(2, cfg.vocab_size, response).astype(np.int32))
              for _ in range(pairs)]
  tok = data.TokenizeConfig(eos_id=1, pad_id=0, max_prompt_len=prompt,
                            max_response_len=response)
  batch = scoring.collate_pairs(examples, tok, shared)
  dpo = pref.default_config()
  dpo.reference, dpo.shared_prefix = reference, shared
  tx = optax.adamw(1e-6)
  params = jax.tree.map(jnp.copy, params)  # Each variant donates its own copy.
  state = {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32),
           "rng": jax.random.key_data(jax.random.key(0))}
  extra = ()
  if reference == "model":
    state["ref"], extra = jax.tree.map(jnp.copy, params), ("ref",)
  else:
    batch["ref_chosen"] = np.zeros((pairs,), np.float32)
    batch["ref_rejected"] = np.zeros((pairs,), np.float32)
  step = step_lib.make_train_step(pref.preference_loss_fn(module, dpo, prompt), tx,
                                  state_extra=extra)
  t0 = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  holder = {"state": state}

  def run():
    holder["state"], metrics = compiled(holder["state"], batch)
    return metrics["loss"]

  jax.block_until_ready(run())  # Warm-up.
  stats = common.compiled_stats(compiled)
  timed = common.time_against_peak([run] * steps, stats["xla_flops"], peak)
  step_s = statistics.median(timed["seconds"])
  # Analytic: tokens the model actually processes (a shared row holds the prompt once).
  tokens = pairs * (prompt + 2 * response) if shared else 2 * pairs * (prompt + response)
  n = cfg.num_params() - cfg.vocab_size * cfg.d_model * (0 if cfg.tie_embeddings else 1)
  per_token = 6 * n + (2 * n if reference == "model" else 0)
  width = prompt + 2 * response if shared else prompt + response
  attn = 4 * cfg.n_layers * width * cfg.n_heads * cfg.head_size * tokens * (
      3 + (1 if reference == "model" else 0))
  return {"pairs": pairs, "prompt": prompt, "response": response, "reference": reference,
          "shared_prefix": shared, "tokens_per_s": round(tokens / step_s, 1),
          "step_s": round(step_s, 4), "compile_s": round(compile_s, 2),
          "flops_xla": stats["xla_flops"], "flops_analytic": per_token * tokens + attn,
          "flops_xla_per_pair": stats["xla_flops"] / pairs,
          "achieved_gflops": round(stats["xla_flops"] / step_s / 1e9, 1),
          "temp_bytes": stats.get("temp_size_in_bytes"), **common.peak_fields(timed)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="tiny", choices=sorted(models.SIZES))
  parser.add_argument("--steps", type=int, default=3)
  args = parser.parse_args()
  module = models.build_model(models.get_config(args.model))
  params = parallel.init_params(module, jax.random.key(0), jnp.ones((1, 8), jnp.int32))
  common_kw = dict(pairs=8, steps=args.steps, peak=common.matmul_peak_meter())
  variants = {
      "model_ref": run_variant(module, params, prompt=128, response=128, reference="model",
                               shared=False, **common_kw),
      "precomputed_ref": run_variant(module, params, prompt=128, response=128,
                                     reference="precomputed", shared=False, **common_kw),
      "long_prompt_unshared": run_variant(module, params, prompt=384, response=128,
                                          reference="model", shared=False, **common_kw),
      "long_prompt_shared": run_variant(module, params, prompt=384, response=128,
                                        reference="model", shared=True, **common_kw),
  }
  v = variants
  print(json.dumps({
      "benchmark": "dpo_step", "model": args.model, **v,
      "precomputed_flops_saving": round(1 - v["precomputed_ref"]["flops_xla"]
                                        / v["model_ref"]["flops_xla"], 3),
      "prefix_sharing_flops_saving_per_pair": round(
          1 - v["long_prompt_shared"]["flops_xla_per_pair"]
          / v["long_prompt_unshared"]["flops_xla_per_pair"], 3),
      **common.device_info()}))


if __name__ == "__main__":
  common.run_main(main)
