"""One GRPO iteration end to end: rlhf_jax's GRPO trainer vs TRL's `GRPOTrainer`, same weights.

  python benchmarks/rl_iteration.py                     # small, 16 prompts x 8, up to 256 tokens
  python benchmarks/rl_iteration.py --slots 32          # ours with continuous batching as well
  python benchmarks/rl_iteration.py --slots 16 --variants slots,slots_packed   # a subset
  python benchmarks/rl_iteration.py --quick --no-trl    # tiny shapes, our side only (a smoke run)

A BENCHMARK, NOT A TEST: it asserts nothing about speed (issue 17's target is >= 3x TRL).
Needs TRL (benchmarks/requirements.txt, benchmark-only) unless --no-trl.

Workload (one iteration = what one optimizer step of GRPO costs, rollout included):
16 prompts of 32 tokens, 8 samples each (128 rollouts), temperature 1, no top-k/top-p, at least
8 and at most 256 new tokens; a programmatic reward (`reward_of`: the fraction of the response's
tokens whose id is a multiple of 4, the same Python function on both sides); group-normalised
advantages; one clipped-surrogate optimizer step over the 128 rollouts (micro-batches of
--micro-batch rows, gradients accumulated). The policy is our Llama-style `small` (or `tiny`)
exported with `models.save_hf` and read back by transformers for TRL; the prompt logits of
both are compared before anything is timed.

Long-tailed lengths from identical weights: a random-init model almost never samples EOS and
gives every row the maximum length, which hides what a sampler does with ragged batches. So
`long_tail_policy` rewires a few reserved residual dimensions so that the EOS hazard is known
and falls with the response length (measured with our sampler on tiny and small: median ~37,
p90 ~155, ~4% of the rows reaching 256); see its docstring.

  ours   config.ppo of train/rl.py with algorithm="grpo", driven through `ppo.make_trainer` and
         `PPOTrainer.host_iteration` (the library's own GRPO iteration: sampling.generate,
         full-forward old log-probs, reference log-probs, advantages, the jitted update); the
         reward is the host-side "gold" callable. `--slots N` sets SamplingConfig.slots
         (continuous batching) when this rlhf_jax has that field, and falls back to the fixed
         batch otherwise; the fixed-batch sampler is measured too ("ours_fixed_batch"), and,
         when config.ppo.packing exists, continuous batching with the scoring passes and the
         update on packed rollouts ("ours_slots_packed", the headline; data.pack_rollouts:
         no padding columns, the LM head only at response tokens), with
         ("slots_packed_kl") and without ("slots_packed") the reference pass. --variants
         times a subset.
  TRL    trl.GRPOTrainer (transformers generate, no vLLM), float32 on the CPU, per_device_
         train_batch_size = --micro-batch, gradient_accumulation_steps = 128 / micro-batch, so
         one generation batch of 128 is one optimizer step; min_new_tokens through
         generation_kwargs. One `trainer.train()` runs 1 + --rounds steps; a TrainerCallback
         times each step from on_step_begin to on_step_end (generation, rewards, advantages,
         forward/backward, clip, AdamW) and runs our timed iterations between TRL's steps, so
         the two sides alternate: TRL warm-up, ours, TRL, ours, TRL, ...

GRPO settings matched to TRL 1.16's defaults: beta = 0 (no KL term; ours kl_coef = 0; TRL then
loads no reference model, and ours runs no reference pass either, config.ppo.monitor_kl=False,
except in the variant "slots_packed_kl", which keeps it for the logged KL, the library's
default); one update per iteration, so both sides take the update's own log-probs as the old
ones (no separate pass: ppo.log_prob_passes); loss_type "dapo" = our loss_aggregation
"token_mean", scale_rewards "group" = grpo_std_normalize (sample std, ddof 1; eps 1e-4 theirs,
1e-6 ours), epsilon 0.2, num_iterations 1 = epochs 1, no truncation masking, no missing-EOS
penalty; AdamW lr 1e-6, betas (0.9, 0.999), eps 1e-8, weight decay 0, gradient clipping at norm
1, constant lr. With accumulation, TRL divides by the tokens of the whole generation batch and
ours averages the micro-batches' token means (the same cost; with --micro-batch 128 the same
loss).

Reported per side: median wall seconds per iteration, generated tokens (sum of response
lengths, EOS included), new tokens/s (generated tokens / iteration seconds), the padding
fraction of the response columns of the update batch (ours: fixed max_new_tokens columns;
TRL: padded to the longest completion; ours packed also reports the real-token fraction of the
packed rows it actually ran, packed_real_token_fraction) and the length distribution; speedup =
TRL's median seconds / ours. Compile and first-call times are reported apart. Prints one JSON
line.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time

import jax
import ml_collections
import numpy as np

import common
from rlhf_jax import configs, data, models, parallel, sampling
from rlhf_jax.train import ppo, rl
from rlhf_jax.train import task as task_lib

TARGET_SPEEDUP = 3.0
EOS, PAD = 1, 0  # ModelConfig's ids, exported with the model and used by the tokenizer.
# Prompts are drawn from the first 1/PROMPT_SUBSET of the vocabulary (see long_tail_policy).
PROMPT_SUBSET = 16
# One optimiser setting on both sides (TRL's GRPOConfig defaults, clipping and decay spelled out).
LR, B1, B2, ADAM_EPS, WD, CLIP_NORM, CLIP_EPS = 1e-6, 0.9, 0.999, 1e-8, 0.0, 1.0, 0.2


# ---------------------------------------------------------------------------------------------
# The shared workload: weights, prompts, reward
# ---------------------------------------------------------------------------------------------

def reward_of(ids) -> float:
  """The programmatic reward of one response (token ids, EOS included): the fraction of its
  non-special tokens whose id is a multiple of 4. Both sides call this same function."""
  toks = [int(t) for t in ids if t not in (EOS, PAD)]
  return sum(t % 4 == 0 for t in toks) / max(len(toks), 1)


def make_prompts(cfg, n: int, length: int, seed: int = 0) -> np.ndarray:
  """[n, length] prompt ids from the reserved prompt subset (no special ids)."""
  rng = np.random.RandomState(seed)
  return rng.randint(2, cfg.vocab_size // PROMPT_SUBSET, size=(n, length)).astype(np.int32)


def long_tail_policy(module, params, prompts: np.ndarray, max_new_tokens: int, *,
                     hazard: tuple[float, float] = (0.035, 0.009), min_new_tokens: int = 8,
                     key=None):
  """Host (numpy) params of a Llama-style policy whose EOS probability is set by construction.

  Why: random-init weights put ~1/vocab on EOS, so every rollout runs to max_new_tokens and a
  benchmark never sees the ragged batches real RL produces. Sampling the lengths outside the
  model would not be the same work on both sides; changing the weights is, since both samplers
  draw EOS from the same logits. Three residual dimensions k, k2, k3 (the last three) are
  reserved; no block writes them (o-proj and MLP-down output columns zeroed), and k, k3 are
  read by no block (their attn/mlp norm scales zeroed):
    k   every token embeds the constant 1 there, so after the final norm h_k = g/rms(x): a
        near-constant feature (a bias for the EOS logit);
    k2  prompt-subset tokens (ids below vocab/PROMPT_SUBSET, which prompts are drawn from)
        embed 1 there, other tokens 0;
    k3  block 0's first key/value head has zero key weights, so the query heads that read it
        attend uniformly to every visible position; its value reads k2, and of those heads'
        outputs only that value reaches the residual, in k3: x_k3 is proportional to the
        running fraction of prompt-subset tokens (up to the attn norm's rms), which starts
        near 1 and falls as the (near-uniform) response grows, towards 1/PROMPT_SUBSET.
  The LM head's EOS column reads only k and k3 (and no other token reads them), so
  logit_EOS = w·h_k + w3·h_k3. (w, w3) are fit by least squares, on sequences sampled from
  the model itself, so that logit_EOS - logsumexp(other logits) follows logit(hazard) with
  hazard falling from hazard[0] (right after min_new_tokens) to hazard[1] (at the last
  column) through the running fraction: a decreasing hazard gives a heavier tail than a
  geometric, so with 128 rollouts the lengths span min_new_tokens to max_new_tokens. Every
  other weight is the random init. Returns (params, calibration stats).
  """
  cfg = module.cfg
  if cfg.arch != "llama" or cfg.tie_embeddings:
    raise ValueError("long_tail_policy rewires an untied Llama-style model")
  p = jax.tree.map(np.array, params)  # Writable host copies.
  bb, head = p["backbone"], p["lm_head"]["kernel"]  # lm_head kernel: [d_model, vocab].
  d, hd = cfg.d_model, cfg.head_size
  k, k2, k3 = d - 1, d - 2, d - 3
  for i in range(cfg.n_layers):
    blk = bb[f"block_{i}"]
    for dim in (k, k3):
      blk["attn_norm"]["scale"][dim] = 0.0
      blk["mlp_norm"]["scale"][dim] = 0.0
    for dim in (k, k2, k3):
      blk["attn"]["o"]["kernel"][:, dim] = 0.0
      blk["mlp"]["down"]["kernel"][:, dim] = 0.0
  # Block 0, kv head 0 (and every query head sharing it): uniform attention, value = x_k2.
  attn, group = bb["block_0"]["attn"], cfg.n_heads // cfg.kv_heads
  attn["k"]["kernel"][:, :hd] = 0.0
  attn["v"]["kernel"][:, :hd] = 0.0
  attn["v"]["kernel"][k2, 0] = 1.0
  attn["o"]["kernel"][:group * hd, :] = 0.0
  attn["o"]["kernel"][0, k3] = 0.1  # Keeps x_k3 of the order of x_k in the final rms.
  emb = bb["embed"]["embedding"]
  emb[:, k], emb[:, k2], emb[:, k3] = 1.0, 0.0, 0.0
  emb[2:cfg.vocab_size // PROMPT_SUBSET, k2] = 1.0
  head[[k, k2, k3], :] = 0.0
  head[:, EOS] = 0.0

  # CALIBRATION: responses sampled without EOS, then logit_EOS per unit weight on k and k3.
  n = max_new_tokens
  key = jax.random.key(1) if key is None else key
  sample_cfg = sampling.SamplingConfig(max_new_tokens=n, eos_id=None, pad_id=PAD)
  out = sampling.generate(module, p, prompts, np.ones_like(prompts), key, sample_cfg)
  ids = np.concatenate([prompts, np.asarray(out.tokens)], 1)
  plen = prompts.shape[1]
  forward = jax.jit(lambda prm: module.apply({"params": prm}, ids, np.ones_like(ids)))
  feats = []
  for dim in (k, k3):
    head[:, EOS] = 0.0
    head[dim, EOS] = 1.0
    logits = np.asarray(forward(p))[:, plen - 1:plen - 1 + n]  # Predict response columns.
    feats.append(logits[..., EOS])
  others = np.delete(logits, EOS, axis=-1)
  top = others.max(-1)
  log_z = top + np.log(np.exp(others - top[..., None]).sum(-1))
  col = np.arange(n)
  frac = lambda c: (plen + c / PROMPT_SUBSET) / (plen + c)
  logit = lambda h: math.log(h / (1 - h))
  first, last = min(min_new_tokens, n - 1), n - 1
  beta = (logit(hazard[0]) - logit(hazard[1])) / max(frac(first) - frac(last), 1e-6)
  target = logit(hazard[0]) + beta * (frac(col) - frac(first))
  cols = col >= first  # EOS is suppressed before min_new_tokens: fit the rest.
  a = np.stack([feats[0][:, cols].ravel(), feats[1][:, cols].ravel()], 1)
  (w, w3), *_ = np.linalg.lstsq(a, (target[None, cols] + log_z[:, cols]).ravel(), rcond=None)
  head[:, EOS] = 0.0
  head[k, EOS], head[k3, EOS] = w, w3
  fitted = w * feats[0] + w3 * feats[1] - log_z
  resid = (fitted - target[None])[:, cols]
  return p, {"eos_weights": [round(float(w), 4), round(float(w3), 4)],
             "hazard_schedule": list(hazard),
             "fit_rms_logit_error": round(float(np.sqrt(np.mean(resid ** 2))), 4)}


def length_stats(lengths) -> dict:
  x = np.asarray(lengths)
  return {"median": float(np.median(x)), "p10": float(np.percentile(x, 10)),
          "p90": float(np.percentile(x, 90)), "min": int(x.min()), "max": int(x.max()),
          "mean": round(float(x.mean()), 1)}


# ---------------------------------------------------------------------------------------------
# Ours: the library's GRPO trainer
# ---------------------------------------------------------------------------------------------

def grpo_config(args) -> ml_collections.ConfigDict:
  """config with config.ppo from train/rl.py's defaults, set to TRL's GRPO defaults.

  reward_source="gold" makes host_iteration take its reward from the host callable it is
  given (`reward_of` here); rl.validate is not run, as it allows that only on the review world.
  """
  config = configs.base_config(size=args.model)
  config.ppo = rl.default_config()
  config.ppo.update(dict(
      algorithm="grpo", iterations=1, prompts_per_iter=args.prompts, group_size=args.group,
      minibatch_size=args.prompts * args.group, epochs=1, max_new_tokens=args.max_new_tokens,
      temperature=1.0, clip_eps=CLIP_EPS, kl_coef=0.0, kl_in_reward=False,
      kl_controller="fixed", loss_aggregation="token_mean", grpo_std_normalize=True,
      mask_truncated=False, missing_eos_penalty=0.0, reward_source="gold", fused=False))
  config.ppo.min_new_tokens = args.min_new_tokens  # Read by sampling.sampling_config.
  config.ppo.optim.update(dict(lr=LR, b1=B1, b2=B2, eps=ADAM_EPS, weight_decay=WD,
                               grad_clip=CLIP_NORM, schedule="constant", warmup_steps=0,
                               accum_steps=args.prompts * args.group // args.micro_batch))
  return config


def our_side(args, module, params, prompts):
  """(runs, info): runs maps a variant name to a zero-argument timed iteration returning
  (generated lengths, update-batch response columns)."""
  config = grpo_config(args)
  mesh = parallel.make_mesh({"data": 1})
  tok = data.TokenizeConfig(eos_id=EOS, pad_id=PAD, max_prompt_len=args.prompt_len,
                            max_response_len=args.max_new_tokens)
  task = task_lib.Task(tokenizer=None, tokenize_config=tok, vocab_size=module.cfg.vocab_size)
  placed = parallel.place_params(params, parallel.param_shardings(
      module, mesh, config.sharding, prompts[:1], np.ones_like(prompts[:1])))
  trainers = {}

  def trainer_for(monitor_kl):
    """A trainer (and its state) per config.ppo.monitor_kl: log_prob_passes is fixed at
    construction."""
    if monitor_kl not in trainers:
      cfg = ml_collections.ConfigDict(config.to_dict())
      if "monitor_kl" in cfg.ppo:
        cfg.ppo.monitor_kl = monitor_kl
      trainer, trainable = ppo.make_trainer(cfg, task, mesh, policy=(module, placed))
      trainers[monitor_kl] = (trainer, {"state": trainer.init_state(trainable,
                                                                    jax.random.key(0))})
    return trainers[monitor_kl]

  trainer, _ = trainer_for(False)
  rows = np.repeat(prompts, args.group, axis=0)  # Group-major, as ppo.prompt_iterator.
  ids, mask = parallel.distributed.shard_global((rows, np.ones_like(rows)), mesh)

  def gold(samples):
    tokens, lengths = np.asarray(samples.tokens), np.asarray(samples.lengths)
    return np.array([reward_of(t[:n]) for t, n in zip(tokens, lengths)], np.float32)

  has_slots = "slots" in {f.name for f in dataclasses.fields(sampling.SamplingConfig)}
  fixed = (dataclasses.replace(trainer.sampling_cfg, slots=None) if has_slots
           else trainer.sampling_cfg)
  has_packing = "packing" in config.ppo
  variants = {"fixed_batch": (fixed, False, False)}
  if args.slots and has_slots:
    variants["slots"] = (dataclasses.replace(fixed, slots=args.slots), False, False)
    if has_packing:
      variants["slots_packed"] = (variants["slots"][0], True, False)
      variants["slots_packed_kl"] = (variants["slots"][0], True, True)

  def make_run(variant):
    scfg, packed, monitor_kl = variant
    trainer, holder = trainer_for(monitor_kl)
    def run():
      trainer.sampling_cfg = scfg  # A static argument of generate: one program per variant.
      if has_packing:  # Read by host_iteration at each call.
        trainer.cfg.packing.enabled = packed
      with parallel.mesh_context(mesh, config.sharding):
        holder["state"], out = trainer.host_iteration(holder["state"], ids, mask, gold)
      jax.block_until_ready(holder["state"])
      fill = None
      if packed:  # Real tokens per token slot of the update's packed rows (a few ms of numpy).
        rows = jax.device_get({k: out["batch"][k] for k in (
            "prompt_ids", "prompt_mask", "tokens", "response_mask")})
        mb = trainer.pack(rows, config.ppo.optim.accum_steps, last_columns=False)
        fill = float(np.sum(mb["mask"]) / np.size(mb["mask"]))
      return (np.asarray(out["samples"].lengths), int(out["batch"]["tokens"].shape[1]), fill)
    return run

  info = {"slots_requested": args.slots, "slots_supported": has_slots,
          "packing_supported": has_packing,
          "config_ppo": {k: config.ppo[k] for k in (
              "algorithm", "group_size", "prompts_per_iter", "minibatch_size", "epochs",
              "kl_coef", "loss_aggregation", "grpo_std_normalize", "clip_eps",
              "missing_eos_penalty", "mask_truncated")},
          "accum_steps": config.ppo.optim.accum_steps}
  wanted = args.variants.split(",") if args.variants else list(variants)
  unknown = sorted(set(wanted) - set(variants))
  if unknown:
    raise SystemExit(f"--variants: {unknown} not available (have {sorted(variants)}; "
                     "the slots variants need --slots)")
  runs = {name: make_run(variants[name]) for name in wanted}
  # Which scoring forward passes each variant ran (ppo.log_prob_passes, where this rlhf_jax
  # has it): old log-probs (else the update's own) and reference log-probs (else no KL).
  passes = lambda trainer: {"old_logp": getattr(trainer, "old_pass", True),
                            "ref_logp": getattr(trainer, "ref_pass", True)}
  info["scoring_passes"] = {name: passes(trainer_for(variants[name][2])[0]) for name in wanted}
  return runs, info


# ---------------------------------------------------------------------------------------------
# TRL: GRPOTrainer on the exported weights
# ---------------------------------------------------------------------------------------------

def word_tokenizer(vocab_size: int):
  """A word-level PreTrainedTokenizerFast: token i is the word "t<i>" (0 = <pad>, 1 = </s>), so
  a prompt of ids is the text of their words and TRL tokenizes it back to the same ids."""
  import tokenizers
  import transformers
  vocab = {f"t{i}": i for i in range(vocab_size)}
  vocab.update({"<pad>": PAD, "</s>": EOS})
  del vocab[f"t{PAD}"], vocab[f"t{EOS}"]
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<pad>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>",
                                              pad_token="<pad>", unk_token="<pad>")


def trl_trainer(args, model, tokenizer, prompts, workdir, callback, lengths_log):
  """A GRPOTrainer doing the same work as one of our iterations per optimizer step."""
  import datasets
  import trl

  def length_tail_reward(prompts, completions, completion_ids, **kwargs):
    del prompts, completions, kwargs
    lengths_log.append([len(c) for c in completion_ids])
    return [reward_of(c) for c in completion_ids]

  texts = [" ".join(f"t{i}" for i in row) for row in prompts]
  rows = args.prompts * args.group
  grpo = trl.GRPOConfig(
      output_dir=workdir, use_cpu=True, bf16=False, fp16=False, report_to="none",
      save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
      dataloader_num_workers=0,
      max_steps=1 + args.rounds, shuffle_dataset=False,
      per_device_train_batch_size=args.micro_batch,
      gradient_accumulation_steps=rows // args.micro_batch,
      num_generations=args.group, max_completion_length=args.max_new_tokens,
      temperature=1.0, top_k=0, top_p=1.0,
      generation_kwargs={"min_new_tokens": args.min_new_tokens},
      use_vllm=False, beta=0.0, loss_type="dapo", scale_rewards="group", epsilon=CLIP_EPS,
      num_iterations=1, mask_truncated_completions=False, learning_rate=LR,
      adam_beta1=B1, adam_beta2=B2, adam_epsilon=ADAM_EPS, weight_decay=WD,
      max_grad_norm=CLIP_NORM, lr_scheduler_type="constant", warmup_steps=0,
      use_transformers_continuous_batching=args.trl_continuous_batching)
  trainer = trl.GRPOTrainer(model=model, reward_funcs=length_tail_reward, args=grpo,
                            train_dataset=datasets.Dataset.from_dict({"prompt": texts}),
                            processing_class=tokenizer, callbacks=[callback])
  settings = {k: getattr(grpo, k) for k in (
      "per_device_train_batch_size", "gradient_accumulation_steps", "generation_batch_size",
      "steps_per_generation", "num_generations", "max_completion_length", "beta", "loss_type",
      "scale_rewards", "epsilon", "num_iterations", "learning_rate", "max_grad_norm",
      "use_transformers_continuous_batching")}
  settings["generation_kwargs"] = {"min_new_tokens": args.min_new_tokens}
  return trainer, settings


def step_timer(between):
  """A TrainerCallback timing each optimizer step; `between(step)` runs after each step."""
  import transformers

  class StepTimer(transformers.TrainerCallback):
    def __init__(self):
      self.seconds, self._start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
      self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
      self.seconds.append(time.perf_counter() - self._start)
      between(len(self.seconds))

  return StepTimer()


def hf_parity(module, params, ids):
  """(transformers model of `params`, max |logit difference| on `ids`)."""
  import torch
  import transformers
  with tempfile.TemporaryDirectory() as tmp:
    models.save_hf(module, params, tmp)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
  with torch.inference_mode():
    theirs = model.eval()(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
  mine = np.asarray(module.apply({"params": params}, ids, np.ones_like(ids)))
  return model.train(), float(np.max(np.abs(theirs - mine)))


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------

def summary(seconds, lengths, columns, max_new_tokens, first_call_s=None, fills=None) -> dict:
  """Per-side figures from per-round seconds, generated lengths and update-batch columns
  (and, for packed updates, the real-token fraction of their packed rows)."""
  tokens = [int(np.sum(x)) for x in lengths]
  rows = len(lengths[0])
  pad = [1.0 - t / (rows * c) for t, c in zip(tokens, columns)]
  out = {"seconds": round(statistics.median(seconds), 3),
         "rounds_s": [round(s, 3) for s in seconds],
         "generated_tokens": round(statistics.mean(tokens), 1),
         "new_tokens_per_s": round(statistics.median(t / s for t, s in zip(tokens, seconds)), 1),
         "update_response_columns": columns,
         "padding_fraction": round(statistics.mean(pad), 3),
         "lengths": length_stats(np.concatenate(lengths)),
         "rows_at_max_new_tokens": int(sum(np.sum(np.asarray(x) >= max_new_tokens)
                                           for x in lengths))}
  if first_call_s is not None:
    out["first_call_s"] = round(first_call_s, 2)
  if fills and fills[0] is not None:
    out["packed_real_token_fraction"] = round(statistics.mean(fills), 3)
  return out


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="tiny model, 4 prompts x 8, prompt 8, 32 new tokens, 1 round")
  parser.add_argument("--model", choices=["tiny", "small"], default=None)
  parser.add_argument("--n-layers", type=int, default=0, help="override (smoke runs)")
  parser.add_argument("--prompts", type=int, default=None)
  parser.add_argument("--group", type=int, default=8, help="samples per prompt")
  parser.add_argument("--prompt-len", type=int, default=None)
  parser.add_argument("--max-new-tokens", type=int, default=None)
  parser.add_argument("--min-new-tokens", type=int, default=8)
  parser.add_argument("--hazard", default=None,
                      help="EOS hazard right after min-new-tokens, and at the last column "
                           "(default 0.035,0.009; 0.12,0.04 with --quick)")
  parser.add_argument("--micro-batch", type=int, default=None,
                      help="rows per forward/backward in the update (both sides); default 16, "
                           "all rows with --quick")
  parser.add_argument("--rounds", type=int, default=None, help="timed iterations per side")
  parser.add_argument("--slots", type=int, default=0,
                      help="SamplingConfig.slots for ours (continuous batching), if supported")
  parser.add_argument("--no-trl", action="store_true", help="our side only")
  parser.add_argument("--variants", default="",
                      help="comma-separated subset of our variants to time (fixed_batch, "
                           "slots, slots_packed, slots_packed_kl); default all that --slots "
                           "allows")
  parser.add_argument("--trl-continuous-batching", action="store_true",
                      help="TRL's use_transformers_continuous_batching (off by default, as TRL)")
  parser.add_argument("--torch-threads", type=int, default=2)
  args = parser.parse_args()
  quick = dict(model="tiny", prompts=4, prompt_len=8, max_new_tokens=32, rounds=1,
               hazard="0.12,0.04")
  full = dict(model="small", prompts=16, prompt_len=32, max_new_tokens=256, rounds=3,
              hazard="0.035,0.009")
  for name, value in (quick if args.quick else full).items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  rows = args.prompts * args.group
  if args.micro_batch is None:
    args.micro_batch = rows if args.quick else min(16, rows)
  if rows % args.micro_batch:
    parser.error(f"--micro-batch {args.micro_batch} must divide {rows} rollouts")
  args.hazard = tuple(float(x) for x in args.hazard.split(","))
  return args


def main():
  args = parse_args()
  load_start = round(os.getloadavg()[0], 2)
  cfg = models.get_config(args.model, **({"n_layers": args.n_layers} if args.n_layers else {}))
  module = models.build_model(cfg)
  prompts = make_prompts(cfg, args.prompts, args.prompt_len)
  params = parallel.init_params(module, jax.random.key(0), prompts[:1], np.ones_like(prompts[:1]))
  params, calibration = long_tail_policy(module, params, prompts, args.max_new_tokens,
                                         hazard=args.hazard, min_new_tokens=args.min_new_tokens)
  result = {"benchmark": "rl_iteration", "timing": "wall-clock; benchmark, not a test",
            "model": args.model, "params": cfg.num_params(), "n_layers": cfg.n_layers,
            "prompts": args.prompts, "group": args.group, "rollouts": args.prompts * args.group,
            "prompt_len": args.prompt_len, "max_new_tokens": args.max_new_tokens,
            "min_new_tokens": args.min_new_tokens, "micro_batch": args.micro_batch,
            "rounds": args.rounds, "long_tail": calibration}

  # Same weights: transformers' logits of our params (whenever transformers is installed).
  model = None
  try:
    import torch
    torch.set_num_threads(args.torch_threads)
    tail = np.random.RandomState(1).randint(2, cfg.vocab_size, (args.prompts, 16), np.int32)
    check_ids = np.concatenate([prompts, tail], 1)
    model, diff = hf_parity(module, params, check_ids)
    result["hf_logits_max_abs_diff"] = diff
    result["torch_threads"] = torch.get_num_threads()
    if diff > 1e-3:
      raise RuntimeError(f"transformers' logits differ from ours by {diff}: not the same model")
  except ImportError:
    if not args.no_trl:
      raise

  # OURS: compile + first call of each variant, then the timed rounds.
  runs, info = our_side(args, module, params, prompts)
  result.update(info)
  first = {}
  for name, run in runs.items():
    start = time.perf_counter()
    run()
    first[name] = time.perf_counter() - start
  timed = {name: ([], [], [], []) for name in runs}

  def ours_round(step=None):
    if step is not None and step > args.rounds:
      return
    for name, run in runs.items():
      start = time.perf_counter()
      lengths, columns, fill = run()
      for acc, x in zip(timed[name], (time.perf_counter() - start, lengths, columns, fill)):
        acc.append(x)

  if args.no_trl:
    for _ in range(args.rounds):
      ours_round()
  else:
    import torch
    tokenizer = word_tokenizer(cfg.vocab_size)
    tokenized = tokenizer([" ".join(f"t{i}" for i in row) for row in prompts])["input_ids"]
    if not np.array_equal(np.asarray(tokenized), prompts):
      raise RuntimeError("TRL's tokenizer does not give back our prompt ids")
    trl_lengths = []
    timer = step_timer(ours_round)  # Ours runs after each TRL step: the sides alternate.
    with tempfile.TemporaryDirectory() as workdir:
      trainer, settings = trl_trainer(args, model, tokenizer, prompts, workdir, timer,
                                      trl_lengths)
      with contextlib.redirect_stdout(sys.stderr):  # Its log lines: stdout is one JSON line.
        trainer.train()
    import trl
    trl_columns = [max(x) for x in trl_lengths[1:]]
    result["trl"] = summary(timer.seconds[1:], trl_lengths[1:], trl_columns,
                            args.max_new_tokens, first_call_s=timer.seconds[0])
    result["trl"].update({"version": trl.__version__, "config": settings,
                          "torch_version": torch.__version__})

  for name in runs:
    seconds, lengths, columns, fills = timed[name]
    result[f"ours_{name}"] = summary(seconds, lengths, columns, args.max_new_tokens,
                                     first_call_s=first[name], fills=fills)
  headline = next(f"ours_{name}" for name in ("slots_packed", "slots", "fixed_batch")
                  if f"ours_{name}" in result)
  result["ours"] = headline
  if "trl" in result:
    for name in runs:
      result[f"speedup_{name}_vs_trl"] = round(
          result["trl"]["seconds"] / result[f"ours_{name}"]["seconds"], 2)
    result["speedup_vs_trl"] = result[f"speedup_{headline[5:]}_vs_trl"]
    # The two sides draw different samples, so their lengths differ a little: the same ratio
    # in new tokens per second corrects for that.
    result["speedup_new_tokens_per_s_vs_trl"] = round(
        result[headline]["new_tokens_per_s"] / result["trl"]["new_tokens_per_s"], 2)
    result["target_speedup"] = TARGET_SPEEDUP
    result["target_met"] = result["speedup_vs_trl"] >= TARGET_SPEEDUP
  result["load_avg_1m_start_end"] = [load_start, round(os.getloadavg()[0], 2)]
  print(json.dumps({**result, **common.device_info()}))


if __name__ == "__main__":
  common.run_main(main)
