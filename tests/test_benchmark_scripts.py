"""The benchmark scripts run end to end and print the JSON fields the report reads.

Smoke tests with shrunken shapes, in subprocesses (the scripts are entry points, and gpu.sh is
a shell script): they check structure and the built-in parity checks, never speed.
"""
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT, run_python


def _json_lines(stdout: str) -> list[dict]:
  return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_compare_quick_prints_one_line_per_workload():
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  out = _json_lines(run_python(
      ["benchmarks/compare.py", "--quick", "--n-layers", "1", "--pairs", "2", "--prompt", "16", "--response", "16",
       "--batch", "2", "--prompt-len", "8", "--new-tokens", "8"], timeout=300))
  assert [(r["workload"], r["model"]) for r in out] == [("W1", "tiny"), ("W2", "tiny"),
                                                        ("W3", "tiny")]
  for r in out:
    assert r["rounds"] == 1 and len(r["ours_rounds_s"]) == len(r["theirs_rounds_s"]) == 1
    assert r["ours_s"] > 0 and r["theirs_s"] > 0 and r["flops"] > 0
    assert r["speedup"] == pytest.approx(r["theirs_s"] / r["ours_s"], rel=0.05)
    assert r["ours_fraction_of_peak"] == pytest.approx(
        r["ours_gflops"] / r["peak_gflops"], abs=2e-3)
    assert r["target_met"] is None  # Targets apply to `small` only.
    assert r["torch_threads"] == 2 and r["n_layers_override"] == 1
  w1, w2, w3 = out
  # The scripts refuse to time different computations; the losses they compared are reported.
  for r in (w1, w2):
    assert r["first_loss_ours"] == pytest.approx(r["first_loss_torch"], rel=1e-4, abs=1e-4)
    assert r["flops_source"] == "xla_cost_analysis"
  assert w3["hf_logits_max_abs_diff"] < 1e-3
  assert w3["new_tokens"] == 8 and w3["ours_new_tokens_per_s"] > 0


def test_bounds_quick_takes_each_step_apart_consistently():
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  out = _json_lines(run_python(
      ["benchmarks/bounds.py", "--quick", "--n-layers", "1", "--pairs", "2", "--prompt", "16",
       "--response", "16", "--batch", "2", "--prompt-len", "8", "--new-tokens", "8"],
      timeout=300))
  assert out[0]["bound"] == "read_bandwidth" and out[0]["jax_sum_GB_per_s"] > 0
  rows = out[1:]
  assert [(r["workload"], r["model"]) for r in rows] == [("W1", "tiny"), ("W2", "tiny"),
                                                         ("W3", "tiny")]
  for r in rows:
    raw = r["raw_s"]
    assert r["ours_s"] == raw["ours"] and r["theirs_s"] == raw["theirs"]
    assert r["target_s"] == pytest.approx(r["theirs_s"] / r["target_speedup"], abs=2e-4)
    assert r["ours_rest_s"] == pytest.approx(r["ours_s"] - r["ours_skeleton_s"], abs=2e-4)
    assert r["rest_budget_s"] == pytest.approx(r["target_s"] - r["ours_skeleton_s"], abs=2e-4)
    assert r["reachable_on_these_kernels"] == (r["rest_budget_s"] > 0)
    assert min(r["skeleton_gflops"].values()) > 0
  w1, w2, w3 = rows
  # W1's skeleton includes the LM head (timed on its own); W2 (a scalar head) has none.
  assert w1["ours_skeleton_s"] == pytest.approx(
      w1["raw_s"]["ours_skeleton"] + w1["raw_s"]["ours_head"], abs=2e-4)
  assert "ours_head" not in w2["raw_s"]
  assert w3["new_tokens"] == 8 and w3["hf_logits_max_abs_diff"] < 1e-3
  assert w3["ms_per_step"]["target"] == pytest.approx(1e3 * w3["target_s"] / 8, abs=0.02)
  assert w3["ms_per_step"]["ours_attention_full_cache"] > 0


def test_gpu_script_tiny_cpu_mode():
  env = dict(os.environ, GPU_SH_TINY="1", PYTHON=sys.executable, JAX_PLATFORMS="cpu")
  proc = subprocess.run(["bash", "benchmarks/gpu.sh"], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = _json_lines(proc.stdout)
  kinds = [r["benchmark"] for r in out]
  assert kinds == ["gpu_dpo_step", "gpu_memory", "gpu_generate", "gpu_memory"]
  dpo, mem, gen, whole = out
  assert all(r["model"] == "tiny" and r["tiny_mode"] for r in out)
  assert dpo["step_s"] > 0 and dpo["flops_xla"] > 0 and dpo["flops_6n_plus_attention"] > 0
  # XLA's count and the analytic 6N + attention count agree to within the softmax, norms and
  # optimiser FLOPs that the analytic one leaves out.
  assert dpo["flops_xla"] == pytest.approx(dpo["flops_6n_plus_attention"], rel=0.3)
  assert 0 < dpo["mfu_xla_flops"] and 0 < dpo["mfu_6n"]
  assert mem["memory_analysis"]["temp_size_in_bytes"] > 0
  assert gen["new_tokens_per_s"] > 0 and gen["new_tokens"] == 16
  assert whole["params_bytes"] == 4 * dpo["params"]


def test_rl_iteration_quick_our_side():
  """CI installs no TRL (benchmarks/requirements.txt): --no-trl still runs our GRPO iteration
  on the long-tailed policy, as a fixed batch with padded updates and with continuous batching
  and packed updates (with and without the reference pass), and checks the rewired weights
  against transformers."""
  variants = ["fixed_batch", "slots_packed", "slots_packed_kl"]
  out = _json_lines(run_python(
      ["benchmarks/rl_iteration.py", "--quick", "--no-trl", "--n-layers", "1", "--slots", "4",
       "--variants", ",".join(variants)], timeout=600))
  assert len(out) == 1
  r = out[0]
  assert r["benchmark"] == "rl_iteration" and r["rollouts"] == 32 and "trl" not in r
  assert r["slots_supported"] and r["packing_supported"]
  if importlib.util.find_spec("transformers") is not None:
    assert r["hf_logits_max_abs_diff"] < 1e-4  # Same logits: the weights TRL would get.
  assert r["ours"] == "ours_slots_packed" and "ours_slots" not in r
  assert 0 < r["ours_slots_packed"]["packed_real_token_fraction"] <= 1
  assert "packed_real_token_fraction" not in r["ours_fixed_batch"]
  # One update per iteration: the old log-probs are the update's own on every variant; the
  # reference pass runs only where the KL is monitored (TRL at beta 0 runs none).
  assert r["scoring_passes"] == {"fixed_batch": {"old_logp": False, "ref_logp": False},
                                 "slots_packed": {"old_logp": False, "ref_logp": False},
                                 "slots_packed_kl": {"old_logp": False, "ref_logp": True}}
  for name in variants:
    s = r[f"ours_{name}"]
    assert len(s["rounds_s"]) == 1 and s["seconds"] > 0 and s["first_call_s"] > 0
    lengths = s["lengths"]
    # EOS is possible from column min_new_tokens on (length 9), and the hazard makes some rows
    # end well before the 32-token limit.
    assert 9 <= lengths["min"] and lengths["max"] <= 32 and lengths["median"] < 32
    assert s["padding_fraction"] == pytest.approx(1 - s["generated_tokens"] / (32 * 32),
                                                  abs=1e-3)
    assert s["new_tokens_per_s"] == pytest.approx(s["generated_tokens"] / s["seconds"],
                                                  rel=1e-2)


def test_packed_pairs_quick_measures_every_layout_at_equal_loss(hh_rlhf_path):
  out = _json_lines(run_python(["benchmarks/packed_pairs.py", "--quick", "--path",
                                str(hh_rlhf_path)], timeout=600))
  layouts = {"dpo_precomputed": ["padded", "padded_shared", "packed", "packed_shared"],
             "dpo_model": ["padded", "padded_shared", "packed", "packed_shared"],
             "reward": ["padded", "packed", "packed_shared"]}
  rows = [r for r in out if not r.get("summary")]
  assert [(r["step"], r["layout"]) for r in rows] == [(s, l) for s, ls in layouts.items()
                                                      for l in ls]
  for r in rows:
    assert r["pairs"] == 8 and r["pairs_per_s"] > 0 and r["xla_flops_per_step"] > 0
    assert 0 < r["real_token_fraction"] <= 1 and 0 < r["fraction_of_matmul_peak"]
    # One fraction per timed step, each between the peaks taken just before and after it.
    fractions = r["fractions_of_adjacent_peaks"]
    assert len(r["adjacent_peaks_gflops"]) == len(fractions) + 1 >= 2
    assert abs(np.median(fractions) - r["fraction_of_matmul_peak"]) <= 1e-3
    if r["layout"].startswith("packed"):
      assert r["packing"]["rows"] >= 1 and r["packing"]["length"] % 128 == 0
      assert ("loss_tokens" in r["packing"]) == r["step"].startswith("dpo")
    if r["layout"] != "padded":  # The same pairs, the same first-step loss.
      assert r["first_loss_rel_diff_vs_padded"] < 1e-4
      assert r["speedup_vs_padded"] > 0
  summaries = [r for r in out if r.get("summary")]
  assert [r["step"] for r in summaries] == list(layouts)
  for r in summaries:
    assert r["losses_equal"] and isinstance(r["target_met"], bool)


def test_sampler_quick_long_tail_and_budget_sweep():
  """Ours only (CI: transformers' side runs in the full benchmark): every variant samples the
  long-tailed policy; the budget sweep gives every row the same response under both budgets."""
  out = _json_lines(run_python(["benchmarks/sampler.py", "--quick", "--no-hf", "--n-layers",
                                "1", "--slots", "4"], timeout=600))
  assert len(out) == 1
  r = out[0]
  assert r["benchmark"] == "sampler" and r["rollouts"] == 32
  assert sorted(r["long_tail"]) == ["fixed_batch", "slots_4"] and r["best_slots"] == "slots_4"
  for s in r["long_tail"].values():
    assert 9 <= s["lengths"]["min"] and s["lengths"]["max"] <= 48
    assert s["new_tokens_per_s"] == pytest.approx(s["generated_tokens"] / s["seconds"],
                                                  rel=1e-2)
  sweep = r["budget_sweep"]["by_max_new_tokens"]
  assert sorted(sweep) == ["32", "64"]
  for row in sweep.values():  # 32 rows of exactly 16 tokens (EOS at column 15).
    assert row["fixed_batch"]["generated_tokens"] == row["slots_4"]["generated_tokens"] == 512
