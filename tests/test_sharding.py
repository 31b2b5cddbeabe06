"""Sharded vs single-device numerics on a simulated 8-device CPU mesh (in a subprocess)."""
import json

import pytest

from conftest import run_python
from rlhf_jax.parallel import mesh_shape


@pytest.fixture(scope="module")
def report():
  out = run_python(["tests/helpers/sharded_equivalence.py"])
  return json.loads(out.strip().splitlines()[-1])


def test_every_preset_matches_single_device(report):
  assert len(report["cases"]) == 5
  for case in report["cases"]:
    assert case["init_rel"] == 0.0, case  # Sharded init draws the very same numbers.
    assert case["loss_rel"] <= 1e-5, case
    assert case["grad_rel"] <= 1e-5, case
    assert case["grads_keep_param_sharding"], case
    assert case["batch_spec"] == "P(('data', 'fsdp'), None)", case


def test_params_are_really_sharded(report):
  by = {(c["preset"], tuple(c["mesh"].values())): c for c in report["cases"]}
  fsdp = by[("fsdp", (2, 4, 1))]
  assert fsdp["q_kernel_spec"] == "P('fsdp', None)"
  assert fsdp["q_kernel_shard_shape"] == [16, 64]
  tensor = by[("fsdp_tensor", (1, 2, 4))]
  assert tensor["q_kernel_spec"] == "P('fsdp', 'tensor')"
  assert tensor["q_kernel_shard_shape"] == [32, 16]
  assert tensor["embedding_spec"] == "P('tensor', 'fsdp')"
  assert by[("fsdp", (1, 8, 1))]["q_kernel_shard_shape"] == [8, 64]
  assert by[("replicated", (8, 1, 1))]["q_kernel_shard_shape"] == [64, 64]


def test_mesh_shape_resolution_and_errors():
  assert mesh_shape({"data": -1}, 8) == (8, 1, 1)
  assert mesh_shape({"data": 2, "tensor": -1}, 8) == (2, 1, 4)
  assert mesh_shape((1, -1, 2), 8) == (1, 4, 2)
  with pytest.raises(ValueError, match="unknown mesh axes"):
    mesh_shape({"model": 2}, 8)
  with pytest.raises(ValueError, match="at most one axis may be -1"):
    mesh_shape({"data": -1, "fsdp": -1}, 8)
  with pytest.raises(ValueError, match="needs 6 devices, but 8 are available"):
    mesh_shape({"data": 2, "fsdp": 3}, 8)
  with pytest.raises(ValueError, match="not divisible"):
    mesh_shape({"fsdp": 3, "data": -1}, 8)


LOAD_ON_MESH = """
import json, sys, jax, numpy as np
from rlhf_jax import models, parallel
mesh = parallel.make_mesh({"fsdp": 2, "tensor": 4})
module, sharded = models.load_hf(sys.argv[1], mesh=mesh, rules="fsdp_tensor")
_, plain = models.load_hf(sys.argv[1])
same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(plain)))
k = sharded["backbone"]["block_0"]["mlp"]["gate"]["kernel"]
print(json.dumps({"devices": jax.device_count(), "same": same, "spec": str(k.sharding.spec),
                  "shard": list(k.addressable_shards[0].data.shape), "shape": list(k.shape)}))
"""


def test_load_hf_places_tensors_on_mesh(tmp_path):
  from hf_fixtures import make_hf_model
  make_hf_model("llama_gqa_untied").save_pretrained(tmp_path)
  out = run_python(["-c", LOAD_ON_MESH, str(tmp_path)],
                   env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  got = json.loads(out.strip().splitlines()[-1])
  assert got == {"devices": 8, "same": True, "spec": "P('fsdp', 'tensor')", "shard": [32, 24],
                 "shape": [64, 96]}
