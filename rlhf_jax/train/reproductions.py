"""Paper reproductions in miniature on the embedded review world (stages "frontier" and
"critic_free"): each runs the shared pipeline (SFT -> k samples per prompt -> gold-labelled
pairs -> reward model), then its sweep, and writes a plot, results.md and results.json.

frontier     Rafailov et al. 2023 (DPO, arXiv:2305.18290), Fig. 2: gold reward against
             KL(π‖π_SFT) for DPO at several β, PPO against the reward model at several target
             KLs, PPO against the gold reward, and best-of-n against the reward model.
critic_free  Ahmadian et al. 2024 (RLOO, arXiv:2402.14740) and Shao et al. 2024 (GRPO,
             arXiv:2402.03300) against PPO with the same number of samples per iteration:
             gold reward, KL, wall time and compiled peak memory of each iteration.

A finished phase leaves its curves in workdir/<phase>.json and is not rerun (delete the file
to redo it); SFT and the reward model resume from their own checkpoints.
"""
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from rlhf_jax.eval import overoptimization
from rlhf_jax.train import ppo as ppo_lib
from rlhf_jax.train import quickstart as quickstart_lib
from rlhf_jax.train import sweep as sweep_lib


# ---------------------------------------------------------------------------------------------
# Shared pipeline and helpers
# ---------------------------------------------------------------------------------------------

def _publish(workdir: str, results: dict, table: str, plot, plot_name: str) -> dict:
  """Prints the table; process 0 writes the plot, results.md and results.json."""
  print(table, flush=True)
  if jax.process_index() == 0:
    plot(results, os.path.join(workdir, plot_name))
    _write(workdir, "results.md", table)
    _write(workdir, "results.json", json.dumps(results, indent=1))
  return results


def _cached(path: str, compute):
  """compute() once: its JSON result is kept at `path` and read back on later runs."""
  if os.path.exists(path):
    logging.info("reusing %s", path)
    with open(path) as f:
      return json.load(f)
  out = compute()
  if jax.process_index() == 0:
    with open(path + ".tmp", "w") as f:
      json.dump(out, f, indent=1)
    os.replace(path + ".tmp", path)
  return out


def _with(config: ml_collections.ConfigDict, **ppo) -> ml_collections.ConfigDict:
  """A copy of config with config.ppo fields replaced (the original stays untouched)."""
  c = config.copy_and_resolve_references()
  c.ppo.update(ppo)
  return c


def _figure(*shape, size):
  """A matplotlib Figure on an Agg canvas, without pyplot (no global backend is touched)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=size, layout="constrained")
  FigureCanvasAgg(fig)
  return fig, fig.subplots(*shape, squeeze=False)


def _write(workdir: str, name: str, text: str) -> None:
  if jax.process_index() == 0:
    with open(os.path.join(workdir, name), "w") as f:
      f.write(text)


def _pm(x, se, digits=3) -> str:
  return f"{x:.{digits}f} ± {se:.{digits}f}"


# ---------------------------------------------------------------------------------------------
# Frontier (Rafailov et al. 2023, Fig. 2)
# ---------------------------------------------------------------------------------------------

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


def run_frontier(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Stage "frontier": the shared pipeline, then DPO over β (one vmapped program), PPO against
  the reward model over target KL (one vmapped program), PPO against the gold reward, and
  best-of-n from a pool; every run measured on the same held-out prompts."""
  fc = config.frontier
  os.makedirs(workdir, exist_ok=True)
  prep = quickstart_lib.sft_pairs_and_reward(config, workdir)
  module, sft_params, task, mesh = (prep[k] for k in ("module", "sft_params", "task", "mesh"))
  evaluate = sweep_lib.make_policy_evaluator(config, task, mesh, module, sft_params)
  timings = dict(prep["timings"])

  def timed(name, fn):
    start = time.perf_counter()
    out = _cached(os.path.join(workdir, f"{name}.json"), fn)
    timings[name] = time.perf_counter() - start
    return out

  # DPO AT EVERY β: ONE VMAPPED PROGRAM ON THE SAME BATCHES
  dpo = timed("dpo_sweep", lambda: sweep_lib.dpo_beta_sweep(
      config, task=task, mesh=mesh, module=module, sft_params=sft_params,
      train_pairs=prep["train_pairs"], betas=list(fc.dpo_betas), evaluate=evaluate,
      eval_every=fc.dpo_eval_every)[1])

  # PPO AGAINST THE REWARD MODEL AT EVERY TARGET KL: ONE VMAPPED PROGRAM
  def ppo_rm():
    c = _with(config, reward_source="model", fused=True)
    trainer, params = ppo_lib.make_trainer(c, task, mesh, policy=(module, sft_params),
                                           rm=prep["rm"])
    return sweep_lib.ppo_sweep(trainer, params, task=task, config=c,
                               kl_targets=list(fc.ppo_kl_targets), evaluate=evaluate,
                               eval_every=fc.ppo_eval_every)[1]
  ppo = timed("ppo_sweep", ppo_rm)

  # PPO AGAINST THE GOLD REWARD (HOST-SIDE REWARD: THE HOST-DRIVEN ITERATION)
  def ppo_gold():
    curves = []
    for target in fc.gold_kl_targets:
      c = _with(config, reward_source="gold", fused=False, kl_target=float(target))
      trainer, params = ppo_lib.make_trainer(c, task, mesh, policy=(module, sft_params),
                                             rm=prep["rm"])
      _, curve, _ = sweep_lib.ppo_with_curve(trainer, params, task=task, config=c,
                                             evaluate=evaluate, eval_every=fc.ppo_eval_every)
      curves.append([{**p, "kl_target": float(target)} for p in curve])
    return curves
  gold = timed("ppo_gold", ppo_gold)

  # BEST-OF-N AGAINST THE REWARD MODEL: ONE POOL, THE UNBIASED ESTIMATOR FOR EVERY n
  def bon():
    proxy, gold_r = sweep_lib.best_of_n_pool(config, task, mesh, module, sft_params,
                                             prep["rm"], n_prompts=fc.bon_prompts,
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
             "reward_model": prep["rm_results"],
             "sft_eval_perplexity": prep["sft_eval"]["eval_perplexity"],
             "wall_time_s": {k: round(v, 1) for k, v in timings.items()}}
  results["checks"] = frontier_checks(results)
  return _publish(workdir, results, frontier_table(config, results), plot_frontier,
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
          f"{_pm(results['dpo'][0][0]['gold_reward'], results['dpo'][0][0]['gold_reward_stderr'])}.",
          "", "| run | steps | final gold reward | final KL | best gold on the curve (at KL) |",
          "|---|---|---|---|---|"]

  def row(name, curve):
    last = curve[-1]
    best = max(curve, key=lambda p: p["gold_reward"])
    rows.append(f"| {name} | {last['step']} | "
                f"{_pm(last['gold_reward'], last['gold_reward_stderr'])} | "
                f"{_pm(last['kl'], last['kl_stderr'])} | "
                f"{best['gold_reward']:.3f} ({best['kl']:.2f}) |")
  for c in results["dpo"]:
    row(f"DPO β={c[0]['beta']:g}", c)
  for c in results["ppo_rm"]:
    row(f"PPO, reward model, target KL {c[0]['kl_target']:g}", c)
  for c in results["ppo_gold"]:
    row(f"PPO, gold reward, target KL {c[0]['kl_target']:g}", c)
  for p in results["best_of_n"]:
    rows.append(f"| best-of-{p['n']} (reward model) | – | "
                f"{_pm(p['gold_reward'], p['gold_reward_stderr'])} | {p['kl']:.3f} (formula) "
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
  fig, axes = _figure(1, 1, size=(8, 5.5))
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


# ---------------------------------------------------------------------------------------------
# RLOO / GRPO vs PPO with matched samples
# ---------------------------------------------------------------------------------------------

def run_critic_free(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Stage "critic_free": the shared pipeline, then each algorithm of config.critic_free
  (config.ppo with that algorithm's overrides, the same rollouts per iteration and the same
  iterations) against the reward model, fused; gold reward and KL on held-out prompts every
  few iterations; wall time of the iterations and XLA's memory analysis of the compiled
  iteration."""
  cf = config.critic_free
  os.makedirs(workdir, exist_ok=True)
  prep = quickstart_lib.sft_pairs_and_reward(config, workdir)
  module, sft_params, task, mesh = (prep[k] for k in ("module", "sft_params", "task", "mesh"))
  evaluate = sweep_lib.make_policy_evaluator(config, task, mesh, module, sft_params)
  runs = {}
  for algo in cf.algorithms:
    overrides = cf.overrides[algo].to_dict()

    def one(algo=algo, overrides=overrides):
      c = _with(config, algorithm=algo, reward_source="model", fused=True, **overrides)
      rollouts = c.ppo.prompts_per_iter * c.ppo.group_size
      out = {"algorithm": algo, "rollouts_per_iteration": rollouts,
             "iterations": c.ppo.iterations, "epochs": c.ppo.epochs, "seeds": []}
      for seed in cf.seeds:
        trainer, params = ppo_lib.make_trainer(c, task, mesh, policy=(module, sft_params),
                                               rm=prep["rm"])
        if "memory" not in out:
          state = trainer.init_state(jax.tree.map(jnp.copy, params), jax.random.key(0))
          out["memory"] = sweep_lib.compiled_memory(
              trainer, state, next(ppo_lib.prompt_iterator(task, c, 0)))
          del state
        _, curve, timing = sweep_lib.ppo_with_curve(
            trainer, params, task=task, config=c, evaluate=evaluate,
            eval_every=cf.eval_every, seed=int(seed))
        out["seeds"].append({"seed": int(seed), "curve": curve, **timing})
      return out
    runs[algo] = _cached(os.path.join(workdir, f"{algo}.json"), one)
  results = {"runs": runs, "reward_model": prep["rm_results"],
             "wall_time_s": {k: round(v, 1) for k, v in prep["timings"].items()}}
  return _publish(workdir, results, critic_free_table(config, results), plot_critic_free,
                  "critic_free.png")


def _final(run: dict) -> dict:
  """Final gold reward and KL averaged over seeds; s.e.: over seeds when there are several,
  else over the held-out samples."""
  finals = [s["curve"][-1] for s in run["seeds"]]
  out = {}
  for k in ("gold_reward", "kl"):
    vals = np.asarray([f[k] for f in finals])
    se = (vals.std(ddof=1) / np.sqrt(len(vals)) if len(vals) > 1 else finals[0][f"{k}_stderr"])
    out[k], out[k + "_stderr"] = float(vals.mean()), float(se)
  out["iteration_s"] = float(np.mean([s["iteration_s"] for s in run["seeds"]]))
  out["train_s"] = float(np.mean([s["train_s"] for s in run["seeds"]]))
  return out


def critic_free_table(config, results: dict) -> str:
  runs = results["runs"]
  sft = next(iter(runs.values()))["seeds"][0]["curve"][0]
  seeds = len(next(iter(runs.values()))["seeds"])
  finals = {a: _final(r) for a, r in runs.items()}
  mib = lambda b: b / 2 ** 20
  rows = ["# RLOO / GRPO vs PPO with matched samples (Ahmadian et al. 2024; Shao et al. 2024)",
          "", f"Same SFT policy, reward model (held-out accuracy "
          f"{results['reward_model']['eval_accuracy']:.3f}) and prompts; every algorithm sees "
          "the same number of sampled responses per iteration and the same iterations. "
          f"SFT gold reward {_pm(sft['gold_reward'], sft['gold_reward_stderr'])}. "
          f"± is the s.e. {'over ' + str(seeds) + ' seeds' if seeds > 1 else 'over the held-out samples (1 seed)'}. "
          "Peak memory is XLA's memory analysis of the compiled fused iteration "
          "(arguments + outputs + temporaries − donated); wall time is this machine's.", "",
          "| algorithm | rollouts/iter × iters (epochs) | final gold reward | final KL(π‖π_SFT) "
          "| median iteration (s) | train wall time (s) | peak memory (MiB) | temporaries (MiB) |",
          "|---|---|---|---|---|---|---|---|"]
  for a, r in runs.items():
    f, m = finals[a], r["memory"]
    rows.append(f"| {a.upper()} | {r['rollouts_per_iteration']} × {r['iterations']} "
                f"({r['epochs']}) | {_pm(f['gold_reward'], f['gold_reward_stderr'])} | "
                f"{_pm(f['kl'], f['kl_stderr'])} | {f['iteration_s']:.2f} | {f['train_s']:.0f} "
                f"| {mib(m['peak_bytes']):.1f} | {mib(m['temp_bytes']):.1f} |")
  rows += ["", "## Checks", "", "| claim | measured | reproduced? |", "|---|---|---|"]
  if "ppo" in finals:
    p = finals["ppo"]
    for a in [a for a in finals if a != "ppo"]:
      f = finals[a]
      se = np.hypot(f["gold_reward_stderr"], p["gold_reward_stderr"])
      diff = f["gold_reward"] - p["gold_reward"]
      verdict = ("yes" if diff > -2 * se else "no")
      rows.append(f"| {a.upper()} matches or beats PPO's gold reward at matched samples | "
                  f"difference {diff:+.4f} (2 s.e. = {2 * se:.4f}) | {verdict} |")
      lighter = runs[a]["memory"]["peak_bytes"] < runs["ppo"]["memory"]["peak_bytes"]
      rows.append(f"| {a.upper()} needs less memory than PPO (no value network) | "
                  f"{mib(runs[a]['memory']['peak_bytes']):.1f} vs "
                  f"{mib(runs['ppo']['memory']['peak_bytes']):.1f} MiB | "
                  f"{'yes' if lighter else 'no'} |")
      faster = f["iteration_s"] < p["iteration_s"]
      rows.append(f"| {a.upper()} iterates faster than PPO | {f['iteration_s']:.2f} vs "
                  f"{p['iteration_s']:.2f} s per iteration | {'yes' if faster else 'no'} |")
  rows += ["", "A claim counts as reproduced for gold reward when the critic-free method is no "
           "more than 2 s.e. below PPO.", "", "![critic-free vs PPO](critic_free.png)", ""]
  return "\n".join(rows)


def plot_critic_free(results: dict, path: str) -> None:
  """Gold reward per iteration, gold reward vs KL, and time / memory bars per algorithm."""
  fig, axes = _figure(1, 3, size=(15, 4.5))
  colors = {"ppo": "tab:orange", "grpo": "tab:purple", "rloo": "tab:cyan"}
  for a, r in results["runs"].items():
    for j, s in enumerate(r["seeds"]):
      c = s["curve"]
      label = a.upper() if j == 0 else None
      steps = [p["step"] for p in c]
      gold = np.asarray([p["gold_reward"] for p in c])
      se = np.asarray([p["gold_reward_stderr"] for p in c])
      axes[0, 0].plot(steps, gold, marker="o", ms=3, color=colors.get(a), label=label)
      axes[0, 0].fill_between(steps, gold - se, gold + se, color=colors.get(a), alpha=0.15)
      axes[0, 1].plot([p["kl"] for p in c], gold, marker="o", ms=3, color=colors.get(a),
                      label=label)
  axes[0, 0].set(xlabel="iteration", ylabel="held-out gold reward (± s.e.)",
                 title="Gold reward per iteration")
  axes[0, 1].set(xlabel="KL(π ‖ π_SFT) (nats)", ylabel="held-out gold reward",
                 title="Gold reward vs KL")
  names = list(results["runs"])
  finals = [_final(results["runs"][a]) for a in names]
  x = np.arange(len(names))
  ax = axes[0, 2]
  ax.bar(x - 0.2, [f["iteration_s"] for f in finals], 0.4, color="tab:gray",
         label="median iteration (s)")
  ax.set_ylabel("seconds per iteration")
  ax2 = ax.twinx()
  ax2.bar(x + 0.2, [results["runs"][a]["memory"]["peak_bytes"] / 2 ** 20 for a in names], 0.4,
          color="tab:red", alpha=0.7, label="compiled peak memory (MiB)")
  ax2.set_ylabel("MiB")
  ax.set_xticks(x, [a.upper() for a in names])
  ax.set_title("Cost per iteration (grey: time, red: memory)")
  for a in axes[0, :2]:
    a.grid(alpha=0.3)
    a.legend()
  fig.savefig(path, dpi=110)
