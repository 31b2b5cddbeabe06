"""Preference pairs from a policy's own samples, labelled by the task's gold reward."""
import jax
from absl import logging

from rlhf_jax import eval as eval_lib
from rlhf_jax import sampling
from rlhf_jax.train import task as task_lib


def label_policy_samples(module, params, task, config, mesh, *, n_prompts: int, seed: int):
  """All k(k-1)/2 gold-labelled pairs of k policy samples for each of n fresh prompts."""
  world, tok, cfg = task.world, task.tokenize_config, config.sampling
  prompts = world.sample_prompts(n_prompts, seed=seed)
  sampling_cfg = sampling.SamplingConfig(max_new_tokens=cfg.max_new_tokens, eos_id=tok.eos_id,
                                         pad_id=tok.pad_id, temperature=cfg.temperature)
  tokens, _, _, _ = eval_lib.sample_responses(
      module, params, [world.encode(p) for p in prompts], k=cfg.k, sampling_cfg=sampling_cfg,
      prompt_len=tok.max_prompt_len, pad_id=tok.pad_id, mesh=mesh, rules=config.sharding,
      key=jax.random.fold_in(jax.random.key(config.seed + 2), seed), batch_size=cfg.batch_size)
  texts = [[world.decode(t) for t in row] for row in tokens]
  labelled = world.label_pairs(prompts, texts, temperature=cfg.label_temperature, seed=seed)
  logging.info("quickstart pairs (seed %d): %s", seed, labelled.report.summary())
  return task_lib.tokenize_pairs(task, labelled.examples, f"pairs (seed {seed})")
