"""The task a run trains on: an embedded world (the review world; the arithmetic world, whose
reward is verifiable), or the user's files and tokenizer.

`build_task(config)` gives the tokenizer, the special ids, the lengths and how chat messages are
rendered; `sft_examples`, `preference_examples` and `prompts` give a split of the data as token
ids. For files, the tokenizer and its special tokens come from the user's model directory
(`config.task.tokenizer`, else `config.model_dir`): eos/pad/bos from its tokenizer_config.json
(the config keys only override), chat-format data rendered with its chat template. Data files
are named in `config.data` (JSONL, JSON array or parquet; see rlhf_jax.data.readers); a split
without its own eval file holds out a seeded `config.data.eval_fraction` of the train file.
"""
import dataclasses
import os
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from rlhf_jax import data, rng
from rlhf_jax import eval as eval_lib

CHAT_MODES = ("auto", "template", "hh")
# Embedded tasks with a gold reward (Task.world): config.task.kind values.
WORLD_KINDS = ("review_world", "arithmetic_world")
KINDS = WORLD_KINDS + ("files",)


@dataclasses.dataclass
class Task:
  tokenizer: Any
  tokenize_config: data.TokenizeConfig
  # Ids the tokenizer can produce lie below this (added tokens included). A fresh model's
  # vocabulary is exactly this; a loaded model's must be at least this.
  vocab_size: int
  # Set for an embedded task (it has a gold reward).
  world: data.ReviewWorld | data.ArithmeticWorld | None = None
  chat: Any = data.ChatFormat()  # Renders message lists: the tokenizer's chat template or hh.
  tokenizer_files: Any = None  # data.TokenizerFiles of a user's tokenizer (copied to exports).
  _cache: dict = dataclasses.field(default_factory=dict, repr=False)

  def cached(self, config, name: str, compute, *key):
    """compute() once per (name, key) and data settings: a task handed from stage to stage
    tokenises each split once, and a config with other data settings gets its own."""
    settings = (repr(config.task.to_dict()),
                repr(config.data.to_dict()) if "data" in config else "")
    full = (name, *key, *settings)
    if full not in self._cache:
      self._cache[full] = compute()
    return self._cache[full]

  def decode(self, ids) -> str:
    if self.world is not None:
      return self.world.decode(ids)
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

  @property
  def special_ids(self) -> dict[str, int | None]:
    tok = self.tokenize_config
    return {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id}


def review_world_config() -> ml_collections.ConfigDict:
  """config.task for the embedded review world: its seed and how much data to draw."""
  return ml_collections.ConfigDict(dict(
      kind="review_world", world_seed=0, n_sft=20_000, n_eval=500,
      # Gold-labelled pairs of the process's own samples (standalone reward / DPO stages).
      n_pairs=10_000, n_eval_pairs=1_000, k=4, label_temperature=0.0))


def arithmetic_world_config() -> ml_collections.ConfigDict:
  """config.task for the embedded arithmetic world (data/arithmetic_world.py): its seed, the
  problem distribution (operand count and range, operators), the gold reward's format weight,
  and how many SFT examples to draw."""
  world = data.arithmetic_world.WorldConfig()
  return ml_collections.ConfigDict(dict(
      kind="arithmetic_world", world_seed=0, n_sft=20_000, n_eval=500,
      min_operands=world.min_operands, max_operands=world.max_operands,
      max_operand=world.max_operand, ops=world.ops, format_weight=world.format_weight,
      heldout_fraction=world.heldout_fraction))


def _arithmetic_world(cfg: ml_collections.ConfigDict) -> data.ArithmeticWorld:
  """The world of config.task; a bad knob names its config.task key."""
  try:
    world_cfg = data.arithmetic_world.WorldConfig(
        seed=cfg.world_seed, min_operands=cfg.min_operands, max_operands=cfg.max_operands,
        max_operand=cfg.max_operand, ops=cfg.ops, format_weight=cfg.format_weight,
        heldout_fraction=cfg.heldout_fraction)
  except ValueError as e:
    raise ValueError(f"config.task.{e}") from None
  return data.ArithmeticWorld(world_cfg)


def files_config() -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict]:
  """(config.task, config.data) for a user's tokenizer and data files.

  task.tokenizer: a model directory or tokenizer.json ("" = config.model_dir); eos/pad/bos
  tokens: "" = the tokenizer's own (tokenizer_config.json); chat: "auto" renders message lists
  with the tokenizer's chat template when it has one, else with hh-rlhf markers ("template"
  requires one, "hh" never uses it). data.*: files (""= none); *_eval: "" = hold out
  eval_fraction of the train file; on_error: "raise" or "skip" (bad rows counted by reason);
  answer_field: the field of config.data.prompts records that holds each prompt's reference
  answer, read only for a grader that takes one (config.ppo.grader, rlhf_jax.graders).
  """
  task = ml_collections.ConfigDict(dict(
      kind="files", tokenizer="", eos_token="", pad_token="", bos_token="", chat="auto",
      max_prompt_len=256, max_response_len=256, over_length="truncate"))
  files = ml_collections.ConfigDict(dict(
      sft="", sft_eval="", pairs="", pairs_eval="", prompts="", prompts_eval="",
      eval_fraction=0.05, split_seed=0, on_error="raise", answer_field="answer"))
  return task, files


def validate(config: ml_collections.ConfigDict) -> None:
  """config.task (and config.data for files): kinds, sizes and choices, each naming its key."""
  cfg = config.task
  if cfg.kind == "review_world":
    for key in ("n_sft", "n_eval", "n_pairs", "n_eval_pairs", "k"):
      if not isinstance(cfg[key], int) or cfg[key] < 1:
        raise ValueError(f"config.task.{key}={cfg[key]!r}: must be an integer >= 1")
    return
  if cfg.kind == "arithmetic_world":
    for key in ("n_sft", "n_eval"):
      if not isinstance(cfg[key], int) or cfg[key] < 1:
        raise ValueError(f"config.task.{key}={cfg[key]!r}: must be an integer >= 1")
    _arithmetic_world(cfg)
    return
  if cfg.kind != "files":
    raise ValueError(f"config.task.kind={cfg.kind!r}; expected one of {KINDS}")
  for key in ("max_prompt_len", "max_response_len"):
    if not isinstance(cfg[key], int) or cfg[key] < 1:
      raise ValueError(f"config.task.{key}={cfg[key]!r}: must be an integer >= 1")
  choices = {"task.chat": (cfg.chat, CHAT_MODES),
             "task.over_length": (cfg.over_length, data.tokenization.OVER_LENGTH),
             "data.on_error": (config.data.on_error, data.errors.ON_ERROR)}
  for key, (value, allowed) in choices.items():
    if value not in allowed:
      raise ValueError(f"config.{key}={value!r}; expected one of {tuple(allowed)}")
  if not 0.0 < config.data.eval_fraction < 1.0:
    raise ValueError(f"config.data.eval_fraction={config.data.eval_fraction}: must lie in "
                     "(0, 1) (the held-out part of a file without an eval file of its own)")


# ---------------------------------------------------------------------------------------------
# Building the task
# ---------------------------------------------------------------------------------------------


def _special_id(tokenizer, token: str, key: str, source: str) -> int:
  try:
    return data.token_id(tokenizer, token)
  except ValueError as e:
    where = f" ({source})" if source != key else ""
    raise ValueError(f"{key}={token!r}{where}: {e}") from None


def build_task(config: ml_collections.ConfigDict) -> Task:
  """config.task.kind = "review_world" / "arithmetic_world" (seeded, generated here) or
  "files"."""
  cfg = config.task
  if cfg.kind == "review_world":
    world = data.ReviewWorld(data.WorldConfig(seed=cfg.world_seed))
    vocab = world.vocab_size
    files = data.tokenizer_files_from(world.tokenizer, eos_token=data.review_world.EOS,
                                      pad_token=data.review_world.PAD,
                                      unk_token=data.review_world.UNK)
    return Task(world.tokenizer, world.tokenize_config(vocab_size=vocab), vocab, world,
                tokenizer_files=files)
  if cfg.kind == "arithmetic_world":
    world = _arithmetic_world(cfg)
    names = data.arithmetic_world
    files = data.tokenizer_files_from(world.tokenizer, eos_token=names.EOS,
                                      pad_token=names.PAD, unk_token=names.UNK)
    return Task(world.tokenizer, world.tokenize_config(vocab_size=world.vocab_size),
                world.vocab_size, world, tokenizer_files=files)
  if cfg.kind != "files":
    raise ValueError(f"config.task.kind={cfg.kind!r}; expected one of {KINDS}")
  chat_mode = cfg.get("chat", "auto")  # Configs saved before chat templates lack the key.
  if chat_mode not in CHAT_MODES:
    raise ValueError(f"config.task.chat={chat_mode!r}; expected one of {CHAT_MODES}")
  path = cfg.tokenizer or config.get("model_dir") or ""
  if not path:
    raise ValueError("config.task.tokenizer is empty and there is no config.model_dir: name a "
                     "model directory (or tokenizer.json) whose tokenizer the data is read with")
  key_of = "config.task.tokenizer" if cfg.tokenizer else "config.model_dir"
  try:
    files = data.load_tokenizer_files(path)
  except (OSError, ValueError) as e:
    raise ValueError(f"{key_of}={path!r}: {e}") from None
  tokenizer = files.tokenizer
  if chat_mode == "template" and not files.chat_template:
    raise ValueError(f"config.task.chat='template' but {key_of}={path!r} has no chat template")
  chat = files.chat_format() if chat_mode != "hh" else data.ChatFormat()
  ids = {}
  for name in ("eos", "pad"):
    override = cfg[f"{name}_token"]
    token = override or getattr(files, f"{name}_token")
    if not token:
      hint = (" The tokenizer defines no pad token: set --config.task.pad_token to a token of "
              "its vocabulary that is not the EOS (padding must never look like the end of a "
              "response), e.g. an unused reserved token." if name == "pad" else "")
      raise ValueError(f"config.task.{name}_token is empty and {key_of}={path!r} defines no "
                       f"{name} token.{hint}")
    source = f"config.task.{name}_token" if override else f"{key_of}={path!r}"
    ids[name] = _special_id(tokenizer, token, f"config.task.{name}_token", source)
  # BOS: the one the tokenizer adds itself on plain text; none under a chat template, which
  # writes its own (as transformers' apply_chat_template encodes); the config key overrides.
  bos_token = cfg.get("bos_token", "")
  ids["bos"] = (_special_id(tokenizer, bos_token, "config.task.bos_token",
                            "config.task.bos_token") if bos_token
                else files.prompt_bos_id(chat))
  if ids["pad"] == ids["eos"]:
    raise ValueError(f"config.task.pad_token: the pad token is the EOS (id {ids['eos']}) of "
                     f"{key_of}={path!r}; set --config.task.pad_token to another token of the "
                     "vocabulary (rewards and 'did the response end' are read at EOS)")
  on_error = config.data.on_error if "data" in config else "raise"
  tok = data.TokenizeConfig(eos_id=ids["eos"], pad_id=ids["pad"], bos_id=ids["bos"],
                            max_prompt_len=cfg.max_prompt_len,
                            max_response_len=cfg.max_response_len,
                            vocab_size=files.min_vocab_size, over_length=cfg.over_length,
                            on_error=on_error)
  return Task(tokenizer, tok, files.min_vocab_size, chat=chat, tokenizer_files=files)


# ---------------------------------------------------------------------------------------------
# Splits of the data
# ---------------------------------------------------------------------------------------------


def held_out_split(examples: list, fraction: float, split: str, seed: int = 0) -> list:
  """A deterministic train/eval split of one file: `fraction` of it (a seeded permutation)
  is held out for evaluation and never trained on."""
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"config.data.eval_fraction={fraction}: expected a value in (0, 1) when "
                     "the split has no eval file of its own")
  order = rng.host_rng(seed, "held_out_split").permutation(len(examples))
  n_eval = max(1, int(round(fraction * len(examples))))
  if n_eval >= len(examples):
    raise ValueError(f"config.data.eval_fraction={fraction} of {len(examples)} example(s) "
                     "leaves nothing to train on: give a larger file, a smaller fraction, or "
                     "an eval file of its own (config.data.*_eval)")
  keep = order[:n_eval] if split == "eval" else order[n_eval:]
  return [examples[i] for i in sorted(keep)]


def _split(config, kind: str, split: str, read) -> list:
  """Raw examples of `split` from config.data.<kind> / <kind>_eval (or a held-out part)."""
  files = config.data
  train_path, eval_path = files[kind], files[f"{kind}_eval"]
  if not train_path and not (split == "eval" and eval_path):
    raise ValueError(f"config.data.{kind} is empty: this stage needs a {kind} file")
  if split == "eval" and eval_path:
    return read(eval_path)
  everything = _read_once(config, kind, train_path, read)
  if eval_path:
    return everything
  return held_out_split(everything, files.eval_fraction, split, seed=files.split_seed)


_READ_CACHE: dict = {}


def _read_once(config, kind: str, path: str, read) -> list:
  """The train file is read once for both of its splits (the held-out part comes from it); a
  file changed on disk since is read again."""
  stat = os.stat(path) if os.path.isfile(path) else None
  key = (kind, path, stat and (stat.st_mtime_ns, stat.st_size), config.data.on_error,
         config.task.get("chat"), config.task.get("tokenizer"), config.get("model_dir"))
  if key not in _READ_CACHE:
    if len(_READ_CACHE) >= 2:  # The train file of the split being read, and one more.
      _READ_CACHE.pop(next(iter(_READ_CACHE)))
    _READ_CACHE[key] = read(path)
  return _READ_CACHE[key]


def _report(what: str, result) -> None:
  """Logged always; printed too when anything was dropped or truncated (never silently)."""
  summary = f"{what}: {len(result.examples)} examples; {result.summary()}"
  logging.info("%s", summary)
  if result.report.num_skipped or result.truncated_prompts or result.truncated_responses:
    print(summary, flush=True)


def sft_examples(task: Task, config: ml_collections.ConfigDict, split: str
                 ) -> list[data.TokenizedSFT]:
  """Tokenised SFT examples of `split` ("train" or "eval")."""
  return task.cached(config, "sft", lambda: _sft_examples(task, config, split), split)


def _sft_examples(task: Task, config: ml_collections.ConfigDict, split: str):
  if task.world is not None:
    n = config.task.n_sft if split == "train" else config.task.n_eval
    raw = task.world.sample_sft(n, seed={"train": 0, "eval": 1}[split])
  else:
    raw = _split(config, "sft", split, lambda p: data.read_sft(
        p, on_error=config.data.on_error, chat_format=task.chat))
  result = data.tokenize_sft(raw, task.tokenizer, task.tokenize_config)
  _report(f"SFT {split}", result)
  return result.examples


def preference_examples(task: Task, config: ml_collections.ConfigDict, split: str
                        ) -> list[data.TokenizedPair]:
  """Tokenised preference pairs of `split`: gold-labelled samples of the review world's own
  process, or config.data.pairs in any layout `data.read_preferences` reads."""
  return task.cached(config, "pairs", lambda: _preference_examples(task, config, split), split)


def _preference_examples(task: Task, config: ml_collections.ConfigDict, split: str):
  if task.world is not None:
    if not hasattr(task.world, "sample_preferences"):
      raise ValueError(f"config.task.kind={config.task.kind!r} has no preference pairs of its "
                       "own (its reward is verified, not learned): train a policy with "
                       "config.stages ('sft', 'ppo')")
    cfg = config.task
    n = cfg.n_pairs if split == "train" else cfg.n_eval_pairs
    raw = task.world.sample_preferences(n, k=cfg.k, temperature=cfg.label_temperature,
                                        seed={"train": 0, "eval": 1}[split])
  else:
    raw = _split(config, "pairs", split, lambda p: data.read_preferences(
        p, on_error=config.data.on_error, chat_format=task.chat))
  return tokenize_pairs(task, raw, f"pairs {split}")


def tokenize_pairs(task: Task, raw, desc: str) -> list[data.TokenizedPair]:
  result = data.tokenize_preferences(raw, task.tokenizer, task.tokenize_config)
  _report(desc, result)
  return result.examples


def prompts(task: Task, config: ml_collections.ConfigDict, split: str, n: int = 0
            ) -> list[np.ndarray]:
  """Token ids of the RL prompts of `split` ("train" or "eval"; review world: n fresh prompts
  of that prompt set). Files: config.data.prompts (/ prompts_eval), else the prompts of
  config.data.pairs, else of config.data.sft (each prompt once, in file order)."""
  if task.world is not None:
    name = "rl" if split == "train" else "heldout"
    texts = task.world.sample_prompts(n, seed=rng.prompt_seed(name))
    return [task.world.encode(t) for t in texts]
  files = config.data
  if files.prompts or (split == "eval" and files.prompts_eval):
    texts = _split(config, "prompts", split, lambda p: data.read_prompts(
        p, on_error=files.on_error, chat_format=task.chat))
  elif files.pairs:
    texts = [p.prompt for p in _split(config, "pairs", split, lambda p: data.read_preferences(
        p, on_error=files.on_error, chat_format=task.chat))]
  elif files.sft:
    texts = [e.prompt for e in _split(config, "sft", split, lambda p: data.read_sft(
        p, on_error=files.on_error, chat_format=task.chat))]
  else:
    raise ValueError("config.data.prompts is empty (and there are no config.data.pairs or "
                     "config.data.sft files to take prompts from): RL needs prompts")
  return encode_prompts(task, list(dict.fromkeys(texts)), f"prompts {split}")


def grouped_prompt_batches(task: Task, config: ml_collections.ConfigDict, position: int, *,
                           train_prompts: int, prompts_per_batch: int, repeats: int):
  """The online stages' prompt stream: batches of `prompts_per_batch` left-padded training
  prompts (of `train_prompts`, tokenised once per task), each repeated `repeats` times
  (group-major: the samples of one prompt are adjacent rows), resumable at `position`.

  Global batches on every process (prompts are tiny): a rollout's random draws are per global
  row, so a fixed global row order makes a run independent of the process count."""
  tok = task.tokenize_config
  pool = task.cached(config, "rl_prompts",
                     lambda: prompts(task, config, "train", n=train_prompts), train_prompts)

  def collate(batch):
    rows = [p for p in batch for _ in range(repeats)]
    ids, mask = eval_lib.left_pad(rows, tok.max_prompt_len, tok.pad_id)
    return {"ids": ids, "mask": mask}

  return data.DataIterator(pool, data.PaddedBatcher(prompts_per_batch, collate),
                           seed=config.seed, position=position, process_index=0,
                           process_count=1)


def encode_prompts(task: Task, texts: list[str], what: str, report: bool = True
                   ) -> list[np.ndarray]:
  """Prompt texts as the policy reads them: token ids, the BOS in front, the last
  config.task.max_prompt_len tokens of a longer one (counted, and printed when any is cut)."""
  ids = data.encode_texts(task.tokenizer, texts, desc=what)
  bos = task.tokenize_config.bos_id
  if bos is not None:
    ids = [np.concatenate([[bos], x]).astype(np.int32) for x in ids]
  width = task.tokenize_config.max_prompt_len
  cut = sum(len(x) > width for x in ids)
  message = f"{what}: {len(ids)} prompts; {cut} longer than {width} tokens keep " \
            "their last tokens (config.task.max_prompt_len)"
  if report:
    logging.info("%s", message)
    if cut:
      print(message, flush=True)
  return [x[-width:] for x in ids]


def prompt_references(task: Task, config: ml_collections.ConfigDict
                      ) -> dict[tuple[int, ...], str]:
  """Each RL prompt's reference answer, by the prompt's token ids as `prompts` gives them (BOS,
  left truncation), for graders that take one (train/grading.py): the config.data.answer_field
  field of every record of config.data.prompts and config.data.prompts_eval, whichever split a
  prompt falls in. Keyed by ids, not text, so a tokenizer whose decoding does not reproduce the
  file's string exactly still finds the answer. {} without a prompts file. A prompt given two
  different answers is an error naming both records."""
  return task.cached(config, "prompt_references", lambda: _prompt_references(task, config))


def _prompt_references(task: Task, config: ml_collections.ConfigDict):
  files = config.data
  field = files.get("answer_field", "answer")
  records = []
  for key in ("prompts", "prompts_eval"):
    if files[key]:
      try:
        records += data.read_prompt_answers(files[key], answer_field=field,
                                            on_error=files.on_error, chat_format=task.chat)
      except data.DataError as e:
        raise data.DataError(e.where, f"{e.problem} (config.data.{key}, answers in "
                             f"config.data.answer_field={field!r})", e.reason) from None
  first: dict[str, data.PromptAnswer] = {}
  for r in records:
    seen = first.setdefault(r.prompt, r)
    if seen.answer != r.answer:
      raise data.DataError(r.source, f"the same prompt as {seen.source} with another "
                           f"answer ({r.answer!r}, there {seen.answer!r})",
                           "conflicting_answers")
  unique = list(first.values())
  table: dict[tuple[int, ...], data.PromptAnswer] = {}
  for r, ids in zip(unique, encode_prompts(task, [r.prompt for r in unique],
                                           "prompt references", report=False)):
    seen = table.setdefault(tuple(int(i) for i in ids), r)
    if seen.answer != r.answer:
      raise data.DataError(r.source, f"the prompt tokenises to the same last "
                           f"{task.tokenize_config.max_prompt_len} tokens as {seen.source} "
                           f"(config.task.max_prompt_len) but its answer {r.answer!r} differs "
                           f"from {seen.answer!r}", "conflicting_answers")
  return {k: r.answer for k, r in table.items()}
