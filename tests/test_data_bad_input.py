"""Bad input: each case raises a DataError naming `path:line` and the problem, or, with
on_error="skip", is counted per reason and reported. Nothing is dropped silently."""
import gzip
import json
import logging

import pytest
import tokenizers
from tokenizers import models as tok_models
from tokenizers import pre_tokenizers

from rlhf_jax import data

GOOD = {"prompt": "Q", "chosen": " a", "rejected": " b"}
HH_GOOD = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go"}


def _write_lines(tmp_path, lines, name="bad.jsonl"):
  """Writes raw lines (bytes, str, or objects as JSON) one per line."""
  path = tmp_path / name
  out = b""
  for line in lines:
    if isinstance(line, dict) or isinstance(line, list):
      line = json.dumps(line)
    out += (line if isinstance(line, bytes) else line.encode("utf-8")) + b"\n"
  path.write_bytes(out)
  return path


def _raises(path, line, *fragments, reader=data.read_preferences, **kw):
  with pytest.raises(data.DataError) as info:
    reader(path, **kw)
  msg = str(info.value)
  assert msg.startswith(f"{path}:{line}: "), msg
  for frag in fragments:
    assert frag in msg, msg
  assert isinstance(info.value, ValueError)
  return info.value


def test_missing_field(tmp_path):
  path = _write_lines(tmp_path, [GOOD, {"prompt": "Q", "chosen": " a"}])
  err = _raises(path, 2, "missing field 'rejected'", "pairwise")
  assert err.reason == "missing_field"


def test_missing_field_on_the_first_line(tmp_path):
  path = _write_lines(tmp_path, [{"prompt": "Q", "rejected": " b"}])
  _raises(path, 1, "missing field 'chosen'")


def test_empty_chosen(tmp_path):
  path = _write_lines(tmp_path, [GOOD, GOOD, {"prompt": "Q", "chosen": "", "rejected": " b"}])
  _raises(path, 3, "field 'chosen' is empty")


def test_empty_rejected_message(tmp_path):
  path = _write_lines(tmp_path, [{
      "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
      "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}])
  _raises(path, 1, "final assistant message of 'rejected' is empty")


def test_empty_response_in_transcript(tmp_path):
  path = _write_lines(tmp_path, [HH_GOOD, {"chosen": "\n\nHuman: hi\n\nAssistant:",
                                           "rejected": "\n\nHuman: hi\n\nAssistant: go"}])
  _raises(path, 2, "empty chosen response")


def test_chosen_equals_rejected(tmp_path):
  path = _write_lines(tmp_path, [GOOD, {"prompt": "Q", "chosen": " same", "rejected": " same"}])
  assert _raises(path, 2, "identical").reason == "identical"


def test_identical_transcripts(tmp_path):
  path = _write_lines(tmp_path, [{"chosen": HH_GOOD["chosen"], "rejected": HH_GOOD["chosen"]}])
  _raises(path, 1, "chosen and rejected responses are identical")


def test_malformed_json(tmp_path):
  path = _write_lines(tmp_path, [GOOD, '{"prompt": "Q", "chosen": " a", "rejected": }'])
  err = _raises(path, 2, "malformed JSON at column 45: Expecting value")
  assert err.reason == "bad_json"


def test_truncated_json_object(tmp_path):
  path = _write_lines(tmp_path, [GOOD, GOOD, GOOD, '{"prompt": "Q", "chosen"'])
  _raises(path, 4, "malformed JSON")


def test_non_utf8_bytes(tmp_path):
  path = _write_lines(tmp_path, [GOOD, b'{"prompt": "caf\xe9", "chosen": " a", "rejected": " b"}'])
  err = _raises(path, 2, "not valid UTF-8", "0xe9", "byte column 16")
  assert err.reason == "bad_utf8"


def test_wrong_type_of_chosen(tmp_path):
  path = _write_lines(tmp_path, [GOOD, {"prompt": "Q", "chosen": 3, "rejected": " b"}])
  _raises(path, 2, "field 'chosen' must be a string, got int")


def test_wrong_type_of_margin(tmp_path):
  path = _write_lines(tmp_path, [{**GOOD, "margin": "high"}])
  _raises(path, 1, "field 'margin' must be a number, got str")


def test_line_is_not_an_object(tmp_path):
  path = _write_lines(tmp_path, [GOOD, ["Q", " a", " b"]])
  _raises(path, 2, "expected a JSON object per line, got list")


def test_wrong_type_of_label(tmp_path):
  path = _write_lines(tmp_path, [{"prompt": "Q", "completion": " a", "label": "yes"}])
  _raises(path, 1, "field 'label' must be true or false, got str", reader=data.read_unpaired)


def test_bad_message_role(tmp_path):
  path = _write_lines(tmp_path, [{
      "chosen": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}],
      "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}])
  _raises(path, 1, "chosen[1].role='bot'")


def test_transcript_without_assistant_turn(tmp_path):
  path = _write_lines(tmp_path, [HH_GOOD, {"chosen": "\n\nHuman: hi there",
                                           "rejected": "\n\nHuman: hi\n\nAssistant: go"}])
  err = _raises(path, 2, "chosen transcript has no '\\n\\nAssistant:' turn")
  assert err.reason == "no_assistant_turn"


def test_chat_without_final_assistant_turn(tmp_path):
  path = _write_lines(tmp_path, [{"chosen": [{"role": "user", "content": "hi"}],
                                  "rejected": [{"role": "user", "content": "hi"}]}])
  _raises(path, 1, "last message of 'chosen' must be an assistant turn")


def test_mismatched_transcript_prompts(tmp_path):
  path = _write_lines(tmp_path, [HH_GOOD, {"chosen": "\n\nHuman: hi\n\nAssistant: hello",
                                           "rejected": "\n\nHuman: bye\n\nAssistant: go"}])
  err = _raises(path, 2, "mismatched prompts", "first differ at offset 9")
  assert err.reason == "prompt_mismatch"


def test_mismatched_chat_prompts(tmp_path):
  path = _write_lines(tmp_path, [{
      "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
      "rejected": [{"role": "user", "content": "bye"}, {"role": "assistant", "content": "x"}]}])
  _raises(path, 1, "mismatched prompts", "message 0")


def test_prompt_field_disagrees_with_conversation(tmp_path):
  path = _write_lines(tmp_path, [{
      "prompt": "something else",
      "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
      "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]}])
  _raises(path, 1, "field 'prompt' disagrees")


def test_sft_conversation_without_prompt(tmp_path):
  path = _write_lines(tmp_path, [{"messages": [{"role": "assistant", "content": "hi"}]}])
  _raises(path, 1, "no prompt", reader=data.read_sft)


def test_corrupt_gzip(tmp_path):
  path = tmp_path / "bad.jsonl.gz"
  good = gzip.compress((json.dumps(GOOD) + "\n").encode() * 50)
  path.write_bytes(good[:len(good) // 2])  # Cut mid-stream.
  with pytest.raises(data.DataError, match=r"bad\.jsonl\.gz:\d+: cannot read the file"):
    data.read_preferences(path)


def test_missing_file_and_bad_arguments(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.jsonl: no such data file"):
    data.read_preferences(tmp_path / "nope.jsonl")
  path = _write_lines(tmp_path, [GOOD])
  with pytest.raises(ValueError, match="format='csv'"):
    data.read_preferences(path, format="csv")
  with pytest.raises(ValueError, match="on_error='ignore'"):
    data.read_preferences(path, on_error="ignore")


def test_skip_counts_every_reason_and_reports(tmp_path, caplog):
  lines = [GOOD,
           {"prompt": "Q", "chosen": " a"},  # 2 missing_field
           '{"prompt": ',  # 3 bad_json
           b'{"prompt": "\xff", "chosen": " a", "rejected": " b"}',  # 4 bad_utf8
           {"prompt": "Q", "chosen": " x", "rejected": " x"},  # 5 identical
           {"prompt": "Q", "chosen": 1, "rejected": " b"},  # 6 wrong_type
           {"prompt": "Q", "chosen": "", "rejected": " b"},  # 7 empty
           "",  # 8 blank: not an example, not an error
           {"prompt": "Q2", "chosen": " c", "rejected": " d"},
           '{"prompt": "Q", "chosen": " a", "rejected": " b"',  # 10 bad_json
           ]
  path = _write_lines(tmp_path, lines)
  with caplog.at_level(logging.WARNING):
    res = data.read_preferences_with_stats(path, on_error="skip")
  assert [e.prompt for e in res.examples] == ["Q", "Q2"]
  assert res.report.kept == 2
  assert res.report.skipped == {"missing_field": 1, "bad_json": 2, "bad_utf8": 1,
                                "identical": 1, "wrong_type": 1, "empty": 1}
  assert res.report.num_skipped == 7
  assert res.blank_lines == 1
  assert res.report.messages["bad_json"] == (
      f"{path}:3: malformed JSON at column 12: Expecting value",
      f"{path}:10: malformed JSON at column 49: Expecting ',' delimiter")
  logged = "\n".join(r.getMessage() for r in caplog.records)
  assert "skipped 7 (bad_json=2, bad_utf8=1, empty=1, identical=1, missing_field=1, " \
         "wrong_type=1)" in logged
  assert f"{path}:2: missing field 'rejected'" in logged


def _word_tokenizer(words):
  vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>"] + words)}
  tok = tokenizers.Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  return tok


def test_token_id_beyond_model_vocab_names_file_and_line(tmp_path):
  # The tokenizer knows 8 ids; the model only 7, so "zebra" (id 7) cannot be embedded.
  tok = _word_tokenizer(["hi", "yes", "no", "ok", "zebra"])
  path = _write_lines(tmp_path, [{"prompt": "hi", "chosen": "yes", "rejected": "no"},
                                 {"prompt": "hi", "chosen": "ok zebra", "rejected": "no"}])
  pairs = data.read_preferences(path)
  cfg = data.TokenizeConfig(eos_id=1, pad_id=0, max_prompt_len=4, max_response_len=4,
                            vocab_size=7)
  with pytest.raises(data.DataError) as info:
    data.tokenize_preferences(pairs, tok, cfg)
  assert str(info.value) == (f"{path}:2: token id 7 in the chosen response is >= the model's "
                             "vocab size 7 (tokenizer and model disagree)")
  skipped = data.tokenize_preferences(
      pairs, tok, data.TokenizeConfig(eos_id=1, pad_id=0, vocab_size=7, on_error="skip"))
  assert len(skipped.examples) == 1 and skipped.report.skipped == {"token_out_of_vocab": 1}


def test_empty_prompt_after_tokenization(tmp_path):
  tok = _word_tokenizer(["yes", "no"])
  # "   " is a non-empty prompt string, but whitespace splitting leaves no token.
  path = _write_lines(tmp_path, [{"prompt": "   ", "chosen": "yes", "rejected": "no"}])
  pairs = data.read_preferences(path)
  with pytest.raises(data.DataError, match=rf"^{path}:1: the prompt tokenises to no tokens"):
    data.tokenize_preferences(pairs, tok, data.TokenizeConfig(eos_id=1, pad_id=0))
  with_bos = data.tokenize_preferences(pairs, tok, data.TokenizeConfig(eos_id=1, pad_id=0,
                                                                       bos_id=2))
  assert with_bos.examples[0].prompt.tolist() == [2]
