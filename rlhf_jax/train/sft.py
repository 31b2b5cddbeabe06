"""SFT stage: masked next-token NLL on response tokens over packed batches."""
import jax
import ml_collections
import numpy as np
from absl import logging

from rlhf_jax import data, objectives, parallel, rng
from rlhf_jax import eval as eval_lib
from rlhf_jax.train import loop as loop_lib
from rlhf_jax.train import optim, stage as stage_lib, state as state_lib, step as step_lib
from rlhf_jax.train import task as task_lib

NAME = "sft"


def default_config() -> ml_collections.ConfigDict:
  """config.sft: `rows` x `length` packed rows per (global) batch, at most `max_sequences`
  examples per row; held-out NLL every `eval_every` steps; init_hf_dir: a local HF causal LM
  to start from ("" = config.model_dir, else fresh weights of config.model)."""
  return ml_collections.ConfigDict(dict(
      steps=300, rows=8, length=128, max_sequences=32, eval_every=100, eval_batch_size=64,
      init_hf_dir="", optim=optim.default_optim_config()))


def validate(config: ml_collections.ConfigDict) -> None:
  cfg = config.sft
  stage_lib.check_positive(config, "sft.steps", "sft.rows", "sft.length", "sft.max_sequences",
                           "sft.eval_batch_size")
  stage_lib.check_at_least(config, 0, "sft.eval_every")
  stage_lib.check_optim(config, "sft")
  stage_lib.check_batch(config, "sft.rows", accum_key="sft.optim.accum_steps")
  tok_len = config.task.get("max_prompt_len", 0) + config.task.get("max_response_len", 0)
  if config.task.kind == "files" and tok_len > cfg.length:
    raise ValueError(f"config.sft.length={cfg.length} is shorter than one example can be "
                     f"(config.task.max_prompt_len + max_response_len = {tok_len}): such "
                     "examples could never be packed")


def sft_loss_fn(module):
  """loss_fn for step.make_train_step: summed response-token NLL and the token count."""
  def loss_fn(params, batch, rng_key):
    del rng_key  # Deterministic objective.
    logits = module.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                          batch.get("segment_ids"))
    nll, count = objectives.next_token_nll(logits, batch["input_ids"], batch["loss_mask"])
    return nll, (count, {})
  return loss_fn


def packed_arrays(batch: data.PackedBatch) -> dict[str, np.ndarray]:
  """The [R, T] arrays the model and loss read from a packed batch."""
  return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
          "segment_ids": batch.segment_ids, "loss_mask": batch.loss_mask}


def run(config: ml_collections.ConfigDict, workdir: str, init: stage_lib.Init = None
        ) -> stage_lib.StageResult:
  """Trains a policy on config.data.sft (or the review world's SFT set).

  Resumes from workdir/checkpoints if present; a finished run returns its final params.
  """
  validate(config)
  cfg = config.sft
  task = init.task if isinstance(init, stage_lib.StageResult) else task_lib.build_task(config)
  mesh = parallel.make_mesh(config.mesh.to_dict())
  rules = config.sharding
  train = task_lib.sft_examples(task, config, "train")
  heldout = task_lib.sft_examples(task, config, "eval")
  tok = task.tokenize_config
  # config.sft.rows is global: each process packs its share from its slice of the stream.
  batcher = data.PackedBatcher(data.pack_sft,
                               rows=parallel.distributed.local_batch_size(cfg.rows,
                                                                          "config.sft.rows"),
                               length=cfg.length,
                               pad_id=tok.pad_id, max_sequences=cfg.max_sequences)

  def make_iterator(position):
    return data.DataIterator(train, batcher, seed=config.seed, position=position)

  tx, schedule = optim.make_optimizer(cfg.optim, cfg.steps)
  init_key, key = jax.random.split(rng.key(config.seed, "sft"))
  module, params, dtype = stage_lib.load_model(
      config, stage_lib.init_source(config, "sft", init), task=task, mesh=mesh, role="policy",
      fresh_key=init_key, where="config.sft.init_hf_dir")
  state = state_lib.state_from_params(params, tx, key, mesh, rules)
  step_fn = state_lib.jit_step(
      step_lib.make_train_step(sft_loss_fn(module), tx, accum_steps=cfg.optim.accum_steps),
      state)
  evaluate = eval_lib.make_nll_evaluator(module, heldout, tok, mesh, cfg.eval_batch_size)
  with parallel.mesh_context(mesh, rules):
    state = loop_lib.train_loop(
        workdir=workdir, state=state, step_fn=step_fn, make_iterator=make_iterator,
        to_device=lambda b: parallel.shard_batch(packed_arrays(b), mesh),
        loop=stage_lib.loop_config(cfg, config.run), extra=stage_lib.checkpoint_extra(config, module),
        eval_fn=evaluate, desc=NAME, schedule=schedule,
        count_tokens=lambda b: int(np.sum(b.attention_mask)))
    final = evaluate(state["params"])
  logging.info("sft: final held-out loss %.4f, perplexity %.3f", final["eval_loss"],
               final["eval_perplexity"])
  hf_dir = stage_lib.export(config, workdir, module, state["params"], task, dtype)
  return stage_lib.StageResult(NAME, module, state["params"], task, mesh, final, workdir,
                               hf_dir, dtype)
