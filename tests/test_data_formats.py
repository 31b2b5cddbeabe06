"""File types: JSON Lines, JSON arrays and Parquet give the same examples; unsupported files,
directories, deep or broken JSON, lone surrogates and empty files are named errors (or
counted skips); `read_prompts` for each layout and .txt."""
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhf_jax import data

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
PAIRWISE = [{"prompt": "Q1", "chosen": " good", "rejected": " bad", "margin": 2.0},
            {"prompt": "Q2", "chosen": "yes", "rejected": "no"}]
CHAT_PAIRS = [{"chosen": CONV + [{"role": "assistant", "content": "4"}],
               "rejected": CONV + [{"role": "assistant", "content": "5"}]},
              {"chosen": [{"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello."}],
               "rejected": [{"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": "Go away."}]}]
HH_PAIRS = [{"chosen": "\n\nHuman: hi\n\nAssistant: hello",
             "rejected": "\n\nHuman: hi\n\nAssistant: go"}]
SFT_CHAT = [{"messages": CONV + [{"role": "assistant", "content": "4"}]},
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                          {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}]
# TRL's conversational prompt/completion layout: messages in both columns.
SFT_PROMPT_COMPLETION = [{"prompt": CONV, "completion": [{"role": "assistant", "content": "4"}]}]
UNPAIRED = [{"prompt": "Q", "completion": " yes", "label": True},
            {"prompt": "Q", "completion": " no", "label": False}]
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _write(tmp_path, rows, kind, name="d"):
  """rows as `kind`: jsonl, jsonl.gz, json (array), json.gz, json_lines (JSON Lines named
  .json, as datasets' to_json writes) or parquet."""
  if kind == "parquet":
    path = tmp_path / f"{name}.parquet"
    # Small row groups, so a file spans several record batches.
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=1)
    return path
  if kind in ("jsonl", "jsonl.gz", "json_lines"):
    text = "".join(json.dumps(r) + "\n" for r in rows)
  else:
    text = json.dumps(rows, indent=2)
  path = tmp_path / f"{name}.{'json' if kind == 'json_lines' else kind}"
  if kind.endswith(".gz"):
    with gzip.open(path, "wt", encoding="utf-8") as f:
      f.write(text)
  else:
    path.write_text(text, encoding="utf-8")
  return path


KINDS = ["jsonl", "jsonl.gz", "json", "json.gz", "json_lines", "parquet"]


def _where(path, n, kind):
  return f"{path}:{n}" if kind in ("jsonl", "jsonl.gz", "json_lines") else f"{path}:row {n}"


def _fields(examples):
  return [tuple(v for k, v in vars(e).items() if k != "source") for e in examples]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows,reader,layout", [
    (PAIRWISE, data.read_preferences_with_stats, "pairwise"),
    (CHAT_PAIRS, data.read_preferences_with_stats, "chat"),
    (HH_PAIRS, data.read_preferences_with_stats, "hh"),
    (SFT_CHAT, data.read_sft_with_stats, "chat"),
    (SFT_PROMPT_COMPLETION, data.read_sft_with_stats, "prompt_response"),
    (UNPAIRED, data.read_unpaired_with_stats, "unpaired"),
])
def test_same_examples_from_every_file_type(tmp_path, kind, rows, reader, layout):
  reference = reader(_write(tmp_path, rows, "jsonl", "ref"))
  path = _write(tmp_path, rows, kind)
  res = reader(path)
  assert res.format == layout
  assert _fields(res.examples) == _fields(reference.examples)
  assert [e.source for e in res.examples] == [_where(path, i, kind)
                                              for i in range(1, len(rows) + 1)]
  # And rendered in a model's template, the same again.
  fmt = data.ChatTemplate(CHATML, eos_token="<|im_end|>")
  assert _fields(reader(path, chat_format=fmt).examples) == _fields(
      reader(_write(tmp_path, rows, "jsonl", "ref"), chat_format=fmt).examples)


def test_parquet_message_columns_and_nulls(tmp_path):
  rows = [dict(PAIRWISE[0]), dict(PAIRWISE[1])]  # The second has no margin: a null cell.
  path = _write(tmp_path, rows, "parquet")
  assert pq.read_schema(path).field("margin").nullable
  assert [e.margin for e in data.read_preferences(path)] == [2.0, None]
  # A list-of-struct column comes out as plain lists of dicts.
  path = _write(tmp_path, CHAT_PAIRS, "parquet", "chat")
  assert pa.types.is_list(pq.read_schema(path).field("chosen").type)
  (a, b) = data.read_preferences(path)
  assert a.prompt == "\n\nSystem: Be brief.\n\nHuman: 2+2?\n\nAssistant:"
  assert (a.chosen, a.rejected, b.rejected) == (" 4", " 5", " Go away.")


def test_chat_template_rendering_of_each_layout(tmp_path):
  fmt = data.ChatTemplate(CHATML, eos_token="<|im_end|>")
  (ex,) = data.read_sft(_write(tmp_path, SFT_PROMPT_COMPLETION, "parquet"), chat_format=fmt)
  assert ex.prompt == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?"
                       "<|im_end|>\n<|im_start|>assistant\n")
  assert ex.response == "4<|im_end|>"
  # hh transcripts are re-rendered as messages (the space after each marker dropped).
  (pair,) = data.read_preferences(_write(tmp_path, HH_PAIRS, "json"), chat_format=fmt)
  assert pair.prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
  assert (pair.chosen, pair.rejected) == ("hello<|im_end|>", "go<|im_end|>")
  (sft,) = data.read_sft(_write(tmp_path, [{"text": HH_PAIRS[0]["chosen"]}], "jsonl", "t"),
                         chat_format=fmt)
  assert (sft.prompt, sft.response) == (pair.prompt, pair.chosen)
  # Strings are always verbatim, even under a template; a message response after a string
  # prompt is rendered as the reply to that prompt as one user turn.
  mixed = _write(tmp_path, [{"prompt": "raw text", "completion": [
      {"role": "assistant", "content": "ok"}], "label": True}], "jsonl", "mixed")
  (un,) = data.read_unpaired(mixed, chat_format=fmt)
  assert (un.prompt, un.completion) == ("raw text", "ok<|im_end|>")
  (pw,) = data.read_preferences(_write(tmp_path, PAIRWISE[:1], "jsonl", "pw"), chat_format=fmt)
  assert (pw.prompt, pw.chosen) == ("Q1", " good")


def test_a_custom_chat_format_also_rerenders_hh(tmp_path):
  fmt = data.ChatFormat(user_marker="<|user|>", assistant_marker="<|assistant|>", separator="\n")
  (pair,) = data.read_preferences(_write(tmp_path, HH_PAIRS, "jsonl"), chat_format=fmt)
  assert (pair.prompt, pair.chosen) == ("<|user|>\nhi<|assistant|>", "\nhello")


@pytest.mark.parametrize("name", ["d.csv", "d.txt", "d.tsv", "data"])
def test_unsupported_file_type_names_the_file(tmp_path, name):
  path = tmp_path / name
  path.write_text("prompt,chosen,rejected\nQ,a,b\n")
  with pytest.raises(data.DataError) as info:
    data.read_preferences(path)
  msg = str(info.value)
  assert msg.startswith(f"{path}: unsupported file type"), msg
  assert ".jsonl, .jsonl.gz, .json, .json.gz, .parquet" in msg
  assert info.value.reason == "unsupported_format"


def test_directory_is_named_as_a_directory(tmp_path):
  with pytest.raises(IsADirectoryError, match=f"^{tmp_path}: is a directory, not a data file"):
    data.read_sft(tmp_path)
  with pytest.raises(FileNotFoundError, match="no such data file"):
    data.read_sft(tmp_path / "missing.parquet")


@pytest.mark.parametrize("kind", ["json", "parquet"])
def test_row_errors_name_the_row(tmp_path, kind):
  rows = [PAIRWISE[0], PAIRWISE[1], {"prompt": "Q3", "chosen": "x", "rejected": "x"}]
  path = _write(tmp_path, rows, kind)
  with pytest.raises(data.DataError, match=f"^{path}:row 3: chosen and rejected responses are "
                     "identical"):
    data.read_preferences(path)


def test_json_array_element_and_syntax_errors(tmp_path):
  path = tmp_path / "a.json"
  path.write_text(json.dumps([PAIRWISE[0], ["not", "an", "object"], PAIRWISE[1]]))
  with pytest.raises(data.DataError, match=rf"^{path}:row 2: expected a JSON object per array "
                     "element, got list"):
    data.read_preferences(path)
  res = data.read_preferences_with_stats(path, on_error="skip")
  assert len(res.examples) == 2 and res.report.skipped == {"wrong_type": 1}
  # One document: a syntax error makes the whole file unreadable, even under skip.
  path.write_text('[\n  {"prompt": "Q", "chosen": "a", "rejected": "b"},\n  {"prompt": }\n]')
  with pytest.raises(data.DataError, match=rf"^{path}:3: malformed JSON at column 14"):
    data.read_preferences(path, on_error="skip")
  path.write_text('"a"\n"b"\n')  # Not "[": read as JSON Lines.
  with pytest.raises(data.DataError, match=rf"^{path}:1: expected a JSON object per line, got "
                     "str .*read as JSON Lines"):
    data.read_preferences(path)
  pretty = tmp_path / "pretty.json"
  pretty.write_text(json.dumps({"prompt": "Q", "chosen": "a", "rejected": "b"}, indent=2))
  with pytest.raises(data.DataError, match=rf"^{pretty}:1: malformed JSON .* read as JSON Lines"):
    data.read_preferences(pretty)


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet"])
def test_skip_counts_per_reason_and_prints(tmp_path, kind, capsys):
  rows = [PAIRWISE[0],
          {"prompt": "Q", "chosen": " a", "rejected": " a"},  # identical
          {"prompt": "Q", "chosen": " a", "rejected": ""},  # empty
          {"prompt": "Q", "chosen": " a"},  # missing_field (a null cell in parquet)
          PAIRWISE[1]]
  path = _write(tmp_path, rows, kind)
  res = data.read_preferences_with_stats(path, on_error="skip")
  assert [e.prompt for e in res.examples] == ["Q1", "Q2"]
  assert res.report.skipped == {"identical": 1, "empty": 1, "missing_field": 1}
  assert res.report.messages["missing_field"] == (
      f"{_where(path, 4, kind)}: missing field 'rejected' (layout 'pairwise')",)
  out = capsys.readouterr().out
  assert f"preferences from {path}: kept 2, skipped 3 (empty=1, identical=1, " \
         "missing_field=1)" in out


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_deeply_nested_json_is_a_named_error(tmp_path, on_error):
  deep = "[" * 100_000 + "]" * 100_000
  path = tmp_path / "deep.jsonl"
  path.write_text(json.dumps(PAIRWISE[0]) + "\n" + deep + "\n" +
                  '{"prompt": ' + deep + ', "chosen": "a", "rejected": "b"}\n')
  if on_error == "raise":
    with pytest.raises(data.DataError, match=f"^{path}:2: JSON nested too deeply") as info:
      data.read_preferences(path)
    assert info.value.reason == "bad_json"
  else:
    res = data.read_preferences_with_stats(path, on_error="skip")
    assert len(res.examples) == 1 and res.report.skipped == {"bad_json": 2}
    assert res.report.messages["bad_json"][1].startswith(f"{path}:3: JSON nested too deeply")
  array = tmp_path / "deep.json"
  array.write_text("[" + deep + "]")
  with pytest.raises(data.DataError, match=f"^{array}: JSON nested too deeply"):
    data.read_preferences(array, on_error=on_error)


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_lone_surrogate_is_a_named_error(tmp_path, on_error):
  lines = [json.dumps(PAIRWISE[0]),
           '{"prompt": "Q", "chosen": "ok \\ud83d\\ude00", "rejected": "no"}',  # A valid pair.
           '{"prompt": "broken \\ud800 escape", "chosen": "a", "rejected": "b"}',
           '{"chosen": [{"role": "user", "content": "x"}, {"role": "assistant", "content": '
           '"\\uDC00"}], "prompt": "Q", "rejected": "b"}']
  path = tmp_path / "s.jsonl"
  path.write_text("\n".join(lines) + "\n")
  if on_error == "raise":
    with pytest.raises(data.DataError, match=rf"^{path}:3: field prompt holds a lone surrogate "
                       r"'\\ud800' at character 7") as info:
      data.read_preferences(path)
    assert info.value.reason == "bad_text"
  else:
    res = data.read_preferences_with_stats(path, on_error="skip")
    assert [e.chosen for e in res.examples] == [" good", "ok \U0001F600"]
    assert res.report.skipped == {"bad_text": 2}
    assert "field chosen[1].content holds a lone surrogate" in res.report.messages["bad_text"][1]
  array = tmp_path / "s.json"
  array.write_text("[" + ",".join(lines) + "]")
  with pytest.raises(data.DataError, match=rf"^{array}:row 3: field prompt holds a lone"):
    data.read_preferences(array)


def test_parquet_invalid_utf8_names_the_row(tmp_path):
  values = pa.array([b"Q1", b"caf\xe9", b"Q3"], pa.binary())
  prompt = pa.Array.from_buffers(pa.string(), 3, values.buffers())  # Unvalidated bytes.
  path = tmp_path / "bad.parquet"
  pq.write_table(pa.table({"prompt": prompt, "chosen": ["a", "b", "c"],
                           "rejected": ["x", "y", "z"]}), path)
  with pytest.raises(data.DataError, match=f"^{path}:row 2: not valid UTF-8") as info:
    data.read_preferences(path)
  assert info.value.reason == "bad_utf8"
  res = data.read_preferences_with_stats(path, on_error="skip")
  assert [e.prompt for e in res.examples] == ["Q1", "Q3"]
  not_parquet = tmp_path / "fake.parquet"
  not_parquet.write_text("hello")
  with pytest.raises(data.DataError, match=f"^{not_parquet}: not a readable Parquet file"):
    data.read_preferences(not_parquet)


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet"])
def test_no_examples_is_an_error_naming_the_file(tmp_path, kind):
  empty = tmp_path / f"empty.{kind}"
  if kind == "parquet":
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), empty)
  else:
    empty.write_text("" if kind == "jsonl" else "[]")
  with pytest.raises(data.DataError, match=f"^{empty}: no examples: ") as info:
    data.read_sft(empty)
  assert info.value.reason == "no_examples"
  bad = _write(tmp_path, [{"prompt": "Q"}, {"prompt": "", "response": "a"}], kind, "bad")
  with pytest.raises(data.DataError, match=rf"^{bad}: no examples: all 2 records were skipped "
                     r"\(empty=1, missing_field=1\)"):
    data.read_sft(bad, on_error="skip")


def test_blank_only_file(tmp_path):
  path = tmp_path / "blank.jsonl"
  path.write_text("\n  \n\n")
  with pytest.raises(data.DataError, match="no examples: the file holds only 3 blank lines"):
    data.read_unpaired(path)


# ---------------------------------------------------------------------------------------------
# read_prompts
# ---------------------------------------------------------------------------------------------

PROMPT_ROWS = {
    "prompt": [{"prompt": "Tell me a joke."}, {"prompt": CONV}],
    "messages": [{"messages": CONV}, {"messages": [{"role": "user", "content": "Hi"}]}],
    "hh": [HH_PAIRS[0], {"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d",
                         "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: e"}],
}
HH_RENDERED = {
    "prompt": ["Tell me a joke.", "\n\nSystem: Be brief.\n\nHuman: 2+2?\n\nAssistant:"],
    "messages": ["\n\nSystem: Be brief.\n\nHuman: 2+2?\n\nAssistant:",
                 "\n\nHuman: Hi\n\nAssistant:"],
    "hh": ["\n\nHuman: hi\n\nAssistant:", "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"],
}


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet"])
@pytest.mark.parametrize("layout", sorted(PROMPT_ROWS))
def test_read_prompts_layouts(tmp_path, kind, layout):
  rows = PROMPT_ROWS[layout]
  if kind == "parquet" and layout == "prompt":
    rows = rows[:1]  # One Parquet column cannot hold both a string and a message list.
  path = _write(tmp_path, rows, kind)
  res = data.read_prompts_with_stats(path)
  assert res.format == layout
  assert res.examples == HH_RENDERED[layout][:len(rows)]
  fmt = data.ChatTemplate(CHATML, eos_token="<|im_end|>")
  templated = data.read_prompts(path, chat_format=fmt)
  if layout == "messages":
    assert templated[1] == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
  if layout == "hh":
    assert templated[0] == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
  if layout == "prompt":
    assert templated[0] == "Tell me a joke."  # A string prompt is verbatim.


def test_read_prompts_txt_and_errors(tmp_path):
  path = tmp_path / "p.txt"
  path.write_bytes(b"\xef\xbb\xbfFirst prompt\n\n  \nSecond: with  spaces \r\n\xff bad\nlast")
  with pytest.raises(data.DataError, match=f"^{path}:5: not valid UTF-8"):
    data.read_prompts(path)
  res = data.read_prompts_with_stats(path, on_error="skip")
  assert res.examples == ["First prompt", "Second: with  spaces ", "last"]
  assert res.format == "text" and res.blank_lines == 2 and res.report.skipped == {"bad_utf8": 1}
  gz = tmp_path / "p.txt.gz"
  gz.write_bytes(gzip.compress(b"one\ntwo\n"))
  assert data.read_prompts(gz) == ["one", "two"]
  ends = _write(tmp_path, [{"messages": CONV + [{"role": "assistant", "content": "4"}]}],
                "jsonl", "ends")
  with pytest.raises(data.DataError, match=rf"^{ends}:1: the last message of 'messages' is an "
                     "assistant turn"):
    data.read_prompts(ends)
  neither = _write(tmp_path, [{"question": "Q"}], "jsonl", "neither")
  with pytest.raises(data.DataError, match="missing field: expected 'prompt', 'messages'"):
    data.read_prompts(neither)
  csv = tmp_path / "p.csv"
  csv.write_text("a\n")
  with pytest.raises(data.DataError, match=r"supported: .*\.parquet, \.txt, \.txt\.gz"):
    data.read_prompts(csv)
  with pytest.raises(ValueError, match="format='hh' for a .txt prompt file"):
    data.read_prompts(path, format="hh")


def test_check_readable_fails_fast_naming_the_setting(tmp_path, capsys):
  # The first row is bad (a null cell: pyarrow takes the columns from the first row).
  rows = [{"prompt": "Q", "chosen": "a", "rejected": None, "margin": None}] + PAIRWISE * 100
  path = _write(tmp_path, rows, "parquet")
  assert data.check_readable(path, data.read_preferences, what="config.data.pairs") == "pairwise"
  assert capsys.readouterr().out == ""  # Skips are the real read's to report.
  with pytest.raises(data.DataError, match=rf"^{path}:row 1: missing field 'rejected'.*"
                     r"\(config.data.pairs\)$"):
    data.check_readable(path, data.read_preferences, what="config.data.pairs",
                        on_error="raise")
  with pytest.raises(data.DataError, match=r"no examples: .*\(config.data.sft\)$"):
    data.check_readable(path, data.read_sft, what="config.data.sft")
  with pytest.raises(FileNotFoundError, match=r"no such data file \(config.data.prompts\)"):
    data.check_readable(tmp_path / "nope.txt", data.read_prompts, what="config.data.prompts")
  with pytest.raises(IsADirectoryError, match="is a directory"):
    data.check_readable(tmp_path, data.read_prompts)
  txt = tmp_path / "p.txt"
  txt.write_text("a prompt\n")
  assert data.check_readable(txt, data.read_prompts) == "text"
  # A template that rejects the data fails here too, before any model is built.
  fmt = data.ChatTemplate("{{ raise_exception('no system turns') }}")
  chat = _write(tmp_path, CHAT_PAIRS, "jsonl", "chat")
  with pytest.raises(data.DataError, match="no system turns"):
    data.check_readable(chat, data.read_preferences, chat_format=fmt, on_error="raise")
