"""Driver of the IPO vs DPO bandit (see config.py for the card).

  python -m rlhf_jax.main --config=experiments/ipo_vs_dpo/config.py --workdir=DIR

Writes DIR/results.json, DIR/results.md and DIR/ipo_vs_dpo.png.
"""
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from rlhf_jax import objectives

LOSSES = {"dpo": "sigmoid", "ipo": "ipo"}


def preference_pairs(num_responses: int, winners) -> tuple[np.ndarray, np.ndarray]:
  """(chosen, rejected) indices: every winner against every loser."""
  losers = [y for y in range(num_responses) if y not in winners]
  pairs = [(w, l) for w in winners for l in losers]
  return np.asarray([w for w, _ in pairs]), np.asarray([l for _, l in pairs])


def make_sweep(loss: str, ref_logp: jax.Array, chosen, rejected, cfg):
  """train(betas [S]) -> log-policies [S, steps // log_every, M]: one scanned, vmapped program.

  The policy is a tabular softmax over the responses, started at the reference; each step is
  one sign-descent step on the mean library loss over all preference pairs (full batch).
  """
  hparams = {"length_normalized": False} if loss == "ipo" else {}
  schedule = optax.cosine_decay_schedule(cfg.lr, cfg.steps)
  tx = optax.chain(optax.scale_by_sign(), optax.scale_by_learning_rate(schedule))

  def loss_fn(logits, beta):
    logp = jax.nn.log_softmax(logits)
    logps = objectives.PreferenceLogps(policy_chosen=logp[chosen], policy_rejected=logp[rejected],
                                       ref_chosen=ref_logp[chosen],
                                       ref_rejected=ref_logp[rejected])
    losses, _ = objectives.PREFERENCE_LOSSES[LOSSES[loss]](logps, beta=beta, **hparams)
    return jnp.mean(losses)

  def train(beta):
    def step(carry, _):
      logits, opt = carry
      grads = jax.grad(loss_fn)(logits, beta)
      updates, opt = tx.update(grads, opt, logits)
      logits = optax.apply_updates(logits, updates)
      return (logits, opt), jax.nn.log_softmax(logits)

    def block(carry, _):  # log_every steps, keeping the last log-policy.
      carry, logps = jax.lax.scan(step, carry, None, length=cfg.log_every)
      return carry, logps[-1]

    init = (ref_logp, tx.init(ref_logp))
    _, trace = jax.lax.scan(block, init, None, length=cfg.steps // cfg.log_every)
    return jnp.concatenate([ref_logp[None], trace])

  return jax.jit(jax.vmap(train))


def ipo_prediction(ref_probs: np.ndarray, chosen, rejected, tau: float):
  """IPO's fixed point: log-ratios s = log π/π_ref solving the least squares
  s_w − s_l = 1/(2τ) over the observed pairs (exact here: the pair graph is bipartite), then
  π ∝ π_ref·e^s. Returns (the predicted margin of each pair, the predicted policy)."""
  m = len(ref_probs)
  a = np.zeros((len(chosen), m))
  a[np.arange(len(chosen)), chosen], a[np.arange(len(chosen)), rejected] = 1.0, -1.0
  s, *_ = np.linalg.lstsq(a, np.full(len(chosen), 1.0 / (2.0 * tau)), rcond=None)
  policy = ref_probs * np.exp(s - s.max())
  return a @ s, policy / policy.sum()


def run(config, workdir: str) -> dict:
  cfg = config.bandit
  start = time.perf_counter()
  ref = np.asarray(cfg.ref_probs, np.float64)
  if abs(ref.sum() - 1) > 1e-6 or np.any(ref <= 0):
    raise ValueError(f"config.bandit.ref_probs={cfg.ref_probs}: must be positive and sum to 1")
  if cfg.steps % cfg.log_every:
    raise ValueError(f"config.bandit.steps={cfg.steps} must be a multiple of log_every")
  ref_logp = jnp.log(jnp.asarray(ref, jnp.float32))
  chosen, rejected = preference_pairs(len(ref), tuple(cfg.winners))
  losers = np.setdiff1d(np.arange(len(ref)), cfg.winners)
  betas = np.asarray(cfg.betas, np.float32)
  steps = np.arange(0, cfg.steps + 1, cfg.log_every)
  traces = {name: np.asarray(make_sweep(name, ref_logp, chosen, rejected, cfg)(betas),
                             np.float64) for name in LOSSES}  # [S, T, M]
  ref_l = np.log(ref)
  results = {"steps": steps.tolist(), "betas": betas.tolist(), "ref_probs": ref.tolist(),
             "winners": list(cfg.winners), "pairs": [[int(w), int(l)] for w, l in
                                                     zip(chosen, rejected)]}
  rows, ok_all = [], True
  for name, trace in traces.items():
    log_loser_mass = np.logaddexp.reduce(trace[:, :, losers], axis=-1)  # [S, T]
    ratio = trace - ref_l  # log π/π_ref, [S, T, M]
    margins = ratio[:, :, chosen] - ratio[:, :, rejected]  # [S, T, pairs]
    results[name] = {"log_loser_mass": log_loser_mass.tolist(),
                     "mean_margin": margins.mean(-1).tolist(),
                     "final_policy": np.exp(trace[:, -1]).tolist()}
    for i, beta in enumerate(betas):
      mass = np.exp(log_loser_mass[i])
      if name == "dpo":
        predicted = 0.0
        falling = bool(np.all(np.diff(log_loser_mass[i]) <= 1e-6))
        ok = falling and mass[-1] < cfg.dpo_loser_mass_below
        rows.append(f"| DPO | β = {beta:g} | loser mass → 0 | {mass[-1]:.3g} (start "
                    f"{mass[0]:.3g}, step {steps[len(steps) // 10]}: "
                    f"{mass[len(steps) // 10]:.3g}); monotone: {falling}; margin "
                    f"{margins[i, -1].mean():.1f} | 0 (< {cfg.dpo_loser_mass_below:g}) | "
                    f"{'**yes**' if ok else '**no**'} |")
      else:
        want, policy = ipo_prediction(ref, chosen, rejected, float(beta))
        got = margins[i, -1]
        err = float(np.max(np.abs(got - want)))
        predicted = float(policy[losers].sum())
        ok = err < cfg.ipo_margin_tol and abs(mass[-1] - predicted) < 1e-3
        rows.append(f"| IPO | τ = {beta:g} | margin h(y_w, y_l) → 1/(2τ) = {1 / (2 * beta):g} "
                    f"| {got.mean():.5f} (max error over pairs {err:.1e}); loser mass "
                    f"{mass[-1]:.4f} | {want.mean():.5f}; loser mass {predicted:.4f} | "
                    f"{'**yes**' if ok else '**no**'} |")
      ok_all &= ok
  results["all_checks_pass"] = bool(ok_all)
  results["wall_time_s"] = round(time.perf_counter() - start, 1)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f)
    plot(results, os.path.join(workdir, "ipo_vs_dpo.png"))
    table = [
        "# IPO vs DPO on deterministic preferences (Azar et al. 2024) in a bandit", "",
        f"Responses 0..{len(ref) - 1}, π_ref = {tuple(cfg.ref_probs)}; responses "
        f"{tuple(cfg.winners)} always beat the others ({len(chosen)} pairs, full batch). "
        f"Tabular softmax policy from π_ref, sign descent (lr {cfg.lr}, cosine decay to 0; "
        f"see config.py for why), {cfg.steps} steps. Losses: objectives.PREFERENCE_LOSSES "
        "'sigmoid' (DPO) and 'ipo' (IPO, summed log-ratios, τ = β).", "",
        "![IPO vs DPO](ipo_vs_dpo.png)", "",
        "| loss | β / τ | claim | measured (end of training) | predicted limit | holds |",
        "|---|---|---|---|---|---|", *rows, "",
        f"All checks pass: **{ok_all}**. DPO's loser mass has no positive limit: its loss "
        "−log σ(βh) decreases in h for every β, so the run is stopped by its step budget "
        "(and float32: the gradient underflows at βh ≈ 85, which is where β = 5, 1 and 0.5 "
        "stop, at margins ≈ 85/β), not by a minimum. Under sign descent DPO's path does not "
        "depend on β at all until then: with deterministic preferences β does not hold the "
        "policy near π_ref. IPO's margin settles on 1/(2τ), so τ controls how far the policy "
        "moves from π_ref. "
        f"Wall time {results['wall_time_s']:.0f} s.", ""]
    with open(os.path.join(workdir, "results.md"), "w") as f:
      f.write("\n".join(table))
  print("\n".join(rows), flush=True)
  return results


def plot(results: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  steps, betas = np.asarray(results["steps"]), results["betas"]
  colors = plt.cm.viridis(np.linspace(0, 0.9, len(betas)))
  fig, (ax_m, ax_d, ax_i) = plt.subplots(1, 3, figsize=(15, 4.4))
  for i, beta in enumerate(betas):
    ax_m.plot(steps, np.asarray(results["dpo"]["log_loser_mass"][i]) / np.log(10),
              color=colors[i], label=f"DPO β={beta:g}")
    ax_m.plot(steps, np.asarray(results["ipo"]["log_loser_mass"][i]) / np.log(10),
              color=colors[i], ls="--", label=f"IPO τ={beta:g}")
    ax_d.plot(steps, results["dpo"]["mean_margin"][i], color=colors[i], label=f"β={beta:g}")
    ax_i.plot(steps, results["ipo"]["mean_margin"][i], color=colors[i], label=f"τ={beta:g}")
    ax_i.axhline(1 / (2 * beta), color=colors[i], ls=":", lw=1)
  ax_m.set(xlabel="step", ylabel="log10 π(losing responses)",
           title="mass on the losing responses\n(solid DPO → 0; dashed IPO → a finite value)")
  ax_d.set(xlabel="step", ylabel="mean log-ratio margin h(y_w, y_l)",
           title="DPO margin: grows until lr decays to 0\n(β ≥ 0.5 stop earlier: gradient underflow)")
  ax_i.set(xlabel="step", ylabel="mean log-ratio margin h(y_w, y_l)", yscale="log",
           title="IPO margin → 1/(2τ) (dotted)")
  ax_m.legend(fontsize=7, ncol=2)
  ax_d.legend(fontsize=7)
  ax_i.legend(fontsize=7)
  for ax in (ax_m, ax_d, ax_i):
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
