"""Driver of online vs offline DPO at a matched number of labelled samples (Guo et al. 2024,
arXiv:2402.04792); the card is config.py. The library pipeline's front (SFT, gold-labelled
pairs of the SFT policy's samples), then per training seed offline DPO on those pairs (the
library's DPO step, train.sweep), iterative DPO and online DPO (train/online_dpo.py), all
evaluated on the same held-out prompts with the same sampling keys. A finished run leaves its
curve in workdir/<method>_seed<s>.json and is not rerun (delete the file to redo it); SFT and the
online stages resume from their own checkpoints.
"""
import json
import os
import time

import ml_collections
import numpy as np

from experiments import reporting
from rlhf_jax import eval as eval_lib
from rlhf_jax import objectives, rng
from rlhf_jax.train import online_dpo
from rlhf_jax.train import sweep as sweep_lib

METHODS = ("offline", "iterative", "online")
LABELS = {"offline": "offline DPO (SFT pairs)", "iterative": "iterative DPO",
          "online": "online DPO"}
COLORS = {"offline": "tab:blue", "iterative": "tab:green", "online": "tab:red"}


def _stage_config(config, mode: str, seed: int) -> ml_collections.ConfigDict:
  """config with config.online_dpo in `mode` and the run's seed (the iterative run evaluates
  every round)."""
  c = config.copy_and_resolve_references()
  c.seed = seed
  c.online_dpo.mode = mode
  if mode == "iterative":
    c.online_dpo.eval_every = config.repro.iterative_eval_every
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  """The three runs can run, and they are matched: the same labelled samples and the same
  number of DPO updates (each error names the keys to change)."""
  dpo, cfg = config.dpo, config.online_dpo
  if dpo.loss not in objectives.PREFERENCE_LOSSES or dpo.reference != "model" or (
      dpo.ref_sync_every or dpo.packing.rows):
    raise ValueError("offline DPO runs through train.sweep: config.dpo.loss must be a paired "
                     "loss with config.dpo.reference='model', no TR-DPO, no packing")
  for mode in ("online", "iterative"):
    online_dpo.validate(_stage_config(config, mode, config.seed))
  if config.sampling.k != cfg.samples_per_prompt or cfg.pairs != "best_worst" or (
      cfg.samples_per_prompt != 2):
    raise ValueError("matched samples: one pair of 2 samples per prompt everywhere "
                     "(config.sampling.k = config.online_dpo.samples_per_prompt = 2, "
                     "config.online_dpo.pairs='best_worst')")
  n = config.sampling.train_prompts
  prompts = {"online": cfg.iterations * cfg.prompts_per_iter,
             "iterative": cfg.rounds * cfg.prompts_per_round}
  updates = {"online": cfg.iterations * online_dpo.updates_per_iteration(cfg),
             "iterative": cfg.rounds * cfg.steps_per_round}
  for mode in prompts:
    if prompts[mode] != n:
      raise ValueError(f"matched samples: {mode} DPO labels {prompts[mode]} prompts' samples, "
                       f"offline config.sampling.train_prompts={n}")
    if updates[mode] != dpo.steps:
      raise ValueError(f"matched updates: {mode} DPO takes {updates[mode]} updates, offline "
                       f"config.dpo.steps={dpo.steps}")
  if cfg.batch_size != dpo.batch_size or cfg.beta != dpo.beta or cfg.loss != dpo.loss:
    raise ValueError("config.online_dpo.batch_size / beta / loss must equal config.dpo's")


def _stage_curve(workdir: str, sft_point: dict, cfg, mode: str) -> list[dict]:
  """The held-out points an online_dpo run logged (its eval_every), with the SFT point first;
  each with its updates and labelled pairs so far."""
  per_iter = online_dpo.pair_slots(cfg)
  updates = online_dpo.updates_per_iteration(cfg)
  curve = [{**sft_point, "step": 0, "updates": 0, "labelled_pairs": 0,
            "informative_pairs": 0}]
  informative = 0.0
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      m = json.loads(line)
      informative += m["informative_pairs"]
      if "heldout_gold_reward" in m:
        point = {k[len("heldout_"):]: v for k, v in m.items() if k.startswith("heldout_")}
        curve.append({**point, "step": m["step"], "updates": m["step"] * updates,
                      "labelled_pairs": m["step"] * per_iter,
                      "informative_pairs": int(informative),
                      "train_gold_reward": m["gold_reward"]})
  return curve


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The front (SFT, gold-labelled SFT pairs), then offline, iterative and online DPO per seed
  of config.repro.seeds; table, plot and results.json."""
  front, _ = reporting.front(config, workdir)
  sft = front.stages["sft"]
  module, sft_params, task, mesh = sft.module, sft.params, sft.task, sft.mesh
  train_pairs = front.pairs[0]
  prompts = task.world.sample_prompts(config.eval.prompts, seed=rng.prompt_seed("heldout"))
  runs = {m: [] for m in METHODS}
  timings = dict(front.timings)
  for seed in config.repro.seeds:
    seed = int(seed)
    # Each seed's evaluator keys follow its config, as the online stage's own evaluator does.
    evaluate = eval_lib.make_policy_evaluator(_stage_config(config, "online", seed), task, mesh,
                                              module, sft_params, prompts=prompts)

    def timed(name, fn):
      """fn()'s curve, computed once: the cached file keeps its wall time too, so a rerun
      that reuses it reports the time the run took, not the time to read it back."""
      def compute():
        start = time.perf_counter()
        curve = fn()
        return {"curve": curve, "wall_time_s": round(time.perf_counter() - start, 1)}
      out = reporting.cached(os.path.join(workdir, f"{name}_seed{seed}.json"), compute)
      timings[f"{name}_seed{seed}"] = out["wall_time_s"]
      return out["curve"]

    def offline():
      c = _stage_config(config, "online", seed)
      _, curves = sweep_lib.dpo_beta_sweep(
          c, task=task, mesh=mesh, module=module, sft_params=sft_params,
          train_pairs=train_pairs, betas=[c.dpo.beta], evaluate=evaluate,
          eval_every=config.repro.offline_eval_every)
      n = len(train_pairs)
      return [{**p, "updates": p["step"], "labelled_pairs": config.sampling.train_prompts,
               "informative_pairs": n} for p in curves[0]]
    runs["offline"].append(timed("offline", offline))
    sft_point = {k: v for k, v in runs["offline"][-1][0].items()
                 if k in ("gold_reward", "gold_reward_stderr", "kl", "kl_stderr")}

    for mode in ("iterative", "online"):
      def one(mode=mode):
        c = _stage_config(config, mode, seed)
        stage_dir = os.path.join(workdir, f"{mode}_dpo_seed{seed}")
        online_dpo.run(c, stage_dir, sft)
        return _stage_curve(stage_dir, sft_point, c.online_dpo, mode)
      runs[mode].append(timed(mode, one))

  results = {"runs": runs, "sft_eval_perplexity": sft.metrics["eval_perplexity"],
             "offline_pairs": len(train_pairs),
             "labelled_samples": 2 * config.sampling.train_prompts,
             "updates": config.dpo.steps,
             "wall_time_s": {k: round(v, 1) for k, v in timings.items()}}
  results["checks"] = checks(results)
  return reporting.publish(workdir, results, table(config, results), plot, "online_dpo.png")


# ---------------------------------------------------------------------------------------------
# Verdicts, table, plot
# ---------------------------------------------------------------------------------------------


def final(runs: list[list[dict]]) -> dict:
  """Final gold reward and KL averaged over seeds; s.e. over seeds when there are several,
  else over the held-out samples."""
  finals = [c[-1] for c in runs]
  out = {}
  for k in ("gold_reward", "kl"):
    vals = np.asarray([f[k] for f in finals])
    out[k] = float(vals.mean())
    out[k + "_stderr"] = float(vals.std(ddof=1) / np.sqrt(len(vals)) if len(vals) > 1
                               else finals[0][k + "_stderr"])
  return out


def _envelope_at(curves: list[list[dict]], kl: float) -> float:
  """The best gold reward any point of `curves` reached at KL <= kl (−inf when none)."""
  golds = [p["gold_reward"] for c in curves for p in c if p["kl"] <= kl]
  return max(golds) if golds else -np.inf


def checks(results: dict) -> dict:
  """Guo et al.'s claim as measured here (reported, never asserted): online beats offline at
  the same labelled samples, by final gold reward and by the gold reward–KL frontier."""
  runs = results["runs"]
  off = final(runs["offline"])
  # Offline DPO's curve says nothing about KLs it never reached: points beyond its largest KL
  # are counted apart, not compared with its best gold reward.
  max_kl = max(p["kl"] for c in runs["offline"] for p in c)
  out = {"offline_max_kl": max_kl}
  for m in ("online", "iterative"):
    f = final(runs[m])
    se = float(np.hypot(f["gold_reward_stderr"], off["gold_reward_stderr"]))
    diff = f["gold_reward"] - off["gold_reward"]
    points = [p for c in runs[m] for p in c if p["updates"] > 0]
    margins = [p["gold_reward"] - _envelope_at(runs["offline"], p["kl"]) for p in points
               if p["kl"] <= max_kl]
    reached = [p["labelled_pairs"] for p in runs[m][0]
               if p["updates"] > 0 and p["gold_reward"] >= off["gold_reward"]]
    out[m] = {"gold_difference": diff, "two_se": 2 * se, "beats_offline": bool(diff > 2 * se),
              "points": len(points), "comparable": len(margins),
              "above_offline_frontier": int(sum(x > 0 for x in margins)),
              "mean_frontier_margin": float(np.mean(margins)) if margins else None,
              "beyond_offline_kl": len(points) - len(margins),
              "pairs_to_reach_offline_final": reached[0] if reached else None}
  return out


def table(config, results: dict) -> str:
  runs, chk = results["runs"], results["checks"]
  seeds = len(runs["offline"])
  sft = runs["offline"][0][0]
  n = config.eval.prompts * config.eval.k
  rows = [
      "# Online vs offline DPO at matched labelled samples (Guo et al. 2024, in miniature)", "",
      f"Review world; one SFT policy (held-out perplexity {results['sft_eval_perplexity']:.2f}, "
      f"gold reward {reporting.pm(sft['gold_reward'], sft['gold_reward_stderr'])}). Every method "
      f"labels {results['labelled_samples']} samples ({results['labelled_samples'] // 2} pairs of "
      f"2 samples, gold-reward argmax labels) and takes {results['updates']} DPO updates (β = "
      f"{config.dpo.beta:g}, {config.dpo.batch_size} pairs each, the same optimiser). Held-out "
      f"evaluation: {config.eval.prompts} prompts × {config.eval.k} samples = {n} samples per "
      f"point, the same sampling keys for every policy; ± is the s.e. "
      + (f"over {seeds} training seeds." if seeds > 1 else "over the held-out samples (1 seed)."),
      "", "| method | where the pairs come from | informative pairs | final gold reward | "
      "final KL(π‖π_SFT) | best gold on the curve (at KL) |", "|---|---|---|---|---|---|",
      f"| SFT | – | – | {reporting.pm(sft['gold_reward'], sft['gold_reward_stderr'])} | 0 "
      "| – |"]
  cfg = config.online_dpo
  source = {"offline": f"the SFT policy, once ({config.sampling.train_prompts} prompts)",
            "iterative": f"the policy at the start of each of {cfg.rounds} rounds "
                         f"({cfg.prompts_per_round} prompts each)",
            "online": f"the current policy, every one of {cfg.iterations} iterations "
                      f"({cfg.prompts_per_iter} prompts each)"}
  for m in METHODS:
    f = final(runs[m])
    best = max((p for c in runs[m] for p in c if p["updates"] > 0),
               key=lambda p: p["gold_reward"])
    informative = np.mean([c[-1]["informative_pairs"] for c in runs[m]])
    rows.append(f"| {LABELS[m]} | {source[m]} | {informative:.0f} | "
                f"{reporting.pm(f['gold_reward'], f['gold_reward_stderr'])} | "
                f"{reporting.pm(f['kl'], f['kl_stderr'])} | "
                f"{best['gold_reward']:.3f} ({best['kl']:.2f}) |")
  rows += ["", "## Checks", "", "| claim | measured | reproduced? |", "|---|---|---|"]
  for m in ("online", "iterative"):
    c = chk[m]
    reach = c["pairs_to_reach_offline_final"]
    above = c["comparable"] > 0 and c["above_offline_frontier"] > c["comparable"] / 2
    margin = ("" if c["mean_frontier_margin"] is None else
              f" (mean margin {c['mean_frontier_margin']:+.3f})")
    rows += [
        f"| {LABELS[m]} beats offline DPO's final gold reward at matched samples | difference "
        f"{c['gold_difference']:+.4f} (2 s.e. = {c['two_se']:.4f}) | "
        f"{'yes' if c['beats_offline'] else 'no'} |",
        f"| {LABELS[m]} lies above offline DPO's gold–KL frontier | "
        f"{c['above_offline_frontier']} of the {c['comparable']} evaluated points within "
        f"offline's KL range (≤ {chk['offline_max_kl']:.2f} nats) lie above the best offline "
        f"gold reward at no larger KL{margin}; {c['beyond_offline_kl']} points lie beyond that "
        f"range (not compared) | {'yes' if above else 'no'} |",
        f"| {LABELS[m]} reaches offline DPO's final gold reward with fewer labels | "
        + (f"first at {reach} pairs (offline: {results['labelled_samples'] // 2}) | "
           f"{'yes' if reach < results['labelled_samples'] // 2 else 'no'} |" if reach is not None
           else "never reached | no |")]
  rows += ["", "A difference counts as reproduced when it exceeds 2 s.e.; a frontier claim when "
           "more than half of the comparable points lie above it.", "",
           "Wall time (s): " + ", ".join(f"{k} {v:.0f}"
                                        for k, v in results["wall_time_s"].items()),
           "", "![online vs offline DPO](online_dpo.png)", ""]
  return "\n".join(rows)


def plot(results: dict, path: str) -> None:
  """Gold reward against KL(π‖π_SFT) and against labelled pairs, one line per run."""
  fig, axes = reporting.figure(1, 2, size=(12, 4.6))
  ax_kl, ax_n = axes[0, 0], axes[0, 1]
  for m in METHODS:
    for j, c in enumerate(results["runs"][m]):
      label = LABELS[m] if j == 0 else None
      gold = np.asarray([p["gold_reward"] for p in c])
      se = np.asarray([p["gold_reward_stderr"] for p in c])
      ax_kl.errorbar([p["kl"] for p in c], gold, yerr=se, marker="o", ms=3, capsize=2,
                     color=COLORS[m], label=label, alpha=0.9)
      if m == "offline":  # All its pairs are labelled before its first update.
        ax_n.errorbar([c[-1]["labelled_pairs"]], [gold[-1]], yerr=[se[-1]], marker="s",
                      ms=7, capsize=3, color=COLORS[m], label=label)
        ax_n.axhline(gold[-1], color=COLORS[m], ls=":", lw=1)
      else:
        ax_n.errorbar([p["labelled_pairs"] for p in c], gold, yerr=se, marker="o", ms=3,
                      capsize=2, color=COLORS[m], label=label)
  ax_kl.set(xlabel="KL(π ‖ π_SFT) (nats, Monte-Carlo, held-out prompts)",
            ylabel="held-out gold reward (± s.e.)", title="Gold reward vs KL")
  ax_n.set(xlabel="gold-labelled pairs used so far", ylabel="held-out gold reward (± s.e.)",
           title="Gold reward vs labelled samples (2 samples per pair)")
  for ax in (ax_kl, ax_n):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.savefig(path, dpi=100)
