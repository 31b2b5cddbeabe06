"""`collect label`: fill the queue with machine judgments, for synthetic experiments.

Two labellers score every response once and compare the scores per item:
  * gold: the review world's gold reward r*(prompt, response) (needs the round's world seed,
    stored by `generate` when the prompts or the policy come from the review world);
  * reward: a reward model of ours (a reward-stage workdir; the ensemble mean is the score).
temperature = 0: the higher score wins (an exact tie is a "tie"); temperature > 0: the winner
is drawn as P(a > b) = sigmoid((r_a - r_b) / temperature), the Bradley–Terry label noise of
`ReviewWorld.label_pairs`, each judgment of an item drawn independently. Machine judgments go
through the same tables as human ones (assignments with a recorded left/right order, then
judgments), exactly up to each item's target: the ~10% re-annotation items get a second,
independent judgment by "<annotator>-2", so `stats` reports the label noise's own agreement.
Items currently leased to a person are left alone.
"""
import dataclasses
import random
import sqlite3
import time
from typing import Callable, Sequence

import numpy as np
from absl import logging

from rlhf_jax import data, parallel
from rlhf_jax.collect import checkpoints
from rlhf_jax.collect import db as db_lib

LABELERS = ("gold", "reward")
# (prompts, responses, finished) -> one score per response.
Scorer = Callable[[Sequence[str], Sequence[str], Sequence[bool]], np.ndarray]


def gold_scorer(world_seed: int) -> Scorer:
  """The review world's gold reward; unfinished responses are scored without an end event."""
  world = data.ReviewWorld(data.WorldConfig(seed=world_seed))

  def score(prompts, responses, finished):
    finished = np.asarray(finished, bool)
    out = np.zeros(len(prompts))
    for ended in (True, False):
      idx = np.flatnonzero(finished == ended)
      if idx.size:
        out[idx] = world.score([prompts[i] for i in idx], [responses[i] for i in idx],
                               ended=ended).reward
    return out
  return score


def reward_model_scorer(path: str, *, mesh, rules="fsdp", batch_size: int = 64) -> Scorer:
  """The ensemble-mean reward of a reward-stage checkpoint. Responses are tokenised as the
  reward stage tokenises them (EOS appended, the same truncation), so scores are on the scale
  the model was trained on."""
  from rlhf_jax.train import scoring  # Only this labeller needs the train stack.
  restored = checkpoints.restore(path, role="reward", mesh=mesh, rules=rules)
  tok = dataclasses.replace(restored.task.tokenize_config, over_length="truncate")

  def score(prompts, responses, finished):
    del finished  # Training pairs always end in EOS; score every response the same way.
    examples = [data.SFTExample(p, r, f"response {i}")
                for i, (p, r) in enumerate(zip(prompts, responses))]
    tokenized = data.tokenize_sft(examples, restored.task.tokenizer, tok).examples
    batch = data.pad_sft(tokenized, tok.max_prompt_len, tok.max_response_len, tok.pad_id)
    with parallel.mesh_context(mesh, rules):
      rewards = scoring.score_sequences(restored.module, restored.params, batch.input_ids,
                                        batch.attention_mask, mesh, batch_size)
    return rewards.mean(axis=0)
  return score


def _pending(conn: sqlite3.Connection, now: float) -> list[sqlite3.Row]:
  """Items that still need judgments and are not leased to anyone right now."""
  return conn.execute("""
    SELECT i.id, i.target_judgments, i.response_a, i.response_b,
      (SELECT COUNT(*) FROM judgments j WHERE j.item_id = i.id AND j.choice <> 'skip') AS done
    FROM items i
    WHERE NOT EXISTS (SELECT 1 FROM assignments s WHERE s.item_id = i.id AND s.expires_at > ?
                      AND NOT EXISTS (SELECT 1 FROM judgments j WHERE j.assignment_id = s.id))
    ORDER BY i.queue_order""", (now,)).fetchall()


def label_queue(conn: sqlite3.Connection, scorer: Scorer, *, labeler: str, annotator: str,
                temperature: float = 0.0, seed: int = 0) -> dict[str, int]:
  """Adds machine judgments until every unleased item has its target; returns counts."""
  if temperature < 0:
    raise ValueError(f"temperature={temperature} must be >= 0")
  annotator = db_lib.check_annotator(annotator)
  now = time.time()
  items = [r for r in _pending(conn, now) if r["done"] < r["target_judgments"]]
  if not items:
    return {"labelled": 0, "items": 0, "ties": 0}
  ids = sorted({r[c] for r in items for c in ("response_a", "response_b")})
  rows = {r["id"]: r for r in conn.execute(
      f"SELECT r.id, r.text, r.finished, p.text AS prompt FROM responses r JOIN prompts p ON "
      f"p.id = r.prompt_id WHERE r.id IN ({','.join('?' * len(ids))})", ids)}
  scores = dict(zip(ids, np.asarray(scorer([rows[i]["prompt"] for i in ids],
                                           [rows[i]["text"] for i in ids],
                                           [bool(rows[i]["finished"]) for i in ids]),
                                    np.float64)))
  labels = []
  for r in items:
    taken = {row[0] for row in conn.execute("SELECT annotator FROM judgments WHERE item_id = ?",
                                            (r["id"],))}
    names = [n for n in [annotator] + [f"{annotator}-{i}" for i in range(2, 10)]
             if n not in taken]
    diff = scores[r["response_a"]] - scores[r["response_b"]]
    for j in range(r["target_judgments"] - r["done"]):
      if temperature == 0.0:
        outcome = "tie" if diff == 0 else ("a" if diff > 0 else "b")
      else:
        u = np.random.default_rng([seed, r["id"], r["done"] + j]).random()
        outcome = "a" if u < 1.0 / (1.0 + np.exp(-diff / temperature)) else "b"
      labels.append((r["id"], outcome, names[j]))
  db_lib.record_labels(conn, labels, labeler=labeler, rng=random.Random(seed))
  result = {"labelled": len(labels), "items": len(items),
            "ties": sum(outcome == "tie" for _, outcome, _ in labels)}
  logging.info("collect label (%s): %s", labeler, result)
  return result
