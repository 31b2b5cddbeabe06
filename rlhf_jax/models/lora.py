"""LoRA (Hu et al. 2021, arXiv:2106.09685): low-rank adapters on the decoder's 2-D kernels.

Pure-functional: an adapter tree mirrors the params tree down to each targeted module and
holds A [in, r] and B [r, out] there. What `module.apply({"params": ...})` receives is
    apply_lora(base, adapters, scale) = base with A, B and the scale next to each targeted
    kernel W, which the decoder's projections (models.transformer.Dense) apply unmerged:
    y = x W + scale · (x A) B.
So a step never builds W + scale · A B or its kernel-sized gradient (what folding the
adapters into the kernels would cost in memory), and the base arrays are used as they are.
B starts at zero, so a fresh adapter leaves the model exactly as it was, and the reference
model of DPO/PPO is the base itself (adapters off, no second copy of the params). Training
differentiates the adapters only: the base is a frozen input of the step, never in the
optimiser state and never donated or checkpointed (the stage rebuilds it, as it rebuilds a PPO
reference). `merge_lora` folds the adapters into plain params for `save_hf`, sampling outside
a step and evaluation.

Which kernels: config.lora.targets names modules, comma-separated; a kernel is adapted when
any module on its path has one of the names: "attn" (q, k, v, o), "mlp" (gate, up, down; fc,
proj for GPT-2), or single projections ("q,v"). Only 2-D kernels inside the backbone's blocks
qualify; embeddings, norms and heads stay frozen.

Sharding: A's input dim carries the kernel's input logical axis and B's output dim its output
axis (the rank dim is replicated), so adapters shard like the kernels they adapt.
"""
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import PartitionSpec as P

from rlhf_jax import parallel

PyTree = Any


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """rank r (0 = off), alpha (the update is scaled by alpha / r) and the targeted modules."""
  rank: int = 0
  alpha: float = 16.0
  targets: str = "attn,mlp"

  def __post_init__(self):
    if self.rank < 0:
      raise ValueError(f"config.lora.rank={self.rank} must be >= 0 (0 = LoRA off)")
    if self.rank and not self.target_names:
      raise ValueError("config.lora.targets is empty; name modules, e.g. 'attn,mlp' or 'q,v'")

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @property
  def target_names(self) -> frozenset[str]:
    return frozenset(n.strip() for n in self.targets.split(",") if n.strip())


def default_config() -> ml_collections.ConfigDict:
  """The config.lora block: rank 0 (off) until a run sets it."""
  return ml_collections.ConfigDict(dict(rank=0, alpha=16.0, targets="attn,mlp"))


def config_from(c: ml_collections.ConfigDict | None) -> LoRAConfig | None:
  """LoRAConfig of a config.lora block, or None when absent or rank 0 (full fine-tuning)."""
  if c is None:
    return None
  cfg = LoRAConfig(rank=int(c.rank), alpha=float(c.alpha), targets=str(c.targets))
  return cfg if cfg.enabled else None


# ---------------------------------------------------------------------------------------------
# Which kernels, adapter shapes and init
# ---------------------------------------------------------------------------------------------

def _targeted(path: tuple[str, ...], leaf, names: frozenset[str]) -> bool:
  """A 2-D "kernel" inside a decoder block whose path names a targeted module."""
  return (len(path) >= 3 and path[-1] == "kernel" and len(leaf.shape) == 2
          and any(p.startswith("block_") for p in path[:-1])
          and any(p in names for p in path[:-1]))


def _kernel_paths(params: PyTree, cfg: LoRAConfig) -> list[tuple[str, ...]]:
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  paths = [(tuple(str(k.key) for k in path), leaf) for path, leaf in flat]
  chosen = [path for path, leaf in paths if _targeted(path, leaf, cfg.target_names)]
  if not chosen:
    in_blocks = [path for path, _ in paths if path[-1] == "kernel"
                 and any(p.startswith("block_") for p in path)]
    modules = sorted({p for path in in_blocks for p in path[:-1]
                      if not p.startswith("block_") and p != "backbone"})
    raise ValueError(f"config.lora.targets={cfg.targets!r} matches no kernel inside a block; "
                     f"module names are {modules}")
  return chosen


def _nest(items: dict[tuple[str, ...], Any]) -> dict:
  out: dict = {}
  for path, value in items.items():
    node = out
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = value
  return out


def _get(tree, path):
  for name in path:
    tree = tree[name]
  return tree


def adapter_shapes(params: PyTree, cfg: LoRAConfig) -> PyTree:
  """ShapeDtypeStructs of the adapters of `params` (arrays or ShapeDtypeStructs)."""
  items = {}
  for path in _kernel_paths(params, cfg):
    d_in, d_out = _get(params, path).shape
    items[path[:-1] + ("a",)] = jax.ShapeDtypeStruct((d_in, cfg.rank), jnp.float32)
    items[path[:-1] + ("b",)] = jax.ShapeDtypeStruct((cfg.rank, d_out), jnp.float32)
  return _nest(items)


def init_lora(params: PyTree, cfg: LoRAConfig, key: jax.Array) -> PyTree:
  """Fresh adapters: A ~ U(±1/sqrt(in)) (PEFT's kaiming_uniform(a=√5)), B = 0.

  Only the shapes of `params` are read (arrays or ShapeDtypeStructs), so this jits with
  out_shardings to create adapters directly in their shards (see init_sharded).
  """
  shapes = adapter_shapes(params, cfg)
  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  keys = jax.random.split(key, len(flat))
  leaves = []
  for (path, s), k in zip(flat, keys):
    if str(path[-1].key) == "a":
      bound = 1.0 / jnp.sqrt(jnp.float32(s.shape[0]))
      leaves.append(jax.random.uniform(k, s.shape, jnp.float32, -bound, bound))
    else:
      leaves.append(jnp.zeros(s.shape, jnp.float32))
  return jax.tree_util.tree_unflatten(treedef, leaves)


def logical_specs(base_specs: PyTree, params: PyTree, cfg: LoRAConfig) -> PyTree:
  """Logical PartitionSpecs of the adapters from the base params' logical specs (as
  parallel.abstract_params returns them): A = (kernel input axis, None), B = (None, kernel
  output axis)."""
  items = {}
  for path in _kernel_paths(params, cfg):
    spec = tuple(_get(base_specs, path)) + (None, None)
    items[path[:-1] + ("a",)] = P(spec[0], None)
    items[path[:-1] + ("b",)] = P(None, spec[1])
  return _nest(items)


def shardings(module, params: PyTree, cfg: LoRAConfig, mesh, rules) -> PyTree:
  """NamedShardings of the adapters of `module`'s params on `mesh` under `rules`."""
  sample = jnp.ones((1, 8), jnp.int32)
  _, specs = parallel.abstract_params(module, sample)
  return parallel.logical_to_shardings(logical_specs(specs, params, cfg),
                                       adapter_shapes(params, cfg), mesh, rules)


def init_sharded(module, params: PyTree, cfg: LoRAConfig, key: jax.Array, mesh, rules
                 ) -> PyTree:
  """init_lora born on the mesh, each adapter in the shards of its kernel's axes."""
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  out = shardings(module, params, cfg, mesh, rules)  # Outside the mesh context, as init_params.
  with parallel.mesh_context(mesh, rules):
    return jax.jit(lambda k: init_lora(abstract, cfg, k), out_shardings=out)(key)


def num_params(adapters: PyTree) -> int:
  return sum(x.size for x in jax.tree.leaves(adapters))


# ---------------------------------------------------------------------------------------------
# Applying and merging
# ---------------------------------------------------------------------------------------------

def _is_adapter(node) -> bool:
  return isinstance(node, dict) and set(node) == {"a", "b"} and not any(
      isinstance(v, dict) for v in node.values())


def _attach(base: PyTree, adapters: PyTree, adapt: Callable) -> PyTree:
  """base with adapt(module params, adapter, path) in place of each adapted module's params;
  every other leaf is base's own array."""
  def walk(base_node, lora_node, where):
    out = dict(base_node)
    for name, sub in lora_node.items():
      path = where + (name,)
      if name not in base_node:
        raise KeyError(f"LoRA adapter at {'/'.join(path)} has no base params; adapters and "
                       "base must come from the same ModelConfig")
      if _is_adapter(sub):
        kernel = base_node[name]["kernel"]
        if (sub["a"].shape[0], sub["b"].shape[1]) != kernel.shape:
          raise ValueError(f"LoRA adapter at {'/'.join(path)}: A {sub['a'].shape} @ "
                           f"B {sub['b'].shape} does not match the kernel {kernel.shape}")
        out[name] = adapt(base_node[name], sub)
      else:
        out[name] = walk(base_node[name], sub, path)
    return out
  return walk(base, adapters, ())


def apply_lora(base: PyTree, adapters: PyTree, scale: float) -> PyTree:
  """Effective params for `module.apply`: base with "lora_a", "lora_b" and "lora_scale" next
  to each adapted kernel, applied unmerged by the decoder's projections (module docstring).
  The base arrays are not copied. With B = 0 the update is exactly 0, so a fresh adapter
  gives exactly the base model's outputs."""
  return _attach(base, adapters, lambda module, ad: {
      **module, "lora_a": ad["a"], "lora_b": ad["b"], "lora_scale": jnp.float32(scale)})


def fold_lora(base: PyTree, adapters: PyTree, scale: float) -> PyTree:
  """Plain params: each adapted kernel W replaced by W + scale · A @ B (float32,
  full-precision product). With B = 0 this is W + 0 = W bitwise."""
  def fold(module, ad):
    delta = jnp.matmul(ad["a"], ad["b"], precision=jax.lax.Precision.HIGHEST)
    return {**module, "kernel": module["kernel"] + (scale * delta).astype(
        module["kernel"].dtype)}
  return _attach(base, adapters, fold)


@jax.jit
def _merge_jit(base, adapters, scale):
  return fold_lora(base, adapters, scale)


def merge_lora(base: PyTree, adapters: PyTree, scale: float) -> PyTree:
  """Plain params with the adapters folded in (for models.save_hf, sampling, evaluation)."""
  return _merge_jit(base, adapters, jnp.float32(scale))


# ---------------------------------------------------------------------------------------------
# Training with a frozen base
# ---------------------------------------------------------------------------------------------

def lora_loss_fn(loss_fn: Callable, scale: float, base_is_reference: bool) -> Callable:
  """A loss over adapters: loss(adapters, batch, rng, base, *extra) evaluates
  loss_fn(apply_lora(base, adapters), batch, rng, [base,] *extra). With base_is_reference the
  base is also passed on as the frozen reference (the same buffers, without the adapters)."""
  def wrapped(adapters, batch, rng, base, *extra):
    params = apply_lora(base, adapters, scale)
    return loss_fn(params, batch, rng, *((base,) if base_is_reference else ()), *extra)
  return wrapped


def with_frozen(step_fn: Callable, name: str) -> Callable:
  """step(state, batch, frozen) from a make_train_step step that reads state[name] (listed in
  its state_extra): `frozen` (the LoRA base) goes in for the call and is dropped from the
  returned state, so jitting with donate_argnums=0 donates the train state but not the base."""
  def step(state, batch, frozen):
    new_state, metrics = step_fn({**state, name: frozen}, batch)
    return {k: v for k, v in new_state.items() if k != name}, metrics
  return step


def jit_frozen_step(step_fn: Callable, name: str, state: dict, frozen: PyTree) -> Callable:
  """jit of with_frozen(step_fn, name), state donated and pinned to its shardings (as
  train.state.jit_step), returned as step(state, batch) with `frozen` bound."""
  shard = jax.tree.map(lambda x: x.sharding, state)
  jitted = jax.jit(with_frozen(step_fn, name), donate_argnums=0, out_shardings=(shard, None))
  return lambda state, batch: jitted(state, batch, frozen)
