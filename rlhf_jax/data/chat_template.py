"""A model's own chat template (the jinja string its tokenizer files carry), rendered as
`transformers` renders it, without importing transformers.

Users bring a Hugging Face model directory; its tokenizer was trained to read conversations in
one exact format, and `tokenizer.apply_chat_template` is the reference for that format. This
module reproduces what `apply_chat_template(messages, tokenize=False, ...)` renders in
transformers 5.x (`transformers/utils/chat_template_utils.py`): the same sandboxed jinja
environment (trim_blocks, lstrip_blocks, loop controls, the `{% generation %}` tag), the same
`tojson` filter, the same globals (`raise_exception`, `strftime_now`, `dict`, `namespace`) and
the same template variables (messages, add_generation_prompt, tools=None, documents=None and
the tokenizer's named special tokens). tests/test_data_chat_template.py checks it against
transformers itself.

`ChatTemplate` follows `chat.ChatRenderer`, so readers take it wherever they take a
`ChatFormat`:

    files = data.load_tokenizer_files("path/to/model_dir")
    pairs = data.read_preferences("pairs.jsonl", chat_format=files.chat_format())
"""
import dataclasses
import datetime
import json
from typing import Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import jinja2.utils

from rlhf_jax.data.chat import Message
from rlhf_jax.data.errors import DataError

# The named special tokens transformers passes to every template
# (`PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES`), in its order.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                       "cls_token", "mask_token")


class _GenerationTag(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}` renders its body unchanged.

  transformers uses the tag to find assistant tokens for `return_assistant_tokens_mask`; the
  text is the same with or without it, and the text is all we need (the response mask comes
  from the prompt/response split).
  """
  tags = {"generation"}

  def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body
                                  ).set_lineno(lineno)

  def _render_body(self, caller) -> str:
    return caller()


def _raise_exception(message):
  # Templates call this to reject a conversation (e.g. "roles must alternate").
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  # jinja's own tojson escapes <, >, & and ' as HTML; chat templates want plain JSON.
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _strftime_now(format):
  return datetime.datetime.now().strftime(format)


class _TemplateDict:
  """`dict(...)` in a template, without exposing the dict type itself to the sandbox."""

  def __call__(self, *args, **kwargs):
    return dict(*args, **kwargs)

  def fromkeys(self, *args, **kwargs):
    return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
  """jinja's `namespace`, refusing underscore names (no reaching CPython internals)."""

  def __init__(*args, **kwargs):
    # jinja's signature trick, so that `namespace(self=...)` still works.
    self, args = args[0], args[1:]
    attrs = dict(*args, **kwargs)
    for name in attrs:
      _TemplateNamespace._check_name(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name, value):
    _TemplateNamespace._check_name(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check_name(name):
    if isinstance(name, str) and name.startswith("_"):
      raise jinja2.exceptions.SecurityError(
          f"chat templates cannot store underscore-prefixed attributes on a namespace, got "
          f"{name!r}")


def compile_template(template: str, source: str = "chat template") -> jinja2.Template:
  """The jinja environment of transformers' `_cached_compile_jinja_template`, compiled.

  Templates come from downloaded model files, so they run sandboxed and immutable; a syntax
  error is a ValueError naming `source` (the file it came from) and the template line.
  """
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True,
      extensions=[_GenerationTag, jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = _strftime_now
  env.globals["dict"] = _TemplateDict()
  env.globals["namespace"] = _TemplateNamespace
  try:
    return env.from_string(template)
  except jinja2.exceptions.TemplateSyntaxError as e:
    raise ValueError(f"{source}: chat template syntax error at template line {e.lineno}: "
                     f"{e.message}") from None


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """A jinja chat template plus the tokenizer's special token strings it may refer to.

  `render(messages, add_generation_prompt)` equals transformers'
  `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` for a tokenizer
  with these special tokens. Tokens left None are not passed (as in transformers, a template
  then sees them undefined). `extra_tokens` are model-specific ones ((name, text) pairs such
  as ("image_token", "<image>"): transformers 5 passes every "*_token" string of
  tokenizer_config.json). `source` names the template's file in errors.

  Example boundaries: `render_prompt(context)` ends with the generation prompt (e.g.
  "<|im_start|>assistant\\n"), and `render_response(context, content)` is the rest of the full
  rendering, trimmed to end at the EOS text when only whitespace follows it.
  """
  template: str
  bos_token: str | None = None
  eos_token: str | None = None
  unk_token: str | None = None
  sep_token: str | None = None
  pad_token: str | None = None
  cls_token: str | None = None
  mask_token: str | None = None
  extra_tokens: tuple[tuple[str, str], ...] = ()
  source: str = "chat template"
  _compiled: jinja2.Template = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    if not isinstance(self.template, str) or not self.template:
      raise ValueError(f"{self.source}: a chat template must be a non-empty string, got "
                       f"{self.template!r:.60}")
    # Compiled once here, so a broken template fails when it is loaded, not mid-dataset.
    object.__setattr__(self, "_compiled", compile_template(self.template, self.source))

  def __reduce__(self):
    # Pickle/copy the fields and compile again: a compiled jinja template does not pickle.
    return (type(self), tuple(getattr(self, f.name) for f in dataclasses.fields(self)
                              if f.init))

  @classmethod
  def from_files(cls, files) -> "ChatTemplate":
    """The template of a `tokenizer.TokenizerFiles`, with its special tokens."""
    if not files.chat_template:
      where = files.directory or files.tokenizer_file or "in-memory tokenizer"
      raise ValueError(f"{where}: the tokenizer files hold no chat template (no "
                       "chat_template.jinja, no 'chat_template' in tokenizer_config.json, no "
                       "chat_template.json)")
    named = {k: v for k, v in files.special.items() if k in SPECIAL_TOKEN_NAMES}
    extra = tuple(sorted((k, v) for k, v in files.special.items()
                         if k not in SPECIAL_TOKEN_NAMES))
    return cls(files.chat_template, source=files.chat_template_source or "chat template",
               extra_tokens=extra, **named)

  @property
  def special_tokens(self) -> dict[str, str]:
    """The template variables for special tokens: transformers' `special_tokens_map`."""
    return {**{name: getattr(self, name) for name in SPECIAL_TOKEN_NAMES
               if getattr(self, name) is not None}, **dict(self.extra_tokens)}

  def render(self, messages: Sequence[Message], add_generation_prompt: bool,
             where: str = "") -> str:
    """The conversation rendered by the template; template failures (including its own
    `raise_exception`) are DataErrors naming `where`, reason "template_error"."""
    chat = [{"role": m.role, "content": m.content} for m in messages]
    try:
      return self._compiled.render(messages=chat, tools=None, documents=None,
                                   add_generation_prompt=add_generation_prompt,
                                   **self.special_tokens)
    except Exception as e:  # A template is user code: any failure is about this example.
      raise DataError(where, f"the chat template ({self.source}) failed on this conversation: "
                      f"{type(e).__name__}: {e}", "template_error") from None

  def render_prompt(self, context: Sequence[Message], where: str = "") -> str:
    """The conversation so far, rendered with the generation prompt that cues the reply."""
    return self.render(context, True, where)

  def render_response(self, context: Sequence[Message], content: str, where: str = "") -> str:
    """The assistant turn `content` as the template renders it after `context`.

    It is the full rendering of context + [assistant(content)] minus the rendered prompt, so
    prompt + response is exactly what the model sees in a finished conversation. When the
    turn contains the EOS text and only whitespace follows its last occurrence (ChatML's
    "<|im_end|>\\n"), that whitespace is dropped: the response then ends at EOS, where
    generation stops and where rewards are read, and tokenisation adds no second EOS.
    """
    prompt = self.render_prompt(context, where)
    full = self.render(tuple(context) + (Message("assistant", content),), False, where)
    if not full.startswith(prompt):
      at = next((i for i, (a, b) in enumerate(zip(prompt, full)) if a != b),
                min(len(prompt), len(full)))
      raise DataError(where, f"the chat template ({self.source}) renders the generation prompt "
                      "differently from a finished assistant turn, so the prompt is not a "
                      f"prefix of the conversation (they differ at character {at}: "
                      f"{prompt[at:at + 30]!r} vs {full[at:at + 30]!r}); this template "
                      "cannot split prompt from response", "template_mismatch")
    response = full[len(prompt):]
    if self.eos_token:
      end = response.rfind(self.eos_token)
      if end >= 0:
        end += len(self.eos_token)
        if not response[end:].strip():
          response = response[:end]
    return response

