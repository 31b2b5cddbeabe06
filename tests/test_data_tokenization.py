"""Tokenizer loading and tokenisation: truncation sides, EOS, PAD != EOS, counted drops."""
import json

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, pre_tokenizers, trainers
from tokenizers import models as tok_models

from rlhf_jax import data

WORDS = ["a", "b", "c", "d", "e", "f", "g", "h"]


def word_tokenizer():
  """ids: <pad>=0 </s>=1 <bos>=2 a=3 b=4 ... h=10."""
  vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<bos>"] + WORDS)}
  tok = tokenizers.Tokenizer(tok_models.WordLevel(vocab, unk_token="<pad>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return tok


def bpe_tokenizer(texts, vocab_size=600):
  tok = tokenizers.Tokenizer(tok_models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["<pad>", "</s>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return tok


def test_load_tokenizer_from_file_and_directory(tmp_path):
  tok = word_tokenizer()
  tok.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"eos_token": {"content": "</s>", "special": True}, "pad_token": "<pad>"}))
  for path in (tmp_path / "tokenizer.json", tmp_path, str(tmp_path)):
    loaded = data.load_tokenizer(path)
    assert loaded.encode("a c h", add_special_tokens=False).ids == [3, 5, 10]
  assert data.special_tokens(tmp_path) == {"eos_token": "</s>", "pad_token": "<pad>"}
  assert data.token_id(loaded, "</s>") == 1
  with pytest.raises(ValueError, match="token '<eos>' is not in the tokenizer's vocabulary"):
    data.token_id(loaded, "<eos>")


def test_load_tokenizer_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.json: no such tokenizer file"):
    data.load_tokenizer(tmp_path / "missing.json")
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match=r"has no tokenizer.json \(it holds \['config.json'\]"):
    data.load_tokenizer(tmp_path)
  bad = tmp_path / "bad.json"
  bad.write_text('{"not": "a tokenizer"}')
  with pytest.raises(ValueError, match="bad.json: not a valid tokenizer.json"):
    data.load_tokenizer(bad)


def test_config_enforces_pad_not_eos_and_ids_in_vocab():
  with pytest.raises(ValueError, match="PAD must differ from EOS"):
    data.TokenizeConfig(eos_id=1, pad_id=1)
  with pytest.raises(ValueError, match=r"bos_id=9 is outside the model vocabulary \[0, 8\)"):
    data.TokenizeConfig(eos_id=1, pad_id=0, bos_id=9, vocab_size=8)
  with pytest.raises(ValueError, match="over_length='clip'"):
    data.TokenizeConfig(eos_id=1, pad_id=0, over_length="clip")


def test_truncation_sides_eos_and_counts():
  tok = word_tokenizer()
  cfg = data.TokenizeConfig(eos_id=1, pad_id=0, bos_id=2, max_prompt_len=4, max_response_len=3)
  res = data.tokenize_sft([data.SFTExample("a b c d e", "f g", "x:1"),  # prompt too long
                           data.SFTExample("a", "b c d", "x:2"),  # response + EOS too long
                           data.SFTExample("a b", "c", "x:3")], tok, cfg)
  got = [(e.prompt.tolist(), e.response.tolist()) for e in res.examples]
  assert got == [([2, 5, 6, 7], [8, 9, 1]),  # BOS kept, oldest prompt tokens dropped.
                 ([2, 3], [4, 5, 6]),  # Cut on the right: the truncated response has no EOS.
                 ([2, 3, 4], [5, 1])]
  assert (res.truncated_prompts, res.truncated_responses) == (1, 1)
  assert res.report.skipped == {}
  assert all(e.prompt.dtype == np.int32 for e in res.examples)


def test_over_length_drop_is_counted():
  tok = word_tokenizer()
  cfg = data.TokenizeConfig(eos_id=1, pad_id=0, max_prompt_len=2, max_response_len=2,
                            over_length="drop")
  pairs = [data.PreferenceExample("a", "b", "c", None, "f:1"),
           data.PreferenceExample("a", "b c", "d", 0.5, "f:2"),  # chosen + EOS = 3 > 2
           data.PreferenceExample("a b c", "d", "e", None, "f:3")]  # prompt 3 > 2
  res = data.tokenize_preferences(pairs, tok, cfg)
  assert [e.source for e in res.examples] == ["f:1"]
  assert res.report.skipped == {"over_length": 2}
  assert res.report.messages["over_length"][0].startswith("f:2: over length")
  assert "skipped 2 (over_length=2)" in res.summary()


def test_unpaired_tokenization():
  tok = word_tokenizer()
  res = data.tokenize_unpaired([data.UnpairedExample("a", "b", False, "u:1")], tok,
                               data.TokenizeConfig(eos_id=1, pad_id=0))
  (ex,) = res.examples
  assert (ex.prompt.tolist(), ex.completion.tolist(), ex.desirable) == ([3], [4, 1], False)


def test_hh_rlhf_tokenizes_with_exact_boundaries(hh_rlhf_path):
  pairs = data.read_preferences(hh_rlhf_path)
  tok = bpe_tokenizer([p.prompt + p.chosen for p in pairs[:500]])
  pad, eos = data.token_id(tok, "<pad>"), data.token_id(tok, "</s>")
  cfg = data.TokenizeConfig(eos_id=eos, pad_id=pad, max_prompt_len=4096, max_response_len=4096,
                            vocab_size=tok.get_vocab_size())
  res = data.tokenize_preferences(pairs, tok, cfg)
  assert len(res.examples) == 2312 and res.truncated_prompts == res.truncated_responses == 0
  for ex, tp in zip(pairs[:50], res.examples[:50]):
    # Byte-level BPE round-trips: the prompt and each response decode to their own text.
    assert tok.decode(tp.prompt.tolist()) == ex.prompt
    assert tp.chosen[-1] == eos and tp.rejected[-1] == eos
    assert tok.decode(tp.chosen[:-1].tolist()) == ex.chosen
    assert tok.decode(tp.rejected[:-1].tolist()) == ex.rejected
    assert tp.source == ex.source
