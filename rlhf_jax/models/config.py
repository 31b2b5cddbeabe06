"""Model configuration: one frozen dataclass for the GPT-2 and Llama/Qwen2 decoder family.

Named sizes follow big_vision's `decode_variant` habit: a table whose real shapes cite the
config file they were read from, so a reader can check every number.
"""
import dataclasses
from typing import Any

import jax.numpy as jnp

ARCHITECTURES = ("gpt2", "llama", "qwen2")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of one decoder.

  `arch` picks the block flavour: "gpt2" = learned positions, LayerNorm, GELU MLP, biases;
  "llama"/"qwen2" = RoPE, RMSNorm, SwiGLU, grouped-query attention ("qwen2" adds q/k/v bias).
  """
  arch: str = "llama"
  vocab_size: int = 8192
  d_model: int = 256
  n_layers: int = 4
  n_heads: int = 4
  n_kv_heads: int | None = None  # None = n_heads (multi-head attention).
  head_dim: int | None = None  # None = d_model // n_heads.
  mlp_dim: int = 704
  max_len: int = 2048  # Learned-position table size (gpt2); an upper bound for RoPE models.
  norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  # Llama-3 style frequency rescaling: None, or a tuple of (key, value) pairs with
  # factor, low_freq_factor, high_freq_factor, original_max_position_embeddings.
  rope_scaling: tuple[tuple[str, float], ...] | None = None
  qkv_bias: bool = False  # q/k/v projection biases (Qwen2; always on for gpt2).
  tie_embeddings: bool = False
  dtype: str = "float32"  # Compute dtype; params are always float32.
  remat: bool = False  # Rematerialise each block in the backward pass.
  pad_token_id: int = 0  # Only for export; masks, not this id, decide what is padding.
  eos_token_id: int = 1
  bos_token_id: int | None = None

  def __post_init__(self):
    if self.arch not in ARCHITECTURES:
      raise ValueError(f"ModelConfig.arch={self.arch!r}; expected one of {ARCHITECTURES}")
    if self.dtype not in DTYPES:
      raise ValueError(f"ModelConfig.dtype={self.dtype!r}; expected one of {tuple(DTYPES)}")
    if self.n_heads % self.kv_heads:
      raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.kv_heads}")
    if self.head_dim is None and self.d_model % self.n_heads:
      raise ValueError(f"d_model={self.d_model} is not a multiple of n_heads={self.n_heads}; "
                       "set head_dim explicitly")
    if self.uses_rope and self.head_size % 2:
      raise ValueError(f"RoPE needs an even head_dim, got {self.head_size}")

  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def head_size(self) -> int:
    return self.head_dim or self.d_model // self.n_heads

  @property
  def uses_rope(self) -> bool:
    return self.arch != "gpt2"

  @property
  def compute_dtype(self) -> Any:
    return DTYPES[self.dtype]

  def num_params(self, include_embeddings: bool = True) -> int:
    """Exact parameter count of the policy model (embeddings, blocks, final norm, LM head)."""
    d, h, kv, hd, f = self.d_model, self.n_heads, self.kv_heads, self.head_size, self.mlp_dim
    gpt2 = self.arch == "gpt2"
    attn = d * h * hd + 2 * d * kv * hd + h * hd * d
    if gpt2:
      attn += h * hd + 2 * kv * hd + d
    elif self.qkv_bias:
      attn += h * hd + 2 * kv * hd
    mlp = 2 * d * f + f + d if gpt2 else 3 * d * f
    norms = (4 * d if gpt2 else 2 * d)
    blocks = self.n_layers * (attn + mlp + norms)
    final_norm = 2 * d if gpt2 else d
    embed = self.vocab_size * d + (self.max_len * d if gpt2 else 0)
    head = 0 if self.tie_embeddings else self.vocab_size * d
    return blocks + final_norm + (embed + head if include_embeddings else 0)


# Named sizes. The real shapes are read from each model's published config.json.
SIZES: dict[str, dict[str, Any]] = {
    # Our own small Llama-style models for tests, CPU runs and the embedded task.
    "tiny": dict(arch="llama", vocab_size=8192, d_model=256, n_layers=4, n_heads=4,
                 mlp_dim=704, tie_embeddings=False, max_len=2048),
    "small": dict(arch="llama", vocab_size=8192, d_model=512, n_layers=8, n_heads=8,
                  mlp_dim=1408, tie_embeddings=False, max_len=2048),
    # huggingface.co/openai-community/gpt2/blob/main/config.json (124M).
    "gpt2": dict(arch="gpt2", vocab_size=50257, d_model=768, n_layers=12, n_heads=12,
                 mlp_dim=3072, max_len=1024, norm_eps=1e-5, tie_embeddings=True,
                 pad_token_id=50256, eos_token_id=50256, bos_token_id=50256),
    # huggingface.co/meta-llama/Llama-3.2-1B/blob/main/config.json.
    "llama-3.2-1b": dict(arch="llama", vocab_size=128256, d_model=2048, n_layers=16,
                         n_heads=32, n_kv_heads=8, head_dim=64, mlp_dim=8192,
                         max_len=131072, norm_eps=1e-5, rope_theta=500000.0,
                         rope_scaling=(("factor", 32.0), ("high_freq_factor", 4.0),
                                       ("low_freq_factor", 1.0),
                                       ("original_max_position_embeddings", 8192)),
                         tie_embeddings=True, pad_token_id=128001,
                         bos_token_id=128000, eos_token_id=128001),
    # huggingface.co/Qwen/Qwen2.5-0.5B/blob/main/config.json.
    "qwen2.5-0.5b": dict(arch="qwen2", vocab_size=151936, d_model=896, n_layers=24,
                         n_heads=14, n_kv_heads=2, mlp_dim=4864, max_len=32768,
                         norm_eps=1e-6, rope_theta=1000000.0, qkv_bias=True,
                         tie_embeddings=True, pad_token_id=151643,
                         bos_token_id=151643, eos_token_id=151643),
}


def config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
  """Plain JSON-able fields (a checkpoint stores the config of the model it holds)."""
  return dataclasses.asdict(cfg)


def config_from_dict(fields: dict[str, Any]) -> ModelConfig:
  """The inverse of config_to_dict, through JSON (lists back to the hashable tuples)."""
  fields = dict(fields)
  if fields.get("rope_scaling") is not None:
    fields["rope_scaling"] = tuple(tuple(kv) for kv in fields["rope_scaling"])
  return ModelConfig(**fields)


def get_config(name: str = "tiny", **overrides) -> ModelConfig:
  """The named size `name` with keyword overrides, e.g. get_config("tiny", n_layers=2)."""
  if name not in SIZES:
    raise ValueError(f"unknown model size {name!r}; expected one of {sorted(SIZES)}")
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = set(overrides) - fields
  if unknown:
    raise ValueError(f"unknown ModelConfig field(s) {sorted(unknown)}; expected some of "
                     f"{sorted(fields)}")
  return ModelConfig(**{**SIZES[name], **overrides})
