"""Shared measurement helpers for the benchmark scripts (each prints one JSON line)."""
import os
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from rlhf_jax import host_memory


def run_main(main: Callable[[], Any]) -> None:
  """A timing script's entry point: on a CPU backend the script first starts again with the
  host-memory settings every rlhf_jax run uses (rlhf_jax.host_memory: XLA:CPU's freed temp
  buffers kept for the next step), so steps are timed as a training run takes them. Both
  sides of a side-by-side run (torch too) share the process and so the settings."""
  host_memory.reexec_with_retained_memory()
  main()


def median_seconds(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
  """Median wall time of fn() over `repeats` calls, blocking on its outputs."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _square_matmuls(sizes, dtype) -> dict[int, Callable[[], Any]]:
  """A jitted n x n matmul on fixed random operands, per size, ready to call."""
  out = {}
  for n in sizes:
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(jnp.matmul)
    out[n] = lambda f=f, a=a, b=b: f(a, b)
  return out


def matmul_peak(sizes=(2048, 4096), dtype=jnp.float32, repeats=5) -> dict[str, float]:
  """Achieved GFLOP/s of a jitted square matmul at each size: this machine's practical peak."""
  return {f"matmul_{n}_gflops": 2 * n**3 / median_seconds(fn, repeats) / 1e9
          for n, fn in _square_matmuls(sizes, dtype).items()}


def matmul_peak_meter(sizes=(2048, 4096), dtype=jnp.float32,
                      repeats=3) -> Callable[[], float]:
  """matmul_peak's best size as a function to call again next to each timed workload: on a
  shared VM the speed drifts by tens of percent within minutes, so a peak taken once at the
  start says little about a step timed ten minutes later."""
  matmuls = _square_matmuls(sizes, dtype)
  for fn in matmuls.values():  # Compiled once, here.
    jax.block_until_ready(fn())
  return lambda: max(2 * n**3 / median_seconds(fn, repeats, warmup=0) / 1e9
                     for n, fn in matmuls.items())


def time_against_peak(calls: list[Callable[[], Any]], flops: float,
                      peak: Callable[[], float]) -> dict[str, list[float]]:
  """Times each call (blocking on its output) with the matmul peak (`peak()`, GFLOP/s) taken
  before the first call and after every call. A call's fraction of the peak is its achieved
  GFLOP/s (`flops` per call) over the mean of the two peaks taken right around it: a step of
  tens of seconds is long enough for a shared VM's speed to drift by tens of percent, so a
  peak taken once says little about a step timed minutes later."""
  seconds, peaks, fractions = [], [peak()], []
  for call in calls:
    start = time.perf_counter()
    jax.block_until_ready(call())
    seconds.append(time.perf_counter() - start)
    peaks.append(peak())
    fractions.append(flops / seconds[-1] / 1e9 / statistics.mean(peaks[-2:]))
  return {"seconds": seconds, "peaks": peaks, "fractions": fractions}


def peak_fields(timed: dict[str, list[float]]) -> dict[str, Any]:
  """The JSON fields of a time_against_peak result: the peaks, each call's fraction, and
  their median as the reported fraction of the matmul peak."""
  return {"adjacent_peak_gflops": round(statistics.median(timed["peaks"]), 1),
          "adjacent_peaks_gflops": [round(p, 1) for p in timed["peaks"]],
          "fractions_of_adjacent_peaks": [round(f, 3) for f in timed["fractions"]],
          "fraction_of_matmul_peak": round(statistics.median(timed["fractions"]), 3)}


def compiled_stats(compiled) -> dict[str, float]:
  """FLOPs (XLA cost analysis) and per-device memory (memory_analysis) of a compiled step."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  stats = {"xla_flops": float(cost.get("flops", 0.0))}
  if mem is not None:
    for field in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                  "generated_code_size_in_bytes"):
      stats[field] = int(getattr(mem, field, 0))
  return stats


def device_info() -> dict[str, str]:
  d = jax.devices()[0]
  return {"platform": d.platform, "device_kind": d.device_kind, "devices": jax.device_count(),
          "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}  # host_memory's, or none.
