"""Chat templates and tokenizer files against transformers itself: rendered text, token ids,
what `load_tokenizer_files` finds, and `save_tokenizer_files` round trips.

Every tokenizer here is trained in the test (byte-level BPE on hh-rlhf text, with the
pre-tokenizer regex of Llama 3 / Qwen 2), wrapped in `transformers.PreTrainedTokenizerFast`
with a template written in the style of the public one, and saved with `save_pretrained`, so
the files on disk are what a user's model directory holds.
"""
import filecmp
import gzip
import itertools
import json
import shutil

import jinja2
import pytest
import tokenizers
import transformers

import chat_models
from chat_models import CHATML_QWEN, LLAMA3
from rlhf_jax import data
from rlhf_jax.data import review_world

N_CONVERSATIONS = 50
# Llama 2 / Mistral style: BOS per user turn, no generation prompt, and raise_exception on
# turns that do not alternate.
LLAMA2 = """{%- if messages[0]['role'] == 'system' %}
    {%- set loop_messages = messages[1:] %}
    {%- set system_message = messages[0]['content'] %}
{%- else %}
    {%- set loop_messages = messages %}
    {%- set system_message = false %}
{%- endif %}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if loop.index0 == 0 and system_message != false %}
        {%- set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}
    {%- else %}
        {%- set content = message['content'] %}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {{- bos_token + '[INST] ' + content.strip() + ' [/INST]' }}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + content.strip() + ' ' + eos_token }}
    {%- endif %}
{%- endfor %}
"""

# SmolLM3 / TRL style: {% generation %} around assistant text, a namespace counter and dict().
GENERATION_TAG = """{%- set ns = namespace(users=0) %}
{%- for message in messages %}{%- if message.role == 'user' %}{%- set ns.users = ns.users + 1 %}{%- endif %}{%- endfor %}
{%- set meta = dict(turns=ns.users) %}
{{- '<|im_start|>system\\nturns: ' + meta.turns|string + '<|im_end|>\\n' }}
{%- for message in messages %}
    {%- if message.role == 'assistant' %}
        {{- '<|im_start|>assistant\\n' }}
        {%- generation %}
        {{- message.content + '<|im_end|>' }}
        {%- endgeneration %}
        {{- '\\n' }}
    {%- else %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# name -> (template, special tokens, the special token the tokenizer itself puts first).
FLAVOURS = {
    "chatml_qwen": (CHATML_QWEN, dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
                    None),
    "llama3": (LLAMA3, dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                            pad_token="<|end_of_text|>"), "<|begin_of_text|>"),
    "llama2": (LLAMA2, dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>"), "<s>"),
    "generation_tag": (GENERATION_TAG, dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
                       None),
}


@pytest.fixture(scope="module")
def hh_rows(hh_rlhf_path):
  with gzip.open(hh_rlhf_path, "rt", encoding="utf-8") as f:
    return [json.loads(line) for line in itertools.islice(f, 400)]


@pytest.fixture(scope="module")
def bpe(hh_rows):
  """A byte-level BPE trained on hh-rlhf text, with the chat specials as added tokens."""
  return chat_models.train_bpe(r["chosen"] for r in hh_rows)


def _saved(bpe, directory, name) -> transformers.PreTrainedTokenizerBase:
  """`save_pretrained` of the flavour into `directory`; returns transformers' reload of it."""
  template, special, adds = FLAVOURS[name]
  return chat_models.save_tokenizer(bpe, directory, template, special, adds)


@pytest.fixture(scope="module", params=sorted(FLAVOURS))
def flavour(request, bpe, tmp_path_factory):
  """(name, model directory, transformers' tokenizer loaded from it)."""
  directory = tmp_path_factory.mktemp(request.param)
  return request.param, directory, _saved(bpe, directory, request.param)


def _dicts(messages):
  return [{"role": m.role, "content": m.content} for m in messages]


def _ids(out):
  """apply_chat_template(tokenize=True) ids: transformers 5 returns a BatchEncoding."""
  return list(out["input_ids"] if hasattr(out, "keys") else out)


def _conversations(hh_rows):
  """(context, final assistant message) of the first chosen transcripts."""
  out = []
  for row in hh_rows[:N_CONVERSATIONS]:
    msgs = data.hh_messages(row["chosen"])
    assert msgs[-1].role == "assistant"
    out.append((msgs[:-1], msgs[-1]))
  return out


def _reference(hf, context, last):
  """transformers' (prompt, full) text, or None when the template rejects the conversation."""
  try:
    return (hf.apply_chat_template(_dicts(context), tokenize=False, add_generation_prompt=True),
            hf.apply_chat_template(_dicts(context + (last,)), tokenize=False))
  except jinja2.exceptions.TemplateError:
    return None


def test_hh_messages_split():
  text = "\n\nHuman: a b\n\nAssistant:  two spaces\n\nHuman: c\n\nAssistant: "
  assert data.hh_messages(text) == (
      data.Message("user", "a b"), data.Message("assistant", " two spaces"),
      data.Message("user", "c"), data.Message("assistant", ""))
  with pytest.raises(data.DataError, match=r"^f:3: transcript must start with"):
    data.hh_messages("Human: hi", "f:3")
  with pytest.raises(data.DataError, match="no turns") as info:
    data.hh_messages("", "f:4")
  assert info.value.reason == "bad_transcript"


def test_rendered_text_matches_transformers(flavour, hh_rows):
  name, directory, hf = flavour
  fmt = data.load_tokenizer_files(directory).chat_format()
  assert isinstance(fmt, data.ChatTemplate)
  for context, last in _conversations(hh_rows):
    ref_prompt, ref_full = _reference(hf, context, last)
    prompt = fmt.render_prompt(context)
    response = fmt.render_response(context, last.content)
    assert prompt == ref_prompt
    # Only whitespace after the final EOS text may differ (ChatML's "<|im_end|>\n").
    assert ref_full.startswith(prompt + response)
    assert not ref_full[len(prompt + response):].strip()
    assert response.endswith(hf.eos_token)


def test_raise_exception_is_a_data_error_where_transformers_raises(bpe, tmp_path):
  """13 hh-rlhf transcripts have two Human turns in a row; a Llama 2 template rejects them
  through raise_exception, and the reader counts them instead of crashing."""
  hf = _saved(bpe, tmp_path / "model", "llama2")
  files = data.load_tokenizer_files(tmp_path / "model")
  fmt = files.chat_format()
  two_users = (data.Message("user", "hi"), data.Message("user", "hello?"))
  with pytest.raises(jinja2.exceptions.TemplateError, match="must alternate"):
    hf.apply_chat_template(_dicts(two_users), tokenize=False, add_generation_prompt=True)
  with pytest.raises(data.DataError, match=r"^f:7: the chat template \(.*chat_template\.jinja\) "
                     "failed on this conversation: TemplateError: Conversation roles must "
                     "alternate") as info:
    fmt.render_prompt(two_users, where="f:7")
  assert info.value.reason == "template_error"
  good = "\n\nHuman: hi\n\nAssistant: yo"
  bad = "\n\nHuman: hi\n\nHuman: again\n\nAssistant: "
  path = tmp_path / "pairs.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in [
      {"chosen": good, "rejected": good + "!"}, {"chosen": bad + "a", "rejected": bad + "b"}]))
  res = data.read_preferences_with_stats(path, chat_format=fmt, on_error="skip")
  assert len(res.examples) == 1 and res.report.skipped == {"template_error": 1}
  assert res.examples[0].prompt == "<s>[INST] hi [/INST]"
  assert (res.examples[0].chosen, res.examples[0].rejected) == (" yo </s>", " yo! </s>")


def test_token_ids_match_transformers(flavour, hh_rows, tmp_path):
  """SFT from message lists and preferences from hh transcripts, through the readers and
  tokenisers with the loaded TokenizerFiles, give transformers' ids."""
  name, directory, hf = flavour
  files = data.load_tokenizer_files(directory)
  fmt = files.chat_format()
  cfg = data.TokenizeConfig(eos_id=files.eos_id, pad_id=files.pad_id,
                            bos_id=files.prompt_bos_id(fmt), max_prompt_len=4096,
                            max_response_len=4096, vocab_size=files.min_vocab_size)
  convs = _conversations(hh_rows)
  sft_path = tmp_path / "sft.jsonl"
  sft_path.write_text("".join(json.dumps({"messages": _dicts(c + (m,))}) + "\n"
                              for c, m in convs))
  sft = data.read_sft(sft_path, chat_format=fmt, on_error="skip")
  tokenized = data.tokenize_sft(sft, files.tokenizer, cfg)
  assert tokenized.report.skipped == {} and tokenized.truncated_responses == 0
  for ex in tokenized.examples:
    context, last = convs[int(ex.source.rsplit(":", 1)[1]) - 1]
    want_prompt = _ids(hf.apply_chat_template(_dicts(context), add_generation_prompt=True))
    want_full = _ids(hf.apply_chat_template(_dicts(context + (last,))))
    assert ex.prompt.tolist() == want_prompt
    got = ex.prompt.tolist() + ex.response.tolist()
    assert got == want_full[:len(got)]
    assert not hf.decode(want_full[len(got):]).strip()
    assert ex.response[-1] == files.eos_id and ex.response[-2] != files.eos_id  # One EOS.
  assert len(tokenized.examples) == N_CONVERSATIONS

  pairs_path = tmp_path / "hh.jsonl"
  pairs_path.write_text("".join(json.dumps(r) + "\n" for r in hh_rows[:N_CONVERSATIONS]))
  res = data.read_preferences_with_stats(pairs_path, chat_format=fmt, on_error="skip")
  assert res.format == "hh" and res.report.skipped == {}
  pairs = data.tokenize_preferences(res.examples, files.tokenizer, cfg).examples
  assert len(pairs) == N_CONVERSATIONS
  for ex in pairs:
    row = hh_rows[int(ex.source.rsplit(":", 1)[1]) - 1]
    for response, transcript in ((ex.chosen, row["chosen"]), (ex.rejected, row["rejected"])):
      msgs = data.hh_messages(transcript)
      assert ex.prompt.tolist() == _ids(hf.apply_chat_template(
          _dicts(msgs[:-1]), add_generation_prompt=True))
      want = _ids(hf.apply_chat_template(_dicts(msgs)))
      got = ex.prompt.tolist() + response.tolist()
      assert got == want[:len(got)] and not hf.decode(want[len(got):]).strip()


def test_load_tokenizer_files_finds_what_save_pretrained_wrote(flavour, bpe):
  name, directory, hf = flavour
  template, special, adds = FLAVOURS[name]
  # transformers 5 writes the template as its own file, next to tokenizer(_config).json.
  assert (directory / "chat_template.jinja").is_file()
  files = data.load_tokenizer_files(directory)
  assert files.directory == directory and files.tokenizer_file == directory / "tokenizer.json"
  assert files.chat_template == template == hf.chat_template
  assert files.chat_template_source.endswith("chat_template.jinja")
  assert dict(files.special) == hf.special_tokens_map
  assert (files.bos_token, files.eos_token, files.pad_token) == (
      special.get("bos_token"), special["eos_token"], special["pad_token"])
  assert files.eos_id == hf.eos_token_id and files.pad_id == hf.pad_token_id
  # BOS that the tokenizer adds itself (add_special_tokens=True), as transformers does.
  with_specials = hf("hello there")["input_ids"]
  without = hf("hello there", add_special_tokens=False)["input_ids"]
  assert files.add_bos_token == (adds is not None)
  if adds is not None:
    assert files.bos_added_id == hf.convert_tokens_to_ids(adds) == with_specials[0]
    assert with_specials[1:] == without
    assert files.prompt_bos_id(data.ChatFormat()) == files.bos_added_id
  else:
    assert with_specials == without
  assert files.prompt_bos_id(files.chat_format()) is None  # The template writes its own BOS.
  assert files.vocab_size == len(hf) == bpe.get_vocab_size()
  assert files.min_vocab_size == max(hf.get_vocab().values()) + 1


def test_tokenizer_config_and_legacy_template_locations(bpe, tmp_path):
  """Older checkpoints: the template inside tokenizer_config.json (a string, or named
  templates), in chat_template.json, special tokens only in special_tokens_map.json, and
  add_bos_token without a BOS post-processor."""
  bpe.save(str(tmp_path / "tokenizer.json"))
  cfg_file = tmp_path / "tokenizer_config.json"
  cfg_file.write_text(json.dumps({"chat_template": CHATML_QWEN, "add_bos_token": True,
                                  "eos_token": {"content": "<|im_end|>", "special": True},
                                  "bos_token": None}))
  (tmp_path / "special_tokens_map.json").write_text(json.dumps(
      {"bos_token": "<s>", "pad_token": {"content": "<pad>"}, "eos_token": "</s>"}))
  files = data.load_tokenizer_files(tmp_path)
  assert files.chat_template == CHATML_QWEN
  assert files.chat_template_source.endswith("tokenizer_config.json (key 'chat_template')")
  # tokenizer_config.json wins; a null there falls back to special_tokens_map.json.
  assert dict(files.special) == {"bos_token": "<s>", "eos_token": "<|im_end|>",
                                 "pad_token": "<pad>"}
  assert files.bos_added_id == bpe.token_to_id("<s>")  # From add_bos_token.
  assert data.special_tokens(tmp_path) == dict(files.special)

  cfg_file.write_text(json.dumps({"chat_template": [
      {"name": "tool_use", "template": "x"}, {"name": "default", "template": LLAMA3}]}))
  assert data.load_tokenizer_files(tmp_path).chat_template == LLAMA3
  cfg_file.write_text("{}")
  (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": LLAMA2}))
  files = data.load_tokenizer_files(tmp_path)
  assert files.chat_template == LLAMA2 and files.bos_added_id is None
  (tmp_path / "chat_template.jinja").write_text(GENERATION_TAG)  # Takes precedence.
  assert data.load_tokenizer_files(tmp_path).chat_template == GENERATION_TAG
  # A bare tokenizer.json: no config files, so no specials and no template.
  bare = data.load_tokenizer_files(tmp_path / "tokenizer.json")
  assert bare.directory is None and bare.chat_template is None and dict(bare.special) == {}
  assert isinstance(bare.chat_format(), data.ChatFormat)


def test_broken_template_and_files_are_named(bpe, tmp_path):
  bpe.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
  files = data.load_tokenizer_files(tmp_path)
  with pytest.raises(ValueError, match=r"chat_template\.jinja: chat template syntax error at "
                     r"template line 1"):
    files.chat_format()
  (tmp_path / "tokenizer_config.json").write_text("{not json")
  with pytest.raises(ValueError, match=r"tokenizer_config\.json: not valid JSON"):
    data.load_tokenizer_files(tmp_path)


def test_template_that_cannot_split_prompt_from_response():
  # The generation prompt opens a thinking block that a finished turn does not have.
  fmt = data.ChatTemplate(
      "{% for m in messages %}<{{ m.role }}>{{ m.content }}</s>{% endfor %}"
      "{% if add_generation_prompt %}<assistant><think>{% endif %}", eos_token="</s>")
  ctx = (data.Message("user", "hi"),)
  assert fmt.render_prompt(ctx) == "<user>hi</s><assistant><think>"
  with pytest.raises(data.DataError, match=r"^f:2: the chat template .* renders the generation "
                     "prompt differently from a finished assistant turn") as info:
    fmt.render_response(ctx, "yo", where="f:2")
  assert info.value.reason == "template_mismatch"


def test_eos_whitespace_trimmed_only_at_the_end():
  ctx = (data.Message("user", "q"),)
  fmt = data.ChatTemplate("{% for m in messages %}{{ m.content }}<e>\n\n{% endfor %}",
                          eos_token="<e>")
  assert fmt.render_prompt(ctx) == "q<e>\n\n"
  assert fmt.render_response(ctx, "a") == "a<e>"  # Whitespace after the last EOS: dropped.
  fmt = data.ChatTemplate("{% for m in messages %}[{{ m.content }}<e>\n]{% endfor %}",
                          eos_token="<e>")
  assert fmt.render_response(ctx, "a") == "[a<e>\n]"  # "]" follows EOS: kept as rendered.
  no_eos = data.ChatTemplate("{% for m in messages %}{{ m.content }}\n{% endfor %}")
  assert no_eos.render_response(ctx, "a") == "a\n"


def test_chat_format_render_response_takes_context():
  fmt = data.ChatFormat()
  ctx = (data.Message("user", "hi"),)
  assert fmt.render_prompt(ctx) + fmt.render_response(ctx, "yo") == (
      "\n\nHuman: hi\n\nAssistant: yo")


def test_save_copies_a_model_directory_unchanged(flavour, tmp_path):
  name, directory, hf = flavour
  files = data.load_tokenizer_files(directory)
  written = data.save_tokenizer_files(tmp_path / "export", files)
  assert sorted(p.name for p in written) == sorted(
      p.name for p in directory.iterdir() if p.name in (
          "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
          "special_tokens_map.json"))
  for p in written:
    assert filecmp.cmp(p, directory / p.name, shallow=False)
  _assert_same_tokenizer(transformers.AutoTokenizer.from_pretrained(str(tmp_path / "export")),
                         hf, files.tokenizer)
  with pytest.raises(ValueError, match="keeps its chat template"):
    data.save_tokenizer_files(tmp_path / "export2", files, chat_template="{{ messages }}")


def test_save_writes_overridden_special_tokens_into_the_copy(flavour, tmp_path):
  """A run's special-token override (e.g. config.task.pad_token) lands in the copied
  tokenizer_config.json / special_tokens_map.json; every other file stays byte-identical and
  the same value again rewrites nothing."""
  name, directory, hf = flavour
  files = data.load_tokenizer_files(directory)
  new_pad = next(t for t in ("<|im_end|>", "<|eot_id|>", "<pad>", "<s>")
                 if t in files.tokenizer.get_vocab() and t != files.special.get("pad_token"))
  written = data.save_tokenizer_files(tmp_path / "export", files, pad_token=new_pad,
                                      eos_token=files.special.get("eos_token"))
  rewritten = {"tokenizer_config.json", "special_tokens_map.json"}
  for p in written:
    if p.name not in rewritten:
      assert filecmp.cmp(p, directory / p.name, shallow=False), p.name
    elif p.is_file():
      content = json.loads(p.read_text())
      assert content["pad_token"] == new_pad
      original = json.loads((directory / p.name).read_text())
      assert {k: v for k, v in content.items() if k != "pad_token"} == {
          k: v for k, v in original.items() if k != "pad_token"}
  assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "export")).pad_token == new_pad
  same = data.save_tokenizer_files(tmp_path / "same", files,
                                   pad_token=files.special.get("pad_token"))
  for p in same:
    assert filecmp.cmp(p, directory / p.name, shallow=False), p.name


def _assert_same_tokenizer(loaded, reference, tok):
  text = "Hello there!\n\nHow are you?<|im_end|> fine"
  assert loaded.special_tokens_map == reference.special_tokens_map
  for specials in (True, False):
    assert loaded(text, add_special_tokens=specials)["input_ids"] == reference(
        text, add_special_tokens=specials)["input_ids"]
  assert loaded(text, add_special_tokens=False)["input_ids"] == tok.encode(
      text, add_special_tokens=False).ids
  assert loaded.chat_template == reference.chat_template
  if loaded.chat_template:
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert loaded.apply_chat_template(conv, tokenize=False) == reference.apply_chat_template(
        conv, tokenize=False)


def test_save_in_memory_tokenizer_with_template(bpe, tmp_path):
  written = data.save_tokenizer_files(tmp_path, bpe, chat_template=CHATML_QWEN,
                                      eos_token="<|im_end|>", pad_token="<|endoftext|>")
  assert sorted(p.name for p in written) == ["tokenizer.json", "tokenizer_config.json"]
  config = json.loads((tmp_path / "tokenizer_config.json").read_text())
  assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
  loaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  reference = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tokenizers.Tokenizer.from_str(bpe.to_str()), chat_template=CHATML_QWEN,
      eos_token="<|im_end|>", pad_token="<|endoftext|>")
  _assert_same_tokenizer(loaded, reference, bpe)
  # What we load back renders exactly what transformers renders.
  files = data.load_tokenizer_files(tmp_path)
  ctx = (data.Message("user", "hi"),)
  assert files.chat_format().render_prompt(ctx) == loaded.apply_chat_template(
      _dicts(ctx), tokenize=False, add_generation_prompt=True)


def test_save_review_world_tokenizer(tmp_path):
  tok = review_world.build_tokenizer(review_world.vocabulary())
  data.save_tokenizer_files(tmp_path, tok, eos_token=review_world.EOS,
                            pad_token=review_world.PAD, unk_token=review_world.UNK)
  loaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert loaded.special_tokens_map == {"eos_token": review_world.EOS,
                                       "pad_token": review_world.PAD,
                                       "unk_token": review_world.UNK}
  text = " ".join(review_world.vocabulary()[3:40]) + " " + review_world.EOS
  for specials in (True, False):
    assert loaded(text, add_special_tokens=specials)["input_ids"] == tok.encode(
        text, add_special_tokens=specials).ids
  assert loaded.eos_token_id == tok.token_to_id(review_world.EOS)
  assert loaded.pad_token_id == tok.token_to_id(review_world.PAD)
  # A token the vocabulary lacks would get a new id in transformers: refused up front.
  with pytest.raises(ValueError, match="'<s>' is not in the tokenizer's vocabulary"):
    data.save_tokenizer_files(tmp_path / "x", tok, bos_token="<s>")


def test_save_bare_tokenizer_json_copies_it(bpe, tmp_path):
  src = tmp_path / "src"
  src.mkdir()
  bpe.save(str(src / "tokenizer.json"))
  files = data.load_tokenizer_files(src / "tokenizer.json")
  data.save_tokenizer_files(tmp_path / "out", files, eos_token="</s>", pad_token="<pad>",
                            chat_template=LLAMA2)
  assert filecmp.cmp(src / "tokenizer.json", tmp_path / "out" / "tokenizer.json",
                     shallow=False)
  again = data.load_tokenizer_files(tmp_path / "out")
  assert (again.eos_token, again.pad_token, again.chat_template) == ("</s>", "<pad>", LLAMA2)
  shutil.rmtree(tmp_path / "out")


def test_model_specific_tokens_reach_the_template(bpe, tmp_path):
  """transformers 5 passes every "*_token" string of tokenizer_config.json to the template
  (Gemma 3's image_token, ...), not only the standard seven."""
  bpe.save(str(tmp_path / "tokenizer.json"))
  template = ("{% for m in messages %}{{ m.role }}: {{ m.content }}{{ eos_token }}{% endfor %}"
              "{% if add_generation_prompt %}{{ image_token }}{{ boi_token }}{% endif %}")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>", "pad_token": "<pad>",
      "image_token": "<|im_start|>", "extra_special_tokens": {"boi_token": "<s>"},
      "add_bos_token": False, "chat_template": template}))
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  files = data.load_tokenizer_files(tmp_path)
  assert files.special["image_token"] == "<|im_start|>" and files.special["boi_token"] == "<s>"
  assert files.bos_added_id is None
  fmt = files.chat_format()
  ctx = (data.Message("user", "hi"),)
  want = hf.apply_chat_template(_dicts(ctx), tokenize=False, add_generation_prompt=True)
  assert fmt.render_prompt(ctx) == want == "user: hi</s><|im_start|><s>"


def test_chat_template_pickles_and_copies():
  import copy
  import pickle
  fmt = data.ChatTemplate(CHATML_QWEN, eos_token="<|im_end|>", extra_tokens=(("x_token", "x"),),
                          source="somewhere/chat_template.jinja")
  for clone in (pickle.loads(pickle.dumps(fmt)), copy.deepcopy(fmt)):
    assert clone == fmt and hash(clone) == hash(fmt)
    ctx = (data.Message("user", "hi"),)
    assert clone.render_prompt(ctx) == fmt.render_prompt(ctx)
  with pytest.raises(ValueError, match="tokenizer files hold no chat template"):
    data.ChatTemplate.from_files(data.tokenizer_files_from(
        review_world.build_tokenizer(review_world.vocabulary())))


def test_save_over_an_earlier_export_leaves_no_stale_template(flavour, bpe, tmp_path):
  name, directory, hf = flavour
  data.save_tokenizer_files(tmp_path, data.load_tokenizer_files(directory))
  assert (tmp_path / "chat_template.jinja").is_file()
  data.save_tokenizer_files(tmp_path, bpe, eos_token="</s>", pad_token="<pad>")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json",
                                                        "tokenizer_config.json"]
  assert transformers.AutoTokenizer.from_pretrained(str(tmp_path)).chat_template is None


def test_a_response_ending_in_eos_gets_no_second_eos(bpe):
  eos, pad = bpe.token_to_id("<|im_end|>"), bpe.token_to_id("<|endoftext|>")
  hello = bpe.encode("Hello", add_special_tokens=False).ids
  cfg = data.TokenizeConfig(eos_id=eos, pad_id=pad, max_prompt_len=64,
                            max_response_len=len(hello) + 1)
  res = data.tokenize_sft([data.SFTExample("Q", "Hello<|im_end|>", "t:1"),
                           data.SFTExample("Q", "Hello", "t:2"),  # Plain text: EOS appended.
                           data.SFTExample("Q", "Hello there, how are you?<|im_end|>", "t:3")],
                          bpe, cfg)
  a, b, c = (e.response.tolist() for e in res.examples)
  assert a == b == hello + [eos]
  assert len(c) == len(hello) + 1 and c[-1] != eos  # Truncated: it did not end there.
  assert (res.truncated_prompts, res.truncated_responses) == (0, 1)
