"""The quickstart pipeline on the embedded review world:
SFT -> k samples per prompt -> gold-labelled pairs -> reward model; DPO on the same pairs; PPO
against the reward model; gold reward and KL(π‖π_SFT) of every policy on held-out prompts.

Each stage writes to its own sub-directory of the workdir and resumes from its checkpoints;
sampling is a deterministic function of the params and the seed, so a rerun redraws exactly
the same pairs.
"""
import json
import os
import time

import jax
import ml_collections

from rlhf_jax import eval as eval_lib
from rlhf_jax.train import ppo as ppo_lib
from rlhf_jax.train import preference as preference_lib
from rlhf_jax.train import reward as reward_lib
from rlhf_jax.train import sft as sft_lib
from rlhf_jax.train.labels import label_policy_samples


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  timings = {}
  start = time.perf_counter()
  module, sft_params, task, mesh, sft_eval = sft_lib.run_sft(config, os.path.join(workdir,
                                                                                  "sft"))
  timings["sft"] = time.perf_counter() - start
  if task.world is None:
    raise ValueError("the quickstart needs config.task.kind='review_world' (a gold reward)")

  # SAMPLE k RESPONSES PER PROMPT FROM THE SFT POLICY; LABEL ALL PAIRS WITH THE GOLD REWARD.
  start = time.perf_counter()
  train_pairs = label_policy_samples(module, sft_params, task, config, mesh,
                                     n_prompts=config.sampling.train_prompts, seed=10)
  eval_pairs = label_policy_samples(module, sft_params, task, config, mesh,
                                    n_prompts=config.sampling.eval_prompts, seed=11)
  timings["sample_and_label"] = time.perf_counter() - start

  # REWARD MODEL FROM THE SFT BACKBONE, EVALUATED AGAINST GOLD LABELS ON FRESH PROMPTS.
  start = time.perf_counter()
  rm_module, rm_params, rm = reward_lib.run_reward(
      config, os.path.join(workdir, "reward"), task=task, backbone=sft_params,
      train_pairs=train_pairs, eval_pairs=eval_pairs)
  timings["reward"] = time.perf_counter() - start

  # DPO FROM THE SFT POLICY ON THE SAME GOLD-LABELLED PAIRS.
  start = time.perf_counter()
  _, dpo_params, dpo = preference_lib.run_preference(
      config, os.path.join(workdir, "dpo"), task=task, policy=(module, sft_params),
      train_pairs=train_pairs, eval_pairs=eval_pairs)
  timings["dpo"] = time.perf_counter() - start

  # PPO FROM THE SFT POLICY AGAINST THE LEARNED REWARD MODEL.
  start = time.perf_counter()
  _, ppo_params, _ = ppo_lib.run_ppo(config, os.path.join(workdir, "ppo"), task=task,
                                     policy=(module, sft_params), rm=(rm_module, rm_params))
  timings["ppo"] = time.perf_counter() - start

  # HELD-OUT PROMPTS: GOLD REWARD OF EACH POLICY, MONTE-CARLO KL TO THE SFT POLICY.
  start = time.perf_counter()
  prompts = task.world.sample_prompts(config.eval.prompts, seed=12)
  measure = lambda params, ref: eval_lib.evaluate_policy(
      module, params, prompts, world=task.world, cfg=config.sampling,
      tok=task.tokenize_config, mesh=mesh, rules=config.sharding,
      key=jax.random.key(config.seed + 4), ref_params=ref, k=config.eval.k)
  sft_policy = measure(sft_params, None)
  dpo_policy, ppo_policy = measure(dpo_params, sft_params), measure(ppo_params, sft_params)
  timings["evaluate"] = time.perf_counter() - start

  results = {"sft": {**sft_policy, "eval_perplexity": sft_eval["eval_perplexity"]},
             "dpo": {**dpo_policy, **dpo}, "ppo": ppo_policy, "reward_model": rm,
             "wall_time_s": {k: round(v, 1) for k, v in timings.items()}}
  n = sft_policy["samples"]
  table = "\n".join([
      "| stage | metric | value |", "|---|---|---|",
      f"| SFT | gold reward, {n} held-out samples (mean ± s.e.) | "
      f"{sft_policy['gold_reward']:.4f} ± {sft_policy['gold_reward_stderr']:.4f} |",
      f"| SFT | held-out perplexity; samples ending in EOS | "
      f"{sft_eval['eval_perplexity']:.3f}; {sft_policy['eos_fraction']:.3f} |",
      f"| RM | held-out accuracy vs gold labels ({rm['eval_pairs']} pairs) | "
      f"{rm['eval_accuracy']:.3f} |",
      f"| DPO (β={config.dpo.beta}) | gold reward, {n} held-out samples (mean ± s.e.) | "
      f"{dpo_policy['gold_reward']:.4f} ± {dpo_policy['gold_reward_stderr']:.4f} |",
      f"| DPO | KL(π‖π_SFT), Monte-Carlo over the samples (mean ± s.e.) | "
      f"{dpo_policy['kl']:.3f} ± {dpo_policy['kl_stderr']:.3f} |",
      f"| DPO | held-out implicit-reward accuracy | {dpo['eval_reward_accuracy']:.3f} |",
      f"| PPO (RM reward, {config.ppo.iterations} iterations) | gold reward, {n} held-out "
      f"samples (mean ± s.e.) | {ppo_policy['gold_reward']:.4f} ± "
      f"{ppo_policy['gold_reward_stderr']:.4f} |",
      f"| PPO | KL(π‖π_SFT), Monte-Carlo over the samples (mean ± s.e.) | "
      f"{ppo_policy['kl']:.3f} ± {ppo_policy['kl_stderr']:.3f} |",
      "| all | wall time (s): " + " / ".join(timings) + " | "
      + " / ".join(f"{v:.0f}" for v in timings.values()) + " |"])
  print(table, flush=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "quickstart_results.md"), "w") as f:
      f.write(table + "\n")
    with open(os.path.join(workdir, "quickstart_results.json"), "w") as f:
      json.dump(results, f, indent=2)
  return results
