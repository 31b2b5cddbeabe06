"""Export of judgments as preference JSONL, and the round's statistics.

Export. Every judgment that prefers one response ("A" or "B" on the page) becomes one pair
{"prompt", "chosen", "rejected"} in the "pairwise" layout `rlhf_jax.data.read_preferences`
reads, plus provenance fields the reader ignores (item, judgment, annotator, labeler, which
side the chosen response was shown on). The left/right order is resolved through the stored
winner response id, never through the letter. Ties and skips are not pairs: a tie says
nothing a Bradley–Terry or DPO loss can use, a skip is no judgment at all; both are counted
in the export summary and in `stats`.
  aggregate="all": one pair per judgment (a re-annotated item contributes two pairs, and two
    contradicting ones when the annotators disagreed: that is the label noise there is).
  aggregate="majority": one pair per item whose preferring votes favour one response
    strictly; items with a split vote are dropped and counted.

Statistics (`stats`). Agreement is measured on items with two non-skip judgments (the
re-annotated ~10%), the first two in time, in the item's own orientation (which response
won, or tie), so that a re-shuffled left/right order does not count as disagreement.
Cohen's kappa treats "first judgment" and "second judgment" as the two raters: with many
annotators each rater slot mixes people, the usual approximation for crowd labels; a
same-annotator re-annotation (self-consistency) is counted separately. Position bias is the
fraction of preferring judgments that picked the left response, with an exact two-sided
binomial test against 1/2.

Bidi controls (BIDI_CONTROLS, Unicode's Bidi_Control characters) reorder how the text around
them is displayed. The page shows them as visible marks, so annotators judged the stored text;
the export keeps the text exactly as stored, and counts the pairs that hold such characters
(stats counts the prompts and responses), because a reader that renders them (a terminal, a
notebook, a labelling tool) shows something else than what was judged.

Who sees what: `collection_stats` names every annotator, for whoever runs the round (`collect
stats` reads the database file); annotators get `public_stats` over the API, without names.
"""
import collections
import json
import math
import os
import sqlite3
import statistics
import time
from typing import Any, Sequence

from rlhf_jax.collect import db as db_lib

AGGREGATES = ("all", "majority")
# Unicode's Bidi_Control property: ALM, LRM, RLM, LRE, RLE, PDF, LRO, RLO, LRI, RLI, FSI, PDI.
# page.js marks exactly these.
BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
                          "\u2066\u2067\u2068\u2069")


def has_bidi_controls(text: str) -> bool:
  return not BIDI_CONTROLS.isdisjoint(text)


def _pairs_query(conn: sqlite3.Connection):
  return conn.execute("""
    SELECT j.id AS judgment_id, j.item_id, j.annotator, j.labeler, j.choice, j.created_at,
           j.winner_response, i.response_a, i.response_b, p.text AS prompt,
           ra.text AS text_a, rb.text AS text_b
    FROM judgments j JOIN items i ON i.id = j.item_id JOIN prompts p ON p.id = i.prompt_id
    JOIN responses ra ON ra.id = i.response_a JOIN responses rb ON rb.id = i.response_b
    ORDER BY j.item_id, j.created_at, j.id""").fetchall()


def export_preferences(conn: sqlite3.Connection, out_path: str | os.PathLike, *,
                       aggregate: str = "all") -> dict[str, int]:
  """Writes the pairs to `out_path` (atomically) and returns counts of what was written, what
  was left out (ties, skips, split votes), and how many written pairs hold bidi controls."""
  if aggregate not in AGGREGATES:
    raise ValueError(f"aggregate={aggregate!r}; expected one of {AGGREGATES}")
  rows = _pairs_query(conn)
  counts = collections.Counter(pairs=0, ties=0, skips=0, split_items=0,
                               pairs_with_bidi_controls=0)
  records = []
  by_item: dict[int, list] = collections.defaultdict(list)
  for r in rows:
    if r["choice"] == "skip":
      counts["skips"] += 1
      continue
    if r["choice"] == "tie":
      counts["ties"] += 1
      continue
    by_item[r["item_id"]].append(r)
  for item_id, judged in by_item.items():
    if aggregate == "majority":
      votes = collections.Counter(r["winner_response"] for r in judged)
      (top, n_top), *rest = votes.most_common()
      if rest and rest[0][1] == n_top:
        counts["split_items"] += 1
        continue
      judged = [next(r for r in judged if r["winner_response"] == top)]
    for r in judged:
      a_wins = r["winner_response"] == r["response_a"]
      record = {
          "prompt": r["prompt"], "chosen": r["text_a"] if a_wins else r["text_b"],
          "rejected": r["text_b"] if a_wins else r["text_a"], "item_id": item_id,
          "judgment_id": r["judgment_id"], "annotator": r["annotator"],
          "labeler": r["labeler"], "chosen_shown": "left" if r["choice"] == "A" else "right"}
      if aggregate == "majority":
        record["votes"] = votes[top]
      counts["pairs_with_bidi_controls"] += any(
          has_bidi_controls(record[k]) for k in ("prompt", "chosen", "rejected"))
      records.append(record)
  counts["pairs"] = len(records)
  out_path = os.fspath(out_path)
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  tmp = out_path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for rec in records:
      f.write(json.dumps(rec, ensure_ascii=False) + "\n")
  os.replace(tmp, out_path)
  return dict(counts)


# ---------------------------------------------------------------------------------------------
# Agreement and position bias
# ---------------------------------------------------------------------------------------------


def cohens_kappa(first: Sequence[str], second: Sequence[str]) -> float | None:
  """Cohen's kappa of two raters' labels: (p_o - p_e) / (1 - p_e), with p_e from each rater's
  own marginals. None when undefined (no items, or p_e = 1: both raters used one label)."""
  if len(first) != len(second):
    raise ValueError(f"{len(first)} vs {len(second)} labels")
  n = len(first)
  if n == 0:
    return None
  p_o = sum(a == b for a, b in zip(first, second)) / n
  c1, c2 = collections.Counter(first), collections.Counter(second)
  p_e = sum(c1[k] * c2[k] for k in c1) / (n * n)
  if p_e >= 1.0:
    return None
  return (p_o - p_e) / (1.0 - p_e)


def binomial_two_sided_p(k: int, n: int) -> float | None:
  """Exact two-sided p-value of k successes in n fair coin flips (sum of the probabilities
  of every outcome at most as likely as k). None for n = 0."""
  if n == 0:
    return None
  probs = [math.comb(n, i) for i in range(n + 1)]
  observed = probs[k]
  # Integer comparison (exact), then one division: no float ties to worry about.
  return min(1.0, sum(p for p in probs if p <= observed) / 2 ** n)


def _outcome(winner: int | None, response_a: int) -> str:
  if winner is None:
    return "tie"
  return "a" if winner == response_a else "b"


def collection_stats(conn: sqlite3.Connection, now: float | None = None) -> dict[str, Any]:
  """Counts, agreement (rate and Cohen's kappa) and position bias of the round so far."""
  now = time.time() if now is None else now
  one = lambda sql, *a: conn.execute(sql, a).fetchone()[0]
  items = one("SELECT COUNT(*) FROM items")
  judged = conn.execute("""
    SELECT i.id, i.target_judgments, i.response_a,
      (SELECT COUNT(*) FROM judgments j WHERE j.item_id = i.id AND j.choice <> 'skip') AS done
    FROM items i""").fetchall()
  by_choice = {c: 0 for c in db_lib.CHOICES}
  for row in conn.execute("SELECT choice, COUNT(*) FROM judgments GROUP BY choice"):
    by_choice[row[0]] = row[1]
  annotators = {r[0]: r[1] for r in conn.execute(
      "SELECT annotator, COUNT(*) FROM judgments GROUP BY annotator ORDER BY annotator")}
  labelers = {r[0]: r[1] for r in conn.execute(
      "SELECT labeler, COUNT(*) FROM judgments GROUP BY labeler ORDER BY labeler")}
  seconds = [r[0] for r in conn.execute(
      "SELECT seconds FROM judgments WHERE labeler = 'human' AND choice <> 'skip'")]

  # AGREEMENT: the first two non-skip judgments of every item that has two.
  rows = conn.execute("""
    SELECT j.item_id, j.annotator, j.winner_response, i.response_a
    FROM judgments j JOIN items i ON i.id = j.item_id
    WHERE j.choice <> 'skip' ORDER BY j.item_id, j.created_at, j.id""").fetchall()
  per_item: dict[int, list] = collections.defaultdict(list)
  for r in rows:
    per_item[r["item_id"]].append(r)
  first, second, same_annotator = [], [], 0
  for judged_rows in per_item.values():
    if len(judged_rows) >= 2:
      x, y = judged_rows[:2]
      first.append(_outcome(x["winner_response"], x["response_a"]))
      second.append(_outcome(y["winner_response"], y["response_a"]))
      same_annotator += x["annotator"] == y["annotator"]
  n_agree = len(first)
  agreement = {
      "items": n_agree,
      "agreement_rate": (sum(a == b for a, b in zip(first, second)) / n_agree
                         if n_agree else None),
      "cohens_kappa": cohens_kappa(first, second),
      "same_annotator_items": same_annotator,
  }

  left_wins, preferring = by_choice["A"], by_choice["A"] + by_choice["B"]
  queue = db_lib.progress(conn, now=now)
  return {
      "prompts": one("SELECT COUNT(*) FROM prompts"),
      "responses": one("SELECT COUNT(*) FROM responses"),
      "items": items,
      "items_for_reannotation": sum(r["target_judgments"] == 2 for r in judged),
      "items_judged": sum(r["done"] > 0 for r in judged),
      "items_complete": sum(r["done"] >= r["target_judgments"] for r in judged),
      "judgments_needed": sum(max(r["target_judgments"] - r["done"], 0) for r in judged),
      # Needed judgments no annotator can give: each person judged or skipped the item.
      "judgments_no_annotator_left": queue["no_annotator_left"],
      "annotators_registered": len(db_lib.annotators(conn)),
      "open_leases": one("SELECT COUNT(*) FROM assignments s WHERE s.expires_at > ? AND NOT "
                         "EXISTS (SELECT 1 FROM judgments j WHERE j.assignment_id = s.id)",
                         now),
      "judgments": sum(by_choice.values()),
      "by_choice": by_choice,
      "exportable_pairs": preferring,
      "ties": by_choice["tie"],
      "skips": by_choice["skip"],
      "by_annotator": annotators,
      "by_labeler": labelers,
      "median_seconds_per_human_judgment": statistics.median(seconds) if seconds else None,
      "texts_with_bidi_controls": {
          table: sum(has_bidi_controls(r[0]) for r in conn.execute(f"SELECT text FROM {table}"))
          for table in ("prompts", "responses")},
      "agreement": agreement,
      "position_bias": {
          "preferring_judgments": preferring,
          "left_wins": left_wins,
          "left_win_rate": left_wins / preferring if preferring else None,
          "binomial_p_value": binomial_two_sided_p(left_wins, preferring),
      },
  }


def public_stats(stats: dict[str, Any]) -> dict[str, Any]:
  """`collection_stats` without who judged how much (GET /api/stats, for any annotator): the
  number of annotators with judgments instead of their names and counts."""
  out = {k: v for k, v in stats.items() if k != "by_annotator"}
  out["annotators_with_judgments"] = len(stats["by_annotator"])
  return out


def format_stats(s: dict[str, Any]) -> str:
  """A plain-text report of `collection_stats` for the terminal."""
  def num(x, fmt="{:.3f}"):
    return "n/a" if x is None else fmt.format(x)
  ag, pb = s["agreement"], s["position_bias"]
  lines = [
      f"prompts {s['prompts']}, responses {s['responses']}, items {s['items']} "
      f"({s['items_for_reannotation']} drawn for re-annotation)",
      f"items judged {s['items_judged']}, complete {s['items_complete']}, judgments still "
      f"needed {s['judgments_needed']} ({s['judgments_no_annotator_left']} that no annotator "
      f"can give: each judged or skipped the item), open leases {s['open_leases']}",
      f"registered annotators {s['annotators_registered']}",
      f"judgments {s['judgments']}: A (left) {s['by_choice']['A']}, B (right) "
      f"{s['by_choice']['B']}, tie {s['ties']}, skip {s['skips']}",
      f"exportable pairs {s['exportable_pairs']} (ties and skips are not exported)",
      "by annotator: " + (", ".join(f"{k} {v}" for k, v in s["by_annotator"].items()) or "-"),
      "by labeler: " + (", ".join(f"{k} {v}" for k, v in s["by_labeler"].items()) or "-"),
      f"texts with bidi control characters (shown as marks on the page, kept in the export): "
      f"{s['texts_with_bidi_controls']['prompts']} prompts, "
      f"{s['texts_with_bidi_controls']['responses']} responses",
      f"median seconds per human judgment: {num(s['median_seconds_per_human_judgment'], '{:.1f}')}",
      f"agreement on {ag['items']} re-annotated items ({ag['same_annotator_items']} by the "
      f"same annotator): rate {num(ag['agreement_rate'])}, Cohen's kappa "
      f"{num(ag['cohens_kappa'])}",
      f"position bias: left won {pb['left_wins']} of {pb['preferring_judgments']} preferring "
      f"judgments (rate {num(pb['left_win_rate'])}, two-sided binomial p "
      f"{num(pb['binomial_p_value'], '{:.3g}')})",
  ]
  return "\n".join(lines)
