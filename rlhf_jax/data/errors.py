"""DataError and the skip tally: how bad input is reported instead of being dropped silently.

Every reader and tokeniser either raises a `DataError` naming `path:line` and the problem, or,
where the caller asked for `on_error="skip"`, counts the example under a short reason key and
logs the counts once at the end. The counts are also returned (`SkipReport`), so a pipeline can
assert on them or write them next to its metrics.
"""
import collections
import dataclasses
from typing import Mapping

from absl import logging

ON_ERROR = ("raise", "skip")
# How many example messages a report keeps per reason: enough to find the lines, not a flood.
_KEEP_MESSAGES = 3


class DataError(ValueError):
  """Bad input data. The message starts with where (`path:line`) and says what is wrong.

  `reason` is a short key (e.g. "missing_field", "bad_json") used to count skips.
  """

  def __init__(self, where: str, problem: str, reason: str = "invalid"):
    super().__init__(f"{where}: {problem}" if where else problem)
    self.where = where
    self.problem = problem
    self.reason = reason


def check_on_error(on_error: str) -> None:
  if on_error not in ON_ERROR:
    raise ValueError(f"on_error={on_error!r}; expected one of {ON_ERROR}")


@dataclasses.dataclass(frozen=True)
class SkipReport:
  """What a pass over some data kept and skipped, by reason.

  `messages` keeps the first few full error messages per reason, so a log line points at
  real file:line locations.
  """
  what: str
  kept: int
  skipped: Mapping[str, int]
  messages: Mapping[str, tuple[str, ...]]

  @property
  def num_skipped(self) -> int:
    return sum(self.skipped.values())

  def summary(self) -> str:
    if not self.skipped:
      return f"{self.what}: kept {self.kept}, skipped 0"
    parts = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()))
    lines = [f"{self.what}: kept {self.kept}, skipped {self.num_skipped} ({parts})"]
    for reason in sorted(self.messages):
      lines.extend(f"  e.g. {m}" for m in self.messages[reason])
    return "\n".join(lines)


class SkipTally:
  """Mutable counter used while reading; `report()` freezes it into a SkipReport.

  `handle(err)` re-raises when on_error="raise", otherwise records the skip.
  """

  def __init__(self, what: str, on_error: str):
    check_on_error(on_error)
    self.what = what
    self.on_error = on_error
    self.kept = 0
    self._counts: collections.Counter = collections.Counter()
    self._messages: dict[str, list[str]] = collections.defaultdict(list)

  def handle(self, err: DataError) -> None:
    """An error: raised under on_error="raise", counted under "skip"."""
    if self.on_error == "raise":
      raise err
    self.record(err)

  def record(self, err: DataError) -> None:
    """A deliberate drop (e.g. over-length with over_length="drop"): always counted."""
    self._counts[err.reason] += 1
    if len(self._messages[err.reason]) < _KEEP_MESSAGES:
      self._messages[err.reason].append(str(err))

  def report(self, log: bool = True) -> SkipReport:
    rep = SkipReport(self.what, self.kept, dict(self._counts),
                     {k: tuple(v) for k, v in self._messages.items()})
    if log:
      if rep.skipped:
        logging.warning("%s", rep.summary())
      else:
        logging.info("%s", rep.summary())
    return rep
