"""rlhf_jax.host_memory: when the glibc settings apply, and that a restarted process keeps a
freed big buffer for the next allocation in another thread (no page faults the second time)
while the system default faults it in again."""
import json
import os
import platform
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from rlhf_jax import host_memory

# In worker threads, as XLA:CPU's executables do: malloc 256 MiB, write every page, free it;
# then the same again, reporting the page faults of the second round (65,536 pages of 4 KiB
# when the memory went back to the kernel in between).
SECOND_TOUCH = """
from rlhf_jax import host_memory
host_memory.reexec_with_retained_memory()
import ctypes, json, os, resource, threading
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def touch_and_free():
  p = libc.malloc(256 << 20)
  ctypes.memset(p, 1, 256 << 20)
  libc.free(p)
def in_a_thread():
  t = threading.Thread(target=touch_and_free)
  t.start()
  t.join()
in_a_thread()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
in_a_thread()
print(json.dumps({"faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before,
                  "tunables": os.environ.get("GLIBC_TUNABLES", "")}))
"""


def _env(**extra):
  """This environment without the two settings (a CPU backend), plus `extra`."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", host_memory.OPT_OUT)}
  return {**env, "JAX_PLATFORMS": "cpu", **extra}


def _second_touch(**extra):
  proc = subprocess.run([sys.executable, "-c", SECOND_TOUCH], env=_env(**extra), cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="glibc tunables exist on Linux only")
def test_restarted_process_reuses_freed_memory_and_the_system_default_does_not():
  kept = _second_touch()  # Started again by reexec_with_retained_memory, with the tunables.
  assert kept["tunables"] == host_memory.TUNABLES
  assert kept["faults"] < 2_000, kept
  system = _second_touch(RLHF_JAX_HOST_MALLOC="system")
  assert system["tunables"] == ""
  assert system["faults"] > 60_000, system  # The measurement above can fail.


def test_where_the_settings_apply(monkeypatch):
  base = _env()
  if sys.platform == "linux":
    assert host_memory.retained_memory_env(base)["GLIBC_TUNABLES"] == host_memory.TUNABLES
  assert host_memory.retained_memory_env({**base, "JAX_PLATFORMS": "cuda"}) is None
  assert host_memory.retained_memory_env({**base, "GLIBC_TUNABLES": "x=1"}) is None
  assert host_memory.retained_memory_env({**base, host_memory.OPT_OUT: "system"}) is None
  with pytest.raises(ValueError, match="RLHF_JAX_HOST_MALLOC='mmap'"):
    host_memory.retained_memory_env({**base, host_memory.OPT_OUT: "mmap"})
  assert host_memory.runs_on_cpu({"JAX_PLATFORMS": "cpu,cuda"})
  assert not host_memory.runs_on_cpu({"JAX_PLATFORMS": "tpu"})
  # No JAX_PLATFORMS: an installed accelerator plugin means JAX will not run on the CPU.
  monkeypatch.setattr(host_memory.importlib.util, "find_spec",
                      lambda name: object() if name == "jax_cuda12_plugin" else None)
  assert not host_memory.runs_on_cpu({})
  monkeypatch.setattr(host_memory.importlib.util, "find_spec", lambda name: None)
  assert host_memory.runs_on_cpu({})


def test_the_entry_point_runs_with_the_settings(tmp_path):
  """`python -m rlhf_jax.main` on a CPU backend: a sitecustomize module records each
  interpreter that exits; the one that prints the usage text runs with the tunables."""
  record = tmp_path / "exits.txt"
  (tmp_path / "sitecustomize.py").write_text(
      "import atexit, os\n"
      "def _done():\n"
      f"  with open({str(record)!r}, 'a') as f:\n"
      "    f.write(os.environ.get('GLIBC_TUNABLES', '') + '\\n')\n"
      "atexit.register(_done)\n")
  env = _env(PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO_ROOT)]))
  proc = subprocess.run([sys.executable, "-m", "rlhf_jax.main", "--helpshort"], env=env,
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert "--workdir" in proc.stdout + proc.stderr, proc.stderr[-4000:]  # absl's usage text.
  exits = record.read_text().splitlines()
  # The first start never reaches its exit hooks (execve replaces it): one record, the
  # restarted process's (on glibc Linux; elsewhere the only start, without tunables).
  applies = host_memory.retained_memory_env(env) is not None
  assert applies == (sys.platform == "linux" and platform.libc_ver()[0] == "glibc")
  assert exits == [host_memory.TUNABLES if applies else ""], exits
