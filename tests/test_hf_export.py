"""save_hf beyond float32 causal LMs: reward models as *ForSequenceClassification, a policy with
a value head, bfloat16 checkpoints, generation_config.json, and the refusals.

Each export is checked against transformers itself (the consumer of the files) and read back
with load_hf.
"""
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import torch
import transformers

from hf_fixtures import (ARCH_VARIANTS, VOCAB, hf_logits, make_hf_model, our_config,
                         random_params, right_padded)
from rlhf_jax import models
from rlhf_jax.models.hf import hf_tensors

# The tokenizer's ids. PAD is below every random token (right_padded draws from [3, VOCAB)),
# so transformers' "last token that is not pad" is our last real token.
IDS = dict(bos=1, eos=2, pad=0)
LENGTHS = (12, 7, 3, 1)


def _scores(module, params, ids, mask) -> np.ndarray:
  return np.asarray(module.apply({"params": params}, ids, mask))


def _reward_params(module, seed=0):
  """Random reward params whose head looks like a normalised one: a dense kernel giving
  scores of a few units and a clearly non-zero bias (the reward stage folds (r - mean) / std
  into both)."""
  params = random_params(module, seed)
  head = params["reward_head"]
  kernel = 0.5 * jax.random.normal(jax.random.key(seed + 1), head["kernel"].shape)
  return {**params, "reward_head": {"kernel": kernel.astype(jnp.float32),
                                    "bias": jnp.full((1,), -0.37, jnp.float32)}}


def _stored_names_and_dtypes(path) -> dict[str, str]:
  with safetensors.safe_open(str(path / "model.safetensors"), framework="numpy") as f:
    return {name: f.get_slice(name).get_dtype() for name in f.keys()}


# ------------------------------------------------------------------------ reward models

@pytest.mark.parametrize("arch", sorted(ARCH_VARIANTS))
def test_reward_export_matches_sequence_classification(arch, tmp_path):
  cfg = our_config(ARCH_VARIANTS[arch])
  module = models.build_model(cfg, "reward")
  params = _reward_params(module)
  ids, mask = right_padded(LENGTHS, IDS["pad"])
  ours = _scores(module, params, ids, mask)

  models.save_hf(module, params, tmp_path, special_ids=IDS)
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["pad_token_id"] == IDS["pad"]
  assert config[models.SCORE_BIAS_KEY] == pytest.approx(-0.37)
  stored = _stored_names_and_dtypes(tmp_path)
  assert "score.weight" in stored and "lm_head.weight" not in stored
  assert not (tmp_path / "generation_config.json").exists()  # Not a generative model.

  hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
  assert type(hf).__name__.endswith("ForSequenceClassification") and hf.config.num_labels == 1
  with torch.no_grad():
    logits = hf(input_ids=torch.as_tensor(ids, dtype=torch.long),
                attention_mask=torch.as_tensor(mask, dtype=torch.long)).logits
  theirs = logits[:, 0].numpy() + hf.config.score_bias
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0, err_msg=arch)

  # Back into our tree: the same params (bias included) and so the same scores, exactly.
  module2, params2 = models.load_hf(tmp_path, role="reward")
  jax.tree.map(np.testing.assert_array_equal, params2, params)
  np.testing.assert_array_equal(_scores(module2, params2, ids, mask), ours)


def test_reward_export_read_as_value_head(tmp_path):
  """A reward checkpoint can initialise a critic: score.weight and score_bias -> value head."""
  cfg = our_config(ARCH_VARIANTS["llama"])
  module = models.build_model(cfg, "reward")
  params = _reward_params(module)
  models.save_hf(module, params, tmp_path, special_ids=IDS)
  _, value = models.load_hf(tmp_path, role="value")
  jax.tree.map(np.testing.assert_array_equal, value["value_head"], params["reward_head"])


def test_transformers_reward_checkpoint_has_zero_bias(tmp_path):
  """A *ForSequenceClassification saved by transformers has no score_bias: our head bias is 0."""
  make_hf_model("qwen2", cls=transformers.AutoModelForSequenceClassification, num_labels=1,
                pad_token_id=0).save_pretrained(tmp_path)
  _, params = models.load_hf(tmp_path, role="reward")
  np.testing.assert_array_equal(params["reward_head"]["bias"], np.zeros((1,), np.float32))


def test_reward_checkpoint_as_policy_is_refused_unless_tied(tmp_path):
  untied = models.build_model(our_config(ARCH_VARIANTS["llama"]), "reward")
  models.save_hf(untied, _reward_params(untied), tmp_path / "untied", special_ids=IDS)
  with pytest.raises(models.HFCheckpointError,
                     match=r"sequence-classification checkpoint .* no LM head for role "
                           r"'policy'; load it with role='reward'"):
    models.load_hf(tmp_path / "untied", role="policy")
  # Tied embeddings: the token embedding is the LM head, so the policy is fully defined.
  tied = models.build_model(our_config(ARCH_VARIANTS["gpt2"]), "reward")
  params = _reward_params(tied)
  models.save_hf(tied, params, tmp_path / "tied", special_ids=IDS)
  _, policy = models.load_hf(tmp_path / "tied", role="policy")
  jax.tree.map(np.testing.assert_array_equal, policy["backbone"], params["backbone"])


# ------------------------------------------------------------------------ policy + value head

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_policy_value_exports_the_causal_lm(arch, tmp_path, caplog):
  cfg = our_config(ARCH_VARIANTS[arch])
  module = models.build_model(cfg, "policy_value")
  params = random_params(module)
  assert float(jnp.abs(params["value_head"]["kernel"]).sum()) > 0
  ids = np.random.RandomState(3).randint(3, VOCAB, size=(2, 10)).astype(np.int32)
  logits, _ = module.apply({"params": params}, ids)

  caplog.set_level(logging.INFO)
  models.save_hf(module, params, tmp_path, special_ids=IDS)
  assert "value head is not exported" in caplog.text
  assert not any("value" in name for name in _stored_names_and_dtypes(tmp_path))

  hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  for row in range(2):
    np.testing.assert_allclose(np.asarray(logits[row]), hf_logits(hf, ids[row]), atol=1e-4,
                               rtol=0, err_msg=arch)
  _, policy = models.load_hf(tmp_path, role="policy")
  without_value = {k: v for k, v in params.items() if k != "value_head"}
  jax.tree.map(np.testing.assert_array_equal, policy, without_value)
  # As a PPO policy again: the LM as exported, a fresh (zero) value head.
  _, again = models.load_hf(tmp_path, role="policy_value")
  jax.tree.map(np.testing.assert_array_equal, {k: again[k] for k in without_value},
               without_value)
  assert not any(np.any(x) for x in jax.tree.leaves(again["value_head"]))


# ------------------------------------------------------------------------ bfloat16

def _bf16(x) -> np.ndarray:
  """float32 -> bfloat16 -> float32 as torch rounds (nearest even): the reference rounding."""
  return torch.from_numpy(np.array(x, np.float32)).to(torch.bfloat16).float().numpy()


def test_bfloat16_export(tmp_path):
  cfg = our_config(ARCH_VARIANTS["llama"])
  module = models.build_model(cfg)
  params = random_params(module)
  models.save_hf(module, params, tmp_path, dtype="bfloat16", special_ids=IDS)

  assert set(_stored_names_and_dtypes(tmp_path).values()) == {"BF16"}
  assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
  assert models.source_dtype(tmp_path) == "bfloat16"

  hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
  state = hf.state_dict()
  reference = dict(hf_tensors(module, params))  # float32, HF layout.
  assert set(reference) <= set(state)
  for name, value in reference.items():
    assert state[name].dtype == torch.bfloat16, name
    np.testing.assert_array_equal(state[name].float().numpy(), _bf16(value), err_msg=name)

  _, loaded = models.load_hf(tmp_path)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(loaded))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, _bf16(b)), loaded, params)


def test_float32_export_is_float32(tmp_path):
  module = models.build_model(our_config(ARCH_VARIANTS["qwen2"]))
  models.save_hf(module, random_params(module), tmp_path)
  assert set(_stored_names_and_dtypes(tmp_path).values()) == {"F32"}
  assert models.source_dtype(tmp_path) == "float32"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_source_dtype_of_transformers_checkpoints(dtype, tmp_path):
  name = str(dtype).removeprefix("torch.")
  make_hf_model("qwen2").to(dtype).save_pretrained(tmp_path)
  assert models.source_dtype(tmp_path) == name
  # transformers v4 wrote "torch_dtype"; older configs name none (the header decides).
  config = json.loads((tmp_path / "config.json").read_text())
  config.pop("dtype", None)
  (tmp_path / "config.json").write_text(json.dumps(dict(config, torch_dtype=name)))
  assert models.source_dtype(tmp_path) == name
  config.pop("torch_dtype", None)
  (tmp_path / "config.json").write_text(json.dumps(config))
  assert models.source_dtype(tmp_path) == name
  # Whatever is stored, our params are float32 master weights.
  _, params = models.load_hf(tmp_path)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))


# ------------------------------------------------------------------------ special ids

def test_generation_config_carries_the_tokenizer_ids(tmp_path):
  cfg = our_config(ARCH_VARIANTS["llama"])
  module = models.build_model(cfg)
  ids = dict(bos=5, eos=6, pad=7)
  models.save_hf(module, random_params(module), tmp_path, special_ids=ids)
  config = json.loads((tmp_path / "config.json").read_text())
  assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (5, 6, 7)
  generation = transformers.GenerationConfig.from_pretrained(tmp_path)
  assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (5, 6, 7)
  assert generation.do_sample is True
  hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
  assert hf.generation_config.pad_token_id == 7
  # And the ids travel back into ModelConfig.
  module2, _ = models.load_hf(tmp_path)
  assert (module2.cfg.bos_token_id, module2.cfg.eos_token_id, module2.cfg.pad_token_id) == (5, 6, 7)


def test_reexport_removes_stale_checkpoint_files(tmp_path):
  """A sharded export followed by a single-file reward export to the same directory: the old
  index (which load_hf prefers), shards and generation_config.json go."""
  cfg = our_config(ARCH_VARIANTS["llama"])
  policy = models.build_model(cfg)
  models.save_hf(policy, random_params(policy), tmp_path, max_shard_bytes=40_000)
  assert (tmp_path / "model.safetensors.index.json").exists()
  reward = models.build_model(cfg, "reward")
  params = _reward_params(reward)
  models.save_hf(reward, params, tmp_path, special_ids=IDS)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
  _, loaded = models.load_hf(tmp_path, role="reward")
  jax.tree.map(np.testing.assert_array_equal, loaded, params)


# ------------------------------------------------------------------------ refusals

def test_refuses_value_role(tmp_path):
  module = models.build_model(our_config(ARCH_VARIANTS["llama"]), "value")
  with pytest.raises(models.HFCheckpointError, match=r"role 'value' .* no transformers "
                                                     r"equivalent"):
    models.save_hf(module, random_params(module), tmp_path / "out")
  assert not (tmp_path / "out").exists()


def test_refuses_stacked_ensemble(tmp_path):
  module = models.build_model(our_config(ARCH_VARIANTS["llama"]), "reward")
  members = [_reward_params(module, seed) for seed in (0, 1)]
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *members)
  with pytest.raises(models.HFCheckpointError,
                     match=r"stacked ensemble of 2 members .* export member by member"):
    models.save_hf(module, stacked, tmp_path / "out", special_ids=IDS)
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", ["float16", "int8", "fp8", jnp.float16])
def test_refuses_unsupported_dtype(dtype, tmp_path):
  module = models.build_model(our_config(ARCH_VARIANTS["gpt2"]))
  with pytest.raises(models.HFCheckpointError, match=r"dtype=.* is not supported"):
    models.save_hf(module, random_params(module), tmp_path / "out", dtype=dtype)
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("special_ids, match", [
    (dict(pad=VOCAB), r"pad=96 is not a token id"),
    (dict(eos=None), r"eos=None is not a token id"),
    (dict(unk=3), r"unknown key\(s\) \['unk'\]"),
])
def test_refuses_bad_special_ids(special_ids, match, tmp_path):
  module = models.build_model(our_config(ARCH_VARIANTS["gpt2"]))
  with pytest.raises(models.HFCheckpointError, match=match):
    models.save_hf(module, random_params(module), tmp_path / "out", special_ids=special_ids)
