"""Bad configs and data files, table-driven: each is refused by the entry point before anything
trains, with the config key or the file:line named, and the workdir left as it was.

The entry point runs in this process (rlhf_jax.main.main after absl parses the same argv the
CLI gets), which is what `python -m rlhf_jax.main` does minus the interpreter start: an
exception out of main is the CLI's non-zero exit (tests/test_stages.py and
tests/test_hf_pipeline.py check that through subprocesses). A config that was *not* refused
would fail the test at once: the run itself is replaced by one that raises.
"""
import json
import logging as std_logging
import sys

import pytest
from absl import flags
from absl import logging as absl_logging

import chat_models
from rlhf_jax import main as main_lib

QUICKSTART = "experiments/quickstart/config.py:runlocal"
PPO = "experiments/ppo/review_world.py:runlocal"
HF_DPO = "experiments/hf/dpo.py:runlocal"
HF_RLHF = "experiments/hf/rlhf.py:runlocal,reward_model=hf"


class Accepted(Exception):
  """Raised instead of running a config that should have been refused."""


@pytest.fixture(scope="module")
def user(tmp_path_factory, hh_rlhf_path):
  """A user's HF model directory and data files, and the bad files of the cases below."""
  root = tmp_path_factory.mktemp("bad_inputs")
  rows = chat_models.hh_rows(hh_rlhf_path, 60)
  bpe = chat_models.train_bpe(r["chosen"] for r in rows)
  model = chat_models.model_dir(root, "model", bpe, tokenizer="chatml", arch="qwen2")
  files = chat_models.write_chat_files(root / "data", rows)
  one_pair = json.loads(open(files["pairs"]).readline())
  bad = {
      "empty.jsonl": "",
      "one_pair.jsonl": json.dumps(one_pair) + "\n",
      "prefs.csv": "prompt,chosen,rejected\nhi,a,b\n",
      "missing_field.jsonl": json.dumps({"prompt": "hi", "chosen": "a"}) + "\n",
      "deep.jsonl": "[" * 100_000 + "]" * 100_000 + "\n",
      "surrogate.jsonl": '{"prompt": "hi \\ud800", "chosen": "a", "rejected": "b"}\n',
  }
  for name, text in bad.items():
    (root / name).write_text(text)
  (root / "a_directory").mkdir()
  no_config = root / "no_config_json"
  no_config.mkdir()
  for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
    (no_config / name).write_bytes((model / name).read_bytes())
  (root / "dict_config.py").write_text("def get_config(arg=None):\n  return {'a': 1}\n")
  (root / "no_get_config.py").write_text("CONFIG = 1\n")
  return {"root": root, "model": model, "no_config": no_config, **files}


def _cases():
  q, p, h, r = QUICKSTART, PPO, HF_DPO, HF_RLHF
  return [
      # (id, config, overrides, what the message must name)
      ("steps_negative", q, ["sft.steps=-1"], "config.sft.steps"),
      ("steps_zero", q, ["sft.steps=0"], "config.sft.steps"),
      ("dpo_batch_zero", q, ["dpo.batch_size=0"], "config.dpo.batch_size"),
      ("reward_batch_negative", q, ["reward.batch_size=-4"], "config.reward.batch_size"),
      ("lr_negative", q, ["sft.optim.lr=-1"], "config.sft.optim.lr"),
      ("lr_nan", q, ["sft.optim.lr=nan"], "config.sft.optim.lr"),
      ("lr_inf", q, ["sft.optim.lr=inf"], "config.sft.optim.lr"),
      ("beta_nan", q, ["dpo.beta=nan"], "config.dpo.beta"),
      ("max_len_zero", q, ["model.max_len=0"], "config.model.max_len"),
      ("rows_zero", q, ["sft.rows=0"], "config.sft.rows"),
      ("length_zero", q, ["sft.length=0"], "config.sft.length"),
      ("log_every_zero", q, ["run.log_every=0"], "config.run.log_every"),
      ("checkpoint_every_zero", q, ["run.checkpoint_every=0"], "config.run.checkpoint_every"),
      ("keep_checkpoints_zero", q, ["run.keep_checkpoints=0"], "config.run.keep_checkpoints"),
      ("unknown_loss", q, ["dpo.loss=dpoo"], "config.dpo.loss"),
      ("unknown_algorithm", q, ["ppo.algorithm=ppg"], "config.ppo.algorithm"),
      ("minibatch_not_dividing", q, ["ppo.minibatch_size=7"], "config.ppo.minibatch_size"),
      ("rows_not_dividing_accum", q, ["sft.optim.accum_steps=3"], "config.sft.rows"),
      ("stages_out_of_order", q, ["stages=('dpo', 'sft')"], "config.stages"),
      ("pairs_without_sft", q, ["stages=('pairs', 'reward')"], "config.stages"),
      ("unknown_task", q, ["task.kind=other"], "config.task.kind"),
      ("model_dtype", q, ["model.dtype=float16"], "config.model.dtype"),
      ("export_dtype", q, ["export.dtype=float16"], "config.export.dtype"),
      ("mesh_too_large", q, ["mesh.tensor=3"], "config.mesh"),
      ("lora_rank_negative", q, ["lora.rank=-1"], "config.lora.rank"),
      ("kl_target_zero", q, ["ppo.kl_target=0.0"], "config.ppo.kl_target"),
      ("simpo_with_reference", q, ["dpo.loss=simpo"], "config.dpo.reference"),
      ("kto_precomputed", q, ["dpo.loss=kto", "dpo.reference=precomputed"],
       "config.dpo.reference"),
      ("tr_dpo_with_lora", q, ["dpo.ref_sync_every=5", "lora.rank=4"],
       "config.dpo.ref_sync_every"),
      ("grpo_group_of_one", p.replace("runlocal", "runlocal,algo=grpo"),
       ["ppo.group_size=1"], "config.ppo.group_size"),
      ("fused_gold", p.replace("runlocal", "runlocal,reward=gold"), ["ppo.fused=True"],
       "config.ppo.fused"),
      ("pairs_missing", h, ["data.pairs={root}/missing.jsonl"], "config.data.pairs"),
      ("pairs_directory", h, ["data.pairs={root}/a_directory"], "a_directory"),
      ("pairs_csv", h, ["data.pairs={root}/prefs.csv"], "prefs.csv"),
      ("pairs_empty", h, ["data.pairs={root}/empty.jsonl"], "empty.jsonl"),
      ("pairs_one", h, ["data.pairs={root}/one_pair.jsonl"], "one_pair.jsonl"),
      ("pairs_missing_field", h, ["data.pairs={root}/missing_field.jsonl", "data.on_error=raise"],
       "missing_field.jsonl:1"),
      ("pairs_deep_json", h, ["data.pairs={root}/deep.jsonl", "data.on_error=skip"],
       "deep.jsonl:1"),
      ("pairs_surrogate", h, ["data.pairs={root}/surrogate.jsonl", "data.on_error=raise"],
       "surrogate.jsonl:1"),
      ("on_error_unknown", h, ["data.on_error=ignore"], "config.data.on_error"),
      ("eval_fraction", h, ["data.eval_fraction=1.5"], "config.data.eval_fraction"),
      ("prompt_len_zero", h, ["task.max_prompt_len=0"], "config.task.max_prompt_len"),
      ("over_length_unknown", h, ["task.over_length=cut"], "config.task.over_length"),
      ("chat_unknown", h, ["task.chat=sometimes"], "config.task.chat"),
      ("pad_is_eos", h, ["task.pad_token=<|im_end|>"], "config.task.pad_token"),
      ("eos_unknown", h, ["task.eos_token=<nope>"], "config.task.eos_token"),
      ("model_dir_missing", h, ["model_dir={root}/nowhere"], "config.model_dir"),
      ("model_without_config_json", h, ["model_dir={root}/no_config_json"],
       "config.model_dir={root}/no_config_json: "),
      # A causal LM named as the reward model would score with a random head.
      ("reward_dir_not_a_reward_model", r, ["ppo.reward_hf_dir={root}/model"],
       "config.ppo.reward_hf_dir"),
  ]


def _argv(user, config, overrides, workdir):
  argv = ["main", f"--config={config}", f"--workdir={workdir}"]
  if config.startswith("experiments/hf/"):
    argv += [f"--config.model_dir={user['model']}", f"--config.data.pairs={user['pairs']}"]
  if config.startswith("experiments/hf/rlhf.py"):
    argv += [f"--config.data.sft={user['sft']}"]
  return argv + [f"--config.{o.format(root=user['root'])}" for o in overrides]


@pytest.fixture(autouse=True)
def _logging_as_it_was():
  """main.main and absl's flag parsing set the absl logger's verbosity and add main's
  third-party filter; later tests in this process read INFO lines through caplog."""
  absl_logger = std_logging.getLogger("absl")
  level = absl_logger.level
  handler = absl_logging.get_absl_handler()
  filters = (list(std_logging.getLogger().filters), list(handler.filters))
  yield
  absl_logger.setLevel(level)
  std_logging.getLogger().filters[:] = filters[0]
  handler.filters[:] = filters[1]


def _reset_flags():
  """Forget the parsed values and the config's override flags (config_flags defines one flag
  per overridden key at parse time; the next case may override the same key again)."""
  flags.FLAGS.unparse_flags()
  for name in [n for n in flags.FLAGS if n.startswith("config.")]:
    delattr(flags.FLAGS, name)
  sys.modules.pop("config_config", None)  # config_flags' module of the last config file.


def _refusal(argv, monkeypatch) -> str:
  """main.main on `argv` as the CLI runs it; returns the refusal's message."""
  resolve = main_lib.resolve

  def no_run(config):  # A config that gets this far was accepted: fail now, train nothing.
    validate, _ = resolve(config)

    def accepted(config, workdir):
      raise Accepted(f"accepted: {argv}")
    return validate, accepted

  monkeypatch.setattr(main_lib, "resolve", no_run)
  monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the overrides from sys.argv.
  _reset_flags()
  try:
    flags.FLAGS(argv)
    main_lib.main(["main"])
  except Accepted:
    raise
  except Exception as e:  # pylint: disable=broad-except
    return f"{type(e).__name__}: {e}"
  finally:
    _reset_flags()
  pytest.fail(f"not refused: {argv}")


def _snapshot(workdir):
  return {p.relative_to(workdir).as_posix(): p.read_bytes()
          for p in sorted(workdir.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c[0])
def test_bad_input_is_refused_naming_it_and_the_workdir_stays_as_it_was(case, user, tmp_path,
                                                                       monkeypatch):
  _, config, overrides, expected = case
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text('{"from": "an earlier run"}')
  before = _snapshot(workdir)
  message = _refusal(_argv(user, config, overrides, workdir), monkeypatch)
  assert expected.format(root=user["root"]) in message, message
  assert _snapshot(workdir) == before  # Nothing written, config.json not overwritten.


@pytest.mark.parametrize("name,expected", [("dict_config.py", "returned a dict"),
                                           ("no_get_config.py", "defines no get_config")])
def test_config_files_that_are_not_configs_are_refused_naming_the_file(user, tmp_path,
                                                                       monkeypatch, name,
                                                                       expected):
  path = user["root"] / name
  argv = ["main", f"--config={path}", f"--workdir={tmp_path / 'run'}"]
  monkeypatch.setattr(sys, "argv", argv)
  _reset_flags()
  try:
    with pytest.raises(flags.Error, match=expected) as info:
      flags.FLAGS(argv)
  finally:
    _reset_flags()
  assert str(path) in str(info.value)
  assert not (tmp_path / "run").exists()


def test_the_table_is_at_least_thirty_cases():
  assert len(_cases()) >= 30
