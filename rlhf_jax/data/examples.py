"""Example types: plain text, one record per training example, before tokenisation.

Every example carries `source` ("path:line", or a generator's name and index) so that any
later error (over-length, a token id outside the model's vocabulary) can still name the
line it came from.
"""
import dataclasses


@dataclasses.dataclass(frozen=True)
class SFTExample:
  """A prompt and the response to imitate. The prompt is fully rendered text (role markers
  included, see `chat.ChatFormat`); the response is the text that follows it verbatim."""
  prompt: str
  response: str
  source: str = ""


@dataclasses.dataclass(frozen=True)
class PreferenceExample:
  """A prompt with a preferred (`chosen`) and a dispreferred (`rejected`) response.

  `margin` is an optional strength of preference (e.g. a score difference), used by
  margin-aware reward-model losses; None when the data has none.
  """
  prompt: str
  chosen: str
  rejected: str
  margin: float | None = None
  source: str = ""


@dataclasses.dataclass(frozen=True)
class PromptAnswer:
  """An RL prompt with its reference answer, for graders that verify responses against one
  (rlhf_jax.graders): the answer is never shown to the policy."""
  prompt: str
  answer: str
  source: str = ""


@dataclasses.dataclass(frozen=True)
class UnpairedExample:
  """A prompt, one completion and a binary desirability label (KTO-style data)."""
  prompt: str
  completion: str
  desirable: bool
  source: str = ""


def sft_from_preferences(pairs: list[PreferenceExample]) -> list[SFTExample]:
  """SFT on the preferred responses: the usual first stage before DPO/RLHF on the same data."""
  return [SFTExample(p.prompt, p.chosen, p.source) for p in pairs]


def unpaired_from_preferences(pairs: list[PreferenceExample]) -> list[UnpairedExample]:
  """Split each pair into a desirable and an undesirable completion (KTO on paired data)."""
  out = []
  for p in pairs:
    out.append(UnpairedExample(p.prompt, p.chosen, True, p.source))
    out.append(UnpairedExample(p.prompt, p.rejected, False, p.source))
  return out
