"""The Colab notebooks run top to bottom on this interpreter; their cells assert on results.

Each notebook is executed by nbclient in a fresh IPython kernel. The kernel is this test's own
interpreter (a kernelspec written to a temporary JUPYTER_PATH, which Jupyter searches before
the user's and the system's), so a stray system-wide `python3` kernel cannot run the notebooks
against another environment. The kernel shares the suite's persistent compile cache.
"""
import json
import pathlib
import resource
import sys
import time

import nbclient
import nbformat
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
COLABS = REPO_ROOT / "colabs"
NOTEBOOKS = sorted(COLABS.glob("*.ipynb"))


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
  """Environment for the kernels: this interpreter as `python3`, the suite's compile cache."""
  spec_dir = tmp_path_factory.mktemp("jupyter") / "kernels" / "python3"
  spec_dir.mkdir(parents=True)
  (spec_dir / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": f"Python 3 ({sys.executable})", "language": "python"}))
  return {"JUPYTER_PATH": str(spec_dir.parents[1]),
          # Small jitted functions are cached too (JAX's default skips those under 1 s).
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
          "MPLBACKEND": "module://matplotlib_inline.backend_inline"}


def test_every_notebook_is_listed():
  names = {p.name for p in NOTEBOOKS}
  assert "quickstart.ipynb" in names and len(names) >= 2, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_its_assertions_hold(path, kernel_env, tmp_path, monkeypatch):
  for key, value in kernel_env.items():
    monkeypatch.setenv(key, value)
  monkeypatch.setenv("TMPDIR", str(tmp_path))  # The notebooks' tempfile workdirs land here.
  nb = nbformat.read(path, as_version=4)
  # The first code cell installs the package only inside Colab.
  first_code = next(c for c in nb.cells if c.cell_type == "code")
  assert '"google.colab" in sys.modules' in first_code.source
  assert nb.metadata.kernelspec.name == "python3"
  nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
  client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                                   # Run where Jupyter runs a notebook: in its folder.
                                   resources={"metadata": {"path": str(COLABS)}})
  start, children = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
  try:
    client.execute()
  except nbclient.exceptions.CellExecutionError as e:
    pytest.fail(f"{path.name}: a cell failed\n{str(e)[-6000:]}")
  elapsed = time.perf_counter() - start
  after = resource.getrusage(resource.RUSAGE_CHILDREN)  # The kernel has exited by now.
  cpu = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  assert nb.cells[-1].outputs[0].text.strip() == sys.executable  # The kernel ran here.
  assert any(o.output_type == "display_data" and "image/png" in o.get("data", {})
             for o in outputs), f"{path.name} displayed no image"
  print(f"{path.name}: executed in {elapsed:.1f} s ({cpu:.1f} s of kernel CPU); slowest cells:",
        ", ".join(f"#{i} {t:.1f} s" for t, i in sorted(cell_seconds(nb), reverse=True)[:4]))


def cell_seconds(nb) -> list[tuple[float, int]]:
  """(seconds, index) of each executed code cell, from the timings nbclient records."""
  from datetime import datetime
  out = []
  for i, cell in enumerate(nb.cells):
    timing = cell.get("metadata", {}).get("execution", {})
    if "iopub.status.busy" in timing and "shell.execute_reply" in timing:
      start, end = (datetime.fromisoformat(timing[k].replace("Z", "+00:00"))
                    for k in ("iopub.status.busy", "shell.execute_reply"))
      out.append(((end - start).total_seconds(), i))
  return out
