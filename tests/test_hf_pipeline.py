"""Bring your own model: a user's HF directories (tiny Qwen2 and Llama made here with
transformers, a byte-level BPE saved with a chat template) and chat-format files made from
hh-rlhf, through experiments/hf/rlhf.py (SFT -> reward model -> PPO or GRPO) and
experiments/hf/dpo.py. Every export loads in transformers and gives load_hf's numbers; the
exported tokenizer renders the user's conversations to the user's ids; bf16 in, bf16 out; and
every up-front check refuses with the key or file named before anything is written."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import safetensors
import torch
import transformers

import chat_models
from conftest import REPO_ROOT, experiment_config, run_python
from rlhf_jax import data, models, parallel
from rlhf_jax.collect import checkpoints
from rlhf_jax.train import pipeline
from rlhf_jax.train import task as task_lib

ROWS = 240  # hh-rlhf rows made into chat files (about 220 usable conversations).


@pytest.fixture(scope="module")
def user(tmp_path_factory, hh_rlhf_path):
  """Model directories and data files as a user brings them."""
  root = tmp_path_factory.mktemp("user")
  rows = chat_models.hh_rows(hh_rlhf_path, ROWS)
  bpe = chat_models.train_bpe(r["chosen"] for r in rows)
  return {"qwen2": chat_models.model_dir(root, "qwen2", bpe, tokenizer="chatml", arch="qwen2"),
          "llama": chat_models.model_dir(root, "llama", bpe, tokenizer="llama3", arch="llama"),
          "bpe": bpe, "root": root, "rows": rows,
          **chat_models.write_chat_files(root / "data", rows)}


def _main(config: str, workdir, user, model: str, *overrides):
  return run_python(["-m", "rlhf_jax.main", f"--config=experiments/hf/{config}",
                     f"--workdir={workdir}", f"--config.model_dir={user[model]}",
                     f"--config.data.sft={user['sft']}", f"--config.data.pairs={user['pairs']}",
                     f"--config.data.prompts={user['prompts']}", *overrides], timeout=900)


IDS = np.array([[5, 17, 300, 42, 9, 77, 1000, 3], [8, 8, 120, 64, 3, 511, 2, 2]], np.int32)


def _check_causal(directory):
  """transformers' AutoModelForCausalLM of the export gives load_hf's logits."""
  module, params = models.load_hf(directory)
  ours = np.asarray(module.apply({"params": params}, IDS, np.ones_like(IDS)))
  model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
  with torch.no_grad():
    theirs = model(torch.as_tensor(IDS, dtype=torch.long)).logits.float().numpy()
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)
  assert transformers.GenerationConfig.from_pretrained(directory).eos_token_id is not None


def _check_reward(directory):
  """transformers' AutoModelForSequenceClassification of the export (+ its score_bias) gives
  load_hf's reward-model scores, read at the last real token of right-padded rows."""
  module, params = models.load_hf(directory, role="reward")
  config = json.loads((directory / "config.json").read_text())
  pad = config["pad_token_id"]
  ids = IDS.copy()
  ids[1, 5:] = pad
  mask = (np.arange(ids.shape[1]) < np.array([[8], [5]])).astype(np.int32)
  ours = np.asarray(module.apply({"params": params}, ids, mask))
  model = transformers.AutoModelForSequenceClassification.from_pretrained(directory).eval()
  with torch.no_grad():
    theirs = model(torch.as_tensor(ids, dtype=torch.long)).logits[:, 0].float().numpy()
  np.testing.assert_allclose(theirs + config[models.SCORE_BIAS_KEY], ours, atol=1e-4,
                             rtol=1e-4)


def _check_tokenizer(directory, user_dir, rows):
  """The exported tokenizer's apply_chat_template gives the user's own ids, and they are the
  ids we trained on (our rendering and tokenisation of the same conversation)."""
  exported = transformers.AutoTokenizer.from_pretrained(directory)
  theirs = transformers.AutoTokenizer.from_pretrained(user_dir)
  files = data.load_tokenizer_files(directory)
  chat = files.chat_format()
  tok = data.TokenizeConfig(eos_id=files.eos_id, pad_id=files.pad_id, max_prompt_len=4096,
                            max_response_len=4096, vocab_size=files.min_vocab_size)
  checked = 0
  for row in rows[:20]:
    messages = data.hh_messages(row["chosen"])
    if messages[-1].role != "assistant" or not messages[-1].content.strip():
      continue
    dicts = [{"role": m.role, "content": m.content} for m in messages]
    ids = list(exported.apply_chat_template(dicts, tokenize=True)["input_ids"])
    assert ids == list(theirs.apply_chat_template(dicts, tokenize=True)["input_ids"])
    example = data.SFTExample(chat.render_prompt(messages[:-1]),
                              chat.render_response(messages[:-1], messages[-1].content))
    ours = data.tokenize_sft([example], files.tokenizer, tok).examples[0]
    ours = list(ours.prompt) + list(ours.response)
    # transformers keeps the whitespace the template writes after the final EOS.
    assert ids[:len(ours)] == ours and ours[-1] == files.eos_id
    assert not exported.decode(ids[len(ours):]).strip()
    checked += 1
  assert checked >= 10


def _logged(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


def _check_stage_outputs(stage_dir, steps):
  logged = _logged(stage_dir / "metrics.jsonl")
  assert [m["step"] for m in logged] == list(range(1, steps + 1))
  for key in ("tokens_per_s", "step_time_s"):
    assert all(m[key] > 0 for m in logged), key
  assert all(m["lr"] >= 0 for m in logged) and logged[-1]["lr"] > 0  # Warm-up starts at 0.
  assert (stage_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rlhf_ppo_on_a_qwen2_model(user, tmp_path):
  out = _main("rlhf.py:runlocal,best_of_n", tmp_path, user, "qwen2")
  assert "prompts train:" in out  # Truncation is reported, not silent.
  for stage, steps in (("sft", 6), ("reward", 6), ("ppo", 3)):
    _check_stage_outputs(tmp_path / stage, steps)
  _check_causal(tmp_path / "sft" / "hf")
  _check_reward(tmp_path / "reward" / "hf")
  _check_causal(tmp_path / "ppo" / "hf")
  _check_tokenizer(tmp_path / "ppo" / "hf", user["qwen2"], user["rows"])
  reward_config = json.loads((tmp_path / "reward" / "hf" / "config.json").read_text())
  assert reward_config["architectures"] == ["Qwen2ForSequenceClassification"]
  assert len(reward_config["id2label"]) == 1  # num_labels = 1: a scalar score.
  # The critic (a separate value network) is not part of the exported policy.
  with safetensors.safe_open(tmp_path / "ppo" / "hf" / "model.safetensors", "np") as f:
    assert not any("value" in name or "score" in name for name in f.keys())
  results = json.loads((tmp_path / "results.json").read_text())
  assert set(results["stages"]) == {"sft", "reward", "best_of_n", "ppo"}
  # Best-of-2 by the trained reward model: the kept samples, as SFT data.
  best = [json.loads(l) for l in (tmp_path / "best_of_n" / "best_of_n.jsonl").read_text()
          .splitlines()]
  assert len(best) == 8 and all(r["score"] == max(r["scores"]) for r in best)
  assert len(data.read_sft(tmp_path / "best_of_n" / "best_of_n.jsonl")) == 8


def test_rlhf_grpo_on_a_llama_model(user, tmp_path):
  _main("rlhf.py:runlocal,algo=grpo", tmp_path, user, "llama")
  for stage, steps in (("sft", 6), ("reward", 6), ("grpo", 3)):
    _check_stage_outputs(tmp_path / stage, steps)
  assert all(m["skipped"] == 0 for m in _logged(tmp_path / "grpo" / "metrics.jsonl"))
  _check_reward(tmp_path / "reward" / "hf")
  _check_causal(tmp_path / "grpo" / "hf")
  _check_tokenizer(tmp_path / "grpo" / "hf", user["llama"], user["rows"])


def test_dpo_on_a_qwen2_model(user, tmp_path):
  _main("dpo.py:runlocal", tmp_path, user, "qwen2")
  logged = _logged(tmp_path / "dpo" / "metrics.jsonl")
  assert abs(logged[0]["loss"] - np.log(2)) < 1e-3  # Policy == reference at step 1.
  assert logged[-1]["grad_norm"] > 0 and "eval_reward_accuracy" in logged[-1]
  _check_causal(tmp_path / "dpo" / "hf")
  _check_tokenizer(tmp_path / "dpo" / "hf", user["qwen2"], user["rows"])
  # The checkpoint of a run started from an HF model reads back (collect's policy loader):
  # the model's own config is stored with it.
  mesh = parallel.make_mesh({"data": -1})
  restored = checkpoints.restore(tmp_path / "dpo", role="policy", mesh=mesh, rules="fsdp")
  exported_module, exported = models.load_hf(tmp_path / "dpo" / "hf")
  np.testing.assert_allclose(restored.module.apply({"params": restored.params}, IDS),
                             exported_module.apply({"params": exported}, IDS), atol=1e-5)
  assert restored.task.tokenize_config.eos_id == data.load_tokenizer_files(user["qwen2"]).eos_id


def test_bfloat16_checkpoint_trains_sft_and_dpo_and_exports_bfloat16(user, tmp_path):
  template, special, adds = chat_models.TOKENIZERS["chatml"]
  source = tmp_path / "qwen2_bf16"
  chat_models.save_tokenizer(user["bpe"], source, template, special, adds)
  vocab = data.load_tokenizer_files(source).min_vocab_size
  chat_models.save_model(source, "qwen2", vocab, dtype=torch.bfloat16)
  assert models.source_dtype(source) == "bfloat16"
  user = {**user, "qwen2_bf16": source}
  _main("dpo.py:runlocal,sft", tmp_path / "run", user, "qwen2_bf16",
        "--config.model.dtype=bfloat16")
  for stage in ("sft", "dpo"):
    logged = _logged(tmp_path / "run" / stage / "metrics.jsonl")
    assert all(np.isfinite(m["loss"]) for m in logged)
    export = tmp_path / "run" / stage / "hf"
    assert json.loads((export / "config.json").read_text())["dtype"] == "bfloat16"
    with safetensors.safe_open(export / "model.safetensors", "np") as f:
      assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    model = transformers.AutoModelForCausalLM.from_pretrained(export)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


# ---------------------------------------------------------------------------------------------
# Up-front checks: refused before anything trains, naming the key or the file
# ---------------------------------------------------------------------------------------------


def _config(user, script="rlhf.py", arg="runlocal", model="qwen2", **data_files):
  """The shipped config for the user's model and files, as main.py would resolve it."""
  config = experiment_config(f"hf/{script}", arg=arg, tiny=False)
  config.model_dir = str(user[model])
  for kind in ("sft", "pairs", "prompts"):
    if kind in config.data and not config.data[kind]:
      config.data[kind] = data_files.get(kind, user[kind])
  return config


def _refused(config):
  with pytest.raises((ValueError, OSError)) as info:
    pipeline.validate(config)
    pipeline.preflight(config)
  return str(info.value)


def test_tokenizer_larger_than_the_model_vocabulary_is_refused(user, tmp_path):
  template, special, adds = chat_models.TOKENIZERS["chatml"]
  small = tmp_path / "small_vocab"
  chat_models.save_tokenizer(user["bpe"], small, template, special, adds)
  chat_models.save_model(small, "qwen2", 1000)  # The tokenizer has more ids than 1000.
  message = _refused(_config({**user, "small": small}, model="small"))
  assert "config.model_dir" in message and "1000 rows" in message


def test_sequence_longer_than_the_learned_position_table_is_refused(user, tmp_path):
  template, special, adds = chat_models.TOKENIZERS["chatml"]
  gpt2 = tmp_path / "gpt2"
  chat_models.save_tokenizer(user["bpe"], gpt2, template, special, adds)
  chat_models.save_model(gpt2, "gpt2", data.load_tokenizer_files(gpt2).min_vocab_size,
                         max_positions=64)
  message = _refused(_config({**user, "gpt2": gpt2}, model="gpt2"))
  assert "64 positions" in message and "config.sft.length" in message


@pytest.mark.parametrize("key,value,expected", [
    ("task.pad_token", "<|im_end|>", "config.task.pad_token"),  # pad == eos.
    ("task.eos_token", "<no such token>", "config.task.eos_token"),
    ("data.pairs", "/nonexistent/prefs.jsonl", "config.data.pairs"),
    ("task.chat", "sometimes", "config.task.chat"),
    ("ppo.algorithm", "ppg", "config.ppo.algorithm"),
    ("sft.steps", 0, "config.sft.steps"),
    ("reward.batch_size", -4, "config.reward.batch_size"),
    ("ppo.minibatch_size", 3, "config.ppo.minibatch_size"),
    ("sft.optim.lr", float("nan"), "config.sft.optim.lr"),
])
def test_bad_settings_are_refused_naming_the_key(user, key, value, expected):
  config = _config(user)
  section, name = key.rsplit(".", 1)
  target = config
  for part in section.split("."):
    target = target[part]
  target[name] = value
  assert expected in _refused(config)


def test_pad_token_missing_from_the_tokenizer_is_refused(user, tmp_path):
  template, special, adds = chat_models.TOKENIZERS["chatml"]
  no_pad = tmp_path / "no_pad"
  chat_models.save_tokenizer(user["bpe"], no_pad, template,
                             {k: v for k, v in special.items() if k != "pad_token"}, adds)
  chat_models.save_model(no_pad, "qwen2", data.load_tokenizer_files(no_pad).min_vocab_size)
  message = _refused(_config({**user, "no_pad": no_pad}, model="no_pad"))
  assert "config.task.pad_token" in message and "defines no pad token" in message


@pytest.mark.parametrize("name,content,expected", [
    ("prefs.csv", "prompt,chosen,rejected\nhi,a,b\n", "supported"),
    ("prefs.jsonl", '{"prompt": "hi", "chosen": "a"}\n', "prefs.jsonl:1"),
    ("prefs.jsonl", "", "no examples"),
])
def test_data_files_that_do_not_parse_are_refused(user, tmp_path, name, content, expected):
  path = tmp_path / name
  path.write_text(content)
  message = _refused(_config(user, pairs=str(path)))
  assert expected in message and str(path) in message and "config.data.pairs" in message


def test_a_refused_run_writes_nothing(user, tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "rlhf_jax.main", "--config=experiments/hf/dpo.py:runlocal",
       f"--workdir={workdir}", f"--config.model_dir={user['qwen2']}",
       f"--config.data.pairs={user['pairs']}", "--config.task.pad_token=<|im_end|>"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, HF_HUB_OFFLINE="1"))
  assert proc.returncode != 0
  assert "config.task.pad_token" in proc.stderr, proc.stderr[-2000:]
  assert not workdir.exists()


def test_task_reads_special_tokens_and_template_from_the_users_files(user):
  config = _config(user, "dpo.py")
  task = task_lib.build_task(config)
  files = data.load_tokenizer_files(user["qwen2"])
  assert task.tokenize_config.eos_id == files.tokenizer.token_to_id("<|im_end|>")
  assert task.tokenize_config.pad_id == files.tokenizer.token_to_id("<|endoftext|>")
  assert isinstance(task.chat, data.ChatTemplate)
  assert task.tokenize_config.bos_id is None  # The template writes its own (none for ChatML).
