"""TFDS: build the hh-rlhf builder from ../shared/data/hh-rlhf and read it back, in a process
where TensorFlow is hidden (so the test holds even on a machine where TF is installed)."""
import json

import pytest

from conftest import run_python
from rlhf_jax.data import tfds_hh

_BUILD_AND_READ = r"""
import importlib.abc, importlib.util, json, sys


class _Fail(importlib.abc.Loader):
  def create_module(self, spec):
    return None

  def exec_module(self, module):
    raise ModuleNotFoundError("No module named 'tensorflow' (hidden by the test)")


class HideTensorFlow(importlib.abc.MetaPathFinder):
  # Any `import tensorflow` fails, whether or not TF is installed on this machine.
  def find_spec(self, name, path=None, target=None):
    if name == "tensorflow" or name.startswith("tensorflow."):
      return importlib.util.spec_from_loader(name, _Fail())
    return None


sys.meta_path.insert(0, HideTensorFlow())
from rlhf_jax import data
from rlhf_jax.data import tfds_hh

manual, data_dir, original = sys.argv[1:4]
builder = tfds_hh.build_hh_rlhf(manual, data_dir)
source = tfds_hh.hh_rlhf_source(data_dir, "test")
first = source[0]
pairs = tfds_hh.preferences_from_source(source)
want = data.read_preferences(original)
print(json.dumps({
    "splits": sorted(builder.info.splits.keys()),
    "len": len(source),
    "first_line": int(first["source_line"]),
    "same": [(p.prompt, p.chosen, p.rejected) for p in pairs]
            == [(w.prompt, w.chosen, w.rejected) for w in want],
    "sources": [pairs[0].source, pairs[-1].source],
    "tensorflow_loaded": any(m == "tensorflow" or m.startswith("tensorflow.")
                             for m in sys.modules),
}))
"""


def test_build_and_read_without_tensorflow(hh_rlhf_path, tmp_path):
  out = run_python(["-c", _BUILD_AND_READ, str(hh_rlhf_path.parent), str(tmp_path / "tfds"),
                    str(hh_rlhf_path)])
  got = json.loads(out.strip().splitlines()[-1])
  assert got["splits"] == ["test"]
  assert got["len"] == 2312
  # TFDS shuffles records when it writes; the stored file line restores the original order.
  assert got["first_line"] != 1
  assert got["same"] is True
  assert got["sources"] == ["harmless-base-test.jsonl.gz:1", "harmless-base-test.jsonl.gz:2312"]
  assert got["tensorflow_loaded"] is False
  assert list((tmp_path / "tfds" / "hh_rlhf_preferences" / "1.0.0").glob("*.array_record*"))


def test_split_names_and_bad_manual_dirs(tmp_path):
  assert tfds_hh.split_of("harmless-base-test.jsonl.gz") == "test"
  assert tfds_hh.split_of("train.jsonl") == "train"
  assert tfds_hh.split_of("helpful_validation.jsonl.gz") == "validation"
  assert tfds_hh.split_of("prefs.jsonl") is None
  manual = tmp_path / "manual"
  manual.mkdir()
  (manual / "prefs.jsonl").write_text(json.dumps({"chosen": "x", "rejected": "y"}) + "\n")
  with pytest.raises(ValueError, match=r"cannot tell the split of \['prefs.jsonl'\]"):
    tfds_hh.build_hh_rlhf(str(manual), str(tmp_path / "out"))
