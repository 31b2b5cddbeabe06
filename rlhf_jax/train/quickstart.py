"""The quickstart pipeline on the embedded review world:
SFT -> k samples per prompt -> gold-labelled pairs -> reward model; DPO on the same pairs; PPO
against the reward model; gold reward and KL(π‖π_SFT) of every policy on held-out prompts.

Each stage writes to its own sub-directory of the workdir and resumes from its checkpoints;
sampling is a deterministic function of the params and the seed, so a rerun redraws exactly
the same pairs. The run ends with a table (printed, `quickstart_results.md`, and `results.md`
beside the plot) and `quickstart.png`: gold reward against KL(π‖π_SFT) for every policy, and
each stage's training curve read back from its `metrics.jsonl`.
"""
import json
import os
import time

import jax
import ml_collections

from rlhf_jax import eval as eval_lib
from rlhf_jax.train import ppo as ppo_lib
from rlhf_jax.train import preference as preference_lib
from rlhf_jax.train import reward as reward_lib
from rlhf_jax.train import sft as sft_lib
from rlhf_jax.train.labels import label_policy_samples


def sft_pairs_and_reward(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The front of the pipeline, shared with the reproductions (train/reproductions.py): SFT
  (workdir/sft); config.sampling.k samples of the SFT policy on each of train_prompts /
  eval_prompts prompts, all k(k-1)/2 pairs labelled by the gold reward; a reward model from
  the SFT backbone on them, evaluated against gold labels on the fresh prompts
  (workdir/reward). SFT and the reward model resume from their own checkpoints."""
  timings = {}
  start = time.perf_counter()
  module, sft_params, task, mesh, sft_eval = sft_lib.run_sft(config, os.path.join(workdir,
                                                                                  "sft"))
  timings["sft"] = time.perf_counter() - start
  if task.world is None:
    raise ValueError("this pipeline needs config.task.kind='review_world' (a gold reward)")

  # SAMPLE k RESPONSES PER PROMPT FROM THE SFT POLICY; LABEL ALL PAIRS WITH THE GOLD REWARD.
  start = time.perf_counter()
  train_pairs = label_policy_samples(module, sft_params, task, config, mesh,
                                     n_prompts=config.sampling.train_prompts, seed=10)
  eval_pairs = label_policy_samples(module, sft_params, task, config, mesh,
                                    n_prompts=config.sampling.eval_prompts, seed=11)
  timings["sample_and_label"] = time.perf_counter() - start

  # REWARD MODEL FROM THE SFT BACKBONE, EVALUATED AGAINST GOLD LABELS ON FRESH PROMPTS.
  start = time.perf_counter()
  rm_module, rm_params, rm_results = reward_lib.run_reward(
      config, os.path.join(workdir, "reward"), task=task, backbone=sft_params,
      train_pairs=train_pairs, eval_pairs=eval_pairs)
  timings["reward"] = time.perf_counter() - start
  return dict(module=module, sft_params=sft_params, task=task, mesh=mesh, sft_eval=sft_eval,
              train_pairs=train_pairs, eval_pairs=eval_pairs, rm=(rm_module, rm_params),
              rm_results=rm_results, timings=timings)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  front = sft_pairs_and_reward(config, workdir)
  module, sft_params, task, mesh = (front[k] for k in ("module", "sft_params", "task", "mesh"))
  sft_eval, train_pairs, eval_pairs = front["sft_eval"], front["train_pairs"], front["eval_pairs"]
  (rm_module, rm_params), rm, timings = front["rm"], front["rm_results"], dict(front["timings"])

  # DPO FROM THE SFT POLICY ON THE SAME GOLD-LABELLED PAIRS.
  start = time.perf_counter()
  _, dpo_params, dpo = preference_lib.run_preference(
      config, os.path.join(workdir, "dpo"), task=task, policy=(module, sft_params),
      train_pairs=train_pairs, eval_pairs=eval_pairs)
  timings["dpo"] = time.perf_counter() - start

  # PPO FROM THE SFT POLICY AGAINST THE LEARNED REWARD MODEL.
  start = time.perf_counter()
  _, ppo_params, _ = ppo_lib.run_ppo(config, os.path.join(workdir, "ppo"), task=task,
                                     policy=(module, sft_params), rm=(rm_module, rm_params))
  timings["ppo"] = time.perf_counter() - start

  # HELD-OUT PROMPTS: GOLD REWARD OF EACH POLICY, MONTE-CARLO KL TO THE SFT POLICY.
  start = time.perf_counter()
  prompts = task.world.sample_prompts(config.eval.prompts, seed=12)
  measure = lambda params, ref: eval_lib.evaluate_policy(
      module, params, prompts, world=task.world, cfg=config.sampling,
      tok=task.tokenize_config, mesh=mesh, rules=config.sharding,
      key=jax.random.key(config.seed + 4), ref_params=ref, k=config.eval.k)
  sft_policy = measure(sft_params, None)
  dpo_policy, ppo_policy = measure(dpo_params, sft_params), measure(ppo_params, sft_params)
  timings["evaluate"] = time.perf_counter() - start

  results = {"sft": {**sft_policy, "eval_perplexity": sft_eval["eval_perplexity"]},
             "dpo": {**dpo_policy, **dpo}, "ppo": ppo_policy, "reward_model": rm,
             "wall_time_s": {k: round(v, 1) for k, v in timings.items()}}
  n = sft_policy["samples"]
  table = "\n".join([
      "| stage | metric | value |", "|---|---|---|",
      f"| SFT | gold reward, {n} held-out samples (mean ± s.e.) | "
      f"{sft_policy['gold_reward']:.4f} ± {sft_policy['gold_reward_stderr']:.4f} |",
      f"| SFT | held-out perplexity; samples ending in EOS | "
      f"{sft_eval['eval_perplexity']:.3f}; {sft_policy['eos_fraction']:.3f} |",
      f"| RM | held-out accuracy vs gold labels ({rm['eval_pairs']} pairs) | "
      f"{rm['eval_accuracy']:.3f} |",
      f"| DPO (β={config.dpo.beta}) | gold reward, {n} held-out samples (mean ± s.e.) | "
      f"{dpo_policy['gold_reward']:.4f} ± {dpo_policy['gold_reward_stderr']:.4f} |",
      f"| DPO | KL(π‖π_SFT), Monte-Carlo over the samples (mean ± s.e.) | "
      f"{dpo_policy['kl']:.3f} ± {dpo_policy['kl_stderr']:.3f} |",
      f"| DPO | held-out implicit-reward accuracy | {dpo['eval_reward_accuracy']:.3f} |",
      f"| PPO (RM reward, {config.ppo.iterations} iterations) | gold reward, {n} held-out "
      f"samples (mean ± s.e.) | {ppo_policy['gold_reward']:.4f} ± "
      f"{ppo_policy['gold_reward_stderr']:.4f} |",
      f"| PPO | KL(π‖π_SFT), Monte-Carlo over the samples (mean ± s.e.) | "
      f"{ppo_policy['kl']:.3f} ± {ppo_policy['kl_stderr']:.3f} |",
      "| all | wall time (s): " + " / ".join(timings) + " | "
      + " / ".join(f"{v:.0f}" for v in timings.values()) + " |"])
  print(table, flush=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "quickstart_results.md"), "w") as f:
      f.write(table + "\n")
    with open(os.path.join(workdir, "quickstart_results.json"), "w") as f:
      json.dump(results, f, indent=2)
    plot_path = plot_quickstart(results, workdir, dpo_beta=config.dpo.beta)
    with open(os.path.join(workdir, "results.md"), "w") as f:
      f.write(f"# Quickstart results\n\n{table}\n\n"
              f"![gold reward vs KL and training curves]({os.path.basename(plot_path)})\n")
    print(f"wrote {plot_path} and {os.path.join(workdir, 'results.md')}", flush=True)
  return results


def read_metrics(path: str) -> list[dict]:
  """The rows of a stage's metrics.jsonl (one JSON object per logged step), in order."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of the rows that logged `key` (eval metrics only appear every few steps)."""
  pairs = [(r["step"], r[key]) for r in rows if key in r]
  return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_quickstart(results: dict, workdir: str, *, dpo_beta: float,
                    filename: str = "quickstart.png") -> str:
  """Writes workdir/filename: gold reward vs KL(π‖π_SFT) per policy, and training curves.

  Panel 1 is the quickstart's answer (the DPO paper's reward–KL plane): mean gold reward ± s.e.
  against the Monte-Carlo KL ± s.e. of SFT (KL 0 by definition), DPO and PPO on the same
  held-out prompts. The others are read back from each stage's metrics.jsonl so they show
  whether a stage trained at all: SFT loss, reward-model accuracy, DPO's implicit-reward
  accuracy, and PPO's rollout gold reward, reward-model score and KL per iteration.
  The figure is drawn on an Agg canvas without pyplot, so no global backend is touched
  (a notebook importing this keeps its inline backend). Returns the written path.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(15, 8.5), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(2, 3)

  ax = axes[0, 0]
  policies = [("SFT", results["sft"], "tab:gray"),
              (f"DPO (β={dpo_beta})", results["dpo"], "tab:blue"),
              ("PPO (RM reward)", results["ppo"], "tab:orange")]
  for name, r, color in policies:
    ax.errorbar(r.get("kl", 0.0), r["gold_reward"], xerr=r.get("kl_stderr", 0.0),
                yerr=r["gold_reward_stderr"], fmt="o", color=color, capsize=4, label=name)
  ax.set(xlabel="KL(π‖π_SFT), nats per response", ylabel="gold reward (mean ± s.e.)",
         title=f"Held-out prompts ({results['sft']['samples']} samples per policy)")
  ax.legend(loc="best")
  ax.grid(alpha=0.3)

  def curve(ax, stage, keys, title, ylabel):
    rows = read_metrics(os.path.join(workdir, stage, "metrics.jsonl"))
    for key, label in keys:
      steps, values = _series(rows, key)
      if steps:
        ax.plot(steps, values, marker="." if len(steps) < 40 else None, label=label)
    ax.set(title=title, xlabel="iteration" if stage == "ppo" else "step", ylabel=ylabel)
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
  curve(axes[1, 1], "ppo", [("gold_reward", "gold reward"), ("rm_score", "RM score")],
        "PPO rollouts", "mean per response")
  curve(axes[1, 2], "ppo", [("kl", "KL(π‖π_SFT) of the rollouts")], "PPO KL control",
        "nats per response")
  # The adaptive coefficient lives on another scale (~0.05 against KL of a few nats).
  twin = axes[1, 2].twinx()
  steps, coef = _series(read_metrics(os.path.join(workdir, "ppo", "metrics.jsonl")), "kl_coef")
  twin.plot(steps, coef, color="tab:red", linestyle="--", label="KL coefficient (right)")
  twin.set_ylabel("KL coefficient")
  twin.legend(loc="lower right")
  path = os.path.join(workdir, filename)
  fig.savefig(path, dpi=90)
  return path
