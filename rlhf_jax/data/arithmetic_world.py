"""The arithmetic world: integer arithmetic problems with exact answers and a verifiable reward,
so RL from verifiable rewards (GRPO on GSM8K-style data) can be studied end to end on a laptop.

This is to verifiable rewards what the review world (data/review_world.py) is to learned ones:
everything is generated from a seed and the reward is exact.

* Problems. An expression of `min_operands`..`max_operands` non-negative integers up to
  `max_operand`, joined by operators drawn from `ops` ("+", "-", "*"), with the usual
  precedence ("*" before "+"/"-", left to right): the prompt is the expression and "=", e.g.
  "12+7*3=". The difficulty knobs are the operand count, the operand range and the operators.
* Responses. A short worked answer: one step per operation, in evaluation order, then the
  GSM8K final-answer marker: "7*3=21 12+21=33 #### 33". Intermediate results may be negative
  ("3-9=-6 -6+2=-4 #### -4"); right operands never are, so no step reads "--".
* Gold reward r*(prompt, response) = correct + format_weight * formatted, where correct = 1 when
  the response ends with "#### N" and N is the exact value of the prompt's expression (what the
  steps say does not matter: the final answer is what is verified), and formatted = 1 when the
  whole response has the worked-answer form (steps, marker, number); format_weight defaults to
  0, so the gold reward is accuracy. Token-id responses must also have ended (EOS): a response
  cut off at the length limit scores 0, as "#### 3" cut from "#### 35" is no answer. The
  `grade(prompt, response)` grader is the same `correct` on text (the text carries no EOS; the
  RL stage's missing-EOS penalty covers the difference), so config.ppo.reward_source="grader"
  with config.ppo.grader="rlhf_jax.data.arithmetic_world:grade" optimises the same thing.
* Tokens. One token per character ("0"-"9", "+", "-", "*", "=", "#", " ") plus [PAD], [EOS],
  [UNK]: a tiny model learns the format within a few dozen SFT steps, while carrying digits
  through a product stays hard enough that accuracy stays well below 100%, leaving RL
  something to improve. The vocabulary is fixed, so the tokenizer is the same for every seed
  and every difficulty.
* Data. SFT examples are (prompt, worked answer) pairs; RL and evaluation prompts are fresh
  problems of the same distribution. The problem space is finite (9,300 problems at the
  defaults), so a seeded `heldout_fraction` of it, chosen by a hash of each problem's text, is
  reserved: those problems make up the held-out prompt set (`sample_prompts(n,
  seed=HELDOUT_SEED)`, the pipeline's evaluation prompts) and never appear in SFT data or any
  other prompt set, so held-out accuracy measures arithmetic rather than recall. The review
  world's preference data has no counterpart here: a verifiable reward needs no pairs.

Everything is numpy and deterministic given the seeds.
"""
import dataclasses
import re
import zlib
from typing import Sequence

import numpy as np
import tokenizers
from tokenizers import Regex, decoders
from tokenizers import models as tok_models
from tokenizers import pre_tokenizers

from rlhf_jax import rng as rng_lib
from rlhf_jax.data.examples import SFTExample
from rlhf_jax.data.tokenization import TokenizeConfig

PAD, EOS, UNK = "[PAD]", "[EOS]", "[UNK]"
SPECIALS = (PAD, EOS, UNK)  # ids 0, 1, 2: the model config's default pad/eos ids.
CHARS = tuple("0123456789+-*=# ")
OPS = "+-*"
MARKER = "####"
# The prompt set made of the reserved problems: the one every policy is evaluated on.
HELDOUT_SEED = rng_lib.prompt_seed("heldout")

_PROMPT = re.compile(r"\s*(\d+(?:\s*[-+*]\s*\d+)*)\s*=?\s*")
_TERM = re.compile(r"\d+|[-+*]")
_FINAL = re.compile(MARKER + r" ?(-?\d+)\s*$")
_STEP = r"-?\d+[-+*]\d+=-?\d+"
_FORMAT = re.compile(rf"(?:{_STEP} )+{MARKER} -?\d+")


# ---------------------------------------------------------------------------------------------
# Exact solutions (pure functions of the text)
# ---------------------------------------------------------------------------------------------


def parse(prompt: str) -> tuple[list[int], list[str]]:
  """(operands, operators) of a prompt such as "12+7*3=" (spaces and the "=" optional)."""
  m = _PROMPT.fullmatch(prompt)
  if m is None:
    raise ValueError(f"{prompt!r} is not an arithmetic_world prompt (non-negative integers "
                     "joined by +, -, *, then '=')")
  terms = _TERM.findall(m.group(1))
  return [int(t) for t in terms[0::2]], terms[1::2]


def solve(operands: Sequence[int], operators: Sequence[str]) -> tuple[int, list[str]]:
  """(exact value, worked steps) with "*" before "+"/"-", each left to right: one step
  "a*b=c" per operation, in the order it is evaluated."""
  if len(operators) != len(operands) - 1 or not operands:
    raise ValueError(f"{len(operands)} operands need {len(operands) - 1} operators, got "
                     f"{len(operators)}")
  values, ops, steps = [int(operands[0])], [], []
  for op, x in zip(operators, operands[1:]):
    if op == "*":
      product = values[-1] * int(x)
      steps.append(f"{values[-1]}*{x}={product}")
      values[-1] = product
    elif op in "+-":
      values.append(int(x))
      ops.append(op)
    else:
      raise ValueError(f"unknown operator {op!r}; expected one of {OPS!r}")
  total = values[0]
  for op, x in zip(ops, values[1:]):
    new = total + x if op == "+" else total - x
    steps.append(f"{total}{op}{x}={new}")
    total = new
  return total, steps


def answer(prompt: str) -> int:
  """The exact value of a prompt's expression."""
  return solve(*parse(prompt))[0]


def worked_answer(prompt: str) -> str:
  """The SFT target: the steps and the final-answer marker, "7*3=21 12+21=33 #### 33"."""
  value, steps = solve(*parse(prompt))
  return " ".join(steps + [f"{MARKER} {value}"])


def final_answer(response: str) -> int | None:
  """N of a response that ends with "#### N" (trailing spaces allowed), else None. Stricter than
  graders.extract_answer: no fall-back to the last number, since the format is part of the task."""
  m = _FINAL.search(response)
  return int(m.group(1)) if m else None


def grade(prompt: str, response: str) -> float:
  """The world's grader for config.ppo.grader ("rlhf_jax.data.arithmetic_world:grade"): 1.0
  when the response ends with "#### N" and N is the exact value of the prompt, else 0.0."""
  got = final_answer(response)
  return float(got is not None and got == answer(prompt))


def formatted(response: str) -> bool:
  """Whether the response has the whole worked-answer form: steps, then "#### N"."""
  return _FORMAT.fullmatch(response) is not None


def build_tokenizer() -> tokenizers.Tokenizer:
  """A character-level `tokenizers.Tokenizer` over SPECIALS + CHARS (every character is a token;
  decoding joins them back without spaces)."""
  vocab = SPECIALS + CHARS
  tok = tokenizers.Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(vocab)},
                                                  unk_token=UNK))
  tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
  tok.decoder = decoders.Fuse()
  tok.add_special_tokens(list(SPECIALS))
  return tok


# ---------------------------------------------------------------------------------------------
# The world
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WorldConfig:
  """The problem distribution. Each invalid field raises a ValueError that starts with its
  name, so config.task can prefix it with its own key."""
  seed: int = 0
  min_operands: int = 2
  max_operands: int = 3
  max_operand: int = 9  # Operands are drawn uniformly from [0, max_operand].
  ops: str = OPS
  format_weight: float = 0.0  # Gold reward for the whole worked-answer form, on top of 1/0.
  heldout_fraction: float = 0.1  # Share of the problem space kept for held-out evaluation.

  def __post_init__(self):
    for name in ("min_operands", "max_operands", "max_operand"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: must be an integer >= 1")
    if self.min_operands < 2:
      raise ValueError(f"min_operands={self.min_operands}: a problem needs >= 2 operands")
    if self.max_operands < self.min_operands:
      raise ValueError(f"max_operands={self.max_operands}: must be >= min_operands="
                       f"{self.min_operands}")
    if self.max_operands > 8:
      raise ValueError(f"max_operands={self.max_operands}: at most 8 (longer problems do not "
                       "fit the prompt and response lengths a small model is built for)")
    if self.max_operand > 9999:
      raise ValueError(f"max_operand={self.max_operand}: at most 9999")
    if not isinstance(self.ops, str) or not self.ops or set(self.ops) - set(OPS) or len(
        set(self.ops)) != len(self.ops):
      raise ValueError(f"ops={self.ops!r}: a non-empty string of distinct operators from "
                       f"{OPS!r}")
    if not 0.0 <= self.format_weight <= 1.0:
      raise ValueError(f"format_weight={self.format_weight}: must lie in [0, 1]")
    if not 0.0 < self.heldout_fraction < 1.0:
      raise ValueError(f"heldout_fraction={self.heldout_fraction}: must lie in (0, 1) (the "
                       "share of problems reserved for held-out evaluation)")


@dataclasses.dataclass(frozen=True)
class GoldScores:
  """Per-example arrays [N] (float64): reward = correct + format_weight * formatted."""
  reward: np.ndarray
  correct: np.ndarray
  formatted: np.ndarray


class ArithmeticWorld:
  """Problems, their worked answers, and the gold reward; the same interface as ReviewWorld
  where the pipeline reads it (encode, decode, tokenize_config, sample_sft, sample_prompts,
  score_ids, score, gold_reward) plus the prompt's reference answer (`reference`).

  Attributes: `tokenizer` (character-level `tokenizers.Tokenizer`), `vocab`, `pad_id` = 0,
  `eos_id` = 1, `unk_id` = 2, `vocab_size`.
  """

  def __init__(self, config: WorldConfig = WorldConfig()):
    self.config = config
    self.vocab = SPECIALS + CHARS
    self.char_to_id = {c: i for i, c in enumerate(self.vocab)}
    self.tokenizer = build_tokenizer()
    self.pad_id, self.eos_id, self.unk_id = (self.char_to_id[t] for t in SPECIALS)
    self.vocab_size = len(self.vocab)

  # ---- text <-> ids ------------------------------------------------------------------------

  def encode(self, text: str) -> np.ndarray:
    """One id per character (unknown characters -> UNK), as the tokenizer does."""
    return np.asarray([self.char_to_id.get(c, self.unk_id) for c in text], np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    """Characters up to (not including) the first EOS; other specials by name."""
    out = []
    for i in ids:
      if int(i) == self.eos_id:
        break
      out.append(self.vocab[int(i)])
    return "".join(out)

  def _lengths(self) -> tuple[int, int]:
    """(longest prompt, longest response + EOS) in tokens over the whole problem space."""
    cfg = self.config
    k = cfg.max_operands
    digits = len(str(cfg.max_operand))
    prompt = k * digits + (k - 1) + 1
    # |any intermediate value| <= the sum of the products of all operands: max_operand^k * k.
    value = len(str(cfg.max_operand ** k * k)) + 1  # Sign included.
    step = value + 1 + value + 1 + value  # "a*b=c".
    return prompt, (k - 1) * (step + 1) + len(MARKER) + 1 + value + 1

  def tokenize_config(self, max_prompt_len: int | None = None,
                      max_response_len: int | None = None, **kw) -> TokenizeConfig:
    """Lengths that never truncate this world's problems and worked answers."""
    prompt, response = self._lengths()
    return TokenizeConfig(eos_id=self.eos_id, pad_id=self.pad_id,
                          max_prompt_len=max_prompt_len or prompt,
                          max_response_len=max_response_len or response,
                          vocab_size=kw.pop("vocab_size", self.vocab_size), **kw)

  # ---- sampling ------------------------------------------------------------------------------

  def is_heldout(self, prompt: str) -> bool:
    """Whether a problem is reserved for held-out evaluation: a seeded hash of its text (CRC32,
    the same in every process and Python version) falls in the first heldout_fraction."""
    digest = zlib.crc32(f"{self.config.seed}:{prompt}".encode())
    return digest < self.config.heldout_fraction * 2 ** 32

  def _problems(self, rng: np.random.Generator, n: int, heldout: bool) -> list[str]:
    """n problems of the held-out part of the space or of the rest, by rejection."""
    cfg = self.config
    out: list[str] = []
    share = cfg.heldout_fraction if heldout else 1.0 - cfg.heldout_fraction
    for _ in range(100):
      if len(out) >= n:
        break
      m = int((n - len(out)) / share * 1.2) + 16
      k = rng.integers(cfg.min_operands, cfg.max_operands + 1, m)
      operands = rng.integers(0, cfg.max_operand + 1, (m, cfg.max_operands))
      ops = rng.integers(0, len(cfg.ops), (m, cfg.max_operands - 1))
      for i in range(m):
        text = str(operands[i, 0])
        for j in range(1, k[i]):
          text += cfg.ops[ops[i, j - 1]] + str(operands[i, j])
        text += "="
        if self.is_heldout(text) == heldout:
          out.append(text)
    if len(out) < n:
      raise ValueError(f"the {'held-out' if heldout else 'training'} part of this world's "
                       f"problem space is (nearly) empty ({cfg}): raise max_operand or "
                       "max_operands, or move heldout_fraction away from 0 or 1")
    return out[:n]

  def sample_prompts(self, n: int, seed: int = 0) -> list[str]:
    """n problems as prompts, "12+7*3=": reserved problems for the held-out prompt set
    (seed = HELDOUT_SEED), the others for every other seed."""
    return self._problems(np.random.default_rng([self.config.seed, 1, seed]), n,
                          heldout=seed == HELDOUT_SEED)

  def sample_sft(self, n: int, seed: int = 0) -> list[SFTExample]:
    """SFT data: n problems (never reserved ones) and their worked answers."""
    prompts = self._problems(np.random.default_rng([self.config.seed, 2, seed]), n, False)
    return [SFTExample(p, worked_answer(p), f"arithmetic_world(seed={self.config.seed},"
                       f"sft_seed={seed}):{i}") for i, p in enumerate(prompts)]

  def reference(self, prompt: str) -> str:
    """The prompt's reference answer (its exact value), for graders that take one."""
    return str(answer(prompt))

  # ---- gold reward ---------------------------------------------------------------------------

  def _gold(self, prompts: Sequence[str], responses: Sequence[str], ended: np.ndarray
            ) -> GoldScores:
    correct = np.asarray([e and grade(p, r) for p, r, e in zip(prompts, responses, ended)],
                         np.float64)
    form = np.asarray([e and formatted(r) for r, e in zip(responses, ended)], np.float64)
    return GoldScores(correct + self.config.format_weight * form, correct, form)

  def score_ids(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]
                ) -> GoldScores:
    """Gold scores of token-id responses (e.g. policy samples). A response ends at its first
    EOS (later ids are ignored); one without EOS did not finish and scores 0."""
    if len(prompts) != len(responses):
      raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    texts, ended = [], []
    for r in responses:
      r = np.asarray(r, np.int64)
      if r.size and (r.min() < 0 or r.max() >= self.vocab_size):
        raise ValueError(f"token ids must lie in [0, {self.vocab_size}) for this world")
      texts.append(self.decode(r))
      ended.append(bool((r == self.eos_id).any()))
    return self._gold([self.decode(p) for p in prompts], texts, np.asarray(ended, bool))

  def score(self, prompts: Sequence[str], responses: Sequence[str], ended: bool = True
            ) -> GoldScores:
    """Gold scores of text responses; `ended` = the responses are complete (EOS follows)."""
    if len(prompts) != len(responses):
      raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    return self._gold(prompts, responses, np.full(len(prompts), ended, bool))

  def gold_reward(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """r*(prompt, response) for complete text responses, [N] float64."""
    return self.score(prompts, responses).reward
