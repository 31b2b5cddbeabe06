"""The quickstart's report: the library pipeline (config.stages), then a table and a plot.

Every policy (SFT, DPO, PPO) is measured on the same held-out prompts and sampling keys
(pipeline.evaluate_policies); the table adds the reward model's held-out accuracy against gold
labels and the wall time of each step; the plot puts the policies in the reward–KL plane and
draws every stage's training curve from its metrics.jsonl.
"""
import json
import os

import jax
import ml_collections

from experiments import reporting
from rlhf_jax.train import metrics as metrics_lib
from rlhf_jax.train import pipeline, rl

STAGES = ("sft", "pairs", "reward", "dpo", "ppo")


def validate(config: ml_collections.ConfigDict) -> None:
  """The report reads every stage's results: all of them must run."""
  if tuple(config.stages) != STAGES:
    raise ValueError(f"config.stages={tuple(config.stages)}: the quickstart's report needs "
                     f"{STAGES}")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  out = pipeline.run(config, workdir)
  stages, evaluation, timings = out.stages, out.evaluation, out.timings
  sft, dpo, ppo = (evaluation[k] for k in ("sft", "dpo", rl.name(config)))
  rm = stages["reward"].metrics
  results = {"sft": {**sft, "eval_perplexity": stages["sft"].metrics["eval_perplexity"]},
             "dpo": {**dpo, **stages["dpo"].metrics}, "ppo": ppo, "reward_model": rm,
             "wall_time_s": {k: round(v, 1) for k, v in timings.items()}}
  table = quickstart_table(config, results)
  print(table, flush=True)
  if jax.process_index() == 0:
    reporting.write(workdir, "quickstart_results.md", table + "\n")
    reporting.write(workdir, "quickstart_results.json", json.dumps(results, indent=2))
    plot_path = plot_quickstart(results, workdir, dpo_beta=config.dpo.beta,
                                rl_dir=rl.name(config))  # Its label is the algorithm's.
    reporting.write(workdir, "results.md", f"# Quickstart results\n\n{table}\n\n"
                    f"![gold reward vs KL and training curves]({os.path.basename(plot_path)})\n")
    print(f"wrote {plot_path} and {os.path.join(workdir, 'results.md')}", flush=True)
  return results


def quickstart_table(config, results: dict) -> str:
  sft, dpo, ppo, rm = (results[k] for k in ("sft", "dpo", "ppo", "reward_model"))
  algo = config.ppo.algorithm.upper()  # The "ppo" results are config.ppo.algorithm's.
  timings, n = results["wall_time_s"], sft["samples"]
  return "\n".join([
      "| stage | metric | value |", "|---|---|---|",
      f"| SFT | gold reward, {n} held-out samples (mean ± s.e.) | "
      f"{sft['gold_reward']:.4f} ± {sft['gold_reward_stderr']:.4f} |",
      f"| SFT | held-out perplexity; samples ending in EOS | "
      f"{sft['eval_perplexity']:.3f}; {sft['eos_fraction']:.3f} |",
      f"| RM | held-out accuracy vs gold labels ({rm['eval_pairs']} pairs) | "
      f"{rm['eval_accuracy']:.3f} |",
      f"| DPO (β={config.dpo.beta}) | gold reward, {n} held-out samples (mean ± s.e.) | "
      f"{dpo['gold_reward']:.4f} ± {dpo['gold_reward_stderr']:.4f} |",
      f"| DPO | KL(π‖π_SFT), Monte-Carlo over the samples (mean ± s.e.) | "
      f"{dpo['kl']:.3f} ± {dpo['kl_stderr']:.3f} |",
      f"| DPO | held-out implicit-reward accuracy | {dpo['eval_reward_accuracy']:.3f} |",
      f"| {algo} (RM reward, {config.ppo.iterations} iterations) | gold reward, {n} held-out "
      f"samples (mean ± s.e.) | {ppo['gold_reward']:.4f} ± {ppo['gold_reward_stderr']:.4f} |",
      f"| {algo} | KL(π‖π_SFT), Monte-Carlo over the samples (mean ± s.e.) | "
      f"{ppo['kl']:.3f} ± {ppo['kl_stderr']:.3f} |",
      "| all | wall time (s): " + " / ".join(timings) + " | "
      + " / ".join(f"{v:.0f}" for v in timings.values()) + " |"])


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of the rows that logged `key` (eval metrics only appear every few steps)."""
  pairs = [(r["step"], r[key]) for r in rows if key in r]
  return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_quickstart(results: dict, workdir: str, *, dpo_beta: float, rl_dir: str = "ppo",
                    filename: str = "quickstart.png") -> str:
  """Writes workdir/filename: gold reward vs KL(π‖π_SFT) per policy, and training curves.

  Panel 1 is the quickstart's answer (the DPO paper's reward–KL plane): mean gold reward ± s.e.
  against the Monte-Carlo KL ± s.e. of SFT (KL 0 by definition), DPO and PPO on the same
  held-out prompts. The others are read back from each stage's metrics.jsonl so they show
  whether a stage trained at all: SFT loss, reward-model accuracy, DPO's implicit-reward
  accuracy, and PPO's rollout gold reward, reward-model score and KL per iteration.
  Returns the written path.
  """
  fig, axes = reporting.figure(2, 3, size=(15, 8.5))
  ax = axes[0, 0]
  policies = [("SFT", results["sft"], "tab:gray"),
              (f"DPO (β={dpo_beta})", results["dpo"], "tab:blue"),
              (f"{rl_dir.upper()} (RM reward)", results["ppo"], "tab:orange")]
  for name, r, color in policies:
    ax.errorbar(r.get("kl", 0.0), r["gold_reward"], xerr=r.get("kl_stderr", 0.0),
                yerr=r["gold_reward_stderr"], fmt="o", color=color, capsize=4, label=name)
  ax.set(xlabel="KL(π‖π_SFT), nats per response", ylabel="gold reward (mean ± s.e.)",
         title=f"Held-out prompts ({results['sft']['samples']} samples per policy)")
  ax.legend(loc="best")
  ax.grid(alpha=0.3)
  rows = lambda stage: metrics_lib.read_jsonl(os.path.join(workdir, stage, "metrics.jsonl"))

  def curve(ax, stage, keys, title, ylabel):
    logged = rows(stage)
    for key, label in keys:
      steps, values = _series(logged, key)
      if steps:
        ax.plot(steps, values, marker="." if len(steps) < 40 else None, label=label)
    ax.set(title=title, xlabel="iteration" if stage == rl_dir else "step", ylabel=ylabel)
    ax.legend(loc="best")
    ax.grid(alpha=0.3)

  curve(axes[0, 1], "sft", [("loss", "train"), ("eval_loss", "held-out")], "SFT",
        "next-token NLL")
  curve(axes[0, 2], "reward", [("accuracy", "train batch"),
                               ("eval_accuracy", "held-out pairs (gold labels)")],
        "Reward model", "pairwise accuracy")
  curve(axes[1, 0], "dpo", [("rewards/accuracies", "train batch"),
                            ("eval_reward_accuracy", "held-out pairs")],
        "DPO implicit reward", "pairwise accuracy")
  curve(axes[1, 1], rl_dir, [("gold_reward", "gold reward"), ("rm_score", "RM score")],
        f"{rl_dir.upper()} rollouts", "mean per response")
  curve(axes[1, 2], rl_dir, [("kl", "KL(π‖π_SFT) of the rollouts")],
        f"{rl_dir.upper()} KL control", "nats per response")
  # The adaptive coefficient lives on another scale (~0.05 against KL of a few nats).
  twin = axes[1, 2].twinx()
  steps, coef = _series(rows(rl_dir), "kl_coef")
  twin.plot(steps, coef, color="tab:red", linestyle="--", label="KL coefficient (right)")
  twin.set_ylabel("KL coefficient")
  twin.legend(loc="lower right")
  path = os.path.join(workdir, filename)
  fig.savefig(path, dpi=90)
  return path
