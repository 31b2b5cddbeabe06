"""Driver of GRPO vs Dr. GRPO vs DAPO on the arithmetic world; the card is config.py. A finished
variant leaves its curves in workdir/<variant>.json and is not rerun."""
import os

import ml_collections
import numpy as np

from experiments import reporting
from rlhf_jax.train import ppo as ppo_lib
from rlhf_jax.train import rl
from rlhf_jax.train import sweep as sweep_lib

NAMES = {"grpo": "GRPO", "dr_grpo": "Dr. GRPO", "dapo": "DAPO"}
COLORS = {"grpo": "tab:purple", "dr_grpo": "tab:green", "dapo": "tab:red"}
# Training metrics are batch means: one batch's prompt mix (2 vs 3 operands) moves its length
# and accuracy more than training does, so tables and plots use means over this many iterations.
WINDOW = 10


def _variant_config(config, variant: str) -> ml_collections.ConfigDict:
  """config.ppo with the variant named (its keys are resolved by the trainer) and its
  over-sampling factor (DAPO's dynamic sampling; 1 for the others)."""
  return reporting.with_ppo(config, algorithm="grpo", grpo_variant=variant,
                            oversample=int(config.grpo_variants.oversample.get(variant, 1)))


def validate(config: ml_collections.ConfigDict) -> None:
  """Each variant's config, checked before the SFT stage trains."""
  for v in config.grpo_variants.variants:
    rl.validate(_variant_config(config, v))


def samples_per_iteration(cfg) -> int:
  """Sampled responses an iteration draws: prompts_per_iter x oversample x group_size."""
  return cfg.prompts_per_iter * cfg.oversample * cfg.group_size


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The SFT stage (library pipeline), then each variant of config.grpo_variants from the SFT
  policy for the same iterations of the same prompts per iteration and group size, over the
  seeds; held-out accuracy / KL / response length on the evaluation schedule and every
  iteration's training metrics."""
  gv = config.grpo_variants
  front, evaluate = reporting.front(config, workdir)
  sft = front.stages["sft"]
  runs = {}
  for variant in gv.variants:
    def one(variant=variant):
      c = _variant_config(config, variant)
      per_iter = samples_per_iteration(c.ppo)
      out = {"variant": variant, "prompts_per_iter": c.ppo.prompts_per_iter,
             "group_size": c.ppo.group_size, "oversample": c.ppo.oversample,
             "iterations": c.ppo.iterations, "samples_per_iteration": per_iter,
             "samples_drawn": per_iter * c.ppo.iterations, "seeds": []}
      for seed in gv.seeds:
        trainer, params = ppo_lib.make_trainer(c, sft.task, sft.mesh,
                                               policy=(sft.module, sft.params))
        train = []

        def record(it, m):
          train.append({"step": it, "samples_drawn": it * per_iter,
                        "accuracy": m.get("gold_reward", float("nan")),
                        "response_length": m["response_length"], "kl": m["kl"],
                        "no_eos_fraction": m["no_eos_fraction"],
                        "kept_groups": m.get("dynamic_sampling/kept_groups"),
                        "informative_fraction": m.get("dynamic_sampling/informative_fraction")})
        _, curve, timing = sweep_lib.ppo_with_curve(
            trainer, params, task=sft.task, config=c, evaluate=evaluate,
            eval_every=gv.eval_every, seed=int(seed), on_iteration=record)
        for p in curve:
          p["samples_drawn"] = p["step"] * per_iter
        out["seeds"].append({"seed": int(seed), "curve": curve, "train": train, **timing})
      return out
    runs[variant] = reporting.cached(os.path.join(workdir, f"{variant}.json"), one)
  results = {"runs": runs, "wall_time_s": {k: round(v, 1) for k, v in front.timings.items()}}
  results["wall_time_s"].update({v: round(sum(s["train_s"] for s in r["seeds"]), 1)
                                 for v, r in runs.items()})
  return reporting.publish(workdir, results, grpo_variants_table(config, results),
                           plot_grpo_variants, "grpo_variants.png")


def _mean_se(vals) -> tuple[float, float]:
  vals = np.asarray(vals, float)
  se = vals.std(ddof=1) / np.sqrt(len(vals)) if len(vals) > 1 else float("nan")
  return float(vals.mean()), float(se)


def final(run: dict) -> dict:
  """Final held-out accuracy, KL and response length, and the training response length of the
  last WINDOW iterations, as (mean, s.e.) over seeds; with one seed the accuracy and KL s.e. are over
  the held-out samples and the lengths' is nan."""
  finals = [s["curve"][-1] for s in run["seeds"]]
  out = {}
  for k in ("gold_reward", "kl", "response_length"):
    out[k], out[k + "_stderr"] = _mean_se([f[k] for f in finals])
    if len(finals) == 1 and f"{k}_stderr" in finals[0]:
      out[k + "_stderr"] = float(finals[0][f"{k}_stderr"])
  out["train_length"], out["train_length_stderr"] = _mean_se(
      [np.mean([t["response_length"] for t in s["train"][-WINDOW:]]) for s in run["seeds"]])
  kept = [t["kept_groups"] for s in run["seeds"] for t in s["train"]
          if t["kept_groups"] is not None]
  out["kept_fraction"] = (float(np.mean(kept)) / run["prompts_per_iter"] if kept else None)
  return out


def at_samples(run: dict, samples: int) -> tuple[float, float]:
  """Held-out accuracy (mean, s.e. over seeds) at `samples` samples drawn: the evaluation point
  at exactly that count, else linear interpolation between the two around it."""
  vals = []
  for s in run["seeds"]:
    x = [p["samples_drawn"] for p in s["curve"]]
    y = [p["gold_reward"] for p in s["curve"]]
    vals.append(float(np.interp(samples, x, y)))
  m, se = _mean_se(vals)
  if len(vals) == 1:  # One seed: the s.e. over held-out samples of the nearest point.
    c = run["seeds"][0]["curve"]
    se = float(min(c, key=lambda p: abs(p["samples_drawn"] - samples))["gold_reward_stderr"])
  return m, se


def _verdict(ok: bool, se: float) -> str:
  return "untested (1 seed)" if not np.isfinite(se) else ("yes" if ok else "no")


def grpo_variants_table(config, results: dict) -> str:
  runs = results["runs"]
  first = next(iter(runs.values()))
  sft = first["seeds"][0]["curve"][0]
  seeds = len(first["seeds"])
  finals = {v: final(r) for v, r in runs.items()}
  ev = config.eval
  rows = ["# GRPO vs Dr. GRPO vs DAPO on the arithmetic world (Shao et al. 2024; Liu et al. "
          "2025; Yu et al. 2025)", "",
          f"One SFT policy ({config.sft.steps} steps); from it each variant for "
          f"{first['iterations']} iterations of {first['prompts_per_iter']} prompts × "
          f"{first['group_size']} samples, learning rate {config.ppo.optim.lr:g}, KL coefficient "
          f"{config.ppo.kl_coef:g}, 0/1 gold reward. DAPO draws "
          f"{config.grpo_variants.oversample.get('dapo', 1)}× the prompts for dynamic sampling "
          "(the same updates, more samples): 'samples drawn' counts every sampled response. "
          f"Held-out accuracy: {ev.prompts} held-out problems × {ev.k} samples at temperature 1, "
          "the same sampling keys for every policy. "
          f"± is the s.e. {'over ' + str(seeds) + ' seeds' if seeds > 1 else 'over the held-out samples (1 seed; lengths: none)'}.",
          "",
          "| policy | samples drawn (prompts × oversample × group × iters) | held-out accuracy "
          f"| KL(π‖π_SFT) | held-out mean response length | training response length (last {WINDOW} iterations) "
          "| kept groups (dynamic sampling) | train wall time (s) |",
          "|---|---|---|---|---|---|---|---|",
          f"| SFT | 0 | {reporting.pm(sft['gold_reward'], sft['gold_reward_stderr'])} | 0 | "
          f"{sft['response_length']:.2f} | — | — | — |"]
  for v, r in runs.items():
    f = finals[v]
    kept = "—" if f["kept_fraction"] is None else f"{f['kept_fraction']:.2f}"
    wall = np.mean([s["train_s"] for s in r["seeds"]])
    rows.append(
        f"| {NAMES.get(v, v)} | {r['samples_drawn']} ({r['prompts_per_iter']} × {r['oversample']}"
        f" × {r['group_size']} × {r['iterations']}) | "
        f"{reporting.pm(f['gold_reward'], f['gold_reward_stderr'])} | "
        f"{reporting.pm(f['kl'], f['kl_stderr'])} | "
        f"{reporting.pm(f['response_length'], f['response_length_stderr'], 2)} | "
        f"{reporting.pm(f['train_length'], f['train_length_stderr'], 2)} | {kept} | {wall:.0f} |")
  rows += ["", "## Checks", "", "| claim (paper) | measured | reproduced? |", "|---|---|---|"]
  if "grpo" in finals and "dr_grpo" in finals:
    g, d = finals["grpo"], finals["dr_grpo"]
    se = np.hypot(g["response_length_stderr"], d["response_length_stderr"])
    grew = g["response_length"] - sft["response_length"]
    rows.append(f"| GRPO's response length grows over training (the bias Dr. GRPO names) | "
                f"held-out length {sft['response_length']:.2f} → {g['response_length']:.2f} "
                f"({grew:+.2f}, 2 s.e. = {2 * g['response_length_stderr']:.2f}) | "
                f"{_verdict(grew > 2 * g['response_length_stderr'], g['response_length_stderr'])} |")
    diff = d["response_length"] - g["response_length"]
    rows.append(f"| Dr. GRPO ends with shorter responses than GRPO | difference {diff:+.2f} "
                f"tokens (2 s.e. = {2 * se:.2f}) | {_verdict(diff < -2 * se, se)} |")
    se = np.hypot(g["gold_reward_stderr"], d["gold_reward_stderr"])
    diff = d["gold_reward"] - g["gold_reward"]
    rows.append(f"| Dr. GRPO matches GRPO's accuracy | difference {diff:+.4f} "
                f"(2 s.e. = {2 * se:.4f}) | {'yes' if abs(diff) <= 2 * se else 'no'} |")
  if "grpo" in finals and "dapo" in finals:
    g, a = finals["grpo"], finals["dapo"]
    se = np.hypot(g["gold_reward_stderr"], a["gold_reward_stderr"])
    diff = a["gold_reward"] - g["gold_reward"]
    rows.append(f"| DAPO beats GRPO's accuracy after the same updates | difference {diff:+.4f} "
                f"(2 s.e. = {2 * se:.4f}) | {'yes' if diff > 2 * se else 'no'} |")
    budget = runs["grpo"]["samples_drawn"]
    am, ase = at_samples(runs["dapo"], budget)
    se = np.hypot(g["gold_reward_stderr"], ase)
    diff = am - g["gold_reward"]
    rows.append(f"| DAPO beats GRPO's accuracy at the same samples drawn ({budget}) | "
                f"DAPO {reporting.pm(am, ase)} vs GRPO "
                f"{reporting.pm(g['gold_reward'], g['gold_reward_stderr'])}: difference "
                f"{diff:+.4f} (2 s.e. = {2 * se:.4f}) | {'yes' if diff > 2 * se else 'no'} |")
  rows += ["", "A difference counts when it exceeds 2 s.e. (the s.e. of a difference: the two "
           "s.e. in quadrature); 'matches' when it is within 2 s.e.", "",
           "Wall time (s): " + ", ".join(f"{k} {v}" for k, v in results["wall_time_s"].items()),
           "", "![GRPO variants](grpo_variants.png)", ""]
  return "\n".join(rows)


def _seed_mean(series: list[list[float]]) -> tuple[np.ndarray, np.ndarray]:
  a = np.asarray(series, float)
  se = a.std(axis=0, ddof=1) / np.sqrt(len(a)) if len(a) > 1 else np.zeros(a.shape[1])
  return a.mean(axis=0), se


def _running_mean(x) -> np.ndarray:
  """Mean of the last WINDOW values at each point (fewer at the start)."""
  c = np.cumsum(np.insert(np.asarray(x, float), 0, 0.0))
  i = np.arange(1, len(x) + 1)
  return (c[i] - c[np.maximum(i - WINDOW, 0)]) / np.minimum(i, WINDOW)


def plot_grpo_variants(results: dict, path: str) -> None:
  """Held-out accuracy vs samples drawn, training accuracy vs samples drawn, and training
  response length per iteration; means over seeds, ± s.e. shaded."""
  fig, axes = reporting.figure(1, 3, size=(16, 4.5))
  sft = next(iter(results["runs"].values()))["seeds"][0]["curve"][0]["gold_reward"]
  for v, r in results["runs"].items():
    color, label = COLORS.get(v), NAMES.get(v, v)
    curves = [s["curve"] for s in r["seeds"]]
    x = [p["samples_drawn"] for p in curves[0]]
    m, se = _seed_mean([[p["gold_reward"] for p in c] for c in curves])
    axes[0, 0].plot(x, m, marker="o", ms=3, color=color, label=label)
    axes[0, 0].fill_between(x, m - se, m + se, color=color, alpha=0.15)
    trains = [s["train"] for s in r["seeds"]]
    x = np.asarray([t["samples_drawn"] for t in trains[0]])
    for ax, key in ((axes[0, 1], "accuracy"), (axes[0, 2], "response_length")):
      m, se = _seed_mean([_running_mean([t[key] for t in tr]) for tr in trains])
      xs = x if key == "accuracy" else np.asarray([t["step"] for t in trains[0]])
      ax.plot(xs, m, color=color, label=label, lw=1.2)
      ax.fill_between(xs, m - se, m + se, color=color, alpha=0.15)
  axes[0, 0].axhline(sft, color="gray", ls="--", lw=1, label="SFT")
  axes[0, 0].set(xlabel="samples drawn", ylabel="held-out accuracy (mean ± s.e. over seeds)",
                 title="Held-out accuracy vs samples drawn")
  axes[0, 1].set(xlabel="samples drawn",
                 ylabel=f"training accuracy (mean of the last {WINDOW} batches)",
                 title="Training accuracy vs samples drawn")
  axes[0, 2].set(xlabel="iteration",
                 ylabel=f"training response length (mean of the last {WINDOW} batches)",
                 title="Response length over training")
  for ax in axes[0]:
    ax.grid(alpha=0.3)
    ax.legend()
  fig.savefig(path, dpi=90)
