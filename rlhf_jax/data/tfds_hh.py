"""A TFDS builder for hh-rlhf-format preference files, written as array_record (no TensorFlow).

    builder = build_hh_rlhf(manual_dir="path/with/*-train.jsonl.gz", data_dir="/tmp/tfds")
    source = hh_rlhf_source(data_dir="/tmp/tfds", split="test")   # random access, no TF
    pairs = preferences_from_source(source)                        # back in file order

Every `*.jsonl` / `*.jsonl.gz` in the manual dir is parsed with the same reader as
`read_preferences(format="hh")`, so the prompt/response split and every error are identical.
The split comes from the file name: `train.jsonl.gz`, `harmless-base-test.jsonl.gz` ->
"train", "test" (the names Anthropic's repository uses); files of one split are merged.
TFDS shuffles example order when it writes, so each record keeps its `source_file` and
`source_line`, and `preferences_from_source` restores file order.

array_record is the only file format that reads back without TensorFlow (`tfds.data_source`;
`tfds.load`/`as_dataset` need TF), hence it is fixed here rather than left to a default.
"""
import os
import re

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from rlhf_jax.data import readers
from rlhf_jax.data.examples import PreferenceExample

NAME = "hh_rlhf_preferences"
FILE_FORMAT = "array_record"
SPLITS = ("train", "test", "validation")
_SPLIT_RE = re.compile(r"(?:^|[-_.])(train|test|validation)\.jsonl(?:\.gz)?$")


def split_of(filename: str) -> str | None:
  """"harmless-base-test.jsonl.gz" -> "test"; None for names that carry no split."""
  m = _SPLIT_RE.search(filename)
  return m.group(1) if m else None


class HhRlhfPreferences(tfds.core.GeneratorBasedBuilder):
  """Anthropic hh-rlhf transcripts split into prompt / chosen / rejected."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "prompt/chosen/rejected split at the longest common prefix "
                            "ending in '\\n\\nAssistant:'; source file and line kept."}
  # TFDS 4.9.10 derives `code_path` for builders that live in a package through the
  # `importlib_resources` backport, which is only installed on Python < 3.9; naming the file
  # here sidesteps that lookup (it is only used to look for a checksums file beside the code).
  code_path = epath.Path(__file__)
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put hh-rlhf files (one JSON object per line with 'chosen' and 'rejected' transcripts) "
      "in the manual dir, named <anything>-train.jsonl.gz / <anything>-test.jsonl.gz or "
      "train.jsonl[.gz] / test.jsonl[.gz].")

  def _info(self) -> tfds.core.DatasetInfo:
    # DatasetInfo directly: dataset_info_from_configs() wants builder metadata files on disk.
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            "prompt": tfds.features.Text(),
            "chosen": tfds.features.Text(),
            "rejected": tfds.features.Text(),
            "source_file": tfds.features.Text(),
            "source_line": np.int32,
        }),
        homepage="https://github.com/anthropics/hh-rlhf",
    )

  def _split_generators(self, dl_manager):
    manual = os.fspath(dl_manager.manual_dir)
    by_split: dict[str, list[str]] = {}
    unnamed = []
    for name in sorted(os.listdir(manual)):
      if not re.search(r"\.jsonl(\.gz)?$", name):
        continue
      split = split_of(name)
      if split is None:
        unnamed.append(name)
      else:
        by_split.setdefault(split, []).append(os.path.join(manual, name))
    if unnamed:
      raise ValueError(f"{manual}: cannot tell the split of {unnamed}; name files "
                       f"<anything>-{{{','.join(SPLITS)}}}.jsonl[.gz]")
    if not by_split:
      raise ValueError(f"{manual}: no *.jsonl or *.jsonl.gz files")
    return {split: self._generate_examples(files) for split, files in by_split.items()}

  def _generate_examples(self, files: list[str]):
    for path in files:
      name = os.path.basename(path)
      for ex in readers.read_preferences(path, format="hh"):
        line = int(ex.source.rsplit(":", 1)[1])
        yield f"{name}:{line}", {"prompt": ex.prompt, "chosen": ex.chosen,
                                 "rejected": ex.rejected, "source_file": name,
                                 "source_line": line}


def build_hh_rlhf(manual_dir: str, data_dir: str) -> HhRlhfPreferences:
  """Parses the manual dir and writes array_record files under data_dir (once; reruns reuse)."""
  builder = HhRlhfPreferences(data_dir=data_dir, file_format=FILE_FORMAT)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def hh_rlhf_source(data_dir: str, split: str):
  """A random-access data source over one built split (no TensorFlow needed)."""
  return tfds.data_source(NAME, data_dir=data_dir, split=split,
                          builder_kwargs={"file_format": FILE_FORMAT})


def _text(v) -> str:
  return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def preferences_from_source(source) -> list[PreferenceExample]:
  """All records as PreferenceExamples, sorted back into (file, line) order."""
  records = [source[i] for i in range(len(source))]
  records.sort(key=lambda r: (_text(r["source_file"]), int(r["source_line"])))
  return [PreferenceExample(_text(r["prompt"]), _text(r["chosen"]), _text(r["rejected"]),
                            None, f"{_text(r['source_file'])}:{int(r['source_line'])}")
          for r in records]
