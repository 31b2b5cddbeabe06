"""Sample a policy on held-out prompts and measure it: gold reward, KL(π‖π_ref), diversity.

KL is the Monte-Carlo sequence estimate E_{y~π}[log π(y|x) − log π_ref(y|x)] over the
sampled responses (temperature 1, the sampling distribution itself), as in the DPO paper's
reward–KL frontier (Rafailov et al. 2023, Fig. 2).
"""
import functools
import math

import jax
import ml_collections
import numpy as np

from rlhf_jax import data, parallel, rng, sampling


def left_pad(prompts, width: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """[N, width] ids and mask, each prompt right-aligned (its last `width` tokens)."""
  ids = np.full((len(prompts), width), pad_id, np.int32)
  mask = np.zeros_like(ids)
  for i, p in enumerate(prompts):
    p = np.asarray(p)[-width:]
    ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
  return ids, mask


def response_mask(tokens: np.ndarray, eos_id: int) -> np.ndarray:
  """1 up to and including the first EOS (every column when there is none), as the sampler's
  Samples.response_mask: what a scorer of sampled responses attends to."""
  eos = (np.asarray(tokens) == eos_id).astype(np.int32)
  before = np.cumsum(eos, axis=-1) - eos  # EOS strictly before this column.
  return (before == 0).astype(np.int32)


def mean_and_stderr(x) -> tuple[float, float]:
  x = np.asarray(x, np.float64).ravel()
  if len(x) < 2:
    return float(x.mean()), 0.0
  return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x)))


def distinct_n(responses: list[np.ndarray], n: int) -> float:
  """Distinct n-grams / all n-grams over the responses (Li et al. 2016)."""
  grams = [tuple(r[i:i + n]) for r in responses for i in range(len(r) - n + 1)]
  return len(set(grams)) / max(len(grams), 1)


@functools.lru_cache(maxsize=None)
def _jitted_response_logprobs(module, temperature: float):
  """One jitted scorer per (module, temperature): repeated evaluations do not retrace."""
  return jax.jit(lambda p, i, m, s: sampling.response_logprobs(module, p, i, m, s,
                                                               temperature))


def sample_responses(module, params, prompt_ids, *, k: int, sampling_cfg: sampling.SamplingConfig,
                     prompt_len: int, pad_id: int, mesh, rules, key: jax.Array, batch_size: int,
                     ref_params=None):
  """k samples per prompt in fixed-shape batches over the mesh (batch b draws from
  fold_in(key, b)).

  Returns (tokens [N, k, max_new], finished [N, k], logprob sums [N, k], reference logprob sums
  [N, k] or None): sums over each response's tokens (EOS included).
  """
  rows = [p for p in prompt_ids for _ in range(k)]
  ref_fn = _jitted_response_logprobs(module, sampling_cfg.temperature)
  tokens, finished, logps, ref_logps = [], [], [], []
  with parallel.mesh_context(mesh, rules):
    for b, (ids, mask), n in parallel.padded_batches(left_pad(rows, prompt_len, pad_id), mesh,
                                                     batch_size):
      out = sampling.generate(module, params, ids, mask, jax.random.fold_in(key, b),
                              sampling_cfg)
      host = parallel.distributed.gather(out)
      tokens.append(host.tokens[:n])
      finished.append(host.finished[:n])
      logps.append(np.sum(host.logprobs * host.response_mask, axis=1)[:n])
      if ref_params is not None:
        ref_logps.append(parallel.distributed.gather(ref_fn(ref_params, ids, mask, out))
                         .sum(axis=1)[:n])
  shape = (len(prompt_ids), k)
  cat = lambda xs: np.concatenate(xs).reshape(*shape, *np.concatenate(xs).shape[1:])
  return (cat(tokens), cat(finished), cat(logps),
          cat(ref_logps) if ref_params is not None else None)


def evaluate_policy(module, params, prompts: list[str], *, world: data.ReviewWorld,
                    cfg: ml_collections.ConfigDict, tok: data.TokenizeConfig, mesh, rules,
                    key: jax.Array, ref_params=None, k: int = 1) -> dict[str, float]:
  """Gold reward (mean ± s.e. over every sample), KL to ref_params (if given), EOS fraction,
  response length and distinct-1/2 of k samples per prompt at temperature cfg.temperature."""
  sampling_cfg = sampling.sampling_config(cfg, tok.eos_id, tok.pad_id)
  prompt_ids = [world.encode(p) for p in prompts]
  tokens, finished, logp, ref_logp = sample_responses(
      module, params, prompt_ids, k=k, sampling_cfg=sampling_cfg,
      prompt_len=tok.max_prompt_len, pad_id=tok.pad_id, mesh=mesh, rules=rules, key=key,
      batch_size=cfg.batch_size, ref_params=ref_params)
  flat = list(tokens.reshape(-1, tokens.shape[-1]))
  gold = world.score_ids([p for p in prompt_ids for _ in range(k)], flat).reward
  responses = [t[:np.argmax(t == tok.eos_id)] if (t == tok.eos_id).any() else t for t in flat]
  out = {}
  out["gold_reward"], out["gold_reward_stderr"] = mean_and_stderr(gold)
  if ref_logp is not None:
    out["kl"], out["kl_stderr"] = mean_and_stderr(logp - ref_logp)
  out.update(samples=len(flat), eos_fraction=float(finished.mean()),
             response_length=float(np.mean([len(r) for r in responses])),
             distinct_1=distinct_n(responses, 1), distinct_2=distinct_n(responses, 2))
  return out


def make_policy_evaluator(config: ml_collections.ConfigDict, task, mesh, module, ref_params,
                          *, prompts: list[str]):
  """params -> gold reward and KL(π‖π_ref) of config.eval.k samples on each of `prompts`
  (held-out prompts of a task with a gold reward, `task.world`). The prompts and the sampling
  key are fixed, so every point of every curve is measured with the same random numbers
  (common random numbers make comparisons between runs less noisy than independent draws)."""
  key = rng.key(config.seed, "evaluation")

  def evaluate(params) -> dict[str, float]:
    out = evaluate_policy(module, params, prompts, world=task.world, cfg=config.sampling,
                          tok=task.tokenize_config, mesh=mesh, rules=config.sharding, key=key,
                          ref_params=ref_params, k=config.eval.k)
    return {k: out[k] for k in ("gold_reward", "gold_reward_stderr", "kl", "kl_stderr",
                                "eos_fraction", "response_length") if k in out}
  return evaluate
