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

from rlhf_jax import host_memory  # noqa: E402

# Subprocesses (`python -m rlhf_jax.main`, the benchmark scripts) get the host-memory settings
# in their environment from the start, as they would get them by restarting themselves
# (rlhf_jax.host_memory): the same runs, one interpreter start fewer each.
_retained = host_memory.retained_memory_env()
if _retained is not None:
  os.environ["GLIBC_TUNABLES"] = _retained["GLIBC_TUNABLES"]

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # Experiment drivers (experiments.*) are imported by tests.
  sys.path.insert(0, str(REPO_ROOT))
SHARED_DIR = REPO_ROOT.parent / "shared"
HH_RLHF_PATH = SHARED_DIR / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"


# The slowest test files (pipelines, subprocess meshes and hosts, reproductions), longest first,
# then every other file in its usual order. pytest.ini hands whole files to two workers in
# collection order; a slow file left to the end keeps one worker busy while the other idles.
SLOW_FILES_FIRST = (
    "test_benchmark_scripts.py", "test_repro_frontier.py", "test_hf_pipeline.py",
    "test_multihost.py", "test_mesh_presets.py", "test_preference_training.py",
    "test_colabs.py", "test_online_dpo.py", "test_online_rl.py", "test_overoptimization.py",
    "test_packed_pairs.py", "test_models.py", "test_repro_critic_free.py", "test_sampling.py",
    "test_quickstart.py", "test_lora.py", "test_hf_export.py", "test_packed_rollouts.py",
    "test_repro_grpo_variants.py", "test_repro_online_dpo.py", "test_arithmetic_world.py")


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # Stable: files stay whole.


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


# A 1-layer, 32-wide model: what the stage and reproduction tests train.
TINY_MODEL = dict(d_model=32, n_layers=1, n_heads=2, mlp_dim=64)


def experiment_config(path, arg="runlocal", tiny=True):
  """get_config(arg) of experiments/<path>, unlocked; with `tiny`, the model is TINY_MODEL."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("cfg", REPO_ROOT / "experiments" / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  config.unlock()
  if tiny:
    config.model.update(TINY_MODEL)
  return config


def ppo_world(config, mesh, rm_members=1):
  """(task, policy module, SFT params, reward module, RM ensemble params) for a PPO test:
  the config's task and model, random SFT weights (seed 0) and an `rm_members` ensemble."""
  import jax.numpy as jnp
  from rlhf_jax import configs, models, parallel
  from rlhf_jax.train import reward as reward_lib
  from rlhf_jax.train import task as task_lib
  task = task_lib.build_task(config)
  cfg = configs.model_config(config.model, task.vocab_size)
  policy = models.build_model(cfg)
  sft = parallel.init_params(policy, jax.random.key(0), jnp.ones((1, 4), jnp.int32), mesh=mesh)
  rm_module = models.build_model(cfg, "reward")
  rm_params = reward_lib.init_ensemble(
      rm_module, jax.random.split(jax.random.key(1), rm_members), mesh, "fsdp")
  return task, policy, sft, rm_module, rm_params


def ragged_pairs(n, prompt_len, response_len, vocab=50):
  """(pairs, TokenizeConfig): `n` preference pairs with prompts and responses of varied
  lengths, EOS (= 1) ending each response, PAD = 0, tokens drawn from [3, vocab)."""
  import numpy as np
  from rlhf_jax import data
  rng = np.random.RandomState(0)
  pairs = []
  for i in range(n):
    prompt = rng.randint(3, vocab, size=1 + i % prompt_len).astype(np.int32)
    chosen = np.append(rng.randint(3, vocab, size=i % (response_len - 1)), 1).astype(np.int32)
    rejected = np.append(rng.randint(3, vocab, size=(i + 2) % (response_len - 1)),
                         1).astype(np.int32)
    pairs.append(data.TokenizedPair(prompt, chosen, rejected))
  tok = data.TokenizeConfig(eos_id=1, pad_id=0, max_prompt_len=prompt_len,
                            max_response_len=response_len, vocab_size=vocab)
  return pairs, tok
