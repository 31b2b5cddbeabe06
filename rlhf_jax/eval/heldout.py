"""Held-out next-token NLL and perplexity of a policy on SFT examples.

Used by the SFT stage (its eval metric) and by the RL stage (the "perplexity degradation" of
the policy on the SFT data as it moves away from it). Every example is counted once: the last
batch is filled with empty rows, which carry no loss.
"""
import math

import jax
import numpy as np

from rlhf_jax import data, objectives, parallel


def _arrays(batch: data.SequenceBatch) -> dict[str, np.ndarray]:
  return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
          "loss_mask": batch.loss_mask}


def make_nll_evaluator(module, examples, tok: data.TokenizeConfig, mesh, batch_size: int):
  """params -> {"eval_loss": NLL per response token, "eval_perplexity"} on `examples`."""
  @jax.jit
  def nll_sums(params, batch):
    logits = module.apply({"params": params}, batch["input_ids"], batch["attention_mask"])
    return objectives.next_token_nll(logits, batch["input_ids"], batch["loss_mask"])

  arrays = _arrays(data.pad_sft(examples, tok.max_prompt_len, tok.max_response_len,
                                tok.pad_id))

  def evaluate(params) -> dict[str, float]:
    total, count = 0.0, 0.0
    for _, batch, _ in parallel.padded_batches(arrays, mesh, batch_size, fill="zeros"):
      nll, n = nll_sums(params, batch)  # Replicated sums: every process reads them.
      total, count = total + float(nll), count + float(n)
    loss = total / max(count, 1.0)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}
  return evaluate
