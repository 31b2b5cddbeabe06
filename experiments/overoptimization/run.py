"""Driver of the reward-model overoptimisation reproduction (see config.py for the card).

  python -m rlhf_jax.main --config=experiments/overoptimization/config.py --workdir=DIR

Writes DIR/results.json, DIR/results.md, DIR/best_of_n.png and DIR/rl.png. The SFT and reward
stages (the library's) checkpoint under DIR and resume; the pool and the PPO sweep are
recomputed. --config.overopt.reanalyse=True only redoes fits, checks, plots and the table from
DIR/results.json.
"""
import copy
import json
import os
import time

import jax
import numpy as np
from absl import logging

from rlhf_jax import configs
from rlhf_jax import eval as eval_lib
from rlhf_jax import rng, sampling
from rlhf_jax.eval import overoptimization as oo
from rlhf_jax.train import pipeline, ppo as ppo_lib, reward, rl, scoring, sft, sweep

DATA = ("small", "large")  # Member order of each size's vmapped proxy pair.
# Random streams of this experiment (offsets of config.seed, beside rlhf_jax.rng.STREAMS).
POOL_STREAM, BASELINE_STREAM = 30, 31
POOL_PROMPTS = 30  # Seed of the best-of-n pool's prompt set.


# ---------------------------------------------------------------------------------------------
# Proxy reward models
# ---------------------------------------------------------------------------------------------

def _same_dims(model_cfg, dims) -> bool:
  return all(model_cfg[k] == v for k, v in dims.items())


def _sized(config, dims):
  """config with the model of one proxy size (its SFT and reward stages run with it)."""
  sized = copy.deepcopy(config)
  sized.model.update(dims.to_dict())
  return sized


def validate(config) -> None:
  """What the driver runs besides config.stages: the SFT and reward stages of every proxy size,
  and PPO with the critic from the policy (proxies of other sizes do not fit it)."""
  for name, dims in config.overopt.rm_sizes.items():
    sized = _sized(config, dims)
    try:
      configs.check_model(sized)
    except ValueError as e:
      raise ValueError(f"config.overopt.rm_sizes.{name}: {e}") from None
    sft.validate(sized)
    reward.validate(sized)
  with_policy_critic = copy.deepcopy(config)
  with_policy_critic.ppo.value_init = "policy"
  rl.validate(with_policy_critic)
  if not config.overopt.train_prompts_small <= config.overopt.train_prompts_large:
    raise ValueError("config.overopt.train_prompts_small must not exceed train_prompts_large "
                     "(the small set is a prefix of the large one)")


def proxy_backbones(config, workdir, policy):
  """{size: (config with that model, the SFT stage's result at that size)}: each proxy starts
  from a language model of its own size SFT-ed on the same data (the paper's RMs start from
  pretrained models of each size); the policy's own size reuses the policy."""
  out = {}
  for name, dims in config.overopt.rm_sizes.items():
    if _same_dims(config.model, dims):
      out[name] = (config, policy)
      continue
    sized = _sized(config, dims)
    out[name] = (sized, sft.run(sized, os.path.join(workdir, f"sft_{name}")))
  return out


def train_proxies(config, workdir, backbone, sources, eval_pairs):
  """One proxy per training set in `sources`: the library's reward stage with one training set
  per ensemble member (stacked params, vmapped step, the same number of steps; heads
  normalised to mean 0, std 1 on the held-out responses). Returns (module, stacked params
  [len(sources), ...], per-member held-out accuracy)."""
  out = reward.run(config, workdir, backbone, pairs=(list(sources), eval_pairs))
  return out.module, out.params, out.metrics["eval_accuracy_members"]


# ---------------------------------------------------------------------------------------------
# Best-of-n from one pool of SFT samples
# ---------------------------------------------------------------------------------------------

def sample_pool(config, task, mesh, module, sft_params):
  """pool_size SFT samples for each of pool_prompts held-out prompts: padded sequences for
  the proxies, and the gold reward of each. Returns (ids [M, L], mask [M, L], gold [P, N])."""
  cfg, tok, world = config.overopt, task.tokenize_config, task.world
  prompts = [world.encode(p) for p in world.sample_prompts(cfg.pool_prompts,
                                                           seed=POOL_PROMPTS)]
  sampling_cfg = sampling.sampling_config(config.sampling, tok.eos_id, tok.pad_id)
  tokens, _, _, _ = eval_lib.sample_responses(
      module, sft_params, prompts, k=cfg.pool_size, sampling_cfg=sampling_cfg,
      prompt_len=tok.max_prompt_len, pad_id=tok.pad_id, mesh=mesh, rules=config.sharding,
      key=jax.random.key(config.seed + POOL_STREAM), batch_size=cfg.score_batch_size)
  flat = tokens.reshape(-1, tokens.shape[-1])
  rows = [p for p in prompts for _ in range(cfg.pool_size)]
  gold = world.score_ids(rows, list(flat)).reward.reshape(len(prompts), cfg.pool_size)
  p_ids, p_mask = eval_lib.left_pad(rows, tok.max_prompt_len, tok.pad_id)
  ids = np.concatenate([p_ids, flat], axis=1)
  mask = np.concatenate([p_mask, eval_lib.response_mask(flat, tok.eos_id)], axis=1)
  return ids, mask, gold


def best_of_n_curves(proxy: np.ndarray, gold: np.ndarray, ns) -> dict:
  """Gold and proxy of best-of-n [len(ns)], each minus its n = 1 value, with the s.e. over
  prompts. proxy, gold: [P, N]."""
  gold_n = np.stack([oo.best_of_n_expected(proxy, n, gold) for n in ns], axis=1)  # [P, len]
  proxy_n = np.stack([oo.best_of_n_expected(proxy, n) for n in ns], axis=1)
  se = lambda x: x.std(axis=0, ddof=1) / np.sqrt(x.shape[0])
  d_gold, d_proxy = gold_n - gold_n[:, :1], proxy_n - proxy_n[:, :1]
  return {"n": list(map(int, ns)), "kl": oo.best_of_n_kl(np.asarray(ns)).tolist(),
          "gold": d_gold.mean(0).tolist(), "gold_se": se(d_gold).tolist(),
          "proxy": d_proxy.mean(0).tolist(), "proxy_se": se(d_proxy).tolist(),
          "gold_at_n1": float(gold_n[:, 0].mean()), "proxy_at_n1": float(proxy_n[:, 0].mean())}


# ---------------------------------------------------------------------------------------------
# PPO against the proxies: the runs of one proxy size as one vmapped fused iteration
# ---------------------------------------------------------------------------------------------

def ppo_sweep(config, task, mesh, module, sft_params, rm_module, members):
  """members: [(proxy params [1, ...] (a one-member ensemble), kl_coef)], run as one vmapped
  fused iteration (sweep.ppo_sweep) with the critic from the policy's backbone (proxies of
  other sizes do not fit it). Returns per member the per-iteration rollout means:
  KL(π‖π_SFT) (Monte-Carlo, k1 summed over the response), proxy score and gold reward."""
  config = copy.deepcopy(config)
  config.ppo.value_init = "policy"
  trainer, params = ppo_lib.make_trainer(config, task, mesh, policy=(module, sft_params),
                                         rm=(rm_module, members[0][0]))
  log = {"kl": [], "proxy": [], "gold": [], "no_eos_fraction": []}

  def record(it, out):
    batch, tokens = out["prompts"], np.asarray(out["samples"].tokens)
    gold = [np.mean(trainer.gold_scores((batch["ids"], batch["mask"]),
                                        sampling.Samples(tokens[m], *(None,) * 4)))
            for m in range(len(members))]
    log["kl"].append(np.asarray(out["kl"]).tolist())
    log["proxy"].append(np.asarray(out["rm_score"]).mean(1).tolist())
    log["gold"].append([float(g) for g in gold])
    log["no_eos_fraction"].append((1 - np.asarray(out["samples"].finished).mean(1)).tolist())
    logging.info("ppo iteration %d: kl %s proxy %s gold %s", it - 1, log["kl"][-1],
                 log["proxy"][-1], log["gold"][-1])

  sweep.ppo_sweep(trainer, params, task=task, config=config,
                  kl_coefs=[coef for _, coef in members],
                  rm_params=sweep.stack_trees([p for p, _ in members]), on_iteration=record)
  # [iterations, members] -> per member lists.
  return [{k: [row[m] for row in v] for k, v in log.items()} for m in range(len(members))]


def sft_gold_on_ppo_prompts(config, task, mesh, module, sft_params) -> list[float]:
  """Mean gold reward of the SFT policy on each PPO iteration's own prompts
  (config.overopt.baseline_k samples per prompt): the paired baseline of the PPO curves, so
  that prompt-to-prompt variation (a prompt's own sentiment) cancels in gold − SFT."""
  cfg, tok, world = config.ppo, task.tokenize_config, task.world
  batches = ppo_lib.prompt_iterator(task, config, 0)
  prompts = []
  for _ in range(cfg.iterations):
    batch = next(batches)
    prompts += [row[m > 0] for row, m in zip(batch["ids"], batch["mask"])]
  k = config.overopt.baseline_k
  sampling_cfg = sampling.sampling_config(cfg, tok.eos_id, tok.pad_id)
  tokens, _, _, _ = eval_lib.sample_responses(
      module, sft_params, prompts, k=k, sampling_cfg=sampling_cfg,
      prompt_len=tok.max_prompt_len, pad_id=tok.pad_id, mesh=mesh, rules=config.sharding,
      key=jax.random.key(config.seed + BASELINE_STREAM),
      batch_size=config.overopt.score_batch_size)
  gold = world.score_ids([p for p in prompts for _ in range(k)],
                         list(tokens.reshape(-1, tokens.shape[-1]))).reward
  return gold.reshape(cfg.iterations, -1).mean(1).tolist()


def windowed(run: dict, window: int, gold0, proxy0: float) -> dict:
  """Means over consecutive windows of iterations, with the SFT point (d = 0) first; gold and
  proxy minus the SFT policy's values (gold0: per iteration, on the same prompts; proxy0: the
  pool's mean), d = sqrt(max(KL, 0)). gold_se: the spread of the window's per-iteration
  differences / sqrt(window) (0 for the exact SFT point)."""
  n = len(run["kl"]) // window * window
  blocks = lambda x: np.asarray(x[:n]).reshape(-1, window)
  kl = np.maximum(blocks(run["kl"]).mean(1), 0.0)
  gold = blocks(np.asarray(run["gold"]) - np.asarray(gold0))
  se = gold.std(1, ddof=1) / np.sqrt(window) if window > 1 else np.zeros(len(gold))
  return {"d": [0.0] + np.sqrt(kl).tolist(),
          "gold": [0.0] + gold.mean(1).tolist(),
          "gold_se": [0.0] + se.tolist(),
          "proxy": [0.0] + (blocks(run["proxy"]).mean(1) - proxy0).tolist(),
          "no_eos_fraction": [0.0] + blocks(run["no_eos_fraction"]).mean(1).tolist()}


# ---------------------------------------------------------------------------------------------
# Checks, table, plots
# ---------------------------------------------------------------------------------------------

def peak(curve: dict) -> tuple[int, float, float]:
  """(index, d, gold) of the highest measured gold point."""
  i = int(np.argmax(curve["gold"]))
  return i, float(curve["d"][i]), float(curve["gold"][i])


def overoptimised(curve: dict) -> bool:
  """Gold peaks inside the range and ends more than 2 s.e. below its peak, while the proxy
  ends above its value at the gold peak."""
  i, _, g = peak(curve)
  tol = 2.0 * max(curve["gold_se"][i], curve["gold_se"][-1])
  return (i < len(curve["gold"]) - 1 and curve["gold"][-1] < g - tol
          and curve["proxy"][-1] > curve["proxy"][i])


def fit_or_none(d, r, form):
  try:
    f = oo.fit_curve(d, r, form)
  except ValueError:
    return None
  return {**f.__dict__, "peak_d": f.peak_d}


def _d(value: float) -> str:
  """A fitted peak d; beyond 1000 it is an extrapolation far outside any measured range."""
  return f"{value:.2f}" if value < 1e3 else "> 1000"


def _verdict(oks) -> str:
  oks = list(oks)
  if all(oks):
    return "**reproduced**"
  return "**not reproduced**" if not any(oks) else f"**partly** ({sum(oks)}/{len(oks)})"


def analyse(results: dict, sizes) -> list[str]:
  """The paper's checks as table rows: claim | measured | verdict."""
  bon, rl, fits = results["best_of_n"], results["rl"], results["fits"]
  kl_penalty = results["kl_penalty"]
  free = [f"{s}/{d}" for s in sizes for d in DATA]
  lines = []
  # 1. The proxy keeps rising while the gold reward peaks and then falls.
  for method, curves in (("best-of-n", bon), ("PPO, no KL penalty", rl)):
    oks = [overoptimised(curves[k]) for k in free]
    desc = "; ".join(
        f"{k}: gold peak {peak(curves[k])[2]:+.3f} at d={peak(curves[k])[1]:.2f}, end "
        f"{curves[k]['gold'][-1]:+.3f} (d={curves[k]['d'][-1]:.2f}); proxy "
        f"{curves[k]['proxy'][peak(curves[k])[0]]:+.2f} → {curves[k]['proxy'][-1]:+.2f}"
        for k in free)
    lines.append(f"| proxy keeps rising while gold peaks then falls ({method}) | {desc} | "
                 f"{_verdict(oks)} |")
  # 2. Larger and better-fed proxies peak higher (highest measured gold) and later (the
  # fitted curve's peak d; inf when the fit never turns down).
  for method, curves, fit in (("best-of-n", bon, fits["best_of_n"]), ("PPO", rl, fits["rl"])):
    high = {k: peak(curves[k])[2] for k in free}
    late = {k: (fit[k]["peak_d"] if fit.get(k) else float("nan")) for k in free}
    pairs_size = [(f"{a}/{d}", f"{b}/{d}") for d in DATA for a, b in zip(sizes, sizes[1:])]
    pairs_data = [(f"{s}/small", f"{s}/large") for s in sizes]
    for what, pairs in (("larger", pairs_size), ("better-fed", pairs_data)):
      lines.append(
          f"| {what} proxies peak higher ({method}) | "
          + "; ".join(f"{b} {high[b]:+.3f} vs {a} {high[a]:+.3f}" for a, b in pairs)
          + f" | {_verdict(high[b] > high[a] for a, b in pairs)} |")
      lines.append(
          f"| {what} proxies peak later ({method}; fitted peak d) | "
          + "; ".join(f"{b} {_d(late[b])} vs {a} {_d(late[a])}" for a, b in pairs)
          + f" | {_verdict(late[b] > late[a] for a, b in pairs)} |")
  # 3. A KL penalty does not improve the gold-vs-KL frontier.
  gaps, better, tols = [], [], []
  for size in sizes:
    free_run, pen = rl[f"{size}/large"], rl[f"{size}/large/penalty"]
    order = np.argsort(free_run["d"])
    d_free, g_free = np.asarray(free_run["d"])[order], np.asarray(free_run["gold"])[order]
    inside = [(d, g) for d, g in zip(pen["d"][1:], pen["gold"][1:]) if d <= d_free[-1]]
    gaps.append(float(np.mean([g - np.interp(d, d_free, g_free) for d, g in inside]))
                if inside else float("nan"))
    i = peak(pen)[0]
    better.append(peak(pen)[2] > peak(free_run)[2] + 2 * pen["gold_se"][i])
    tols.append(2 * float(np.mean(pen["gold_se"][1:])))
  lines.append(
      f"| a KL penalty (coef {kl_penalty}) does not reach a higher best gold reward "
      "(large-data proxies) | best gold, penalised vs unpenalised: " + ", ".join(
          f"{s} {peak(rl[f'{s}/large/penalty'])[2]:+.3f} vs {peak(rl[f'{s}/large'])[2]:+.3f}"
          for s in sizes)
      + f" | {_verdict(not b for b in better)} (higher = by more than 2 s.e.) |")
  lines.append(
      f"| a KL penalty (coef {kl_penalty}) gives the same gold at the same KL (same frontier; "
      "large-data proxies) | penalised minus unpenalised gold at the penalised run's d "
      "(interpolated; mean over its windows): " + ", ".join(
          f"{s} {g:+.3f} (2 s.e. {t:.3f})" for s, g, t in zip(sizes, gaps, tols))
      + f" | {_verdict(abs(g) <= t for g, t in zip(gaps, tols))} |")
  return lines


def plot(results: dict, sizes, path_bon: str, path_rl: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  colors = dict(zip(sizes, ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]))
  styles = {"small": "--", "large": "-"}
  for kind, path in (("best_of_n", path_bon), ("rl", path_rl)):
    fig, (ax_g, ax_p) = plt.subplots(1, 2, figsize=(12, 4.6))
    curves, fits = results[kind], results["fits"][kind]
    for key, c in curves.items():
      size, d = key.split("/")[:2]
      pen = key.endswith("penalty")
      label = key if not pen else f"{size}/{d} + KL penalty"
      kw = dict(color=colors[size], ls=":" if pen else styles[d], marker="x" if pen else "o",
                ms=3)
      ax_g.plot(c["d"], c["gold"], label=label, **kw)
      ax_p.plot(c["d"], c["proxy"], label=label, **kw)
      fit = fits.get(key)
      if fit is not None and not pen:
        grid = np.linspace(0, max(c["d"]), 100)
        f = oo.Fit(fit["form"], fit["alpha"], fit["beta"], fit["r2"])
        ax_g.plot(grid, f(grid), color=colors[size], lw=0.8, alpha=0.5)
    title = "best-of-n (n = 1 ... %d)" % max(next(iter(curves.values()))["n"]) \
        if kind == "best_of_n" else "PPO against the proxy, no KL penalty"
    ax_g.set(xlabel="d = sqrt(KL(π‖π_SFT)) [sqrt nats]", ylabel="gold reward − SFT",
             title=f"gold: {title}\n(thin lines: fitted {'d(α−βd)' if kind == 'best_of_n' else 'd(α−β log d)'})")
    ax_p.set(xlabel="d = sqrt(KL(π‖π_SFT)) [sqrt nats]", ylabel="proxy reward − SFT (RM units)",
             title=f"proxy: {title}")
    for ax in (ax_g, ax_p):
      ax.axhline(0, color="grey", lw=0.5)
      ax.grid(alpha=0.3)
    ax_p.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_table(results: dict, sizes, checks: list[str], path: str, config) -> None:
  cfg = config.overopt
  # The policy's shape (its numerics, dtype and remat, are not what the table is about).
  shape = {k: v for k, v in config.model.items() if k not in ("dtype", "remat")}
  lines = ["# Reward-model overoptimisation (Gao, Schulman & Hilton 2022) in miniature", "",
           f"Review world, policy {shape}; gold = the world's programmatic reward. "
           f"Proxies trained on gold-labelled pairs of SFT samples: "
           f"{results['pairs']['large']} pairs (large) and {results['pairs']['small']} "
           f"(small), {config.reward.steps} steps each. Best-of-n over a pool of "
           f"{cfg.pool_size} SFT samples x {cfg.pool_prompts} held-out prompts (unbiased "
           f"estimator), n up to {2 ** cfg.bon_max_log2}. PPO: {config.ppo.iterations} "
           f"iterations x {config.ppo.prompts_per_iter} rollouts, kl_coef 0 (and {cfg.kl_penalty}"
           f" for the penalised runs), averaged over windows of {cfg.log_window} iterations. "
           "Rewards are changes from the SFT policy's mean; the proxy is in its own units "
           "(normalised to std 1 on held-out responses).", "",
           "![best-of-n](best_of_n.png)", "", "![PPO](rl.png)", "",
           "## Proxies and fits (gold reward vs d = sqrt(KL))", "",
           "| proxy (size/data) | held-out accuracy vs gold | best-of-n α | β | R² | "
           "PPO α | β | R² |", "|---|---|---|---|---|---|---|---|"]
  fits = results["fits"]
  fmt = lambda f: (f"{f['alpha']:.4f} | {f['beta']:.4f} | {f['r2']:.3f}" if f else "– | – | –")
  for size in sizes:
    for d in DATA:
      key = f"{size}/{d}"
      lines.append(f"| {key} | {results['accuracy'][key]:.3f} | "
                   f"{fmt(fits['best_of_n'].get(key))} | {fmt(fits['rl'].get(key))} |")
  lines += ["", "## Checks (the paper's claims)", "", "| claim | measured | verdict |",
            "|---|---|---|", *checks, "",
            f"Wall time: {results['wall_time_s']['total']:.0f} s in all ("
            + ", ".join(f"{k} {v:.0f} s" for k, v in results["wall_time_s"].items()
                        if k != "total") + ").", ""]
  with open(path, "w") as f:
    f.write("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def measure(config, workdir: str) -> dict:
  """Every phase of the reproduction, then the report."""
  cfg = config.overopt
  timings, start = {}, time.perf_counter()
  tic = lambda: time.perf_counter()
  t = tic()
  policy = sft.run(config, os.path.join(workdir, "sft"))
  module, sft_params, task, mesh = policy.module, policy.params, policy.task, policy.mesh
  backbones = proxy_backbones(config, workdir, policy)
  timings["sft"] = tic() - t

  # GOLD-LABELLED PAIRS OF SFT SAMPLES; THE SMALL SET IS A PREFIX OF THE LARGE ONE.
  t = tic()
  large = pipeline.label_policy_samples(module, sft_params, task, config, mesh,
                                        n_prompts=cfg.train_prompts_large,
                                        seed=rng.prompt_seed("pairs_train"))
  small = large[:len(large) * cfg.train_prompts_small // cfg.train_prompts_large]
  eval_pairs = pipeline.label_policy_samples(module, sft_params, task, config, mesh,
                                             n_prompts=config.sampling.eval_prompts,
                                             seed=rng.prompt_seed("pairs_eval"))
  timings["pairs"] = tic() - t

  # PROXIES: EACH SIZE'S TWO DATA SIZES AS ONE VMAPPED PROGRAM.
  t = tic()
  # Smallest first (ConfigDict sorts its keys by name, not by size).
  sizes = sorted(cfg.rm_sizes.keys(),
                 key=lambda k: (cfg.rm_sizes[k].d_model, cfg.rm_sizes[k].n_layers))
  proxies, accuracy = {}, {}
  for size in sizes:
    sized, backbone = backbones[size]
    rm_module, rm_params, acc = train_proxies(sized, os.path.join(workdir, f"rm_{size}"),
                                              backbone, [small, large], eval_pairs)
    proxies[size] = (rm_module, rm_params)
    accuracy.update({f"{size}/{d}": a for d, a in zip(DATA, acc)})
  timings["proxies"] = tic() - t

  # BEST-OF-N FROM ONE POOL.
  t = tic()
  ids, mask, gold = sample_pool(config, task, mesh, module, sft_params)
  ns = [2 ** i for i in range(cfg.bon_max_log2 + 1)]
  bon, baselines = {}, {}
  for size in sizes:
    rm_module, rm_params = proxies[size]
    scores = scoring.score_sequences(rm_module, rm_params, ids, mask, mesh,
                                     cfg.score_batch_size)  # [2, P*N]
    for m, d in enumerate(DATA):
      curve = best_of_n_curves(scores[m].reshape(gold.shape), gold, ns)
      curve["d"] = np.sqrt(curve["kl"]).tolist()
      bon[f"{size}/{d}"] = curve
      baselines[f"{size}/{d}"] = (curve["gold_at_n1"], curve["proxy_at_n1"])
  timings["best_of_n"] = tic() - t

  # PPO AGAINST EACH PROXY: (small data, no penalty), (large, no penalty), (large, penalty).
  t = tic()
  rl_raw = {}
  for size in sizes:
    rm_module, rm_params = proxies[size]
    member = lambda i: jax.tree.map(lambda x: x[i:i + 1], rm_params)
    members = [(member(0), 0.0), (member(1), 0.0), (member(1), cfg.kl_penalty)]
    runs = ppo_sweep(config, task, mesh, module, sft_params, rm_module, members)
    rl_raw.update(zip([f"{size}/small", f"{size}/large", f"{size}/large/penalty"], runs))
  sft_gold = sft_gold_on_ppo_prompts(config, task, mesh, module, sft_params)
  timings["ppo"] = tic() - t

  timings["total"] = time.perf_counter() - start
  results = {"best_of_n": bon, "rl_raw": rl_raw, "baselines": baselines, "accuracy": accuracy,
             "pairs": {"large": len(large), "small": len(small), "eval": len(eval_pairs)},
             "sft_gold_pool": float(gold.mean()), "sft_gold_per_iteration": sft_gold,
             "kl_penalty": cfg.kl_penalty,
             "sizes": sizes, "wall_time_s": {k: round(v, 1) for k, v in timings.items()}}
  return report(results, config, workdir)


def report(results: dict, config, workdir: str) -> dict:
  """Windows, fits, checks, results.json, plots and results.md from the measured curves (also
  re-run alone on a saved results.json: --config.overopt.reanalyse=True)."""
  sizes = results["sizes"]
  results["rl"] = {key: windowed(log, config.overopt.log_window,
                                 results["sft_gold_per_iteration"],
                                 results["baselines"]["/".join(key.split("/")[:2])][1])
                   for key, log in results["rl_raw"].items()}
  results["fits"] = {
      "best_of_n": {k: fit_or_none(c["d"], c["gold"], "bon")
                    for k, c in results["best_of_n"].items()},
      "rl": {k: fit_or_none(c["d"], c["gold"], "rl") for k, c in results["rl"].items()}}
  checks = analyse(results, sizes)
  results["checks"] = checks
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(results, f, indent=1)
    plot(results, sizes, os.path.join(workdir, "best_of_n.png"), os.path.join(workdir, "rl.png"))
    write_table(results, sizes, checks, os.path.join(workdir, "results.md"), config)
  print("\n".join(checks), flush=True)
  return results


def run(config, workdir: str) -> dict:
  """main.py's entry (config.driver): the full run, or with config.overopt.reanalyse only the
  analysis of a saved results.json."""
  os.makedirs(workdir, exist_ok=True)
  if not config.overopt.reanalyse:
    return measure(config, workdir)
  with open(os.path.join(workdir, "results.json")) as f:
    saved = json.load(f)
  if "sft_gold_per_iteration" not in saved:  # Written before the paired baseline existed.
    policy = sft.run(config, os.path.join(workdir, "sft"))
    saved["sft_gold_per_iteration"] = sft_gold_on_ppo_prompts(config, policy.task, policy.mesh,
                                                              policy.module, policy.params)
  return report(saved, config, workdir)
