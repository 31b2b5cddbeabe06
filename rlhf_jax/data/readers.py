"""Readers for .jsonl / .jsonl.gz files of SFT, pairwise-preference and unpaired examples.

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
Any preference layout may carry a numeric "margin". `format="auto"` detects the layout from
the first well-formed line and then holds every line to it, so one malformed line gets an
error about its own problem rather than a guess at a different layout.

Errors name `path:line`; with on_error="skip" they are counted per reason and logged once.
Blank lines are not examples: they are counted (`ReadResult.blank_lines`), not errors.
"""
import dataclasses
import gzip
import json
import math
import os
import zlib
from typing import Any, Callable, Generic, Iterator, TypeVar

from tqdm import auto as tqdm

from rlhf_jax.data import chat as chat_lib
from rlhf_jax.data.errors import DataError, SkipReport, SkipTally
from rlhf_jax.data.examples import PreferenceExample, SFTExample, UnpairedExample

PREFERENCE_FORMATS = ("auto", "pairwise", "chat", "hh")
SFT_FORMATS = ("auto", "prompt_response", "chat", "hh")
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class ReadResult(Generic[T]):
  """Examples in file order, the layout that was used, and what was skipped."""
  examples: list[T]
  format: str
  report: SkipReport
  blank_lines: int


# ---------------------------------------------------------------------------------------------
# Lines -> JSON objects
# ---------------------------------------------------------------------------------------------


def _open(path: str):
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such data file")
  return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _decode_line(raw: bytes, where: str, first: bool) -> str:
  try:
    # utf-8-sig on the first line: a byte-order mark is legal there and invisible to a reader.
    return raw.decode("utf-8-sig" if first else "utf-8")
  except UnicodeDecodeError as e:
    raise DataError(where, f"not valid UTF-8: byte 0x{raw[e.start]:02x} at byte column "
                    f"{e.start + 1} ({e.reason})", "bad_utf8") from None


def _iter_objects(path: str, tally: SkipTally, counts: dict[str, int]
                  ) -> Iterator[tuple[str, dict[str, Any]]]:
  """Yields (where, object) per non-blank line; bad lines go to `tally` (raise or count)."""
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
      where = f"{path}:{lineno}"
      try:
        # Without the line ending, JSON error columns are columns of this line.
        text = _decode_line(raw, where, first=lineno == 1).rstrip("\r\n")
        if not text.strip():
          counts["blank_lines"] += 1
          continue
        try:
          obj = json.loads(text)
        except json.JSONDecodeError as e:
          raise DataError(where, f"malformed JSON at column {e.colno}: {e.msg}",
                          "bad_json") from None
        if not isinstance(obj, dict):
          raise DataError(where, f"expected a JSON object per line, got "
                          f"{type(obj).__name__}", "wrong_type")
      except DataError as err:
        tally.handle(err)
        continue
      yield where, obj


def _read(path, kind: str, formats: tuple[str, ...], fmt: str, on_error: str,
          detect: Callable[[dict, str], str], parse: Callable[[dict, str, str], T]
          ) -> ReadResult[T]:
  """The shared loop: detect the layout once, parse every line, tally what was skipped."""
  if fmt not in formats:
    raise ValueError(f"format={fmt!r}; expected one of {formats}")
  path = os.fspath(path)
  tally = SkipTally(f"{kind} from {path}", on_error)
  counts = {"blank_lines": 0}
  layout = None if fmt == "auto" else fmt
  examples = []
  for where, obj in _iter_objects(path, tally, counts):
    try:
      if layout is None:
        layout = detect(obj, where)
      examples.append(parse(obj, layout, where))
    except DataError as err:
      tally.handle(err)
  tally.kept = len(examples)
  return ReadResult(examples, layout or fmt, tally.report(), counts["blank_lines"])


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


def _prompt_text(value: Any, field: str, where: str, fmt: chat_lib.ChatFormat) -> str:
  """A prompt given as text (taken verbatim) or as messages (rendered with `fmt`)."""
  if isinstance(value, list):
    msgs = chat_lib.parse_messages(value, field, where)
    if msgs[-1].role == "assistant":
      raise DataError(where, f"field {field!r} ends with an assistant turn; a prompt must end "
                      "before the response", "wrong_type")
    return fmt.render_prompt(msgs)
  if not isinstance(value, str):
    raise DataError(where, f"field {field!r} must be a string or a list of messages, got "
                    f"{type(value).__name__}", "wrong_type")
  return _string(value, field, where)


def _response_text(value: Any, field: str, where: str, fmt: chat_lib.ChatFormat) -> str:
  """A response given as text (verbatim) or as a single assistant message."""
  if isinstance(value, list):
    msgs = chat_lib.parse_messages(value, field, where)
    if len(msgs) != 1 or msgs[0].role != "assistant":
      raise DataError(where, f"field {field!r} must hold exactly one assistant message when "
                      f"the prompt is separate, got roles {[m.role for m in msgs]}",
                      "wrong_type")
    if not msgs[0].content:
      raise DataError(where, f"field {field!r} has an empty assistant message", "empty")
    return fmt.render_response(msgs[0].content)
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


def _chat_pair(obj: dict, where: str, fmt: chat_lib.ChatFormat) -> tuple[str, str, str]:
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
  return (fmt.render_prompt(ctx), fmt.render_response(chosen.content),
          fmt.render_response(rejected.content))


def _parse_preference(obj: dict, layout: str, where: str,
                      fmt: chat_lib.ChatFormat) -> PreferenceExample:
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
    else:
      prompt = _string(_require(obj, "prompt", where, layout), "prompt", where)
  if chosen == rejected:
    raise DataError(where, "chosen and rejected responses are identical", "identical")
  return PreferenceExample(prompt, chosen, rejected, _margin(obj, where), where)


def read_preferences_with_stats(path, *, format: str = "auto", on_error: str = "raise",
                                chat_format: chat_lib.ChatFormat = chat_lib.ChatFormat()
                                ) -> ReadResult[PreferenceExample]:
  """Reads pairwise preferences and returns them with the layout used and a skip report."""
  return _read(path, "preferences", PREFERENCE_FORMATS, format, on_error,
               _detect_preference_layout,
               lambda obj, layout, where: _parse_preference(obj, layout, where, chat_format))


def read_preferences(path, *, format: str = "auto", on_error: str = "raise",
                     chat_format: chat_lib.ChatFormat = chat_lib.ChatFormat()
                     ) -> list[PreferenceExample]:
  """Pairwise preferences from .jsonl/.jsonl.gz, in file order.

  Raises DataError (a ValueError) naming `path:line` on the first bad line, or with
  on_error="skip" counts bad lines per reason and logs the counts (see
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


def _parse_sft(obj: dict, layout: str, where: str, fmt: chat_lib.ChatFormat) -> SFTExample:
  if layout == "chat":
    ctx, last = _split_conversation(_require(obj, "messages", where, layout), "messages", where)
    if not ctx:
      raise DataError(where, "no prompt: 'messages' holds only the assistant turn",
                      "missing_field")
    return SFTExample(fmt.render_prompt(ctx), fmt.render_response(last.content), where)
  if layout == "hh":
    text = _string(_require(obj, "text", where, layout), "text", where)
    prompt, response = chat_lib.split_hh_transcript(text, where)
    if not response:
      raise DataError(where, "empty response: the transcript ends at its Assistant marker",
                      "empty")
    return SFTExample(prompt, response, where)
  prompt = _prompt_text(_require(obj, "prompt", where, layout), "prompt", where, fmt)
  key = _first_key(obj, ("response", "completion"), where, layout)
  return SFTExample(prompt, _response_text(obj[key], key, where, fmt), where)


def read_sft_with_stats(path, *, format: str = "auto", on_error: str = "raise",
                        chat_format: chat_lib.ChatFormat = chat_lib.ChatFormat()
                        ) -> ReadResult[SFTExample]:
  return _read(path, "sft", SFT_FORMATS, format, on_error, _detect_sft_layout,
               lambda obj, layout, where: _parse_sft(obj, layout, where, chat_format))


def read_sft(path, *, format: str = "auto", on_error: str = "raise",
             chat_format: chat_lib.ChatFormat = chat_lib.ChatFormat()) -> list[SFTExample]:
  """(prompt, response) examples from .jsonl/.jsonl.gz; errors as in `read_preferences`."""
  return read_sft_with_stats(path, format=format, on_error=on_error,
                             chat_format=chat_format).examples


# ---------------------------------------------------------------------------------------------
# Unpaired (KTO)
# ---------------------------------------------------------------------------------------------


def _parse_unpaired(obj: dict, layout: str, where: str,
                    fmt: chat_lib.ChatFormat) -> UnpairedExample:
  prompt = _prompt_text(_require(obj, "prompt", where, layout), "prompt", where, fmt)
  completion = _response_text(_require(obj, "completion", where, layout), "completion", where,
                              fmt)
  key = _first_key(obj, ("label", "desirable"), where, layout)
  if not isinstance(obj[key], bool):
    raise DataError(where, f"field {key!r} must be true or false, got "
                    f"{type(obj[key]).__name__}", "wrong_type")
  return UnpairedExample(prompt, completion, obj[key], where)


def read_unpaired_with_stats(path, *, on_error: str = "raise",
                             chat_format: chat_lib.ChatFormat = chat_lib.ChatFormat()
                             ) -> ReadResult[UnpairedExample]:
  return _read(path, "unpaired", ("unpaired",), "unpaired", on_error, lambda obj, w: "unpaired",
               lambda obj, layout, where: _parse_unpaired(obj, layout, where, chat_format))


def read_unpaired(path, *, on_error: str = "raise",
                  chat_format: chat_lib.ChatFormat = chat_lib.ChatFormat()
                  ) -> list[UnpairedExample]:
  """(prompt, completion, desirable) examples (TRL's KTO layout: "label" or "desirable")."""
  return read_unpaired_with_stats(path, on_error=on_error, chat_format=chat_format).examples
