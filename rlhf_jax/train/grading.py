"""A Python grader as the reward of a policy stage (config.ppo.reward_source = "grader").

The grader (rlhf_jax.graders: "module:function", (prompt, response[, reference]) -> float) reads
text, so sampled token ids are decoded with the task's tokenizer first: the prompt as the
policy saw it (BOS left out), the response up to, not including, its EOS. Reference answers
come from the task: the arithmetic world computes each prompt's exact value; a file task reads
them from the prompts file (config.data.prompts, field config.data.answer_field) and finds each
rollout's by its prompt token ids (`task.prompt_references`), so the text round trip through
the tokenizer never has to reproduce the file's string exactly.

Grading runs on the host, on every process (each holds every row, as for the gold reward), so
all processes agree on the scores without a collective.
"""
import ml_collections
import numpy as np

from rlhf_jax import graders
from rlhf_jax.train import task as task_lib

def grader_of(config: ml_collections.ConfigDict, section: str = "ppo") -> graders.Grader:
  """The loaded grader of config.<section>.grader (errors name that key)."""
  return graders.load_grader(config[section].grader, f"config.{section}.grader")


def check(config: ml_collections.ConfigDict, section: str = "ppo") -> None:
  """What can be known before training: the grader loads (format, import, attribute, call
  signature), and a grader that requires a reference answer gets one from this task."""
  grader = grader_of(config, section)
  if not grader.needs_reference:
    return
  kind = config.task.kind
  where = f"config.{section}.grader={config[section].grader!r}"
  if kind == "review_world":
    raise ValueError(f"{where} requires a reference answer (its 'reference' parameter has no "
                     "default) but config.task.kind='review_world' has none; use a grader of "
                     "(prompt, response), or a task with answers")
  if kind == "files" and not config.data.prompts:
    raise ValueError(f"{where} requires a reference answer, read from the prompts file: set "
                     "config.data.prompts to JSON Lines / JSON / Parquet records with a "
                     f"{config.data.get('answer_field', 'answer')!r} field "
                     "(config.data.answer_field) beside each prompt")


def prompt_text(task: task_lib.Task, ids: np.ndarray) -> str:
  """A prompt's token ids as text, without the BOS that tokenisation added."""
  bos = task.tokenize_config.bos_id
  ids = np.asarray(ids)
  return task.decode(ids[1:] if bos is not None and len(ids) and ids[0] == bos else ids)


def grade(task: task_lib.Task, config: ml_collections.ConfigDict, prompts, responses, *,
          section: str = "ppo") -> np.ndarray:
  """[N] float32 grader scores of token-id `responses` (each without EOS/PAD) to `prompts`
  (each the prompt's real ids, BOS included as the policy saw it)."""
  grader = grader_of(config, section)
  texts = [prompt_text(task, p) for p in prompts]
  references = None
  if grader.wants_reference:
    if task.world is not None:
      reference = getattr(task.world, "reference", None)
      references = [reference(t) if reference is not None else None for t in texts]
    else:
      table = task_lib.prompt_references(task, config)
      references = [table.get(tuple(int(i) for i in p)) for p in prompts]
  return graders.score_responses(grader, texts, [task.decode(r) for r in responses],
                                 references)


def prepare(task: task_lib.Task, config: ml_collections.ConfigDict, section: str = "ppo"
            ) -> None:
  """Loads the grader and, for one that takes reference answers on a file task, reads them
  now, so a prompts file with a missing or conflicting answer fails before the first rollout
  rather than after it."""
  grader = grader_of(config, section)
  if grader.wants_reference and task.world is None:
    task_lib.prompt_references(task, config)
