"""Host memory on CPU backends: glibc keeps what XLA:CPU frees for the next step.

An XLA:CPU executable allocates its temporaries as one buffer per call: 2.2 GB for the small
model's reward step on 8 pairs x 256 tokens, 4.6 GB for its DPO step on 8 pairs x 512. glibc
serves blocks that big with mmap (XLA's worker threads allocate in their own arenas, where
anything over 64 MB is always mapped) and unmaps them when the step ends, so every step faults
its whole temp buffer in again: on this project's 2-core VM ~1.2M page faults and 3.8-8.5 s of
system time in a 12-15 s DPO step at 512 tokens. Three glibc tunables keep freed memory in the
process for reuse:

  arena_max=1       every thread allocates from the main arena, which grows with brk;
  mmap_max=0        big blocks come from that heap, not from fresh mappings;
  trim_threshold    (64 GiB) the heap's top is never handed back to the kernel.

With them the same step takes ~0 faults after the first calls and 10.4 s instead of 13.9 s
(benchmarks/RESULTS.md). The price: the process keeps its peak heap until it exits, and one
arena serialises malloc between threads, which an accelerator's host threads may feel; so the
settings apply to CPU runs only (JAX_PLATFORMS=cpu, or no GPU/TPU plugin installed).

glibc reads its tunables when a process starts, so `reexec_with_retained_memory` starts the
entry point again with them in GLIBC_TUNABLES, before JAX is imported (the price is one
interpreter start). RLHF_JAX_HOST_MALLOC=system keeps the system's behaviour; a
GLIBC_TUNABLES already set is the user's and is left alone.
"""
import importlib.util
import os
import platform
import sys

TUNABLES = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
            f"glibc.malloc.trim_threshold={64 << 30}")
OPT_OUT = "RLHF_JAX_HOST_MALLOC"
# Installed with jax[cuda12], jax[cuda13], jax[rocm] or jax[tpu]: JAX will pick that device.
ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                       "jax_rocm7_plugin", "libtpu")


def runs_on_cpu(environ=os.environ) -> bool:
  """Whether JAX will run on the CPU backend, decided without importing JAX."""
  platforms = environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip().lower() == "cpu"
  return not any(importlib.util.find_spec(name) for name in ACCELERATOR_PLUGINS)


def retained_memory_env(environ=os.environ) -> dict[str, str] | None:
  """environ with the tunables added, or None where they do not apply: not glibc Linux, a CPU
  backend not chosen, GLIBC_TUNABLES already set, or RLHF_JAX_HOST_MALLOC=system."""
  if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
    return None
  choice = environ.get(OPT_OUT, "retain")
  if choice not in ("retain", "system"):
    raise ValueError(f"{OPT_OUT}={choice!r}: expected 'retain' (the default on CPU) or "
                     "'system'")
  if choice == "system" or "GLIBC_TUNABLES" in environ or not runs_on_cpu(environ):
    return None
  return {**environ, "GLIBC_TUNABLES": TUNABLES}


def reexec_with_retained_memory() -> None:
  """Starts this process's command line again with TUNABLES set, where they apply (see
  retained_memory_env); returns only where they do not. Call it first thing in an entry
  point, before JAX is imported: whatever ran before runs again."""
  env = retained_memory_env()
  if env is not None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
