"""Building models of any role, their KV caches, and moving a backbone between roles."""
from typing import Any

import flax
import jax
import jax.numpy as jnp

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.layout import KVCache
from rlhf_jax.models.transformer import ROLES, Transformer

Params = Any


def build_model(cfg: ModelConfig, role: str = "policy") -> Transformer:
  """The linen module for `role` in ROLES ("policy", "reference", "value", "reward")."""
  if role not in ROLES:
    raise ValueError(f"unknown model role {role!r}; expected one of {ROLES}")
  return Transformer(cfg, role)


def init_cache(cfg: ModelConfig, batch_size: int, max_len: int, dtype=None) -> KVCache:
  """An empty cache of `max_len` slots (prompt + generated tokens) for `batch_size` rows."""
  dtype = dtype or cfg.compute_dtype
  shape = (batch_size, cfg.kv_heads, max_len, cfg.head_size)  # Heads-major (see Attention).
  zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers))
  return KVCache(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers)),
                 mask=jnp.zeros((batch_size, max_len), jnp.int32),
                 index=jnp.zeros((), jnp.int32), next_pos=jnp.zeros((batch_size,), jnp.int32))


def transfer_backbone(source: Params, target: Params) -> Params:
  """`target` with its backbone replaced by `source`'s (e.g. a reward model from SFT params).

  Heads of `target` (a fresh value or reward head) are kept; heads of `source` are ignored.
  Shapes must match: both trees come from the same ModelConfig.
  """
  source, target = flax.core.unfreeze(source), flax.core.unfreeze(target)
  src_shapes = jax.tree.map(jnp.shape, source["backbone"])
  dst_shapes = jax.tree.map(jnp.shape, target["backbone"])
  if src_shapes != dst_shapes:
    raise ValueError("backbones differ in structure or shape; build both from the same "
                     "ModelConfig")
  return {**target, "backbone": source["backbone"]}
