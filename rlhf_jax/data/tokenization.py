"""Text examples -> token ids: truncation, EOS, PAD != EOS, vocabulary checks, counted drops.

Prompt and response are tokenised separately (as the DPO reference implementation does), so
the prompt/response boundary is exact in token space; the response gets EOS appended (unless
it already ends with it, as a chat-template turn does) and is then truncated from the right
(a truncated response loses its EOS: it did not end there), the prompt is truncated from the
left (the most recent turns matter most) and keeps its BOS.
"""
import dataclasses
from typing import Generic, Protocol, Sequence, TypeVar

import numpy as np
from absl import logging
from tqdm import auto as tqdm

from rlhf_jax.data.errors import DataError, SkipReport, SkipTally, check_on_error
from rlhf_jax.data.examples import PreferenceExample, SFTExample, UnpairedExample

OVER_LENGTH = ("truncate", "drop")
T = TypeVar("T")
_CHUNK = 4096  # texts per encode_batch call: big enough for the Rust thread pool, and a tick.


class TextTokenizer(Protocol):
  """What tokenisation needs: `tokenizers.Tokenizer` satisfies it."""

  def encode_batch(self, inputs, add_special_tokens: bool = True): ...


@dataclasses.dataclass(frozen=True)
class TokenizeConfig:
  """Lengths and special ids. `vocab_size` is the *model's*: every id must be below it.

  PAD must differ from EOS: rewards and "did the response end" are read at EOS, and masks,
  not ids, mark padding, so a PAD that equals EOS makes both ambiguous.
  """
  eos_id: int
  pad_id: int
  max_prompt_len: int = 512
  max_response_len: int = 512
  vocab_size: int | None = None
  bos_id: int | None = None  # Prepended to every prompt when set.
  over_length: str = "truncate"  # Or "drop": drop examples that do not fit (counted).
  on_error: str = "raise"  # For empty prompts and out-of-vocabulary ids.

  def __post_init__(self):
    if self.pad_id == self.eos_id:
      raise ValueError(f"pad_id == eos_id == {self.pad_id}: PAD must differ from EOS (give the "
                       "tokenizer a dedicated pad token)")
    if self.max_prompt_len < 1 or self.max_response_len < 1:
      raise ValueError(f"max_prompt_len={self.max_prompt_len} and max_response_len="
                       f"{self.max_response_len} must both be >= 1")
    if self.over_length not in OVER_LENGTH:
      raise ValueError(f"over_length={self.over_length!r}; expected one of {OVER_LENGTH}")
    check_on_error(self.on_error)
    for name in ("eos_id", "pad_id", "bos_id"):
      v = getattr(self, name)
      if v is not None and (v < 0 or (self.vocab_size is not None and v >= self.vocab_size)):
        raise ValueError(f"{name}={v} is outside the model vocabulary [0, {self.vocab_size})")

  @property
  def seq_len(self) -> int:
    """Length of one padded sequence: left-padded prompt + right-padded response."""
    return self.max_prompt_len + self.max_response_len


@dataclasses.dataclass(frozen=True, eq=False)
class TokenizedSFT:
  prompt: np.ndarray  # int32 [<= max_prompt_len], never empty.
  response: np.ndarray  # int32 [<= max_response_len], ends with one EOS unless truncated.
  source: str = ""


@dataclasses.dataclass(frozen=True, eq=False)
class TokenizedPair:
  prompt: np.ndarray
  chosen: np.ndarray
  rejected: np.ndarray
  margin: float = 0.0  # 0.0 where the data has no margin.
  source: str = ""


@dataclasses.dataclass(frozen=True, eq=False)
class TokenizedUnpaired:
  prompt: np.ndarray
  completion: np.ndarray
  desirable: bool
  source: str = ""


@dataclasses.dataclass(frozen=True)
class TokenizeResult(Generic[T]):
  """Tokenised examples plus how many prompts/responses were truncated and what was dropped
  (reason "over_length" for over_length="drop", and any skipped errors)."""
  examples: list[T]
  truncated_prompts: int
  truncated_responses: int
  report: SkipReport

  def summary(self) -> str:
    return (f"{self.report.summary()}; truncated prompts={self.truncated_prompts}, "
            f"responses={self.truncated_responses}")


def encode_texts(tokenizer: TextTokenizer, texts: Sequence[str], desc: str = "tokenize"
                 ) -> list[np.ndarray]:
  """Token ids of each text, no special tokens added; identical texts are encoded once."""
  unique = list(dict.fromkeys(texts))
  ids = {}
  for start in tqdm.trange(0, len(unique), _CHUNK, desc=desc, disable=None, leave=False):
    chunk = unique[start:start + _CHUNK]
    for text, enc in zip(chunk, tokenizer.encode_batch(chunk, add_special_tokens=False)):
      ids[text] = np.asarray(enc.ids, np.int32)
  return [ids[t] for t in texts]


class _Shaper:
  """Per-example truncation and checks, counting as it goes."""

  def __init__(self, cfg: TokenizeConfig, tally: SkipTally):
    self.cfg = cfg
    self.tally = tally
    self.truncated_prompts = 0
    self.truncated_responses = 0
    self._bos = np.asarray([] if cfg.bos_id is None else [cfg.bos_id], np.int32)
    self._eos = np.asarray([cfg.eos_id], np.int32)

  def _check_vocab(self, ids: np.ndarray, field: str, source: str) -> None:
    v = self.cfg.vocab_size
    if v is not None and ids.size and int(ids.max()) >= v:
      bad = int(ids[ids >= v][0])
      raise DataError(source, f"token id {bad} in the {field} is >= the model's vocab size {v}"
                      " (tokenizer and model disagree)", "token_out_of_vocab")

  def prompt(self, ids: np.ndarray, source: str) -> tuple[np.ndarray, bool]:
    self._check_vocab(ids, "prompt", source)
    ids = np.concatenate([self._bos, ids])
    if not ids.size:
      raise DataError(source, "the prompt tokenises to no tokens, so the first response token "
                      "has nothing to be predicted from (set bos_id)", "empty_prompt")
    over = ids.size > self.cfg.max_prompt_len
    if over:  # Left truncation, keeping BOS in front.
      keep = self.cfg.max_prompt_len - self._bos.size
      ids = np.concatenate([self._bos, ids[ids.size - keep:]])
    return ids, over

  def response(self, ids: np.ndarray, field: str, source: str) -> tuple[np.ndarray, bool]:
    self._check_vocab(ids, field, source)
    # A chat template may already end the turn with the EOS text (ChatML's "<|im_end|>"):
    # a second EOS would teach the model to emit EOS twice.
    if not (ids.size and ids[-1] == self.cfg.eos_id):
      ids = np.concatenate([ids, self._eos])
    over = ids.size > self.cfg.max_response_len
    return (ids[:self.cfg.max_response_len] if over else ids), over

  def accept(self, source: str, prompt_over: bool, responses_over: Sequence[bool]) -> bool:
    """Counts truncations, or drops the example under over_length="drop"."""
    if not (prompt_over or any(responses_over)):
      return True
    if self.cfg.over_length == "drop":
      self.tally.record(DataError(source, f"over length (prompt > {self.cfg.max_prompt_len} or "
                                  f"response > {self.cfg.max_response_len} tokens); dropped",
                                  "over_length"))
      return False
    self.truncated_prompts += int(prompt_over)
    self.truncated_responses += sum(responses_over)
    return True

  def result(self, examples: list) -> TokenizeResult:
    self.tally.kept = len(examples)
    res = TokenizeResult(examples, self.truncated_prompts, self.truncated_responses,
                         self.tally.report(log=False))
    (logging.warning if res.report.skipped else logging.info)("%s", res.summary())
    return res


def tokenize_sft(examples: Sequence[SFTExample], tokenizer: TextTokenizer,
                 cfg: TokenizeConfig) -> TokenizeResult[TokenizedSFT]:
  shaper = _Shaper(cfg, SkipTally("tokenize sft", cfg.on_error))
  prompts = encode_texts(tokenizer, [e.prompt for e in examples], "tokenize prompts")
  responses = encode_texts(tokenizer, [e.response for e in examples], "tokenize responses")
  out = []
  for ex, p, r in zip(examples, prompts, responses):
    try:
      p, p_over = shaper.prompt(p, ex.source)
      r, r_over = shaper.response(r, "response", ex.source)
    except DataError as err:
      shaper.tally.handle(err)
      continue
    if shaper.accept(ex.source, p_over, [r_over]):
      out.append(TokenizedSFT(p, r, ex.source))
  return shaper.result(out)


def tokenize_preferences(examples: Sequence[PreferenceExample], tokenizer: TextTokenizer,
                         cfg: TokenizeConfig) -> TokenizeResult[TokenizedPair]:
  shaper = _Shaper(cfg, SkipTally("tokenize preferences", cfg.on_error))
  prompts = encode_texts(tokenizer, [e.prompt for e in examples], "tokenize prompts")
  chosen = encode_texts(tokenizer, [e.chosen for e in examples], "tokenize chosen")
  rejected = encode_texts(tokenizer, [e.rejected for e in examples], "tokenize rejected")
  out = []
  for ex, p, c, r in zip(examples, prompts, chosen, rejected):
    try:
      p, p_over = shaper.prompt(p, ex.source)
      c, c_over = shaper.response(c, "chosen response", ex.source)
      r, r_over = shaper.response(r, "rejected response", ex.source)
    except DataError as err:
      shaper.tally.handle(err)
      continue
    if shaper.accept(ex.source, p_over, [c_over, r_over]):
      margin = 0.0 if ex.margin is None else float(ex.margin)
      out.append(TokenizedPair(p, c, r, margin, ex.source))
  return shaper.result(out)


def tokenize_unpaired(examples: Sequence[UnpairedExample], tokenizer: TextTokenizer,
                      cfg: TokenizeConfig) -> TokenizeResult[TokenizedUnpaired]:
  shaper = _Shaper(cfg, SkipTally("tokenize unpaired", cfg.on_error))
  prompts = encode_texts(tokenizer, [e.prompt for e in examples], "tokenize prompts")
  completions = encode_texts(tokenizer, [e.completion for e in examples],
                             "tokenize completions")
  out = []
  for ex, p, c in zip(examples, prompts, completions):
    try:
      p, p_over = shaper.prompt(p, ex.source)
      c, c_over = shaper.response(c, "completion", ex.source)
    except DataError as err:
      shaper.tally.handle(err)
      continue
    if shaper.accept(ex.source, p_over, [c_over]):
      out.append(TokenizedUnpaired(p, c, bool(ex.desirable), ex.source))
  return shaper.result(out)
