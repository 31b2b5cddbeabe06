"""Driver of the DPO vs PPO reward–KL frontier (Rafailov et al. 2023, arXiv:2305.18290,
Fig. 2) on the review world; the card is dpo_vs_ppo.py. Gold reward against KL(π‖π_SFT) for
DPO at several β, PPO against the reward model at several target KLs, PPO against the gold
reward, and best-of-n against the reward model. A finished phase leaves its curves in
workdir/<phase>.json and is not rerun (delete the file to redo it); SFT and the reward model
resume from their own checkpoints.
"""
import os
import time

import ml_collections
import numpy as np

from experiments import reporting
from rlhf_jax import objectives
from rlhf_jax.eval import overoptimization
from rlhf_jax.train import ppo as ppo_lib
from rlhf_jax.train import preference, rl
from rlhf_jax.train import sweep as sweep_lib


def frontier_envelope(points: list[dict]):
  """The best gold reward reached at KL <= x by any of `points`: a non-decreasing step
  function of x, given as the sorted (kl, best gold so far) breakpoints."""
  pts = sorted((p["kl"], p["gold_reward"]) for p in points)
  best, out = -np.inf, []
  for kl, gold in pts:
    best = max(best, gold)
    out.append((kl, best))
  return out


def frontier_at(envelope, kl: float) -> float:
  """The envelope's value at `kl` (−inf below its first point)."""
  vals = [g for k, g in envelope if k <= kl]
  return vals[-1] if vals else -np.inf


def validate(config: ml_collections.ConfigDict) -> None:
  """Every run of the sweeps, checked before the front trains: DPO at each β (the β sweep
  needs a paired loss and the reference model in the step), PPO against the reward model
  (fused) and against the gold reward at each target."""
  fc, cfg = config.frontier, config.dpo
  preference.validate(config)
  if cfg.loss not in objectives.PREFERENCE_LOSSES or cfg.reference != "model" or (
      cfg.ref_sync_every):
    raise ValueError(f"the β sweep needs a paired loss with the reference model in the step "
                     f"and no TR-DPO: config.dpo.loss={cfg.loss!r}, "
                     f"reference={cfg.reference!r}, ref_sync_every={cfg.ref_sync_every}")
  for beta in fc.dpo_betas:
    if not beta > 0:
      raise ValueError(f"config.frontier.dpo_betas: {beta} is not > 0")
  rl.validate(reporting.with_ppo(config, reward_source="model", fused=True))
  for target in (*fc.ppo_kl_targets, *fc.gold_kl_targets):
    rl.validate(reporting.with_ppo(config, reward_source="gold", fused=False,
                                   kl_target=float(target)))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The library pipeline's front (config.stages: SFT, pairs, reward model), then DPO over β
  (one vmapped program), PPO against the reward model over target KL (one vmapped program),
  PPO against the gold reward, and best-of-n from a pool; every run measured on the same
  held-out prompts."""
  fc = config.frontier
  front, evaluate = reporting.front(config, workdir)
  sft, rm = front.stages["sft"], front.stages["reward"]
  module, sft_params, task, mesh = sft.module, sft.params, sft.task, sft.mesh
  timings = dict(front.timings)

  def timed(name, fn):
    start = time.perf_counter()
    out = reporting.cached(os.path.join(workdir, f"{name}.json"), fn)
    timings[name] = time.perf_counter() - start
    return out

  # DPO AT EVERY β: ONE VMAPPED PROGRAM ON THE SAME BATCHES
  dpo = timed("dpo_sweep", lambda: sweep_lib.dpo_beta_sweep(
      config, task=task, mesh=mesh, module=module, sft_params=sft_params,
      train_pairs=front.pairs[0], betas=list(fc.dpo_betas), evaluate=evaluate,
      eval_every=fc.dpo_eval_every)[1])

  # PPO AGAINST THE REWARD MODEL AT EVERY TARGET KL: ONE VMAPPED PROGRAM
  def ppo_rm():
    c = reporting.with_ppo(config, reward_source="model", fused=True)
    trainer, params = ppo_lib.make_trainer(c, task, mesh, policy=(module, sft_params),
                                           rm=(rm.module, rm.params))
    return sweep_lib.ppo_sweep(trainer, params, task=task, config=c,
                               kl_targets=list(fc.ppo_kl_targets), evaluate=evaluate,
                               eval_every=fc.ppo_eval_every)[1]
  ppo = timed("ppo_sweep", ppo_rm)

  # PPO AGAINST THE GOLD REWARD (HOST-SIDE REWARD: THE HOST-DRIVEN ITERATION)
  def ppo_gold():
    curves = []
    for target in fc.gold_kl_targets:
      c = reporting.with_ppo(config, reward_source="gold", fused=False, kl_target=float(target))
      trainer, params = ppo_lib.make_trainer(c, task, mesh, policy=(module, sft_params),
                                             rm=(rm.module, rm.params))
      _, curve, _ = sweep_lib.ppo_with_curve(trainer, params, task=task, config=c,
                                             evaluate=evaluate, eval_every=fc.ppo_eval_every)
      curves.append([{**p, "kl_target": float(target)} for p in curve])
    return curves
  gold = timed("ppo_gold", ppo_gold)

  # BEST-OF-N AGAINST THE REWARD MODEL: ONE POOL, THE UNBIASED ESTIMATOR FOR EVERY n
  def bon():
    proxy, gold_r = sweep_lib.best_of_n_pool(config, task, mesh, module, sft_params,
                                             (rm.module, rm.params), n_prompts=fc.bon_prompts,
                                             pool=fc.bon_pool)
    out = []
    for n in fc.bon_ns:
      per_prompt = overoptimization.best_of_n_expected(proxy, n, values=gold_r)
      out.append({"n": int(n), "kl": float(overoptimization.best_of_n_kl(n)),
                  "kl_stderr": 0.0, "gold_reward": float(per_prompt.mean()),
                  "gold_reward_stderr": float(per_prompt.std(ddof=1) /
                                              np.sqrt(len(per_prompt))),
                  "proxy_reward": float(overoptimization.best_of_n_expected(proxy, n).mean())})
    return out
  best_of_n = timed("best_of_n", bon)

  results = {"dpo": dpo, "ppo_rm": ppo, "ppo_gold": gold, "best_of_n": best_of_n,
             "reward_model": rm.metrics,
             "sft_eval_perplexity": sft.metrics["eval_perplexity"],
             "wall_time_s": {k: round(v, 1) for k, v in timings.items()}}
  results["checks"] = frontier_checks(results)
  return reporting.publish(workdir, results, frontier_table(config, results), plot_frontier,
                           "frontier.png")


def frontier_checks(results: dict) -> dict:
  """The paper's claims as measured here (nothing is asserted: the numbers are reported)."""
  dpo_final = [c[-1] for c in results["dpo"]]
  betas = [p["beta"] for p in dpo_final]
  kls = [p["kl"] for p in dpo_final]
  order = np.argsort(betas)
  kl_by_beta = [kls[i] for i in order]
  monotone = all(a > b for a, b in zip(kl_by_beta, kl_by_beta[1:]))
  trained = lambda curves: [p for c in curves for p in c if p["step"] > 0]
  ppo_env = frontier_envelope(trained(results["ppo_rm"]))
  gold_env = frontier_envelope(trained(results["ppo_gold"]))
  dpo_points = trained(results["dpo"])

  def compare(env):
    margins = [p["gold_reward"] - frontier_at(env, p["kl"]) for p in dpo_points]
    finite = [m for m in margins if np.isfinite(m)]
    return {"dpo_points": len(dpo_points),
            "above": int(sum(m > 0 for m in margins)),
            "below_kl_range": int(sum(not np.isfinite(m) for m in margins)),
            "mean_margin_in_range": float(np.mean(finite)) if finite else None}
  return {"larger_beta_lower_final_kl": bool(monotone),
          "final_kl_by_increasing_beta": [round(k, 3) for k in kl_by_beta],
          "dpo_vs_ppo_rm_frontier": compare(ppo_env),
          "dpo_vs_ppo_gold_frontier": compare(gold_env)}


def frontier_table(config, results: dict) -> str:
  checks = results["checks"]
  n = config.eval.prompts * config.eval.k
  rows = ["# DPO vs PPO reward–KL frontier (Rafailov et al. 2023, Fig. 2, in miniature)", "",
          f"Held-out evaluation: {config.eval.prompts} prompts × {config.eval.k} samples = {n} "
          "samples per point (gold reward mean ± s.e.; Monte-Carlo KL(π‖π_SFT) ± s.e.). "
          f"Reward model: held-out accuracy vs gold labels "
          f"{results['reward_model']['eval_accuracy']:.3f} on "
          f"{results['reward_model']['eval_pairs']} pairs. SFT gold reward "
          f"{reporting.pm(results['dpo'][0][0]['gold_reward'], results['dpo'][0][0]['gold_reward_stderr'])}.",
          "", "| run | steps | final gold reward | final KL | best gold on the curve (at KL) |",
          "|---|---|---|---|---|"]

  def row(name, curve):
    last = curve[-1]
    best = max(curve, key=lambda p: p["gold_reward"])
    rows.append(f"| {name} | {last['step']} | "
                f"{reporting.pm(last['gold_reward'], last['gold_reward_stderr'])} | "
                f"{reporting.pm(last['kl'], last['kl_stderr'])} | "
                f"{best['gold_reward']:.3f} ({best['kl']:.2f}) |")
  for c in results["dpo"]:
    row(f"DPO β={c[0]['beta']:g}", c)
  for c in results["ppo_rm"]:
    row(f"PPO, reward model, target KL {c[0]['kl_target']:g}", c)
  for c in results["ppo_gold"]:
    row(f"PPO, gold reward, target KL {c[0]['kl_target']:g}", c)
  for p in results["best_of_n"]:
    rows.append(f"| best-of-{p['n']} (reward model) | – | "
                f"{reporting.pm(p['gold_reward'], p['gold_reward_stderr'])} | {p['kl']:.3f} (formula) "
                f"| – |")
  rm, gd = checks["dpo_vs_ppo_rm_frontier"], checks["dpo_vs_ppo_gold_frontier"]

  def frontier_line(name, c):
    return (f"{c['above']} of {c['dpo_points']} DPO points lie above the {name} frontier "
            f"(the best gold reward any of its evaluated points reached at no larger KL); "
            f"{c['below_kl_range']} sit at a KL below its smallest; mean margin where "
            f"comparable {c['mean_margin_in_range'] if c['mean_margin_in_range'] is None else round(c['mean_margin_in_range'], 4)}")
  dominated = rm["above"] > rm["dpo_points"] / 2 and gd["above"] > gd["dpo_points"] / 2
  rows += ["", "## Checks", "", "| claim | measured | reproduced? |", "|---|---|---|",
           f"| larger β → lower final KL | final KL at β = "
           f"{', '.join(f'{b:g}' for b in sorted(fc_b for fc_b in config.frontier.dpo_betas))}: "
           f"{checks['final_kl_by_increasing_beta']} | "
           f"{'yes' if checks['larger_beta_lower_final_kl'] else 'no'} |",
           f"| DPO dominates PPO (reward model) | {frontier_line('PPO (reward model)', rm)} | "
           f"{'yes' if rm['above'] > rm['dpo_points'] / 2 else 'no'} |",
           f"| DPO dominates even PPO on the gold reward | "
           f"{frontier_line('PPO (gold reward)', gd)} | "
           f"{'yes' if gd['above'] > gd['dpo_points'] / 2 else 'no'} |",
           "", f"Overall, the paper's frontier claim is "
           f"{'reproduced' if dominated else 'not reproduced'} here (a claim counts as "
           "reproduced when more than half of DPO's evaluated points lie above the frontier).",
           "", "Wall time (s): " + ", ".join(f"{k} {v:.0f}"
                                            for k, v in results["wall_time_s"].items()),
           "", "![gold reward vs KL](frontier.png)", ""]
  return "\n".join(rows)


def plot_frontier(results: dict, path: str) -> None:
  """Gold reward against KL(π‖π_SFT): one line per run through its evaluated points, the
  best-of-n curve, and the SFT point at KL 0."""
  fig, axes = reporting.figure(1, 1, size=(8, 5.5))
  ax = axes[0, 0]
  families = [("dpo", "DPO β={beta:g}", "Blues", "o"),
              ("ppo_rm", "PPO (RM) target {kl_target:g}", "Oranges", "s"),
              ("ppo_gold", "PPO (gold) target {kl_target:g}", "Greens", "^")]
  from matplotlib import colormaps
  for key, label, cmap, marker in families:
    curves = results[key]
    for i, c in enumerate(curves):
      color = colormaps[cmap](0.45 + 0.5 * i / max(len(curves) - 1, 1))
      ax.plot([p["kl"] for p in c], [p["gold_reward"] for p in c], marker=marker, ms=4,
              color=color, label=label.format(**c[0]), alpha=0.9)
  bon = results["best_of_n"]
  ax.plot([p["kl"] for p in bon], [p["gold_reward"] for p in bon], "k--", marker="D", ms=4,
          label="best-of-n (RM), KL = log n − (n−1)/n")
  ax.set_xlabel("KL(π ‖ π_SFT) (nats, Monte-Carlo over held-out samples)")
  ax.set_ylabel("mean gold reward (held-out prompts)")
  ax.set_title("Reward–KL frontier on the review world")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  fig.savefig(path, dpi=110)
