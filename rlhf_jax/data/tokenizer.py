"""Loading HF tokenizer files through the `tokenizers` package (no transformers, no hub).

A local model directory is accepted too: HF checkpoints keep the fast tokenizer there as
`tokenizer.json`, its special tokens in `tokenizer_config.json` (or the older
`special_tokens_map.json`) and its chat template in `chat_template.jinja` (what
transformers 5 `save_pretrained` writes), in `tokenizer_config.json` (older releases), or in
`chat_template.json` (processor checkpoints). `load_tokenizer_files` reads all of it, so a
user's model is trained on conversations in its own format, ending at its own EOS;
`save_tokenizer_files` writes the files back next to an exported checkpoint.
"""
import dataclasses
import json
import os
import pathlib
import shutil
from typing import Any, Mapping

import tokenizers
from absl import logging

from rlhf_jax.data import chat as chat_lib
from rlhf_jax.data import chat_template as template_lib

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_JINJA = "chat_template.jinja"
CHAT_TEMPLATE_JSON = "chat_template.json"
# Every file a tokenizer may be saved as (fast, slow and SentencePiece ones): an export copies
# whichever exist, so the exported model loads with exactly the user's tokenizer.
TOKENIZER_FILES = (TOKENIZER_FILE, CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE, CHAT_TEMPLATE_JINJA,
                   CHAT_TEMPLATE_JSON, "added_tokens.json", "vocab.json", "merges.txt",
                   "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")
CHAT_TEMPLATES_DIR = "chat_templates"  # transformers 5: extra named templates, one .jinja each.


def _tokenizer_file(path) -> pathlib.Path:
  p = pathlib.Path(path)
  if p.is_dir():
    f = p / TOKENIZER_FILE
    if not f.is_file():
      held = sorted(x.name for x in p.iterdir())[:20]
      raise FileNotFoundError(f"{p}: directory has no tokenizer.json (it holds {held}); only "
                              "fast-tokenizer files are supported")
    return f
  if not p.exists():
    raise FileNotFoundError(f"{p}: no such tokenizer file or directory")
  return p


def load_tokenizer(path: str | os.PathLike) -> tokenizers.Tokenizer:
  """A `tokenizers.Tokenizer` from a tokenizer.json file or a directory that contains one."""
  f = _tokenizer_file(path)
  try:
    return tokenizers.Tokenizer.from_file(str(f))
  except Exception as e:  # tokenizers raises a bare Exception from Rust on a bad file.
    raise ValueError(f"{f}: not a valid tokenizer.json: {e}") from None


def token_id(tokenizer: tokenizers.Tokenizer, token: str) -> int:
  """The id of one token string (e.g. "</s>"), or a ValueError naming it."""
  i = tokenizer.token_to_id(token)
  if i is None:
    raise ValueError(f"token {token!r} is not in the tokenizer's vocabulary "
                     f"(size {tokenizer.get_vocab_size()})")
  return i


def _read_json(f: pathlib.Path) -> Any:
  try:
    return json.loads(f.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{f}: not valid JSON: {e}") from None


def _token_string(value: Any) -> str | None:
  """A special token as saved: a string, or an AddedToken dict with its text in "content"."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) else None


def _special_tokens_of(directory: pathlib.Path, config: Mapping[str, Any]) -> dict[str, str]:
  """Named special tokens: tokenizer_config.json first, then special_tokens_map.json.

  Besides the standard seven (bos_token, eos_token, ...), transformers 5 treats every other
  "*_token" string of tokenizer_config.json (and an `extra_special_tokens` dict) as a
  model-specific named token, e.g. Gemma 3's "image_token"; chat templates can use them.
  """
  legacy_file = directory / SPECIAL_TOKENS_MAP_FILE
  legacy = _read_json(legacy_file) if legacy_file.is_file() else {}
  out = {}
  for key in template_lib.SPECIAL_TOKEN_NAMES:
    v = _token_string(config.get(key))
    if v is None and isinstance(legacy, dict):
      v = _token_string(legacy.get(key))
    if v is not None:
      out[key] = v
  extra = config.get("extra_special_tokens")
  named = {**config, **(extra if isinstance(extra, dict) else {})}
  for key, value in named.items():
    v = _token_string(value)
    if key.endswith("_token") and key not in out and v is not None:
      out[key] = v
  return out


def special_tokens(path: str | os.PathLike) -> dict[str, str]:
  """bos/eos/pad/unk token strings of a model directory: its tokenizer_config.json, then
  special_tokens_map.json; {} when it has neither.

  Values there are either strings or AddedToken dicts with a "content" key.
  """
  d = pathlib.Path(path)
  f = d / CONFIG_FILE
  config = _read_json(f) if f.is_file() else {}
  return {k: v for k, v in _special_tokens_of(d, config).items()
          if k in ("bos_token", "eos_token", "pad_token", "unk_token")}


def _chat_template_of(directory: pathlib.Path, config: Mapping[str, Any]
                      ) -> tuple[str | None, str | None]:
  """(template, the file it came from), in transformers 5's order of precedence."""
  jinja_file = directory / CHAT_TEMPLATE_JINJA
  if jinja_file.is_file():
    return jinja_file.read_text(encoding="utf-8"), str(jinja_file)
  value = config.get("chat_template")
  where = f"{directory / CONFIG_FILE} (key 'chat_template')"
  if isinstance(value, str):
    return value, where
  if isinstance(value, list):
    # transformers 4's format for several named templates; "default" is what it applies.
    named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
    if isinstance(named.get("default"), str):
      return named["default"], f"{where}, template 'default'"
    logging.warning("%s: named chat templates %s but none called 'default'; no chat template "
                    "is used", where, sorted(str(n) for n in named))
    return None, None
  if value is not None:
    raise ValueError(f"{where}: expected a string or a list of {{name, template}} objects, got "
                     f"{type(value).__name__}")
  json_file = directory / CHAT_TEMPLATE_JSON
  if json_file.is_file():
    value = _read_json(json_file)
    template = value.get("chat_template") if isinstance(value, dict) else None
    if not isinstance(template, str):
      raise ValueError(f"{json_file}: expected an object with a string 'chat_template'")
    return template, str(json_file)
  return None, None


def _bos_added_by_post_processor(tokenizer: tokenizers.Tokenizer) -> str | int | None:
  """The token the tokenizer's post-processor puts first (add_special_tokens=True): a token
  string (TemplateProcessing) or an id (Roberta/Bert processors); None when it adds none."""
  pp = tokenizer.post_processor
  if pp is None:
    return None
  stack = [json.loads(pp.__getstate__())]
  while stack:
    state = stack.pop(0)
    kind = state.get("type")
    if kind == "Sequence":
      stack = list(state.get("processors", [])) + stack
    elif kind == "TemplateProcessing":
      single = state.get("single") or []
      if single and "SpecialToken" in single[0]:
        token = single[0]["SpecialToken"]["id"]
        ids = state.get("special_tokens", {}).get(token, {}).get("ids") or []
        return ids[0] if ids else token
    elif kind in ("RobertaProcessing", "BertProcessing"):
      return int(state["cls"][1])
  return None


@dataclasses.dataclass(frozen=True, eq=False)
class TokenizerFiles:
  """A tokenizer with what the files around it say about it.

  `special` holds the named special tokens found (bos_token, eos_token, pad_token, unk_token,
  sep/cls/mask and model-specific ones such as image_token, when present); `chat_template` is
  the jinja template (None when there is none) and `chat_template_source` the file it came
  from. `bos_added_id` is the id the tokenizer itself puts in front of an encoding with
  add_special_tokens=True (None when it adds none): tokenisation here encodes with
  add_special_tokens=False, so a caller that wants the model's usual BOS passes it as
  `TokenizeConfig.bos_id` (see `prompt_bos_id`).
  """
  tokenizer: tokenizers.Tokenizer
  directory: pathlib.Path | None  # None for a bare tokenizer.json.
  tokenizer_file: pathlib.Path | None  # None for a tokenizer built in memory.
  special: Mapping[str, str]
  chat_template: str | None
  chat_template_source: str | None
  bos_added_id: int | None

  @property
  def bos_token(self) -> str | None:
    return self.special.get("bos_token")

  @property
  def eos_token(self) -> str | None:
    return self.special.get("eos_token")

  @property
  def pad_token(self) -> str | None:
    return self.special.get("pad_token")

  @property
  def unk_token(self) -> str | None:
    return self.special.get("unk_token")

  @property
  def add_bos_token(self) -> bool:
    """Whether the tokenizer puts a BOS in front by itself (transformers' attribute name)."""
    return self.bos_added_id is not None

  @property
  def vocab_size(self) -> int:
    """Tokens the tokenizer knows, added tokens included."""
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  @property
  def min_vocab_size(self) -> int:
    """Largest token id + 1: a model's embedding needs at least this many rows. It can exceed
    `vocab_size` when ids have gaps (added tokens placed after a padded vocabulary)."""
    return max(self.tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1

  def _named_id(self, name: str) -> int | None:
    token = self.special.get(name)
    if token is None:
      return None
    where = self.directory or self.tokenizer_file or "in-memory tokenizer"
    i = self.tokenizer.token_to_id(token)
    if i is None:
      raise ValueError(f"{where}: {name} {token!r} is not in the tokenizer's vocabulary")
    return i

  @property
  def eos_id(self) -> int | None:
    return self._named_id("eos_token")

  @property
  def pad_id(self) -> int | None:
    return self._named_id("pad_token")

  @property
  def bos_id(self) -> int | None:
    return self._named_id("bos_token")

  def chat_format(self) -> chat_lib.ChatRenderer:
    """The model's own chat template when the files carry one, else the hh-rlhf markers."""
    if self.chat_template is None:
      return chat_lib.ChatFormat()
    return template_lib.ChatTemplate.from_files(self)

  def prompt_bos_id(self, chat_format: chat_lib.ChatRenderer) -> int | None:
    """The `TokenizeConfig.bos_id` that matches how transformers encodes.

    Under a chat template, `apply_chat_template` encodes with add_special_tokens=False: the
    BOS is whatever the template writes (`{{ bos_token }}`), so none is prepended. Plain-text
    prompts get the BOS the tokenizer adds itself, as `tokenizer(text)` would.
    """
    if isinstance(chat_format, template_lib.ChatTemplate):
      return None
    return self.bos_added_id


def _files_of(tokenizer: tokenizers.Tokenizer, directory: pathlib.Path | None,
              tokenizer_file: pathlib.Path | None) -> TokenizerFiles:
  config: Mapping[str, Any] = {}
  special: dict[str, str] = {}
  template = source = None
  if directory is not None:
    config_file = directory / CONFIG_FILE
    config = _read_json(config_file) if config_file.is_file() else {}
    if not isinstance(config, dict):
      raise ValueError(f"{config_file}: expected a JSON object, got {type(config).__name__}")
    special = _special_tokens_of(directory, config)
    template, source = _chat_template_of(directory, config)
  bos = _bos_added_by_post_processor(tokenizer)
  if bos is None and config.get("add_bos_token") is True and "bos_token" in special:
    # transformers 4's Llama/Gemma tokenizers build their BOS post-processor from this flag.
    bos = special["bos_token"]
  if isinstance(bos, str):
    bos = token_id(tokenizer, bos)
  return TokenizerFiles(tokenizer, directory, tokenizer_file, special, template, source, bos)


def load_tokenizer_files(path: str | os.PathLike) -> TokenizerFiles:
  """The tokenizer of a model directory (or a bare tokenizer.json) and what its files say.

  A directory gives special tokens (tokenizer_config.json, then special_tokens_map.json), the
  chat template (chat_template.jinja, then tokenizer_config.json's "chat_template", then
  chat_template.json) and whether the tokenizer adds BOS itself (a post-processor that
  inserts a special token, or tokenizer_config.json's add_bos_token). A bare tokenizer.json
  has none of the config files, so only the last of these.
  """
  f = _tokenizer_file(path)
  directory = pathlib.Path(path) if pathlib.Path(path).is_dir() else None
  return _files_of(load_tokenizer(f), directory, f)


def tokenizer_files_from(tokenizer: tokenizers.Tokenizer, *, chat_template: str | None = None,
                         **special: str | None) -> TokenizerFiles:
  """TokenizerFiles for a tokenizer built in code (e.g. the review world's), with its special
  tokens given by name (eos_token="</s>", ...): what `save_tokenizer_files` writes out."""
  unknown = [k for k in special if not k.endswith("_token")]
  if unknown:
    raise ValueError(f"special token names {sorted(unknown)}: expected names ending in "
                     f"'_token', such as {template_lib.SPECIAL_TOKEN_NAMES}")
  special = {k: v for k, v in special.items() if v is not None}
  for name, token in special.items():
    if tokenizer.token_to_id(token) is None:
      raise ValueError(f"{name} {token!r} is not in the tokenizer's vocabulary: transformers "
                       "would add it as a new token with a new id")
  if chat_template is not None:
    template_lib.compile_template(chat_template)  # A broken template fails here, not later.
  files = _files_of(tokenizer, None, None)
  return dataclasses.replace(files, special=special, chat_template=chat_template,
                             chat_template_source="chat template" if chat_template else None)


def _remove_stale(dest: pathlib.Path, keep: list[str]) -> None:
  for name in TOKENIZER_FILES:
    if name not in keep and (dest / name).is_file():
      (dest / name).unlink()
  if (dest / CHAT_TEMPLATES_DIR).is_dir():
    shutil.rmtree(dest / CHAT_TEMPLATES_DIR)


def _write_special_tokens(directory: pathlib.Path, special: Mapping[str, str]) -> None:
  """`special` written into the directory's tokenizer_config.json and special_tokens_map.json
  (those that exist), each replaced atomically."""
  for name in (CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE):
    path = directory / name
    if path.is_file():
      content = {**json.loads(path.read_text(encoding="utf-8")), **special}
      tmp = path.with_name(name + ".tmp")
      tmp.write_text(json.dumps(content, indent=2, ensure_ascii=False), encoding="utf-8")
      os.replace(tmp, path)


def save_tokenizer_files(destination: str | os.PathLike,
                         source: "TokenizerFiles | tokenizers.Tokenizer", *,
                         chat_template: str | None = None, **special: str | None
                         ) -> list[pathlib.Path]:
  """Writes the tokenizer next to an exported checkpoint; returns the files written.

  A tokenizer loaded from a model directory is copied file by file (tokenizer.json,
  tokenizer_config.json, special_tokens_map.json, chat templates, vocab/merges and
  SentencePiece files, whichever exist), so the export loads exactly as the user's model did;
  special tokens given here that differ from the directory's (a run's eos/pad/bos overrides)
  are written into the copies of tokenizer_config.json and special_tokens_map.json, every
  other byte is unchanged.
  Anything else (a bare tokenizer.json, or a tokenizer built in code, with its special tokens
  and chat template given here by name) becomes tokenizer.json plus a tokenizer_config.json
  that `transformers.AutoTokenizer.from_pretrained(destination)` loads as a
  PreTrainedTokenizerFast with the same ids, special tokens and chat template. Tokenizer files
  of an earlier export that this one does not write are removed: a stale chat_template.jinja
  would otherwise override the new template when transformers loads the directory.
  """
  dest = pathlib.Path(destination)
  if dest.exists() and not dest.is_dir():
    raise NotADirectoryError(f"{dest}: exists and is not a directory")
  dest.mkdir(parents=True, exist_ok=True)
  if isinstance(source, TokenizerFiles) and source.directory is not None:
    if chat_template is not None:
      raise ValueError(f"{source.directory}: a tokenizer loaded from a model directory keeps "
                       "its chat template; it cannot be overridden (edit the files instead)")
    if dest.resolve() == source.directory.resolve():
      written = [dest / n for n in TOKENIZER_FILES if (dest / n).is_file()]
    else:
      names = [n for n in TOKENIZER_FILES if (source.directory / n).is_file()]
      _remove_stale(dest, names)
      written = [pathlib.Path(shutil.copy2(source.directory / n, dest / n)) for n in names]
      extra = source.directory / CHAT_TEMPLATES_DIR
      if extra.is_dir():
        shutil.copytree(extra, dest / CHAT_TEMPLATES_DIR)
        written.extend(sorted((dest / CHAT_TEMPLATES_DIR).iterdir()))
    changed = {name: token for name, token in special.items()
               if token is not None and source.special.get(name) != token}
    if changed:
      _write_special_tokens(dest, changed)
    return written
  if isinstance(source, TokenizerFiles):
    files = tokenizer_files_from(
        source.tokenizer, chat_template=chat_template or source.chat_template,
        **{**source.special, **special})
  elif isinstance(source, tokenizers.Tokenizer):
    files = tokenizer_files_from(source, chat_template=chat_template, **special)
  else:
    raise TypeError(f"source must be TokenizerFiles or tokenizers.Tokenizer, got "
                    f"{type(source).__name__}")
  _remove_stale(dest, [TOKENIZER_FILE, CONFIG_FILE])
  tok_file = dest / TOKENIZER_FILE
  given = source.tokenizer_file if isinstance(source, TokenizerFiles) else None
  if given is not None:
    if given.resolve() != tok_file.resolve():
      shutil.copy2(given, tok_file)  # Byte for byte what the user gave.
  else:
    files.tokenizer.save(str(tok_file))
  config = {"tokenizer_class": "PreTrainedTokenizerFast", **files.special}
  if files.chat_template is not None:
    config["chat_template"] = files.chat_template
  config_file = dest / CONFIG_FILE
  config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                         encoding="utf-8")
  return [tok_file, config_file]
