"""Readers for files of SFT, pairwise-preference, unpaired examples and RL prompts.

File types (by extension): JSON Lines (.jsonl, .jsonl.gz: one object per line), JSON
(.json, .json.gz: a top-level array of objects; a .json file that starts with "{" is read as
JSON Lines, which is what `datasets.Dataset.to_json` writes) and Parquet (.parquet: one
record per row, message lists as list-of-struct columns, a null cell meaning an absent
field). Prompt files for online RL (`read_prompts`) may also be .txt: one prompt per line.

Layouts understood (`format=`):
  preferences  "pairwise": {"prompt": str, "chosen": str, "rejected": str}
               "chat":     {"chosen": [messages], "rejected": [messages]} (+ optional "prompt",
                           a string or messages); the conversation before the final assistant
                           turn is the prompt and must be the same in both lists
               "hh":       Anthropic hh-rlhf transcripts {"chosen": str, "rejected": str}
  sft          "prompt_response": {"prompt": str|[messages], "response"|"completion": str|[msg]}
               "chat":     {"messages": [...]} ending in an assistant turn
               "hh":       {"text": transcript}, cut after its last Assistant marker
  unpaired     {"prompt": str|[messages], "completion": str|[msg], "label"|"desirable": bool}
  prompts      "prompt": {"prompt": str|[messages]}; "messages": {"messages": [...]} ending
               before the response; "hh": {"chosen": transcript, "rejected": transcript};
               "text": a .txt line; with reference answers (`read_prompt_answers`): any of
               these object layouts plus an answer field ("answer" by default: a string or a
               number)
Any preference layout may carry a numeric "margin". `format="auto"` detects the layout from
the first well-formed record and then holds every record to it, so one malformed record gets
an error about its own problem rather than a guess at a different layout.

Rendering (`chat_format=`, a `chat.ChatFormat` or a model's `chat_template.ChatTemplate`):
strings are always taken verbatim, message lists are rendered. hh-rlhf transcripts are kept
verbatim under the default hh `ChatFormat`; under any other format they are split into
messages (`chat.hh_messages`) and rendered in it, so hh-rlhf trains a chat model in its own
format.

Errors name `path:line` (JSON Lines, .txt) or `path:row N` (1-based; JSON arrays, Parquet);
with on_error="skip" they are counted per reason, logged and printed once. Blank lines are
not examples: they are counted (`ReadResult.blank_lines`), not errors. A file that yields no
example at all is an error either way ("no examples").
"""
import dataclasses
import gzip
import json
import math
import os
import re
import zlib
from typing import Any, Callable, Generic, Iterator, Sequence, TypeVar

from tqdm import auto as tqdm

from rlhf_jax.data import chat as chat_lib
from rlhf_jax.data.errors import DataError, SkipReport, SkipTally
from rlhf_jax.data.examples import PreferenceExample, PromptAnswer, SFTExample, UnpairedExample

PREFERENCE_FORMATS = ("auto", "pairwise", "chat", "hh")
SFT_FORMATS = ("auto", "prompt_response", "chat", "hh")
PROMPT_FORMATS = ("auto", "prompt", "messages", "hh")
DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
PROMPT_SUFFIXES = DATA_SUFFIXES + (".txt", ".txt.gz")
_PARQUET_BATCH = 1024  # Rows converted to Python at a time: a file is never held twice.
# Only a \uD800-\uDFFF escape can put a surrogate into a str parsed from UTF-8 JSON, so the
# full check runs only on records whose text contains one.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_HH_DEFAULT = chat_lib.ChatFormat()
# json.loads recurses once per level of [ or {: a hostile or broken line must not crash a run.
_TOO_DEEP = "JSON nested too deeply to parse (more levels of [ or { than Python's recursion limit)"
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class ReadResult(Generic[T]):
  """Examples in file order, the layout that was used, and what was skipped."""
  examples: list[T]
  format: str
  report: SkipReport
  blank_lines: int


# ---------------------------------------------------------------------------------------------
# Files -> (where, record)
# ---------------------------------------------------------------------------------------------


def _file_type(path: str, suffixes: tuple[str, ...]) -> str:
  """The supported suffix `path` ends with, or an error naming the file."""
  if os.path.isdir(path):
    raise IsADirectoryError(f"{path}: is a directory, not a data file; pass a file "
                            f"({', '.join(suffixes)})")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such data file")
  low = path.lower()
  for suffix in sorted(suffixes, key=len, reverse=True):
    if low.endswith(suffix):
      return suffix
  ext = "".join(os.path.basename(low).partition(".")[1:]) or "(none)"
  raise DataError(path, f"unsupported file type {ext!r}; supported: {', '.join(suffixes)}",
                  "unsupported_format")


def _open(path: str):
  return gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")


def _decode_line(raw: bytes, where: str, first: bool) -> str:
  try:
    # utf-8-sig on the first line: a byte-order mark is legal there and invisible to a reader.
    return raw.decode("utf-8-sig" if first else "utf-8")
  except UnicodeDecodeError as e:
    raise DataError(where, f"not valid UTF-8: byte 0x{raw[e.start]:02x} at byte column "
                    f"{e.start + 1} ({e.reason})", "bad_utf8") from None


def _check_text(obj: Any, where: str) -> None:
  """A lone surrogate ("\\ud800" in JSON) is not text: tokenizers reject it much later with a
  TypeError that names no line. Iterative, so a deeply nested record cannot overflow."""
  stack = [(obj, "")]
  while stack:
    value, field = stack.pop()
    if isinstance(value, str):
      m = _SURROGATE.search(value)
      if m:
        raise DataError(where, f"{'field ' + field if field else 'the record'} holds a lone "
                        f"surrogate {m.group()!r} at character {m.start()}: not valid Unicode "
                        "text (a broken \\u escape?)", "bad_text")
    elif isinstance(value, dict):
      for k, v in value.items():
        key = k if isinstance(k, str) else repr(k)
        if _SURROGATE.search(key):
          raise DataError(where, f"a field name holds a lone surrogate: {key!r}", "bad_text")
        stack.append((v, f"{field}.{key}" if field else key))
    elif isinstance(value, list):
      stack.extend((v, f"{field}[{i}]") for i, v in enumerate(value))


def _loads(text: str, where: str) -> Any:
  try:
    obj = json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(where, f"malformed JSON at column {e.colno}: {e.msg}", "bad_json") from None
  except RecursionError:
    raise DataError(where, _TOO_DEEP, "bad_json") from None
  if _SURROGATE_ESCAPE.search(text):
    _check_text(obj, where)
  return obj


def _object(obj: Any, where: str, unit: str) -> dict:
  if not isinstance(obj, dict):
    raise DataError(where, f"expected a JSON object per {unit}, got {type(obj).__name__}",
                    "wrong_type")
  return obj


def _iter_lines(path: str) -> Iterator[tuple[int, str, bytes]]:
  """(line number, "path:line", raw bytes) per line; a broken stream is a DataError."""
  lineno = 0
  with _open(path) as f, tqdm.tqdm(desc=f"read {os.path.basename(path)}", unit=" lines",
                                   disable=None, leave=False) as bar:
    while True:
      try:
        raw = f.readline()
      except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError.
        # A broken stream cannot be skipped past: every later line is unreadable.
        raise DataError(f"{path}:{lineno + 1}", f"cannot read the file past line {lineno}: "
                        f"{type(e).__name__}: {e}", "bad_file") from None
      if not raw:
        return
      lineno += 1
      bar.update(1)
      yield lineno, f"{path}:{lineno}", raw


def _iter_jsonl(path: str, tally: SkipTally, counts: dict[str, int], hint: str = ""
                ) -> Iterator[tuple[str, dict[str, Any]]]:
  """Yields (where, object) per non-blank line; bad lines go to `tally` (raise or count).
  `hint` is added to JSON errors (a .json file read as JSON Lines says why)."""
  for lineno, where, raw in _iter_lines(path):
    try:
      # Without the line ending, JSON error columns are columns of this line.
      text = _decode_line(raw, where, first=lineno == 1).rstrip("\r\n")
      if not text.strip():
        counts["blank_lines"] += 1
        continue
      try:
        obj = _object(_loads(text, where), where, "line")
      except DataError as err:
        if hint and err.reason in ("bad_json", "wrong_type"):
          err = DataError(where, err.problem + hint, err.reason)
        raise err from None
    except DataError as err:
      tally.handle(err)
      continue
    yield where, obj


def _iter_txt(path: str, tally: SkipTally, counts: dict[str, int]
              ) -> Iterator[tuple[str, str]]:
  """Yields (where, line) per non-blank line of a text file, verbatim but its line ending."""
  for lineno, where, raw in _iter_lines(path):
    try:
      text = _decode_line(raw, where, first=lineno == 1).rstrip("\r\n")
    except DataError as err:
      tally.handle(err)
      continue
    if not text.strip():
      counts["blank_lines"] += 1
      continue
    yield where, text


def _first_char(path: str) -> str:
  """The first non-space character of a (possibly gzipped) file, "" when there is none."""
  with _open(path) as f:
    try:
      head = f.read(4096)
      while head and not head.lstrip(b"\xef\xbb\xbf \t\r\n"):
        head = f.read(4096)
    except (OSError, EOFError, zlib.error) as e:
      raise DataError(path, f"cannot read the file: {type(e).__name__}: {e}", "bad_file") from None
  head = head.lstrip(b"\xef\xbb\xbf \t\r\n")
  return chr(head[0]) if head else ""


def _iter_json_array(path: str, tally: SkipTally, counts: dict[str, int]
                     ) -> Iterator[tuple[str, dict[str, Any]]]:
  """Yields (f"{path}:row N", object) per element of a top-level JSON array.

  The file is one JSON document, so a syntax error anywhere makes all of it unreadable: it is
  raised (naming the file line) even under on_error="skip". Bad elements are skippable.
  """
  try:
    with _open(path) as f:
      raw = f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(path, f"cannot read the file: {type(e).__name__}: {e}", "bad_file") from None
  try:
    text = raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    raise DataError(path, f"not valid UTF-8: byte 0x{raw[e.start]:02x} at byte offset "
                    f"{e.start} ({e.reason})", "bad_utf8") from None
  del raw
  try:
    rows = json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}:{e.lineno}", f"malformed JSON at column {e.colno}: {e.msg}",
                    "bad_json") from None
  except RecursionError:
    raise DataError(path, _TOO_DEEP, "bad_json") from None
  if not isinstance(rows, list):
    raise DataError(path, f"expected a top-level JSON array of objects, got "
                    f"{type(rows).__name__}", "wrong_type")
  check = bool(_SURROGATE_ESCAPE.search(text))
  del text
  for n, obj in enumerate(tqdm.tqdm(rows, desc=f"read {os.path.basename(path)}", unit=" rows",
                                    disable=None, leave=False), 1):
    where = f"{path}:row {n}"
    try:
      obj = _object(obj, where, "array element")
      if check:
        _check_text(obj, where)
    except DataError as err:
      tally.handle(err)
      continue
    yield where, obj


def _iter_parquet(path: str, tally: SkipTally, counts: dict[str, int]
                  ) -> Iterator[tuple[str, dict[str, Any]]]:
  """Yields (f"{path}:row N", record) per row, one record batch in memory at a time.

  A null cell is an absent field: Parquet has one schema for all rows, so a column that some
  rows lack (e.g. "margin") is null in those rows.
  """
  import pyarrow.parquet as pq  # Only Parquet users pay for the import.
  try:
    pf = pq.ParquetFile(path)
  except Exception as e:  # pyarrow raises ArrowInvalid / OSError subclasses on a bad file.
    raise DataError(path, f"not a readable Parquet file: {type(e).__name__}: {e}",
                    "bad_file") from None
  row = 0
  with pf, tqdm.tqdm(total=pf.metadata.num_rows, desc=f"read {os.path.basename(path)}",
                     unit=" rows", disable=None, leave=False) as bar:
    batches = pf.iter_batches(batch_size=_PARQUET_BATCH)
    while True:
      try:
        batch = next(batches)
      except StopIteration:
        return
      except Exception as e:
        raise DataError(f"{path}:row {row + 1}", f"cannot read the file past row {row}: "
                        f"{type(e).__name__}: {e}", "bad_file") from None
      try:
        records = batch.to_pylist()
      except Exception:  # e.g. invalid UTF-8 in a string column: find the row(s) below.
        records = None
      for i in range(batch.num_rows):
        row += 1
        where = f"{path}:row {row}"
        try:
          if records is not None:
            record = records[i]
          else:
            try:
              (record,) = batch.slice(i, 1).to_pylist()
            except UnicodeDecodeError as e:
              raise DataError(where, f"not valid UTF-8 in a string column ({e.reason})",
                              "bad_utf8") from None
            except Exception as e:
              raise DataError(where, f"cannot convert the row: {type(e).__name__}: {e}",
                              "bad_row") from None
          record = {k: v for k, v in record.items() if v is not None}
        except DataError as err:
          tally.handle(err)
          continue
        yield where, record
      bar.update(batch.num_rows)


def _iter_records(path: str, suffix: str, tally: SkipTally, counts: dict[str, int]
                  ) -> Iterator[tuple[str, Any]]:
  if suffix == ".parquet":
    return _iter_parquet(path, tally, counts)
  if suffix in (".txt", ".txt.gz"):
    return _iter_txt(path, tally, counts)
  if suffix in (".json", ".json.gz"):
    if _first_char(path) == "[":
      return _iter_json_array(path, tally, counts)
    return _iter_jsonl(path, tally, counts, hint=(
        " (a .json file that does not start with '[' is read as JSON Lines, one object per "
        "line)"))
  return _iter_jsonl(path, tally, counts)


def _no_examples(path: str, kind: str, report: SkipReport, counts: dict[str, int]
                 ) -> DataError:
  if report.skipped:
    parts = ", ".join(f"{k}={v}" for k, v in sorted(report.skipped.items()))
    first = next(iter(report.messages[min(report.messages)]), "")
    why = f"all {report.num_skipped} records were skipped ({parts}); e.g. {first}"
  elif counts["blank_lines"]:
    why = f"the file holds only {counts['blank_lines']} blank lines"
  else:
    why = "the file is empty"
  return DataError(path, f"no examples: {why} (reading {kind})", "no_examples")


@dataclasses.dataclass(frozen=True)
class _Kind:
  """One kind of data: its layouts, how the layout is told from a record, how a record is
  parsed (`parse(record, layout, where, chat_format)`) and the file types it may come in."""
  name: str
  formats: tuple[str, ...]
  detect: Callable[[Any, str], str]
  parse: Callable[[Any, str, str, chat_lib.ChatRenderer], Any]
  suffixes: tuple[str, ...] = DATA_SUFFIXES


def _read(path, kind: _Kind, fmt: str, on_error: str, chat_format: chat_lib.ChatRenderer,
          limit: int | None = None, echo: bool = True) -> ReadResult:
  """The shared loop: detect the layout once, parse every record, tally what was skipped.
  `limit` stops after that many examples (a preflight check); `echo` prints skip counts."""
  if fmt not in kind.formats:
    raise ValueError(f"format={fmt!r}; expected one of {kind.formats}")
  path = os.fspath(path)
  tally = SkipTally(f"{kind.name} from {path}", on_error)
  suffix = _file_type(path, kind.suffixes)
  counts = {"blank_lines": 0}
  layout = None if fmt == "auto" else fmt
  examples = []
  records = _iter_records(path, suffix, tally, counts)
  for where, obj in records:
    try:
      if layout is None:
        layout = kind.detect(obj, where)
      examples.append(kind.parse(obj, layout, where, chat_format))
    except DataError as err:
      tally.handle(err)
    if limit is not None and len(examples) >= limit:
      records.close()  # Closes the file now, not when the generator is collected.
      break
  tally.kept = len(examples)
  report = tally.report(log=echo)
  if report.skipped and echo:
    # Logged above too, but a run without INFO/WARNING logging must still show what was lost.
    print(report.summary(), flush=True)
  if not examples:
    raise _no_examples(path, kind.name, report, counts)
  return ReadResult(examples, layout or fmt, report, counts["blank_lines"])


# ---------------------------------------------------------------------------------------------
# Field helpers
# ---------------------------------------------------------------------------------------------


def _require(obj: dict, key: str, where: str, layout: str) -> Any:
  if key not in obj:
    raise DataError(where, f"missing field {key!r} (layout {layout!r})", "missing_field")
  return obj[key]


def _first_key(obj: dict, keys: tuple[str, ...], where: str, layout: str) -> str:
  for k in keys:
    if k in obj:
      return k
  names = " or ".join(repr(k) for k in keys)
  raise DataError(where, f"missing field {names} (layout {layout!r})", "missing_field")


def _string(value: Any, field: str, where: str) -> str:
  if not isinstance(value, str):
    raise DataError(where, f"field {field!r} must be a string, got {type(value).__name__}",
                    "wrong_type")
  if not value:
    raise DataError(where, f"field {field!r} is empty", "empty")
  return value


def _prompt(value: Any, field: str, where: str, fmt: chat_lib.ChatRenderer
            ) -> tuple[str, tuple[chat_lib.Message, ...]]:
  """(prompt text, its conversation). Text is taken verbatim (its conversation is one user
  turn, for rendering a response message after it); messages are rendered with `fmt`."""
  if isinstance(value, list):
    msgs = chat_lib.parse_messages(value, field, where)
    if msgs[-1].role == "assistant":
      raise DataError(where, f"field {field!r} ends with an assistant turn; a prompt must end "
                      "before the response", "wrong_type")
    return fmt.render_prompt(msgs, where), msgs
  if not isinstance(value, str):
    raise DataError(where, f"field {field!r} must be a string or a list of messages, got "
                    f"{type(value).__name__}", "wrong_type")
  text = _string(value, field, where)
  return text, (chat_lib.Message("user", text),)


def _response_text(value: Any, field: str, where: str, fmt: chat_lib.ChatRenderer,
                   context: Sequence[chat_lib.Message]) -> str:
  """A response given as text (verbatim) or as a single assistant message after `context`."""
  if isinstance(value, list):
    msgs = chat_lib.parse_messages(value, field, where)
    if len(msgs) != 1 or msgs[0].role != "assistant":
      raise DataError(where, f"field {field!r} must hold exactly one assistant message when "
                      f"the prompt is separate, got roles {[m.role for m in msgs]}",
                      "wrong_type")
    if not msgs[0].content:
      raise DataError(where, f"field {field!r} has an empty assistant message", "empty")
    return fmt.render_response(context, msgs[0].content, where)
  if not isinstance(value, str):
    raise DataError(where, f"field {field!r} must be a string or a list of messages, got "
                    f"{type(value).__name__}", "wrong_type")
  return _string(value, field, where)


def _margin(obj: dict, where: str) -> float | None:
  value = obj.get("margin")
  if value is None:
    return None
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise DataError(where, f"field 'margin' must be a number, got {type(value).__name__}",
                    "wrong_type")
  if not math.isfinite(value):
    raise DataError(where, f"field 'margin' must be finite, got {value}", "wrong_type")
  return float(value)


def _split_conversation(value: Any, field: str, where: str
                        ) -> tuple[tuple[chat_lib.Message, ...], chat_lib.Message]:
  msgs = chat_lib.parse_messages(value, field, where)
  if msgs[-1].role != "assistant":
    raise DataError(where, f"the last message of {field!r} must be an assistant turn, got role "
                    f"{msgs[-1].role!r}", "no_assistant_turn")
  if not msgs[-1].content:
    raise DataError(where, f"the final assistant message of {field!r} is empty", "empty")
  return msgs[:-1], msgs[-1]


def _hh_rendered(prompt: str, responses: Sequence[str], where: str,
                 fmt: chat_lib.ChatRenderer) -> tuple[str, list[str]]:
  """An hh prompt ("...\\n\\nAssistant:") and the responses after it, in `fmt`.

  Under the default hh format the transcript text is the rendering, kept byte for byte. Any
  other format gets the conversation re-rendered from messages; each response is everything
  after the prompt (as `split_hh_pair` cut it, so a response that itself contains markers
  stays one turn), less the space that follows the Assistant marker.
  """
  if isinstance(fmt, chat_lib.ChatFormat) and fmt == _HH_DEFAULT:
    return prompt, list(responses)
  context = chat_lib.hh_messages(prompt[:-len(chat_lib.HH_ASSISTANT)], where)
  return fmt.render_prompt(context, where), [
      fmt.render_response(context, chat_lib.hh_turn_content(r), where) for r in responses]


# ---------------------------------------------------------------------------------------------
# Preferences
# ---------------------------------------------------------------------------------------------


def _detect_preference_layout(obj: dict, where: str) -> str:
  for key in ("chosen", "rejected"):
    if key not in obj:
      raise DataError(where, f"missing field {key!r}: cannot tell the layout (expected "
                      "chosen/rejected, with or without prompt)", "missing_field")
  if isinstance(obj["chosen"], list):
    return "chat"
  if isinstance(obj["chosen"], str):
    return "pairwise" if "prompt" in obj else "hh"
  raise DataError(where, f"field 'chosen' must be a string or a list of messages, got "
                  f"{type(obj['chosen']).__name__}", "wrong_type")


def _chat_pair(obj: dict, where: str, fmt: chat_lib.ChatRenderer) -> tuple[str, str, str]:
  ctx, chosen = _split_conversation(_require(obj, "chosen", where, "chat"), "chosen", where)
  ctx_r, rejected = _split_conversation(_require(obj, "rejected", where, "chat"), "rejected",
                                        where)
  if ctx != ctx_r:
    i = next((i for i, (a, b) in enumerate(zip(ctx, ctx_r)) if a != b), min(len(ctx),
                                                                              len(ctx_r)))
    raise DataError(where, f"mismatched prompts: chosen and rejected conversations differ at "
                    f"message {i}, before their final assistant turn", "prompt_mismatch")
  if "prompt" in obj:
    value = obj["prompt"]
    if isinstance(value, str):
      prompt_msgs = (chat_lib.Message("user", _string(value, "prompt", where)),)
    else:
      prompt_msgs = chat_lib.parse_messages(value, "prompt", where)
    if not ctx:
      ctx = prompt_msgs
    elif ctx[:len(prompt_msgs)] != prompt_msgs:
      # Both given (e.g. ultrafeedback_binarized): the prompt field must repeat the context.
      raise DataError(where, "mismatched prompts: field 'prompt' disagrees with the "
                      "conversation that chosen/rejected start with", "prompt_mismatch")
  if not ctx:
    raise DataError(where, "no prompt: nothing precedes the final assistant turn and there "
                    "is no 'prompt' field", "missing_field")
  return (fmt.render_prompt(ctx, where), fmt.render_response(ctx, chosen.content, where),
          fmt.render_response(ctx, rejected.content, where))


def _parse_preference(obj: dict, layout: str, where: str,
                      fmt: chat_lib.ChatRenderer) -> PreferenceExample:
  if layout == "chat":
    prompt, chosen, rejected = _chat_pair(obj, where, fmt)
  else:
    chosen = _string(_require(obj, "chosen", where, layout), "chosen", where)
    rejected = _string(_require(obj, "rejected", where, layout), "rejected", where)
    if layout == "hh":
      prompt, chosen, rejected = chat_lib.split_hh_pair(chosen, rejected, where)
      for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text:
          raise DataError(where, f"empty {name} response: the transcript ends at its "
                          "Assistant marker", "empty")
      prompt, (chosen, rejected) = _hh_rendered(prompt, (chosen, rejected), where, fmt)
    else:
      prompt = _string(_require(obj, "prompt", where, layout), "prompt", where)
  if chosen == rejected:
    raise DataError(where, "chosen and rejected responses are identical", "identical")
  return PreferenceExample(prompt, chosen, rejected, _margin(obj, where), where)


_PREFERENCES = _Kind("preferences", PREFERENCE_FORMATS, _detect_preference_layout,
                     _parse_preference)


def read_preferences_with_stats(path, *, format: str = "auto", on_error: str = "raise",
                                chat_format: chat_lib.ChatRenderer = _HH_DEFAULT
                                ) -> ReadResult[PreferenceExample]:
  """Reads pairwise preferences and returns them with the layout used and a skip report."""
  return _read(path, _PREFERENCES, format, on_error, chat_format)


def read_preferences(path, *, format: str = "auto", on_error: str = "raise",
                     chat_format: chat_lib.ChatRenderer = _HH_DEFAULT
                     ) -> list[PreferenceExample]:
  """Pairwise preferences from .jsonl/.json/.parquet (optionally .gz), in file order.

  Raises DataError (a ValueError) naming `path:line` / `path:row N` on the first bad record,
  or with on_error="skip" counts bad records per reason and logs and prints the counts (see
  `read_preferences_with_stats` for the counts themselves).
  """
  return read_preferences_with_stats(path, format=format, on_error=on_error,
                                     chat_format=chat_format).examples


# ---------------------------------------------------------------------------------------------
# SFT
# ---------------------------------------------------------------------------------------------


def _detect_sft_layout(obj: dict, where: str) -> str:
  if "messages" in obj:
    return "chat"
  if "prompt" in obj:
    return "prompt_response"
  if "text" in obj:
    return "hh"
  raise DataError(where, "missing field: expected 'prompt' + 'response', 'messages' or 'text'",
                  "missing_field")


def _parse_sft(obj: dict, layout: str, where: str, fmt: chat_lib.ChatRenderer) -> SFTExample:
  if layout == "chat":
    ctx, last = _split_conversation(_require(obj, "messages", where, layout), "messages", where)
    if not ctx:
      raise DataError(where, "no prompt: 'messages' holds only the assistant turn",
                      "missing_field")
    return SFTExample(fmt.render_prompt(ctx, where),
                      fmt.render_response(ctx, last.content, where), where)
  if layout == "hh":
    text = _string(_require(obj, "text", where, layout), "text", where)
    prompt, response = chat_lib.split_hh_transcript(text, where)
    if not response:
      raise DataError(where, "empty response: the transcript ends at its Assistant marker",
                      "empty")
    prompt, (response,) = _hh_rendered(prompt, (response,), where, fmt)
    return SFTExample(prompt, response, where)
  prompt, ctx = _prompt(_require(obj, "prompt", where, layout), "prompt", where, fmt)
  key = _first_key(obj, ("response", "completion"), where, layout)
  return SFTExample(prompt, _response_text(obj[key], key, where, fmt, ctx), where)


_SFT = _Kind("sft", SFT_FORMATS, _detect_sft_layout, _parse_sft)


def read_sft_with_stats(path, *, format: str = "auto", on_error: str = "raise",
                        chat_format: chat_lib.ChatRenderer = _HH_DEFAULT
                        ) -> ReadResult[SFTExample]:
  return _read(path, _SFT, format, on_error, chat_format)


def read_sft(path, *, format: str = "auto", on_error: str = "raise",
             chat_format: chat_lib.ChatRenderer = _HH_DEFAULT) -> list[SFTExample]:
  """(prompt, response) examples; file types and errors as in `read_preferences`."""
  return read_sft_with_stats(path, format=format, on_error=on_error,
                             chat_format=chat_format).examples


# ---------------------------------------------------------------------------------------------
# Unpaired (KTO)
# ---------------------------------------------------------------------------------------------


def _parse_unpaired(obj: dict, layout: str, where: str,
                    fmt: chat_lib.ChatRenderer) -> UnpairedExample:
  prompt, ctx = _prompt(_require(obj, "prompt", where, layout), "prompt", where, fmt)
  completion = _response_text(_require(obj, "completion", where, layout), "completion", where,
                              fmt, ctx)
  key = _first_key(obj, ("label", "desirable"), where, layout)
  if not isinstance(obj[key], bool):
    raise DataError(where, f"field {key!r} must be true or false, got "
                    f"{type(obj[key]).__name__}", "wrong_type")
  return UnpairedExample(prompt, completion, obj[key], where)


_UNPAIRED = _Kind("unpaired", ("unpaired",), lambda obj, where: "unpaired", _parse_unpaired)


def read_unpaired_with_stats(path, *, on_error: str = "raise",
                             chat_format: chat_lib.ChatRenderer = _HH_DEFAULT
                             ) -> ReadResult[UnpairedExample]:
  return _read(path, _UNPAIRED, "unpaired", on_error, chat_format)


def read_unpaired(path, *, on_error: str = "raise",
                  chat_format: chat_lib.ChatRenderer = _HH_DEFAULT
                  ) -> list[UnpairedExample]:
  """(prompt, completion, desirable) examples (TRL's KTO layout: "label" or "desirable")."""
  return read_unpaired_with_stats(path, on_error=on_error, chat_format=chat_format).examples


# ---------------------------------------------------------------------------------------------
# Prompts (online RL)
# ---------------------------------------------------------------------------------------------


def _detect_prompt_layout(obj: Any, where: str) -> str:
  if isinstance(obj, str):
    return "text"
  for key, layout in (("prompt", "prompt"), ("messages", "messages"), ("chosen", "hh")):
    if key in obj:
      return layout
  raise DataError(where, "missing field: expected 'prompt', 'messages', or hh-rlhf "
                  "'chosen' + 'rejected' transcripts", "missing_field")


def _parse_prompt(obj: Any, layout: str, where: str, fmt: chat_lib.ChatRenderer) -> str:
  if layout == "text":
    return obj  # A .txt line, verbatim.
  if layout == "prompt":
    return _prompt(_require(obj, "prompt", where, layout), "prompt", where, fmt)[0]
  if layout == "messages":
    msgs = chat_lib.parse_messages(_require(obj, "messages", where, layout), "messages", where)
    if msgs[-1].role == "assistant":
      raise DataError(where, "the last message of 'messages' is an assistant turn; a prompt "
                      "must end before the response", "wrong_type")
    return fmt.render_prompt(msgs, where)
  chosen = _string(_require(obj, "chosen", where, layout), "chosen", where)
  rejected = _string(_require(obj, "rejected", where, layout), "rejected", where)
  prompt, _, _ = chat_lib.split_hh_pair(chosen, rejected, where)
  return _hh_rendered(prompt, (), where, fmt)[0]


_PROMPTS = _Kind("prompts", PROMPT_FORMATS, _detect_prompt_layout, _parse_prompt,
                 PROMPT_SUFFIXES)
_PROMPT_LINES = dataclasses.replace(_PROMPTS, formats=("text",))


def _prompt_kind(path, format: str) -> tuple[_Kind, str]:
  """A .txt file has one layout: a prompt per line."""
  if os.fspath(path).lower().endswith((".txt", ".txt.gz")):
    if format not in ("auto", "text"):
      raise ValueError(f"format={format!r} for a .txt prompt file; it holds one prompt per line")
    return _PROMPT_LINES, "text"
  return _PROMPTS, format


def read_prompts_with_stats(path, *, format: str = "auto", on_error: str = "raise",
                            chat_format: chat_lib.ChatRenderer = _HH_DEFAULT
                            ) -> ReadResult[str]:
  """Rendered prompts, with the layout used and a skip report (see `read_prompts`)."""
  kind, format = _prompt_kind(path, format)
  return _read(path, kind, format, on_error, chat_format)


def read_prompts(path, *, format: str = "auto", on_error: str = "raise",
                 chat_format: chat_lib.ChatRenderer = _HH_DEFAULT) -> list[str]:
  """Prompts for online RL, rendered and ready to tokenise, in file order.

  Records hold "prompt" (a string, verbatim, or messages rendered with
  `chat_format.render_prompt`), "messages" (a conversation ending before the response), or
  hh-rlhf "chosen"/"rejected" transcripts (their shared prompt). A .txt file holds one prompt
  per line, taken verbatim like any string prompt; blank lines are counted, not prompts.
  """
  return read_prompts_with_stats(path, format=format, on_error=on_error,
                                 chat_format=chat_format).examples


def _answer(obj: dict, field: str, where: str) -> str:
  """The reference answer of a prompt record as text (numbers as written by Python: 72, 0.5)."""
  if field not in obj:
    raise DataError(where, f"missing field {field!r}: the prompt's reference answer, which the "
                    "grader compares responses with", "missing_field")
  value = obj[field]
  if isinstance(value, bool) or not isinstance(value, (str, int, float)):
    raise DataError(where, f"field {field!r} must be a string or a number, got "
                    f"{type(value).__name__}", "wrong_type")
  if isinstance(value, float) and not math.isfinite(value):
    raise DataError(where, f"field {field!r} is {value}, not a finite number", "wrong_type")
  text = str(value).strip()
  if not text:
    raise DataError(where, f"field {field!r} is empty", "empty")
  return text


def _prompt_answers_kind(answer_field: str) -> _Kind:
  """Prompt records (any object layout of `read_prompts`) with a reference answer each."""
  if not isinstance(answer_field, str) or not answer_field:
    raise ValueError(f"answer_field={answer_field!r}: the name of the field holding each "
                     "prompt's reference answer (e.g. 'answer')")

  def parse(obj: Any, layout: str, where: str, fmt: chat_lib.ChatRenderer) -> PromptAnswer:
    return PromptAnswer(_parse_prompt(obj, layout, where, fmt), _answer(obj, answer_field, where),
                        where)
  return _Kind("prompts with answers", PROMPT_FORMATS, _detect_prompt_layout, parse)


def _reject_txt(path) -> None:
  if os.fspath(path).lower().endswith((".txt", ".txt.gz")):
    raise DataError(os.fspath(path), "a .txt prompt file holds one prompt per line and no "
                    "reference answers; give JSON Lines, JSON or Parquet records such as "
                    '{"prompt": "...", "answer": "72"}', "unsupported_format")


def read_prompt_answers_with_stats(path, *, answer_field: str = "answer", format: str = "auto",
                                   on_error: str = "raise",
                                   chat_format: chat_lib.ChatRenderer = _HH_DEFAULT
                                   ) -> ReadResult[PromptAnswer]:
  """Prompts with reference answers, the layout used and a skip report (see
  `read_prompt_answers`)."""
  _reject_txt(path)
  return _read(path, _prompt_answers_kind(answer_field), format, on_error, chat_format)


def read_prompt_answers(path, *, answer_field: str = "answer", format: str = "auto",
                        on_error: str = "raise",
                        chat_format: chat_lib.ChatRenderer = _HH_DEFAULT) -> list[PromptAnswer]:
  """Prompts for online RL with a verifiable reward: each record is a prompt in any object
  layout `read_prompts` reads ("prompt", "messages", hh transcripts), rendered the same way,
  plus its reference answer in `answer_field` (a string, or a number kept as written), e.g.
  {"prompt": "Natalia sold clips to 48 of her friends ...", "answer": "72"} or GSM8K's own
  solution text ending in "#### 72". A record without the field, or with an empty or
  non-scalar one, is an error naming `path:line` (or counted under on_error="skip"). A .txt
  file cannot carry answers and is refused."""
  return read_prompt_answers_with_stats(path, answer_field=answer_field, format=format,
                                        on_error=on_error, chat_format=chat_format).examples


# ---------------------------------------------------------------------------------------------
# Preflight
# ---------------------------------------------------------------------------------------------

_KIND_OF_READER = {read_preferences: _PREFERENCES, read_preferences_with_stats: _PREFERENCES,
                   read_sft: _SFT, read_sft_with_stats: _SFT, read_unpaired: _UNPAIRED,
                   read_unpaired_with_stats: _UNPAIRED, read_prompts: _PROMPTS,
                   read_prompts_with_stats: _PROMPTS}


def check_readable(path, reader: Callable = read_preferences, *, what: str = "",
                   format: str = "auto", on_error: str = "skip",
                   chat_format: chat_lib.ChatRenderer = _HH_DEFAULT, limit: int = 64,
                   min_examples: int = 1, answer_field: str = "answer") -> str:
  """Fails fast, before any model is built, when `reader` could not get examples from `path`.

  Reads until `limit` examples parse (rendered with `chat_format`, so a template that rejects
  the data fails here too) and returns the layout. Errors are those of `reader` (a missing
  file or directory, an unsupported file type, a broken file, no examples, fewer than
  `min_examples` (e.g. 2 when a held-out part is to be split off); with on_error="raise" also
  the first bad record), with `what` (e.g. "config.data.pairs") added so the message names
  the setting to fix. Skips are not printed: the real read reports them. For
  `read_prompt_answers`, `answer_field` names the reference-answer field every record needs.
  """
  if min_examples > limit:
    raise ValueError(f"min_examples={min_examples} > limit={limit}")
  kind = _KIND_OF_READER.get(reader)
  if reader in (read_prompt_answers, read_prompt_answers_with_stats):
    kind = _prompt_answers_kind(answer_field)
  if kind is None:
    raise ValueError(f"reader={reader!r}: expected one of the rlhf_jax.data read_* functions")
  if kind is _PROMPTS:
    kind, format = _prompt_kind(path, format)
  suffix = f" ({what})" if what else ""
  try:
    if kind.name == "prompts with answers":
      _reject_txt(path)
    result = _read(path, kind, format, on_error, chat_format, limit=limit, echo=False)
    if len(result.examples) < min_examples:
      raise DataError(os.fspath(path), f"{len(result.examples)} {kind.name} example(s), fewer "
                      f"than the {min_examples} needed", "too_few")
    return result.format
  except DataError as err:
    raise DataError(err.where, err.problem + suffix, err.reason) from None
  except OSError as err:
    raise type(err)(f"{err}{suffix}") from None
