"""Chat rendering (role markers) and the hh-rlhf transcript split.

Prompts are stored as rendered text so that every layout on disk, Anthropic transcripts and
chat message lists alike, becomes the same kind of example. The default `ChatFormat` is the
hh-rlhf one ("\\n\\nHuman: ...\\n\\nAssistant:"), so a message list and the equivalent
transcript render to identical strings and tokenise identically. A model's own chat template
(`chat_template.ChatTemplate`) follows the same `ChatRenderer` protocol, so every reader takes
either.
"""
import dataclasses
import os
import re
from typing import Any, Protocol, Sequence

from rlhf_jax.data.errors import DataError

HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"
ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class Message:
  role: str
  content: str


class ChatRenderer(Protocol):
  """What readers need from a chat format: `ChatFormat` and `ChatTemplate` both satisfy it.

  `render_prompt(context)` is the conversation so far plus whatever cues the assistant's turn;
  `render_response(context, content)` is the assistant turn that follows it, so that
  prompt + response is the rendered conversation. `where` (a "path:line") only names the
  example in errors.
  """

  def render_prompt(self, context: Sequence["Message"], where: str = "") -> str: ...

  def render_response(self, context: Sequence["Message"], content: str,
                      where: str = "") -> str: ...


@dataclasses.dataclass(frozen=True)
class ChatFormat:
  """Role markers. A turn renders as `marker + separator + content`; a prompt ends with the
  bare assistant marker, and a response is `separator + content`, so prompt + response is
  exactly the rendered conversation."""
  system_marker: str = "\n\nSystem:"
  user_marker: str = HH_HUMAN
  assistant_marker: str = HH_ASSISTANT
  separator: str = " "

  def marker(self, role: str) -> str:
    return {"system": self.system_marker, "user": self.user_marker,
            "assistant": self.assistant_marker}[role]

  def render_prompt(self, context: Sequence[Message], where: str = "") -> str:
    """The conversation so far, followed by the assistant marker that cues the response."""
    del where  # Marker rendering cannot fail.
    turns = "".join(self.marker(m.role) + self.separator + m.content for m in context)
    return turns + self.assistant_marker

  def render_response(self, context: Sequence[Message], content: str, where: str = "") -> str:
    """The assistant turn after `render_prompt(context)`. Markers do not depend on the
    conversation, so `context` is unused; it is there for templates, which can."""
    del context, where
    return self.separator + content


def parse_messages(value: Any, field: str, where: str) -> tuple[Message, ...]:
  """A JSON list of {"role", "content"} objects -> Messages, or a DataError naming the field."""
  if not isinstance(value, list):
    raise DataError(where, f"field {field!r} must be a list of messages, got "
                    f"{type(value).__name__}", "wrong_type")
  if not value:
    raise DataError(where, f"field {field!r} is an empty message list", "empty")
  out = []
  for i, m in enumerate(value):
    if not isinstance(m, dict):
      raise DataError(where, f"{field}[{i}] must be an object with 'role' and 'content', got "
                      f"{type(m).__name__}", "wrong_type")
    for key in ("role", "content"):
      if key not in m:
        raise DataError(where, f"{field}[{i}] is missing {key!r}", "missing_field")
      if not isinstance(m[key], str):
        raise DataError(where, f"{field}[{i}].{key} must be a string, got "
                        f"{type(m[key]).__name__}", "wrong_type")
    if m["role"] not in ROLES:
      raise DataError(where, f"{field}[{i}].role={m['role']!r}; expected one of {ROLES}",
                      "wrong_type")
    out.append(Message(m["role"], m["content"]))
  return tuple(out)


def split_hh_pair(chosen: str, rejected: str, where: str = "") -> tuple[str, str, str]:
  """Anthropic hh-rlhf transcripts -> (prompt, chosen_response, rejected_response).

  The prompt is the longest common prefix of the two transcripts that ends with
  "\\n\\nAssistant:"; each response is whatever follows it (leading space included, so
  prompt + response == transcript). Cutting each transcript at its own last Assistant marker
  would be wrong on real data: a few responses contain a further "Human:/Assistant:" turn of
  their own (5 rows of harmless-base test).
  """
  common = len(os.path.commonprefix([chosen, rejected]))
  # rfind with end=common: the whole marker must lie inside the common prefix.
  start = chosen.rfind(HH_ASSISTANT, 0, common)
  if start < 0:
    for name, text in (("chosen", chosen), ("rejected", rejected)):
      if HH_ASSISTANT not in text:
        raise DataError(where, f"{name} transcript has no {HH_ASSISTANT!r} turn",
                        "no_assistant_turn")
    raise DataError(where, f"mismatched prompts: the chosen and rejected transcripts share no "
                    f"prefix ending in {HH_ASSISTANT!r} (they first differ at offset {common}: "
                    f"{chosen[common:common + 30]!r} vs {rejected[common:common + 30]!r})",
                    "prompt_mismatch")
  cut = start + len(HH_ASSISTANT)
  return chosen[:cut], chosen[cut:], rejected[cut:]


def split_hh_transcript(text: str, where: str = "") -> tuple[str, str]:
  """One transcript -> (prompt, response), cut after its last Assistant marker (SFT data)."""
  start = text.rfind(HH_ASSISTANT)
  if start < 0:
    raise DataError(where, f"transcript has no {HH_ASSISTANT!r} turn", "no_assistant_turn")
  cut = start + len(HH_ASSISTANT)
  return text[:cut], text[cut:]


_HH_MARKER = re.compile(f"({re.escape(HH_HUMAN)}|{re.escape(HH_ASSISTANT)})")


def hh_messages(text: str, where: str = "") -> tuple[Message, ...]:
  """An hh-rlhf transcript ("\\n\\nHuman: a\\n\\nAssistant: b...") -> Messages.

  Human turns become "user" and Assistant turns "assistant"; the single space that follows
  each marker belongs to the format, not to the turn, and is dropped (so a chat template sees
  "a", not " a"). Content is otherwise kept verbatim, inner whitespace included. Used to
  re-render hh-rlhf data in a chat model's own template.
  """
  parts = _HH_MARKER.split(text)
  # split() with one capture group: [before, marker, content, marker, content, ...].
  if parts[0]:
    raise DataError(where, f"transcript must start with {HH_HUMAN!r} or {HH_ASSISTANT!r}, "
                    f"got {parts[0][:30]!r}", "bad_transcript")
  if len(parts) == 1:
    raise DataError(where, "transcript has no turns", "bad_transcript")
  out = []
  for marker, content in zip(parts[1::2], parts[2::2]):
    out.append(Message("user" if marker == HH_HUMAN else "assistant", hh_turn_content(content)))
  return tuple(out)


def hh_turn_content(text: str) -> str:
  """The content of one hh turn: the text after its marker, less the one space that follows
  every marker (" Hello" -> "Hello"; an empty reply " " -> "")."""
  return text[1:] if text.startswith(" ") else text
