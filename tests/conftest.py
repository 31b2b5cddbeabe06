"""Shared pytest set-up: offline hub, persistent compile cache, a tmp workdir.

Simulated multi-device meshes are never configured here: those tests run in subprocesses
(see tests/test_sharding.py), so this process keeps one CPU device.
"""
import os
import pathlib
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One cache directory for this process and every subprocess it starts.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "rlhf_jax_test_jax_cache"))

import jax  # noqa: E402  (after the environment above)
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
HH_RLHF_PATH = SHARED_DIR / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


@pytest.fixture(scope="session")
def hh_rlhf_path():
  if not HH_RLHF_PATH.exists():
    pytest.fail(f"{HH_RLHF_PATH} is missing: CI lays ../shared beside the checkout")
  return HH_RLHF_PATH


def run_python(code_or_args, env=None, timeout=600):
  """Runs `python -c code` (or python ARGS) in a fresh process; returns stdout or fails."""
  import subprocess
  args = [sys.executable] + (["-c", code_or_args] if isinstance(code_or_args, str) else list(code_or_args))
  full_env = dict(os.environ, **(env or {}))
  proc = subprocess.run(args, capture_output=True, text=True, env=full_env, timeout=timeout,
                        cwd=REPO_ROOT)
  if proc.returncode != 0:
    pytest.fail(f"subprocess failed ({proc.returncode}):\nSTDOUT:\n{proc.stdout[-4000:]}\n"
                f"STDERR:\n{proc.stderr[-8000:]}")
  return proc.stdout
