"""Loading HF `tokenizer.json` files through the `tokenizers` package (no transformers, no hub).

A local model directory is accepted too: HF checkpoints keep the fast tokenizer there as
`tokenizer.json`, and its special tokens in `tokenizer_config.json`.
"""
import json
import os
import pathlib

import tokenizers


def _tokenizer_file(path) -> pathlib.Path:
  p = pathlib.Path(path)
  if p.is_dir():
    f = p / "tokenizer.json"
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


def special_tokens(path: str | os.PathLike) -> dict[str, str]:
  """bos/eos/pad/unk token strings from a model directory's tokenizer_config.json (if any).

  Values there are either strings or AddedToken dicts with a "content" key.
  """
  f = pathlib.Path(path) / "tokenizer_config.json"
  if not f.is_file():
    return {}
  cfg = json.loads(f.read_text())
  out = {}
  for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
    v = cfg.get(key)
    if isinstance(v, dict):
      v = v.get("content")
    if isinstance(v, str):
      out[key] = v
  return out
