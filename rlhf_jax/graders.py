"""Verifiable rewards: Python graders named in the config, and GSM8K-style answer extraction.

A grader is a plain function of text, named in the config as "module:function"
(`config.ppo.grader = "rlhf_jax.graders:gsm8k_exact"`, or a user's own `"mypkg.rewards:score"`):

    def score(prompt: str, response: str) -> float: ...
    def score(prompt: str, response: str, reference: str | None) -> float: ...

`prompt` is the prompt as the policy saw it (rendered, decoded with the task's tokenizer, BOS
left out); `response` is the sampled response up to, not including, its EOS. It returns a
finite number (a bool counts as 0/1). Graders run on the host, once per sampled response, so
they may do anything Python can (parse, execute, look things up), but the RL loop waits for
them.

Reference answers. A grader that declares a parameter named `reference` (or takes
**kwargs) is also given the prompt's reference answer, keyword `reference`: on a file task the
`config.data.answer_field` field ("answer" by default, GSM8K's own name) of the prompts file
(`config.data.prompts`, JSON Lines / JSON / Parquet, read by `data.read_prompt_answers`); on the
arithmetic world the exact result of the prompt's expression. A `reference` parameter without a
default means the grader cannot work without one, which is checked before training. This is the
convention the built-in `gsm8k_exact` follows: the prompts carry their reference answers in a
field beside the prompt, never in the text the policy reads. A GSM8K record converts as
{"prompt": question, "answer": answer}: the reference may be a full worked solution ending in
"#### 72", since it goes through `extract_answer` like the response.

Answer extraction (`extract_answer`) follows the usual GSM8K / MATH conventions in this order:
the "#### X" marker, else the last \\boxed{X}, else "the answer is X", else the last number in
the text; `answers_equal` compares two extracted answers as exact rationals ("42" == "42.0" ==
"1,000"/1000-style thousands separators, "3/4" == "0.75"), else as normalised text.
"""
import dataclasses
import fractions
import functools
import importlib
import inspect
import math
import numbers
import re
from typing import Any, Callable, Sequence

import numpy as np
from tqdm import auto as tqdm

# Progress bars only where grading takes long enough to be watched.
_PROGRESS_MIN_ROWS = 2048

# ---------------------------------------------------------------------------------------------
# Loading a grader by name
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Grader:
  """A loaded grader: the function, the spec and config key it came from (for errors), and
  whether it takes (`wants_reference`) or requires (`needs_reference`) a reference answer."""
  fn: Callable[..., Any]
  spec: str
  key: str
  wants_reference: bool
  needs_reference: bool

  @property
  def name(self) -> str:
    return f"{self.key}={self.spec!r}"

  def __call__(self, prompt: str, response: str, reference: str | None = None) -> Any:
    if self.wants_reference:
      return self.fn(prompt, response, reference=reference)
    return self.fn(prompt, response)


def _signature(fn: Callable, name: str) -> tuple[bool, bool]:
  """(wants_reference, needs_reference) of a grader, after checking that it can be called as
  fn(prompt, response) (plus reference=... when it takes one)."""
  try:
    sig = inspect.signature(fn)
  except (TypeError, ValueError):  # Some builtins have no signature: call them as (p, r).
    return False, False
  params = sig.parameters
  ref = params.get("reference")
  wants = ref is not None or any(p.kind is p.VAR_KEYWORD for p in params.values())
  if ref is not None and ref.kind is ref.POSITIONAL_ONLY:
    raise ValueError(f"{name}: its 'reference' parameter is positional-only; graders are "
                     "called as fn(prompt, response, reference=...)")
  try:
    sig.bind("prompt", "response", **({"reference": None} if wants else {}))
  except TypeError as e:
    raise ValueError(f"{name}: a grader is called as fn(prompt, response) (plus reference=... "
                     f"when it declares that parameter), but its signature is {sig}: {e}"
                     ) from None
  needs = ref is not None and ref.default is inspect.Parameter.empty
  return wants, needs


def load_grader(spec: str, key: str = "config.ppo.grader") -> Grader:
  """The grader named by `spec` = "package.module:function" (the function may be a dotted
  attribute path, "module:Class.method"). Every error names `key`, the config key that holds
  the spec, and says which part failed: the format, the import, the attribute, the call
  signature. Loaded once per (spec, key)."""
  if (not isinstance(spec, str) or spec.count(":") != 1
      or not all(part.strip() for part in spec.split(":"))):
    raise ValueError(f"{key}={spec!r}: expected 'module:function', e.g. "
                     "'rlhf_jax.graders:gsm8k_exact' or 'mypkg.rewards:score' (a function "
                     "(prompt: str, response: str) -> float)")
  return _load(spec, key)


@functools.lru_cache(maxsize=32)
def _load(spec: str, key: str) -> Grader:
  module_name, attr = (s.strip() for s in spec.split(":"))
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
      # The module itself (or a package on its path) is missing, not one it imports.
      raise ValueError(f"{key}={spec!r}: module {module_name!r} is not importable ({e}); is "
                       "it installed, or on PYTHONPATH?") from None
    raise ValueError(f"{key}={spec!r}: importing module {module_name!r} failed: {e}") from e
  except Exception as e:  # The module exists but raised while importing: say so, keep the cause.
    raise ValueError(f"{key}={spec!r}: importing module {module_name!r} failed: "
                     f"{type(e).__name__}: {e}") from e
  fn = module
  for part in attr.split("."):
    if not hasattr(fn, part):
      raise ValueError(f"{key}={spec!r}: module {module_name!r} has no attribute {attr!r}")
    fn = getattr(fn, part)
  if not callable(fn):
    raise ValueError(f"{key}={spec!r}: {module_name}.{attr} is a {type(fn).__name__}, not "
                     "callable (a grader is a function (prompt, response) -> float)")
  wants, needs = _signature(fn, f"{key}={spec!r}")
  return Grader(fn, spec, key, wants, needs)


def as_grader(grader: Grader | Callable, key: str = "grader") -> Grader:
  """A Grader from a loaded one or a bare callable (tests, colabs)."""
  if isinstance(grader, Grader):
    return grader
  if not callable(grader):
    raise ValueError(f"{key}: {grader!r} is not callable")
  name = getattr(grader, "__qualname__", repr(grader))
  wants, needs = _signature(grader, f"{key}={name!r}")
  return Grader(grader, name, key, wants, needs)


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


def _short(text: str, n: int = 80) -> str:
  return repr(text if len(text) <= n else text[:n] + "...")


def score_responses(grader: Grader | Callable, prompts: Sequence[str],
                    responses: Sequence[str], references: Sequence[str | None] | None = None
                    ) -> np.ndarray:
  """[N] float32 scores, grader(prompt, response[, reference]) per row.

  A score that is not a real number, or is NaN/inf, is an error naming the grader's config
  key and the row (a reward that silently became 0 or NaN would corrupt every advantage of
  its group); so is a missing reference for a grader that requires one, and an exception the
  grader raises (re-raised with the row it failed on)."""
  grader = as_grader(grader)
  if len(prompts) != len(responses):
    raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
  if references is not None and len(references) != len(prompts):
    raise ValueError(f"{len(references)} references for {len(prompts)} prompts")
  if grader.needs_reference:
    missing = (0 if references is None or not len(references)
               else next((i for i, r in enumerate(references) if r is None), None))
    if missing is not None and len(prompts):
      raise ValueError(f"{grader.name}: the grader requires a reference answer (its "
                       "'reference' parameter has no default) but prompt "
                       f"{_short(prompts[missing])} (row {missing}) has none: give a prompts "
                       "file whose records carry one (config.data.prompts, field "
                       "config.data.answer_field), or a task that knows its answers")
  out = np.empty(len(prompts), np.float32)
  rows = tqdm.tqdm(range(len(prompts)), desc="grading", leave=False,
                   disable=len(prompts) < _PROGRESS_MIN_ROWS or None)
  for i in rows:
    ref = references[i] if references is not None else None
    try:
      value = grader(prompts[i], responses[i], ref)
    except Exception as e:
      raise RuntimeError(f"{grader.name} raised {type(e).__name__} on row {i} (prompt "
                         f"{_short(prompts[i])}, response {_short(responses[i])}): {e}") from e
    if isinstance(value, np.ndarray) and value.size == 1:
      value = value.item()
    if not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
      raise ValueError(f"{grader.name} returned {value!r} ({type(value).__name__}) on row {i} "
                       f"(prompt {_short(prompts[i])}, response {_short(responses[i])}): a "
                       "grader must return a finite number")
    out[i] = float(value)
  return out


# ---------------------------------------------------------------------------------------------
# Answer extraction (GSM8K / MATH conventions)
# ---------------------------------------------------------------------------------------------

# A number: optional sign (a "-" right after a digit, letter or ")" is an operator, not a sign),
# "$", thousands separators in groups of three, a decimal part, a "/" fraction.
_NUMBER = re.compile(r"(?:(?<![\w)])-)?\$?(?:\d{1,3}(?:,\d{3})+|\d+|(?=\.\d))(?:\.\d+)?"
                     r"(?:\s*/\s*\d+)?")
_MARKER = re.compile(r"####")
_ANSWER_IS = re.compile(r"(?:the\s+(?:final\s+)?answer\s+is|answer\s*:)\s*:?", re.IGNORECASE)
_FRAC = re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}")


def _normalise(text: str) -> str:
  """Drops what does not change the value: "$", "," separators, "%", spaces, LaTeX spacing and
  \\text{...} units, a trailing "."; \\frac{a}{b} becomes a/b."""
  text = _FRAC.sub(r"\1/\2", text)
  text = re.sub(r"\\text\{[^{}]*\}|\\[!,;: ]|\\left|\\right", "", text)
  for drop in ("\\$", "$", ",", "%", " "):
    text = text.replace(drop, "")
  return text.rstrip(".")


def _first_number(text: str) -> str | None:
  m = _NUMBER.search(text)
  return _normalise(m.group(0)) if m else None


def _boxed(text: str) -> str | None:
  """The content of the last \\boxed{...} (braces balanced), or None."""
  start = text.rfind("\\boxed{")
  if start < 0:
    return None
  i = start + len("\\boxed{")
  depth = 1
  for j in range(i, len(text)):
    depth += {"{": 1, "}": -1}.get(text[j], 0)
    if depth == 0:
      return text[i:j]
  return None  # Unclosed: no answer.


def extract_answer(text: str) -> str | None:
  """The final answer of a worked solution, normalised ("$1,000." -> "1000"), or None.

  In order: the number after the last "####" marker (GSM8K; a marker followed by no number
  gives None, as the text declared a non-numeric answer); the content of the last \\boxed{}
  (MATH; \\frac{a}{b} -> "a/b"); the number after the last "the answer is" / "answer:"; the
  last number anywhere.
  """
  if not isinstance(text, str):
    raise TypeError(f"extract_answer expects a str, got {type(text).__name__}")
  markers = list(_MARKER.finditer(text))
  if markers:
    after = text[markers[-1].end():].strip()
    m = _NUMBER.match(after)
    return _normalise(m.group(0)) if m else None
  boxed = _boxed(text)
  if boxed is not None:
    value = _normalise(boxed)
    return value or None
  said = list(_ANSWER_IS.finditer(text))
  if said:
    found = _first_number(text[said[-1].end():])
    if found is not None:
      return found
  numbers_ = _NUMBER.findall(text)
  return _normalise(numbers_[-1]) if numbers_ else None


def _rational(text: str) -> fractions.Fraction | None:
  try:
    return fractions.Fraction(text)
  except (ValueError, ZeroDivisionError):
    return None


def answers_equal(a: str | None, b: str | None, rel_tol: float = 1e-6) -> bool:
  """Whether two answers agree: numerically when both parse as numbers (exact rationals, so
  "42" == "42.0", "1,000" == "1000", "3/4" == "0.75"; within `rel_tol` relative, so a rounded
  decimal of a repeating fraction still matches), else as normalised, case-folded text. None
  (no answer) equals nothing."""
  if a is None or b is None:
    return False
  a, b = _normalise(str(a)), _normalise(str(b))
  x, y = _rational(a), _rational(b)
  if x is not None and y is not None:
    return abs(x - y) <= fractions.Fraction(rel_tol) * max(abs(x), abs(y))
  return a.casefold() == b.casefold() and a != ""


# ---------------------------------------------------------------------------------------------
# Built-in graders
# ---------------------------------------------------------------------------------------------


def gsm8k_exact(prompt: str, response: str, reference: str) -> float:
  """1.0 when the response's final answer (`extract_answer`) equals the reference's, else 0.0.

  `reference` is the prompt's reference answer (see the module docstring): a bare "72" or a
  whole GSM8K solution ending in "#### 72". A reference with no extractable answer is an
  error, since every response would score 0 against it without anyone noticing."""
  del prompt  # The reference carries everything the grade needs.
  expected = extract_answer(str(reference))
  if expected is None:
    raise ValueError(f"reference answer {_short(str(reference))} holds no answer to compare "
                     "with (no number, no #### marker, no \\boxed{})")
  return float(answers_equal(extract_answer(response), expected))


def has_final_answer(prompt: str, response: str) -> float:
  """1.0 when the response states a final answer with the "#### X" marker, else 0.0: a format
  reward that needs no reference (e.g. to teach the marker before grading correctness)."""
  del prompt
  markers = list(_MARKER.finditer(response))
  return float(bool(markers) and _NUMBER.match(response[markers[-1].end():].strip()) is not None)
