"""Driver of RLOO and GRPO vs PPO with a matched number of samples (Ahmadian et al. 2024,
arXiv:2402.14740; Shao et al. 2024, arXiv:2402.03300); the card is review_world.py. A
finished algorithm leaves its curves in workdir/<algorithm>.json and is not rerun.
"""
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import reporting
from rlhf_jax.train import ppo as ppo_lib
from rlhf_jax.train import rl
from rlhf_jax.train import sweep as sweep_lib


def _algorithm_config(config, algo: str) -> ml_collections.ConfigDict:
  """config.ppo with `algo`'s overrides: what each compared run trains with."""
  return reporting.with_ppo(config, algorithm=algo, reward_source="model", fused=True,
                            **config.critic_free.overrides[algo].to_dict())


def validate(config: ml_collections.ConfigDict) -> None:
  """Each algorithm's config, checked before the front trains."""
  for algo in config.critic_free.algorithms:
    rl.validate(_algorithm_config(config, algo))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The library pipeline's front (SFT, pairs, reward model), then each algorithm of
  config.critic_free (config.ppo with that algorithm's overrides, the same rollouts per
  iteration and the same iterations) against the reward model, fused; gold reward and KL on
  held-out prompts every few iterations; wall time of the iterations and XLA's memory analysis
  of the compiled iteration."""
  cf = config.critic_free
  front, evaluate = reporting.front(config, workdir)
  sft, rm = front.stages["sft"], front.stages["reward"]
  module, sft_params, task, mesh = sft.module, sft.params, sft.task, sft.mesh
  runs = {}
  for algo in cf.algorithms:
    def one(algo=algo):
      c = _algorithm_config(config, algo)
      rollouts = c.ppo.prompts_per_iter * c.ppo.group_size
      out = {"algorithm": algo, "rollouts_per_iteration": rollouts,
             "iterations": c.ppo.iterations, "epochs": c.ppo.epochs, "seeds": []}
      for seed in cf.seeds:
        trainer, params = ppo_lib.make_trainer(c, task, mesh, policy=(module, sft_params),
                                               rm=(rm.module, rm.params))
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
    runs[algo] = reporting.cached(os.path.join(workdir, f"{algo}.json"), one)
  results = {"runs": runs, "reward_model": rm.metrics,
             "wall_time_s": {k: round(v, 1) for k, v in front.timings.items()}}
  return reporting.publish(workdir, results, critic_free_table(config, results),
                           plot_critic_free, "critic_free.png")


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
          f"SFT gold reward {reporting.pm(sft['gold_reward'], sft['gold_reward_stderr'])}. "
          f"± is the s.e. {'over ' + str(seeds) + ' seeds' if seeds > 1 else 'over the held-out samples (1 seed)'}. "
          "Peak memory is XLA's memory analysis of the compiled fused iteration "
          "(arguments + outputs + temporaries − donated); wall time is this machine's.", "",
          "| algorithm | rollouts/iter × iters (epochs) | final gold reward | final KL(π‖π_SFT) "
          "| median iteration (s) | train wall time (s) | peak memory (MiB) | temporaries (MiB) |",
          "|---|---|---|---|---|---|---|---|"]
  for a, r in runs.items():
    f, m = finals[a], r["memory"]
    rows.append(f"| {a.upper()} | {r['rollouts_per_iteration']} × {r['iterations']} "
                f"({r['epochs']}) | {reporting.pm(f['gold_reward'], f['gold_reward_stderr'])} | "
                f"{reporting.pm(f['kl'], f['kl_stderr'])} | {f['iteration_s']:.2f} | {f['train_s']:.0f} "
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
  fig, axes = reporting.figure(1, 3, size=(15, 4.5))
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
