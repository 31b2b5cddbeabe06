"""DPO on the real hh-rlhf file (hh transcripts) with a tiny Llama loaded from a local HF
directory whose tokenizer has no tokenizer_config.json: the special tokens come from the
config keys."""
import gzip
import json

import numpy as np
import pytest
import tokenizers
import transformers
from tokenizers import decoders, models as tok_models, pre_tokenizers, trainers

from conftest import run_python
from rlhf_jax import data


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, hh_rlhf_path):
  """A byte-level BPE trained on the file's text and a random tiny Llama of that vocab."""
  path = tmp_path_factory.mktemp("hh_llama")
  with gzip.open(hh_rlhf_path, "rt") as f:
    texts = [t for line in f for t in json.loads(line).values()]
  tok = tokenizers.Tokenizer(tok_models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=512,
                                                      special_tokens=["<pad>", "</s>"]))
  tok.save(str(path / "tokenizer.json"))
  config = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32,
                                    intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1,
                                    max_position_embeddings=128, pad_token_id=0,
                                    eos_token_id=1, bos_token_id=None)
  transformers.LlamaForCausalLM(config).save_pretrained(path)
  return path


def test_dpo_on_hh_rlhf_from_a_local_hf_policy(hf_dir, hh_rlhf_path, tmp_path):
  out = run_python(["-m", "rlhf_jax.main", "--config=experiments/hf/dpo.py:runlocal",
                    f"--workdir={tmp_path}", f"--config.model_dir={hf_dir}",
                    f"--config.data.pairs={hh_rlhf_path}", "--config.task.eos_token=</s>",
                    "--config.task.pad_token=<pad>"])
  logged = [json.loads(l) for l in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in logged] == list(range(1, 9))
  assert all(np.isfinite(m["loss"]) for m in logged)
  assert abs(logged[0]["loss"] - np.log(2)) < 1e-3  # Policy == reference at step 1.
  # The policy moved away from the reference (learning is tested on the embedded task).
  assert abs(logged[-1]["rewards/margins"]) > 0 and logged[-1]["grad_norm"] > 0
  assert "eval_reward_accuracy" in logged[-1]
  del out


def test_held_out_split_is_disjoint_and_deterministic(hh_rlhf_path):
  from rlhf_jax.train.task import held_out_split
  pairs = data.read_preferences(hh_rlhf_path)
  train = held_out_split(pairs, 0.02, "train")
  held = held_out_split(pairs, 0.02, "eval")
  assert (len(train), len(held)) == (2266, 46)
  assert not {p.source for p in train} & {p.source for p in held}
  assert [p.source for p in held] == [p.source for p in held_out_split(pairs, 0.02, "eval")]
  with pytest.raises(ValueError, match="eval_fraction=0.0"):
    held_out_split(pairs, 0.0, "eval")


def test_hf_config_requires_the_model_directory(tmp_path):
  import subprocess, sys
  from conftest import REPO_ROOT
  proc = subprocess.run([sys.executable, "-m", "rlhf_jax.main",
                         "--config=experiments/hf/dpo.py:runlocal", f"--workdir={tmp_path}/run"],
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "config.model_dir" in proc.stderr, proc.stderr[-2000:]
  assert not (tmp_path / "run").exists()
