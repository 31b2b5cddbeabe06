"""Logical-axis-rule presets: how the model's logical names map onto mesh axes.

Parameters use: vocab, embed, heads, kv_heads, mlp. Activations use: batch, length,
act_embed, act_vocab. Changing the parallelism strategy means picking another preset
(MaxText's pure-fsdp.yml idea), never editing the model.
"""
from collections.abc import Sequence

MESH_AXES = ("data", "fsdp", "tensor")
_BATCH = ("batch", ("data", "fsdp"))  # Every preset splits the batch over data x fsdp.
_ACTIVATIONS = (("length", None), ("act_embed", None))

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

PRESETS: dict[str, Rules] = {
    # Pure data parallelism: every device holds all params.
    "replicated": (_BATCH, *_ACTIVATIONS, ("act_vocab", None), ("vocab", None),
                   ("embed", None), ("heads", None), ("kv_heads", None), ("mlp", None)),
    # ZeRO-3 style: params split along d_model over `fsdp`, gathered per layer when used.
    "fsdp": (_BATCH, *_ACTIVATIONS, ("act_vocab", None), ("vocab", None), ("embed", "fsdp"),
             ("heads", None), ("kv_heads", None), ("mlp", None)),
    # FSDP + Megatron-style tensor parallelism over `tensor` (heads, MLP and vocab split).
    "fsdp_tensor": (_BATCH, *_ACTIVATIONS, ("act_vocab", "tensor"), ("vocab", "tensor"),
                    ("embed", "fsdp"), ("heads", "tensor"), ("kv_heads", "tensor"),
                    ("mlp", "tensor")),
}


def axis_rules(preset: str | Sequence) -> Rules:
  """The rules of a named preset; a sequence of (name, axes) pairs is returned as is."""
  if isinstance(preset, str):
    if preset not in PRESETS:
      raise ValueError(f"unknown sharding preset {preset!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[preset]
  return tuple((name, axes if axes is None or isinstance(axes, str) else tuple(axes))
               for name, axes in preset)
