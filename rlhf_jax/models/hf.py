"""Hugging Face interop: local safetensors checkpoints <-> our parameter trees.

Supported architectures: GPT-2, Llama and Qwen2, as causal LMs (`GPT2LMHeadModel`,
`LlamaForCausalLM`, `Qwen2ForCausalLM`) and as `*ForSequenceClassification` with one label
(reward models). Only files on disk are read: no hub access, no torch.

Roles on export (`save_hf`):
  policy, reference  -> *ForCausalLM.
  policy_value       -> *ForCausalLM; the value head is dropped (a training-time critic that no
                        HF class holds), also from policy_value params given with a policy
                        module.
  reward             -> *ForSequenceClassification, num_labels=1, `score.weight` = our head's
                        kernel, no lm_head.
  value              -> refused (a per-token critic has no HF equivalent).

The reward bias. transformers' `score` layer has no bias, ours does (zero after Bradley-Terry
training, but the reward stage folds r' = (r - mean) / std into kernel *and* bias). The bias is
stored in config.json as `score_bias` (SCORE_BIAS_KEY), so for an exported reward model

    our reward = transformers' logits[:, 0] + config.score_bias

`load_hf(role="reward")` (or "value") reads it back into the head's bias (0 when absent, as in
checkpoints transformers wrote). transformers reads the score at the last token that is not
`pad_token_id`, we at the last token of the attention mask: the two read the same token when
no real token equals the pad id, which is why the exported config carries the tokenizer's real
pad id (`special_ids`). A tokenizer that pads with its EOS token (GPT-2's habit) makes
transformers skip a trailing EOS that our reward reads: give such a reward model a distinct pad
id. (Left-padded GPT-2 also needs position_ids = cumsum(mask) - 1 on the transformers side,
which otherwise numbers slots, not tokens, in its learned position table; RoPE is shift
invariant, and right padding needs nothing.)

Dtypes. Params we load are float32 master weights whatever the checkpoint stores (bfloat16 and
float16 files are upcast); the compute dtype is `load_hf(dtype=...)`. `source_dtype` tells a
caller what the checkpoint stored, e.g. to export in the same dtype with
`save_hf(dtype=...)`, which writes "float32" or "bfloat16" tensors (never float16: we compute
in float32 or bfloat16 only).
"""
import json
import os
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from absl import logging

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.model import build_model
from rlhf_jax.models.transformer import Transformer
from rlhf_jax.parallel import sharding as sharding_lib

SUPPORTED = ("gpt2", "llama", "qwen2")
_HF_ARCH = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_HF_SEQ_CLS_ARCH = {"gpt2": "GPT2ForSequenceClassification",
                    "llama": "LlamaForSequenceClassification",
                    "qwen2": "Qwen2ForSequenceClassification"}
# config.json key of the reward head's bias, which transformers' bias-free `score` cannot hold.
SCORE_BIAS_KEY = "score_bias"
# Stored dtypes save_hf writes, and those source_dtype reports (float16 is only ever read).
EXPORT_DTYPES = ("float32", "bfloat16")
SOURCE_DTYPES = ("float32", "bfloat16", "float16")
_SAFETENSORS_FLOAT = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
_CAUSAL_ROLES = ("policy", "reference", "policy_value")
# Buffers that old GPT-2 checkpoints store next to the weights; not parameters.
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


class HFCheckpointError(ValueError):
  """A local HF checkpoint that cannot be read into (or written from) our models."""


# ---------------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# ---------------------------------------------------------------------------------------------

def _rope(hf: dict[str, Any], path) -> tuple[float, tuple | None]:
  """(rope_theta, rope_scaling) from a v4 (rope_theta/rope_scaling) or v5 (rope_parameters)."""
  params = dict(hf.get("rope_parameters") or {})
  scaling = dict(hf.get("rope_scaling") or {})
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  merged = {**scaling, **params}
  kind = merged.get("rope_type", merged.get("type", "default"))
  if kind == "default":
    return float(theta), None
  if kind != "llama3":
    raise HFCheckpointError(f"{path}: rope type {kind!r} is not supported (default, llama3)")
  keys = ("factor", "high_freq_factor", "low_freq_factor", "original_max_position_embeddings")
  return float(theta), tuple((k, float(merged[k])) for k in keys)


def config_from_hf(hf: dict[str, Any], path="config.json", dtype=None) -> ModelConfig:
  """A ModelConfig from the dict of an HF config.json."""
  arch = hf.get("model_type")
  if arch not in SUPPORTED:
    raise HFCheckpointError(f"{path}: unsupported architecture model_type={arch!r} "
                            f"(architectures={hf.get('architectures')}); supported: {SUPPORTED}")
  common = dict(vocab_size=hf["vocab_size"], bos_token_id=hf.get("bos_token_id"),
                eos_token_id=_first(hf.get("eos_token_id"), 0),
                pad_token_id=_first(hf.get("pad_token_id"), _first(hf.get("eos_token_id"), 0)))
  if dtype is not None:
    common["dtype"] = jnp.dtype(dtype).name
  if arch == "gpt2":
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
      raise HFCheckpointError(f"{path}: GPT-2 activation_function={act!r} is not supported "
                              "(gelu_new)")
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
      raise HFCheckpointError(f"{path}: GPT-2 attention scaling variants are not supported")
    d = hf["n_embd"]
    return ModelConfig(arch="gpt2", d_model=d, n_layers=hf["n_layer"], n_heads=hf["n_head"],
                       mlp_dim=hf.get("n_inner") or 4 * d, max_len=hf["n_positions"],
                       norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                       tie_embeddings=hf.get("tie_word_embeddings", True), **common)
  if hf.get("hidden_act", "silu") != "silu":
    raise HFCheckpointError(f"{path}: hidden_act={hf.get('hidden_act')!r} is not supported (silu)")
  if hf.get("mlp_bias"):
    raise HFCheckpointError(f"{path}: mlp_bias=true is not supported")
  if arch == "llama" and hf.get("attention_bias"):
    raise HFCheckpointError(f"{path}: Llama attention_bias=true (with an o_proj bias) is not "
                            "supported")
  if arch == "qwen2" and hf.get("use_sliding_window"):
    raise HFCheckpointError(f"{path}: Qwen2 use_sliding_window=true is not supported")
  theta, scaling = _rope(hf, path)
  return ModelConfig(
      arch=arch, d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
      n_heads=hf["num_attention_heads"],
      n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
      head_dim=_explicit_head_dim(hf), mlp_dim=hf["intermediate_size"],
      max_len=hf.get("max_position_embeddings", 2048), norm_eps=hf.get("rms_norm_eps", 1e-6),
      rope_theta=theta, rope_scaling=scaling, qkv_bias=arch == "qwen2",
      tie_embeddings=hf.get("tie_word_embeddings", False), **common)


def _explicit_head_dim(hf) -> int | None:
  """head_dim when it differs from hidden_size / num_attention_heads, else None (derived)."""
  head_dim = hf.get("head_dim")
  return None if head_dim in (None, hf["hidden_size"] // hf["num_attention_heads"]) else head_dim


def _first(x, default):
  if isinstance(x, (list, tuple)):
    return x[0] if x else default
  return default if x is None else x


def config_to_hf(cfg: ModelConfig, *, role: str = "policy", dtype="float32",
                 special_ids: dict[str, int | None] | None = None,
                 score_bias: float = 0.0) -> dict[str, Any]:
  """The config.json dict that transformers reads back into an equivalent model.

  `role` picks the class: *ForCausalLM for policy / reference / policy_value, a one-label
  *ForSequenceClassification for reward (carrying `score_bias`, see the module docstring).
  `dtype` is the stored dtype of the tensors written next to it ("float32" or "bfloat16").
  `special_ids` (bos / eos / pad) override the placeholder ids ModelConfig carries.
  """
  kind = _export_kind(role)
  ids = _special_ids(cfg, special_ids)
  common = dict(model_type=cfg.arch, vocab_size=cfg.vocab_size,
                tie_word_embeddings=cfg.tie_embeddings, bos_token_id=ids["bos"],
                eos_token_id=ids["eos"], pad_token_id=ids["pad"],
                dtype=_export_dtype(dtype))
  if kind == "reward":
    # id2label, not num_labels: transformers derives num_labels from it and falls back to 2
    # labels when it is missing.
    common.update(architectures=[_HF_SEQ_CLS_ARCH[cfg.arch]], id2label={"0": "LABEL_0"},
                  label2id={"LABEL_0": 0}, **{SCORE_BIAS_KEY: float(score_bias)})
  else:
    common.update(architectures=[_HF_ARCH[cfg.arch]])
  if cfg.arch == "gpt2":
    if (cfg.n_kv_heads not in (None, cfg.n_heads)
        or cfg.head_dim not in (None, cfg.d_model // cfg.n_heads)):
      raise HFCheckpointError("GPT-2 export needs n_kv_heads == n_heads and head_dim == "
                              "d_model / n_heads")
    return dict(common, n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
                n_inner=cfg.mlp_dim, n_positions=cfg.max_len, layer_norm_epsilon=cfg.norm_eps,
                activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
  if cfg.arch == "llama" and cfg.qkv_bias:
    raise HFCheckpointError("a Llama config with qkv_bias has no transformers equivalent; use "
                            "arch='qwen2'")
  rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling is not None:
    rope = {**rope, "rope_type": "llama3", **dict(cfg.rope_scaling)}
    rope["original_max_position_embeddings"] = int(rope["original_max_position_embeddings"])
  out = dict(common, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim,
             num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
             num_key_value_heads=cfg.kv_heads, head_dim=cfg.head_size, hidden_act="silu",
             max_position_embeddings=cfg.max_len, rms_norm_eps=cfg.norm_eps,
             rope_parameters=rope, attention_bias=False, mlp_bias=False)
  if cfg.arch == "qwen2":
    out.update(use_sliding_window=False, sliding_window=None)
  return out


def _export_kind(role: str) -> str:
  """"causal" or "reward": the HF class family `role` is exported as; refuses the others."""
  if role in _CAUSAL_ROLES:
    return "causal"
  if role == "reward":
    return "reward"
  if role == "value":
    raise HFCheckpointError(
        "save_hf: role 'value' (a per-token critic) has no transformers equivalent; export "
        "the policy (role 'policy', or 'policy_value' whose value head is dropped) or the "
        "reward model (role 'reward')")
  raise HFCheckpointError(f"save_hf: unknown role {role!r}; expected one of "
                          f"{_CAUSAL_ROLES + ('reward',)}")


def _export_dtype(dtype) -> str:
  """The name ("float32" / "bfloat16") of a dtype save_hf may store tensors in."""
  try:
    name = jnp.dtype(dtype).name
  except TypeError:
    name = str(dtype)
  if name not in EXPORT_DTYPES:
    raise HFCheckpointError(f"save_hf: dtype={dtype!r} is not supported; expected one of "
                            f"{EXPORT_DTYPES} (float16 is read, never written: we compute in "
                            "float32 or bfloat16 only)")
  return name


def _special_ids(cfg: ModelConfig, special_ids: dict | None) -> dict[str, int | None]:
  """{bos, eos, pad}: `special_ids` over ModelConfig's (placeholder) ids, validated.

  eos and pad must be token ids of the vocabulary; bos may be None (Llama-style tokenizers
  without one exist, and transformers accepts a null bos_token_id).
  """
  ids = {"bos": cfg.bos_token_id, "eos": cfg.eos_token_id, "pad": cfg.pad_token_id}
  unknown = sorted(set(special_ids or {}) - set(ids))
  if unknown:
    raise HFCheckpointError(f"save_hf: special_ids has unknown key(s) {unknown}; expected some "
                            f"of {sorted(ids)}")
  ids.update(special_ids or {})
  for name, value in ids.items():
    if value is None and name == "bos":
      continue
    if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
        or not 0 <= value < cfg.vocab_size):
      raise HFCheckpointError(f"save_hf: special_ids {name}={value!r} is not a token id of "
                              f"the vocabulary [0, {cfg.vocab_size})")
    ids[name] = int(value)
  return ids


def generation_config_to_hf(cfg: ModelConfig,
                            special_ids: dict[str, int | None] | None = None) -> dict[str, Any]:
  """generation_config.json of an exported causal LM: the tokenizer's ids, sampling on.

  `GenerationConfig.from_pretrained` reads it; without it transformers derives one from
  config.json, whose ids would be right but whose decoding would be greedy, not the sampling
  our policies were trained (PPO) and evaluated with.
  """
  ids = _special_ids(cfg, special_ids)
  out = {"eos_token_id": ids["eos"], "pad_token_id": ids["pad"], "do_sample": True}
  if ids["bos"] is not None:
    out["bos_token_id"] = ids["bos"]
  return out


# ---------------------------------------------------------------------------------------------
# Tensor name plan: our parameter paths <-> HF tensor names
# ---------------------------------------------------------------------------------------------
# Each entry: (our path, HF name, layout). Layouts: "same"; "T" (torch nn.Linear [out, in]);
# "qkv:i" (GPT-2's fused c_attn, chunk i of 3 along the output axis).

def _plan(cfg: ModelConfig, role: str) -> list[tuple[tuple[str, ...], str, str]]:
  plan = []
  if cfg.arch == "gpt2":
    pre = "transformer."
    plan += [(("backbone", "embed", "embedding"), pre + "wte.weight", "same"),
             (("backbone", "wpe"), pre + "wpe.weight", "same")]
    for i in range(cfg.n_layers):
      b, h = ("backbone", f"block_{i}"), f"{pre}h.{i}."
      for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
        plan += [(b + (ours, "scale"), h + theirs + ".weight", "same"),
                 (b + (ours, "bias"), h + theirs + ".bias", "same")]
      for j, name in enumerate("qkv"):
        plan += [(b + ("attn", name, "kernel"), h + "attn.c_attn.weight", f"qkv:{j}"),
                 (b + ("attn", name, "bias"), h + "attn.c_attn.bias", f"qkv:{j}")]
      for ours, theirs in (("attn", "o"), ("mlp", "fc"), ("mlp", "proj")):
        hf_name = {"o": "attn.c_proj", "fc": "mlp.c_fc", "proj": "mlp.c_proj"}[theirs]
        plan += [(b + (ours, theirs, "kernel"), h + hf_name + ".weight", "same"),
                 (b + (ours, theirs, "bias"), h + hf_name + ".bias", "same")]
    plan += [(("backbone", "final_norm", "scale"), pre + "ln_f.weight", "same"),
             (("backbone", "final_norm", "bias"), pre + "ln_f.bias", "same")]
  else:
    plan.append((("backbone", "embed", "embedding"), "model.embed_tokens.weight", "same"))
    for i in range(cfg.n_layers):
      b, h = ("backbone", f"block_{i}"), f"model.layers.{i}."
      plan += [(b + ("attn_norm", "scale"), h + "input_layernorm.weight", "same"),
               (b + ("mlp_norm", "scale"), h + "post_attention_layernorm.weight", "same")]
      for name in "qkvo":
        plan.append((b + ("attn", name, "kernel"), h + f"self_attn.{name}_proj.weight", "T"))
        if cfg.qkv_bias and name != "o":
          plan.append((b + ("attn", name, "bias"), h + f"self_attn.{name}_proj.bias", "same"))
      for name in ("gate", "up", "down"):
        plan.append((b + ("mlp", name, "kernel"), h + f"mlp.{name}_proj.weight", "T"))
    plan.append((("backbone", "final_norm", "scale"), "model.norm.weight", "same"))
  if role in _CAUSAL_ROLES and not cfg.tie_embeddings:
    plan.append((("lm_head", "kernel"), "lm_head.weight", "T"))
  return plan


def _export_plan(cfg: ModelConfig, role: str) -> list[tuple[tuple[str, ...], str, str]]:
  """The tensors save_hf writes for `role`: the causal LM's, or the backbone plus the reward
  head's kernel as *ForSequenceClassification's `score` (its bias goes to config.json)."""
  if _export_kind(role) == "causal":
    return _plan(cfg, "policy")
  return _plan(cfg, "reward") + [(("reward_head", "kernel"), "score.weight", "T")]


def _to_ours(x: np.ndarray, layout: str) -> np.ndarray:
  if layout == "T":
    return x.T
  if layout.startswith("qkv:"):
    return np.split(x, 3, axis=-1)[int(layout[4:])]
  return x


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

class _TensorFiles:
  """Name -> tensor over a single or sharded (index.json) safetensors checkpoint."""

  def __init__(self, directory: pathlib.Path):
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if index.exists():
      weight_map = json.loads(index.read_text())["weight_map"]
      files = sorted(set(weight_map.values()))
    elif single.exists():
      files = [single.name]
    else:
      found = sorted(p.name for p in directory.iterdir())
      raise HFCheckpointError(f"{directory}: no model.safetensors or model.safetensors.index.json"
                              f" (found {found}); convert .bin checkpoints to safetensors first")
    self._where = {}
    self._handles = []
    for name in files:
      if not (directory / name).exists():
        raise HFCheckpointError(f"{index}: lists shard {name}, which is missing")
      handle = safetensors.safe_open(str(directory / name), framework="numpy")
      self._handles.append(handle)
      for key in handle.keys():
        self._where[key] = (handle, directory / name)

  def names(self) -> set[str]:
    return set(self._where)

  def ordered_names(self) -> list[str]:
    """Tensor names in file order, then each file's sorted names."""
    return [name for handle in self._handles for name in sorted(handle.keys())]

  def where(self, name: str) -> pathlib.Path:
    return self._where[name][1]

  def stored_dtype(self, name: str) -> str:
    """The safetensors dtype code of `name` ("F32", "BF16", ...), read from the header."""
    return self._where[name][0].get_slice(name).get_dtype()

  def resolve(self, name: str) -> str | None:
    """`name` as stored: old GPT-2 files omit the "transformer." prefix."""
    if name in self._where:
      return name
    if name.startswith("transformer.") and name[len("transformer."):] in self._where:
      return name[len("transformer."):]
    return None

  def get(self, name: str) -> np.ndarray:
    handle, _ = self._where[name]
    return np.asarray(handle.get_tensor(name), dtype=np.float32)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._where[name][0].get_slice(name).get_shape())


def source_dtype(path) -> str:
  """The floating dtype a local HF checkpoint stores: "float32", "bfloat16" or "float16".

  From config.json ("dtype" in transformers v5, "torch_dtype" in v4) and, when it names none,
  from the safetensors header of the first floating tensor. It is information for the caller
  (e.g. to export in the dtype it came in): load_hf always gives float32 params, and a float16
  checkpoint is read as float32 (we compute in float32 or bfloat16 only; pick `dtype=` of
  load_hf for that).
  """
  hf_config, config_path = read_hf_config(path)
  named = hf_config.get("dtype") or hf_config.get("torch_dtype")
  if named is not None and named != "auto":
    name = str(named).removeprefix("torch.")
    if name not in SOURCE_DTYPES:
      raise HFCheckpointError(f"{config_path}: dtype {named!r} is not supported; expected one "
                              f"of {SOURCE_DTYPES}")
    return name
  files = _TensorFiles(config_path.parent)
  for name in files.ordered_names():
    code = files.stored_dtype(name)
    if code in _SAFETENSORS_FLOAT:
      found = _SAFETENSORS_FLOAT[code]
      if found not in SOURCE_DTYPES:
        raise HFCheckpointError(f"{files.where(name)}: tensor {name!r} is stored as {code}; "
                                f"expected one of {SOURCE_DTYPES}")
      return found
  raise HFCheckpointError(f"{config_path.parent}: config.json names no dtype and the "
                          "checkpoint holds no floating-point tensor")


def read_hf_config(path) -> tuple[dict[str, Any], pathlib.Path]:
  directory = pathlib.Path(path)
  if not directory.is_dir():
    raise HFCheckpointError(f"{directory}: not a directory (expected a local HF model directory)")
  config_path = directory / "config.json"
  if not config_path.exists():
    raise HFCheckpointError(f"{config_path}: missing (an HF model directory needs config.json)")
  try:
    return json.loads(config_path.read_text()), config_path
  except json.JSONDecodeError as e:
    raise HFCheckpointError(f"{config_path}: not valid JSON ({e})") from e


def load_hf(path, *, role: str = "policy", mesh=None, dtype=None, rules="fsdp",
            key: jax.Array | None = None) -> tuple[Transformer, Any]:
  """Reads a local HF directory into (module, params) of `role`.

  Params are float32 (the checkpoint's dtype, see `source_dtype`, is upcast); `dtype` sets the
  compute dtype. With `mesh`, every tensor goes straight to its shards under the `rules` preset.
  The reward/value head comes from a `score.weight` tensor (an HF *ForSequenceClassification
  checkpoint) plus config.json's `score_bias` (0 when absent) when present; otherwise it is
  freshly initialised from `key`, as is the value head of role "policy_value".
  """
  hf_config, config_path = read_hf_config(path)
  cfg = config_from_hf(hf_config, config_path, dtype)
  module = build_model(cfg, role)
  files = _TensorFiles(config_path.parent)
  if role in _CAUSAL_ROLES and files.resolve("lm_head.weight") is None:
    archs = hf_config.get("architectures") or []
    if (any("ForSequenceClassification" in a for a in archs)
        or files.resolve("score.weight") is not None):
      if not cfg.tie_embeddings:
        raise HFCheckpointError(
            f"{config_path.parent}: a sequence-classification checkpoint "
            f"(architectures={archs}, a `score` head and no "
            f"lm_head.weight) has no LM head for role {role!r}; load it with role='reward' "
            "(or 'value')")
      logging.info("%s: a sequence-classification checkpoint with tied embeddings, loaded as "
                   "role %r: the token embedding serves as the LM head", config_path.parent, role)

  sample = jnp.zeros((1, 1), jnp.int32)
  shapes, specs = sharding_lib.abstract_params(module, sample)
  shardings = (None if mesh is None else
               sharding_lib.logical_to_shardings(specs, shapes, mesh, rules))

  def place(ours: tuple[str, ...], value: np.ndarray):
    if mesh is None:
      return jnp.asarray(value)
    sharding = _get(shardings, ours)
    return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])

  params: dict = {}
  used = set()
  for ours, theirs, layout in _plan(cfg, role):
    stored = files.resolve(theirs)
    if stored is None:
      raise HFCheckpointError(f"{config_path.parent}: tensor {theirs!r} is missing from the "
                              f"checkpoint (needed for {'/'.join(ours)})")
    used.add(stored)
    value = _to_ours(files.get(stored), layout)
    expected = _get(shapes, ours).shape
    if value.shape != expected:
      raise HFCheckpointError(
          f"{config_path.parent}: tensor {theirs!r} has shape {files.shape(stored)} "
          f"(-> {value.shape} in our layout) but {'/'.join(ours)} expects {expected} "
          f"from config.json")
    _set(params, ours, place(ours, value))

  head = {"value": "value_head", "reward": "reward_head", "policy_value": "value_head"}.get(role)
  if head is not None:
    fresh = _init_head(module, key, sample, shapes, shardings, head)
    stored = None if role == "policy_value" else files.resolve("score.weight")
    if stored is not None:
      used.add(stored)
      value = files.get(stored)
      if value.shape != (1, cfg.d_model):
        raise HFCheckpointError(f"{config_path.parent}: tensor 'score.weight' has shape "
                                f"{value.shape}; a scalar head needs (1, {cfg.d_model})")
      fresh["kernel"] = place((head, "kernel"), value.T.copy())
      fresh["bias"] = place((head, "bias"),
                            np.full((1,), _score_bias(hf_config, config_path), np.float32))
    else:
      logging.info("%s: %s initialised fresh (%s)", config_path.parent, head,
                   "a critic of the policy" if role == "policy_value" else "no score.weight")
    params[head] = fresh

  unused = sorted(n for n in files.names() - used
                  if not n.endswith(_IGNORED_SUFFIXES) and n != "lm_head.weight")
  if unused:
    logging.warning("%s: %d tensors not used by role %r: %s", config_path.parent, len(unused),
                    role, unused[:10])
  return module, params


def _score_bias(hf_config: dict[str, Any], config_path) -> float:
  """config.json's `score_bias` (written by save_hf for a reward model), 0 when absent."""
  bias = hf_config.get(SCORE_BIAS_KEY, 0.0)
  if isinstance(bias, bool) or not isinstance(bias, (int, float)):
    raise HFCheckpointError(f"{config_path}: {SCORE_BIAS_KEY}={bias!r} is not a number")
  return float(bias)


def _init_head(module, key, sample, shapes, shardings, head):
  """Fresh params of one head, initialised exactly as module.init would."""
  key = jax.random.key(0) if key is None else key
  init = jax.jit(lambda k: nn.unbox(module.init(k, sample)["params"])[head],
                 out_shardings=None if shardings is None else shardings[head])
  return dict(init(key))


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree, path, value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def _host(x, dtype: str = "float32") -> np.ndarray:
  """`x` on this host as a numpy `dtype` array; on multi-host every process must call (a
  sharded array is all-gathered first)."""
  if jax.process_count() > 1 and isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  # Through float32 (our params' dtype), then rounded to nearest even by ml_dtypes for
  # bfloat16, as torch's .to(torch.bfloat16) rounds.
  return np.asarray(jax.device_get(x), dtype=np.float32).astype(jnp.dtype(dtype))


def _leaves(tree) -> dict[tuple[str, ...], Any]:
  return {tuple(str(k.key) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _exportable(module: Transformer, params) -> dict:
  """Unboxed `params`, checked against `module`, with the value head of a causal export dropped.

  Nothing else is dropped silently: a leaf the HF layout has no place for (LoRA adapters
  attached by apply_lora, ...) is an error, not a smaller checkpoint, and so are leaves whose
  shapes are not the module's (a stacked ensemble [k, ...] above all: one HF directory holds
  one model).
  """
  cfg, role = module.cfg, module.role
  kind = _export_kind(role)
  params = dict(nn.unbox(params))
  if kind == "causal" and "value_head" in params:
    # A training-time critic (PPO's value head on the policy): no *ForCausalLM holds it.
    logging.info("save_hf: role %r: the value head is not exported (no HF causal LM has one)",
                 role)
    params.pop("value_head")

  expected = _leaves(sharding_lib.abstract_params(module, jnp.zeros((1, 1), jnp.int32))[0])
  got = _leaves(params)
  common = sorted(set(expected) & set(got))
  wrong = [(p, tuple(np.shape(got[p])), tuple(expected[p].shape)) for p in common
           if tuple(np.shape(got[p])) != tuple(expected[p].shape)]
  if wrong:
    leading = {g[0] if len(g) == len(e) + 1 and g[1:] == e else None for _, g, e in wrong}
    if len(wrong) == len(common) and len(leading) == 1 and None not in leading:
      k = leading.pop()
      raise HFCheckpointError(
          f"save_hf: the params are a stacked ensemble of {k} members (a leading [{k}] axis on "
          "every leaf); one HF directory holds one model: export member by member, e.g. "
          "save_hf(module, jax.tree.map(lambda x: x[i], params), f'{path}/member_{i}')")
    examples = ", ".join(f"{'/'.join(p)} {g} (expected {e})" for p, g, e in wrong[:3])
    raise HFCheckpointError(f"save_hf: {len(wrong)} param(s) do not have the shapes of the "
                            f"module's {cfg.arch} config, e.g. {examples}")

  exported = {ours for ours, _, _ in _export_plan(cfg, role)}
  if kind == "reward":
    exported.add(("reward_head", "bias"))  # -> config.json's score_bias.
  extra = sorted("/".join(p) for p in set(got) - exported)
  if extra:
    hint = (" (LoRA adapters: export models.merge_lora(base, adapters, scale))"
            if any("/lora_" in name for name in extra) else "")
    raise HFCheckpointError(f"save_hf: {len(extra)} param(s) have no place in the "
                            f"{cfg.arch} HF layout of role {role!r}, e.g. {extra[:3]}{hint}")
  missing = sorted("/".join(p) for p in exported - set(got))
  if missing:
    raise HFCheckpointError(f"save_hf: {len(missing)} param(s) of role {role!r} are missing, "
                            f"e.g. {missing[:3]}")
  return params


def _tensors(module: Transformer, params: dict, dtype: str
             ) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, array) pairs of checked params (see _exportable), in HF layout and `dtype`."""
  cfg = module.cfg
  qkv: dict[str, list] = {}
  for ours, theirs, layout in _export_plan(cfg, module.role):
    value = _host(_get(params, ours), dtype)
    if layout.startswith("qkv:"):
      qkv.setdefault(theirs, []).append(value)
      if len(qkv[theirs]) == 3:
        yield theirs, np.concatenate(qkv.pop(theirs), axis=-1)
      continue
    yield theirs, np.ascontiguousarray(value.T if layout == "T" else value)
  if cfg.arch == "qwen2" and not cfg.qkv_bias:  # transformers' Qwen2 always has q/k/v biases.
    for i in range(cfg.n_layers):
      for name, width in (("q", cfg.n_heads), ("k", cfg.kv_heads), ("v", cfg.kv_heads)):
        yield (f"model.layers.{i}.self_attn.{name}_proj.bias",
               np.zeros((width * cfg.head_size,), jnp.dtype(dtype)))


def hf_tensors(module: Transformer, params, dtype="float32"
               ) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, array) pairs that save_hf writes for `module.role`, in HF layout and `dtype`.

  A reward model's head bias is not among them: it goes to config.json (see the module
  docstring).
  """
  yield from _tensors(module, _exportable(module, params), _export_dtype(dtype))


def save_hf(module: Transformer, params, path, *, dtype="float32",
            special_ids: dict[str, int | None] | None = None,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> pathlib.Path:
  """Writes an HF model directory that transformers loads with our numbers.

  Roles "policy" / "reference" / "policy_value" (value head dropped) -> *ForCausalLM plus a
  generation_config.json; "reward" -> *ForSequenceClassification with one label and the head's
  bias in config.json (see the module docstring); "value" is refused. `dtype` is the stored
  dtype of the tensors ("float32" or "bfloat16", written as safetensors F32 / BF16) and the
  config's "dtype". `special_ids` = dict(bos=..., eos=..., pad=...) are the tokenizer's ids,
  which override ModelConfig's placeholders in config.json and generation_config.json; a reward
  model needs the real pad id (transformers reads the score at the last non-pad token).

  Checkpoints larger than `max_shard_bytes` are split into shards with a
  model.safetensors.index.json. Every file is written atomically (a temporary, then a rename);
  checkpoint files of an earlier export to the same directory that this one does not write
  (a stale index or shard, a generation_config.json) are removed, since transformers and
  load_hf would otherwise read them. On multi-host every process must call this (to gather
  shards); process 0 writes.
  """
  role = module.role
  kind = _export_kind(role)
  stored = _export_dtype(dtype)
  ids = _special_ids(module.cfg, special_ids)
  params = _exportable(module, params)
  tensors = list(_tensors(module, params, stored))
  score_bias = 0.0
  if kind == "reward":
    score_bias = float(_host(params["reward_head"]["bias"]).reshape(-1)[0])
    if "pad" not in (special_ids or {}):
      logging.warning("save_hf: reward model exported with pad_token_id=%d from ModelConfig; "
                      "transformers reads the score at the last token that is not this id, so "
                      "pass special_ids=dict(pad=...) with the tokenizer's pad id if it is a "
                      "placeholder", ids["pad"])
  config = config_to_hf(module.cfg, role=role, dtype=stored, special_ids=ids,
                        score_bias=score_bias)
  directory = pathlib.Path(path)
  if jax.process_index() != 0:
    return directory
  directory.mkdir(parents=True, exist_ok=True)
  shards, current, size = [], {}, 0
  for name, value in tensors:
    if current and size + value.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = value
    size += value.nbytes
  shards.append(current)
  metadata = {"format": "pt"}
  written = {"config.json"}
  if len(shards) == 1:
    _atomic_write(directory / "model.safetensors",
                  lambda p: safetensors.numpy.save_file(shards[0], p, metadata=metadata))
    written.add("model.safetensors")
  else:
    weight_map = {}
    for i, shard in enumerate(shards):
      fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      _atomic_write(directory / fname,
                    lambda p, s=shard: safetensors.numpy.save_file(s, p, metadata=metadata))
      weight_map.update({name: fname for name in shard})
      written.add(fname)
    index = {"metadata": {"total_size": sum(v.nbytes for _, v in tensors)},
             "weight_map": weight_map}
    _write_json(directory / "model.safetensors.index.json", index)
    written.add("model.safetensors.index.json")
  _write_json(directory / "config.json", config)
  if kind == "causal":
    _write_json(directory / "generation_config.json", generation_config_to_hf(module.cfg, ids))
    written.add("generation_config.json")
  stale = [p for p in [directory / "model.safetensors", directory / "model.safetensors.index.json",
                       directory / "generation_config.json",
                       *directory.glob("model-*-of-*.safetensors")]
           if p.name not in written and p.exists()]
  for p in stale:
    logging.info("save_hf: removing %s, left by an earlier export to %s", p.name, directory)
    p.unlink()
  return directory


def _write_json(target: pathlib.Path, obj):
  _atomic_write(target, lambda p: pathlib.Path(p).write_text(json.dumps(obj, indent=2)))


def _atomic_write(target: pathlib.Path, write: Callable[[str], None]):
  tmp = target.with_name(target.name + ".tmp")
  write(str(tmp))
  os.replace(tmp, target)
