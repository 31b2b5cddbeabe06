"""SFT stage: masked next-token NLL on response tokens over packed batches."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from rlhf_jax import configs, data, models, objectives, parallel
from rlhf_jax.train import loop as loop_lib
from rlhf_jax.train import optim, state as state_lib, step as step_lib, task as task_lib


def sft_loss_fn(module):
  """loss_fn for step.make_train_step: summed response-token NLL and the token count."""
  def loss_fn(params, batch, rng):
    del rng  # Deterministic objective.
    logits = module.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                          batch.get("segment_ids"))
    nll, count = objectives.next_token_nll(logits, batch["input_ids"], batch["loss_mask"])
    return nll, (count, {})
  return loss_fn


def packed_arrays(batch: data.PackedBatch) -> dict[str, np.ndarray]:
  """The [R, T] arrays the model and loss read from a packed batch."""
  return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
          "segment_ids": batch.segment_ids, "loss_mask": batch.loss_mask}


def padded_arrays(batch: data.SequenceBatch) -> dict[str, np.ndarray]:
  return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
          "loss_mask": batch.loss_mask}


def make_eval_fn(module, examples, tok_cfg: data.TokenizeConfig, mesh, batch_size: int):
  """Held-out NLL per response token and perplexity, over padded batches (every example
  counted once; the last partial batch is padded with empty rows, which carry no loss)."""
  @jax.jit
  def nll_sums(params, batch):
    logits = module.apply({"params": params}, batch["input_ids"], batch["attention_mask"])
    return objectives.next_token_nll(logits, batch["input_ids"], batch["loss_mask"])

  batch_size = max(batch_size // mesh.size, 1) * mesh.size  # Divisible over the mesh.
  batches = []
  for start in range(0, len(examples), batch_size):
    chunk = examples[start:start + batch_size]
    arrays = padded_arrays(data.pad_sft(chunk, tok_cfg.max_prompt_len,
                                        tok_cfg.max_response_len, tok_cfg.pad_id))
    short = batch_size - len(chunk)
    if short:  # Empty rows: loss_mask 0, attention_mask 0.
      arrays = {k: np.concatenate([v, np.zeros((short, v.shape[1]), v.dtype)])
                for k, v in arrays.items()}
    batches.append(arrays)

  def eval_fn(params):
    total, count = 0.0, 0.0
    for arrays in batches:
      # Every process holds every batch and feeds its devices' rows; the sums are replicated.
      nll, n = nll_sums(params, parallel.distributed.shard_global(arrays, mesh))
      total, count = total + float(nll), count + float(n)
    loss = total / max(count, 1.0)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}
  return eval_fn


def loop_config(cfg: ml_collections.ConfigDict, run: ml_collections.ConfigDict
                ) -> loop_lib.LoopConfig:
  return loop_lib.LoopConfig(total_steps=cfg.steps, log_every=run.log_every,
                             eval_every=cfg.eval_every, checkpoint_every=run.checkpoint_every,
                             keep_checkpoints=run.keep_checkpoints,
                             max_nonfinite=run.max_nonfinite)


def run_sft(config: ml_collections.ConfigDict, workdir: str):
  """Trains config.model on SFT data; returns (module, params, task, mesh, held-out metrics).

  Resumes from workdir/checkpoints if present; a finished run returns its final params.
  """
  task = task_lib.build_task(config.task)
  module = models.build_model(configs.model_config(config.model, task.vocab_size))
  mesh = parallel.make_mesh(config.mesh.to_dict())
  rules = config.sharding
  cfg = config.sft
  train = task_lib.sft_examples(task, config.task, "train")
  heldout = task_lib.sft_examples(task, config.task, "eval")
  tok = task.tokenize_config
  # config.sft.rows is global: each process packs its share from its slice of the stream.
  batcher = data.PackedBatcher(data.pack_sft,
                               rows=parallel.distributed.local_batch_size(cfg.rows,
                                                                          "config.sft.rows"),
                               length=cfg.length,
                               pad_id=tok.pad_id, max_sequences=cfg.max_sequences)

  def make_iterator(position):
    return data.DataIterator(train, batcher, seed=config.seed, position=position)

  tx, _ = optim.make_optimizer(cfg.optim, cfg.steps)
  init_key, rng = jax.random.split(jax.random.key(config.seed))
  sample = jnp.ones((1, 8), jnp.int32)
  params = parallel.init_params(module, init_key, sample, sample, mesh=mesh, rules=rules)
  state = state_lib.state_from_params(params, tx, rng, mesh, rules)
  step_fn = state_lib.jit_step(
      step_lib.make_train_step(sft_loss_fn(module), tx, accum_steps=cfg.optim.accum_steps),
      state)
  eval_fn = make_eval_fn(module, heldout, tok, mesh, cfg.eval_batch_size)
  with parallel.mesh_context(mesh, rules):
    state = loop_lib.train_loop(
        workdir=workdir, state=state, step_fn=step_fn, make_iterator=make_iterator,
        to_device=lambda b: parallel.shard_batch(packed_arrays(b), mesh),
        loop=loop_config(cfg, config.run), extra={"config": config.to_dict()}, eval_fn=eval_fn,
        desc="sft")
    final = eval_fn(state["params"])
  logging.info("sft: final held-out loss %.4f, perplexity %.3f", final["eval_loss"],
               final["eval_perplexity"])
  return module, state["params"], task, mesh, final
