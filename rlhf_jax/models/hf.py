"""Hugging Face interop: local safetensors checkpoints <-> our parameter trees.

Supported architectures: GPT-2 (`GPT2LMHeadModel`), Llama (`LlamaForCausalLM`) and Qwen2
(`Qwen2ForCausalLM`), plus their `*ForSequenceClassification` `score` head for the reward and
value roles. Only files on disk are read: no hub access, no torch.
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


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """The config.json dict that transformers reads back into an equivalent model."""
  common = dict(model_type=cfg.arch, architectures=[_HF_ARCH[cfg.arch]],
                vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings,
                bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                pad_token_id=cfg.pad_token_id, dtype="float32")
  if cfg.arch == "gpt2":
    if cfg.n_kv_heads not in (None, cfg.n_heads) or cfg.head_dim not in (None, cfg.d_model // cfg.n_heads):
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
  if role in ("policy", "reference") and not cfg.tie_embeddings:
    plan.append((("lm_head", "kernel"), "lm_head.weight", "T"))
  return plan


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

  Params are float32 (the checkpoint's dtype is upcast); `dtype` sets the compute dtype.
  With `mesh`, every tensor goes straight to its shards under the `rules` preset.
  The reward/value head comes from a `score.weight` tensor (an HF *ForSequenceClassification
  checkpoint) when present; otherwise it is freshly initialised from `key`.
  """
  hf_config, config_path = read_hf_config(path)
  cfg = config_from_hf(hf_config, config_path, dtype)
  module = build_model(cfg, role)
  files = _TensorFiles(config_path.parent)

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

  head = {"value": "value_head", "reward": "reward_head"}.get(role)
  if head is not None:
    fresh = _init_head(module, key, sample, shapes, shardings, head)
    stored = files.resolve("score.weight")
    if stored is not None:
      used.add(stored)
      value = files.get(stored)
      if value.shape != (1, cfg.d_model):
        raise HFCheckpointError(f"{config_path.parent}: tensor 'score.weight' has shape "
                                f"{value.shape}; a scalar head needs (1, {cfg.d_model})")
      fresh["kernel"] = place((head, "kernel"), value.T.copy())
    else:
      logging.info("%s: no score.weight; %s initialised fresh", config_path.parent, head)
    params[head] = fresh

  unused = sorted(n for n in files.names() - used
                  if not n.endswith(_IGNORED_SUFFIXES) and n != "lm_head.weight")
  if unused:
    logging.warning("%s: %d tensors not used by role %r: %s", config_path.parent, len(unused),
                    role, unused[:10])
  return module, params


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

def _host(x) -> np.ndarray:
  if jax.process_count() > 1 and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x), dtype=np.float32)


def hf_tensors(module: Transformer, params) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, float32 array) pairs of a policy's params, in HF layout."""
  cfg = module.cfg
  params = nn.unbox(params)
  plan = _plan(cfg, "policy")
  # Nothing is dropped silently: a leaf the HF layout has no place for (LoRA adapters attached
  # by apply_lora, a value head, ...) is an error, not a smaller checkpoint.
  exported = {ours for ours, _, _ in plan}
  extra = sorted("/".join(str(k.key) for k in path)
                 for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
                 if tuple(str(k.key) for k in path) not in exported)
  if extra:
    hint = (" (LoRA adapters: export models.merge_lora(base, adapters, scale))"
            if any("/lora_" in name for name in extra) else "")
    raise HFCheckpointError(f"save_hf: {len(extra)} param(s) have no place in the "
                            f"{cfg.arch} HF layout, e.g. {extra[:3]}{hint}")
  qkv: dict[str, list] = {}
  for ours, theirs, layout in plan:
    value = _host(_get(params, ours))
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
               np.zeros((width * cfg.head_size,), np.float32))


def save_hf(module: Transformer, params, path, *,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> pathlib.Path:
  """Writes config.json + safetensors that transformers.AutoModelForCausalLM loads.

  Only the policy/reference roles have an HF causal-LM equivalent. Checkpoints larger than
  `max_shard_bytes` are split into shards with a model.safetensors.index.json. On multi-host
  every process must call this (to gather shards); process 0 writes.
  """
  if module.role not in ("policy", "reference"):
    raise HFCheckpointError(f"save_hf exports causal LMs; role {module.role!r} has no "
                            "AutoModelForCausalLM equivalent")
  directory = pathlib.Path(path)
  tensors = list(hf_tensors(module, params))
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
  if len(shards) == 1:
    _atomic_write(directory / "model.safetensors",
                  lambda p: safetensors.numpy.save_file(shards[0], p, metadata=metadata))
  else:
    weight_map = {}
    for i, shard in enumerate(shards):
      fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      _atomic_write(directory / fname,
                    lambda p, s=shard: safetensors.numpy.save_file(s, p, metadata=metadata))
      weight_map.update({name: fname for name in shard})
    index = {"metadata": {"total_size": sum(v.nbytes for _, v in tensors)},
             "weight_map": weight_map}
    _atomic_write(directory / "model.safetensors.index.json",
                  lambda p: pathlib.Path(p).write_text(json.dumps(index, indent=2)))
  config = config_to_hf(module.cfg)
  _atomic_write(directory / "config.json",
                lambda p: pathlib.Path(p).write_text(json.dumps(config, indent=2)))
  return directory


def _atomic_write(target: pathlib.Path, write: Callable[[str], None]):
  tmp = target.with_name(target.name + ".tmp")
  write(str(tmp))
  os.replace(tmp, target)
