"""Logits parity with transformers (import and export) and the HF loader's errors."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from hf_fixtures import HF_VARIANTS, VOCAB, hf_logits, make_hf_model
from rlhf_jax import models
from rlhf_jax.parallel import init_params

LENGTHS = (12, 7, 3)  # Rows of a padded batch of width 12.


@pytest.fixture(scope="module", params=sorted(HF_VARIANTS))
def hf_checkpoint(request, tmp_path_factory):
  model = make_hf_model(request.param)
  path = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(path)
  return request.param, model, path


def _padded_batch(side: str, seed: int = 0):
  rng = np.random.RandomState(seed)
  width = max(LENGTHS)
  seqs = [rng.randint(3, VOCAB, size=n) for n in LENGTHS]
  ids = np.zeros((len(seqs), width), np.int32)
  mask = np.zeros_like(ids)
  for i, s in enumerate(seqs):
    start = width - len(s) if side == "left" else 0
    ids[i, start:start + len(s)] = s
    mask[i, start:start + len(s)] = 1
  return seqs, ids, mask


@pytest.mark.parametrize("side", ["right", "left"])
def test_logits_match_transformers_with_padding(hf_checkpoint, side):
  name, hf_model, path = hf_checkpoint
  module, params = models.load_hf(path)
  seqs, ids, mask = _padded_batch(side)
  logits = np.asarray(jax.jit(module.apply)({"params": params}, ids, mask))
  for row, seq in enumerate(seqs):
    real = np.flatnonzero(mask[row])
    ref = hf_logits(hf_model, seq)  # The unpadded sequence alone is the reference.
    np.testing.assert_allclose(logits[row, real], ref, atol=1e-4, rtol=0, err_msg=name)


def test_unpadded_batch_matches_transformers(hf_checkpoint):
  name, hf_model, path = hf_checkpoint
  module, params = models.load_hf(path)
  ids = np.random.RandomState(1).randint(3, VOCAB, size=(2, 16)).astype(np.int32)
  logits = np.asarray(module.apply({"params": params}, ids))
  for row in range(2):
    np.testing.assert_allclose(logits[row], hf_logits(hf_model, ids[row]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(HF_VARIANTS))
def test_export_round_trip(name, tmp_path):
  hf_cfg = HF_VARIANTS[name][0](**HF_VARIANTS[name][1])
  cfg = models.config_from_hf(hf_cfg.to_dict())
  module = models.build_model(cfg)
  ids = np.random.RandomState(2).randint(3, VOCAB, size=(2, 10)).astype(np.int32)
  params = init_params(module, jax.random.key(7), ids)
  ours = np.asarray(module.apply({"params": params}, ids))
  models.save_hf(module, params, tmp_path)
  loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  for row in range(2):
    np.testing.assert_allclose(ours[row], hf_logits(loaded, ids[row]), atol=1e-4, rtol=0)
  # And back into our tree, bit for bit.
  module2, params2 = models.load_hf(tmp_path)
  assert module2.cfg == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_sharded_export_writes_an_index(tmp_path):
  name = "llama_gqa_untied"
  cfg = models.config_from_hf(HF_VARIANTS[name][0](**HF_VARIANTS[name][1]).to_dict())
  module = models.build_model(cfg)
  ids = np.ones((1, 4), np.int32)
  params = init_params(module, jax.random.key(3), ids)
  models.save_hf(module, params, tmp_path, max_shard_bytes=40_000)
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 2
  loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  np.testing.assert_allclose(np.asarray(module.apply({"params": params}, ids))[0],
                             hf_logits(loaded, ids[0]), atol=1e-4, rtol=0)
  _, params2 = models.load_hf(tmp_path)
  jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_reward_role_reads_sequence_classification_score(tmp_path):
  hf_model = make_hf_model("qwen2", cls=transformers.AutoModelForSequenceClassification,
                           num_labels=1, pad_token_id=0)
  hf_model.save_pretrained(tmp_path)
  module, params = models.load_hf(tmp_path, role="reward")
  _, ids, mask = _padded_batch("right")
  ours = np.asarray(module.apply({"params": params}, ids, mask))
  import torch
  for row, n in enumerate(LENGTHS):
    with torch.no_grad():
      ref = hf_model(torch.as_tensor(ids[row:row + 1, :n], dtype=torch.long)).logits[0, 0]
    np.testing.assert_allclose(ours[row], ref.numpy(), atol=1e-4, rtol=0)


def test_bfloat16_checkpoint_loads_as_float32_params(tmp_path):
  import torch
  make_hf_model("llama_gqa_untied").to(torch.bfloat16).save_pretrained(tmp_path)
  module, params = models.load_hf(tmp_path, dtype=jnp.bfloat16)
  assert module.cfg.dtype == "bfloat16"
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  logits = module.apply({"params": params}, np.ones((1, 5), np.int32))
  assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())


# ------------------------------------------------------------------------------- errors

@pytest.fixture()
def llama_dir(tmp_path):
  make_hf_model("llama_gqa_untied").save_pretrained(tmp_path / "m")
  return tmp_path / "m"


def test_error_missing_config(llama_dir):
  (llama_dir / "config.json").unlink()
  with pytest.raises(models.HFCheckpointError, match=r"config.json: missing"):
    models.load_hf(llama_dir)


def test_error_missing_weights(llama_dir):
  (llama_dir / "model.safetensors").unlink()
  with pytest.raises(models.HFCheckpointError, match=r"no model.safetensors"):
    models.load_hf(llama_dir)


def test_error_missing_directory(tmp_path):
  with pytest.raises(models.HFCheckpointError, match="not a directory"):
    models.load_hf(tmp_path / "nowhere")


def test_error_missing_shard(llama_dir, tmp_path):
  module, params = models.load_hf(llama_dir)
  out = tmp_path / "sharded"
  models.save_hf(module, params, out, max_shard_bytes=40_000)
  next(out.glob("model-00002-*.safetensors")).unlink()
  with pytest.raises(models.HFCheckpointError, match=r"lists shard model-00002"):
    models.load_hf(out)


def test_error_missing_tensor(llama_dir, tmp_path):
  from safetensors.numpy import load_file, save_file
  tensors = load_file(llama_dir / "model.safetensors")
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, llama_dir / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(models.HFCheckpointError,
                     match=r"'model.layers.1.mlp.up_proj.weight' is missing"):
    models.load_hf(llama_dir)


def test_error_unsupported_architecture(llama_dir):
  cfg = json.loads((llama_dir / "config.json").read_text())
  cfg.update(model_type="bert", architectures=["BertModel"])
  (llama_dir / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(models.HFCheckpointError, match=r"unsupported architecture model_type='bert'"):
    models.load_hf(llama_dir)


def test_error_shape_mismatch_names_tensor_and_shapes(llama_dir):
  cfg = json.loads((llama_dir / "config.json").read_text())
  cfg["intermediate_size"] = 128  # The file holds 96-wide MLP weights.
  (llama_dir / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(models.HFCheckpointError) as err:
    models.load_hf(llama_dir)
  msg = str(err.value)
  assert "model.layers.0.mlp.gate_proj.weight" in msg
  assert "(96, 64)" in msg and "(64, 128)" in msg, msg


def test_error_unsupported_rope_type(llama_dir):
  cfg = json.loads((llama_dir / "config.json").read_text())
  cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}
  (llama_dir / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(models.HFCheckpointError, match="rope type 'yarn'"):
    models.load_hf(llama_dir)


def test_save_hf_refuses_value_role_before_writing(tmp_path):
  """A per-token critic has no HF class; the refusal comes before any file is written."""
  cfg = models.get_config("tiny", n_layers=1, d_model=32, n_heads=2, mlp_dim=64, vocab_size=64)
  module = models.build_model(cfg, "value")
  params = init_params(module, jax.random.key(0), np.ones((1, 4), np.int32))
  with pytest.raises(models.HFCheckpointError, match="role 'value'"):
    models.save_hf(module, params, tmp_path / "out")
  assert not (tmp_path / "out").exists()
