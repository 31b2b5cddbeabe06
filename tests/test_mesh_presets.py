"""Mesh presets tested for equality (in a subprocess with 8 simulated CPU devices): the loss
curves of 5 reward-model, DPO and PPO steps on one device and on meshes 2x4, 8x1 and 4x2 under
the data-parallel (replicated), fsdp and fsdp_tensor presets agree within 1e-5 relative (the
PPO steps on packed rollouts too, on one device and two meshes, equal to the padded ones); and
the compiled FSDP step's HLO gathers params and reduces gradients to shards."""
import json

import numpy as np
import pytest

from conftest import run_python


@pytest.fixture(scope="module")
def report():
  out = run_python(["tests/helpers/mesh_equality.py"], timeout=900)
  return json.loads(out.strip().splitlines()[-1])


def test_loss_curves_agree_on_every_mesh_and_preset(report):
  ref = {c["kind"]: np.asarray(c["losses"]) for c in report["cases"] if c["preset"] == "single"}
  assert sorted(ref) == ["dpo", "ppo", "ppo_packed", "rm"]
  # Packed rollouts give the padded PPO steps' losses.
  np.testing.assert_allclose(ref["ppo_packed"], ref["ppo"], rtol=1e-5)
  seen = set()
  for case in report["cases"]:
    losses = np.asarray(case["losses"])
    assert losses.shape == (5,) and np.isfinite(losses).all(), case
    rel = np.max(np.abs(losses - ref[case["kind"]]) / np.abs(ref[case["kind"]]))
    assert rel <= 1e-5, (case, rel)
    seen.add((case["kind"], case["preset"], tuple(case["mesh"])))
  assert len(seen) == 3 * (1 + 3 * 3) + 3
  for kind, curve in ref.items():  # The steps really train: the curve is not flat.
    assert np.ptp(curve) > 1e-3, (kind, curve)


def test_fsdp_step_all_gathers_params_and_reduces_grads_to_shards(report):
  for kind in ("rm", "dpo", "ppo"):
    fsdp, replicated = report["hlo"][f"{kind}/fsdp"], report["hlo"][f"{kind}/replicated"]
    n = fsdp["sharded_params"]
    assert n >= fsdp["param_leaves"] // 2, fsdp  # Most params are split over fsdp = 4.
    # Each sharded param is gathered for the forward pass and again for the backward pass
    # (or kept): at least once, at most a few times each.
    assert n <= fsdp["all_gather"] <= 4 * n, fsdp
    # Gradients: a reduce-scatter per sharded param, which XLA:CPU writes as an all-reduce of
    # the full gradient followed by a dynamic-slice to the shard: every sharded param's
    # gradient is reduced whole (at least its element count goes through all-reduces) and
    # then sliced to the local shard.
    if not fsdp["reduce_scatter"]:
      assert fsdp["all_reduced_elements"] >= fsdp["sharded_param_elements"], fsdp
      assert fsdp["dynamic_slice"] >= n, fsdp
    # Data parallelism has nothing to gather: params are whole on every device.
    # (A few all-gathers of batch-sharded activations may remain, never one per param.)
    assert replicated["sharded_params"] == 0, replicated
    assert replicated["all_gather"] < n <= fsdp["all_gather"], (replicated, fsdp)
    assert replicated["all_reduce"] > 0, replicated
