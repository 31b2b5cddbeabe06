"""CLI: python -m rlhf_jax.collect {generate,serve,stats,export,label} [flags].

  generate --config=experiments/collect/review_world.py[:runlocal] --workdir=DIR
  serve    --db=DIR/collect.db [--host=127.0.0.1] [--port=8000] [--lease_s=600]
  stats    --db=DIR/collect.db [--json]
  export   --db=DIR/collect.db --out=FILE.jsonl [--aggregate=all|majority]
  label    --db=DIR/collect.db --labeler=gold|reward [--reward_checkpoint=RM_WORKDIR]
           [--temperature=0] [--annotator=NAME] [--world_seed=N]
`--workdir=DIR` stands in for `--db=DIR/collect.db` everywhere. Thin by design: every command
is a library call (rlhf_jax.collect.*) that tests and notebooks can make directly.
"""
import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from rlhf_jax.collect import db as db_lib
from rlhf_jax.collect import report

COMMANDS = ("generate", "serve", "stats", "export", "label")

_CONFIG = config_flags.DEFINE_config_file("config", None, "generate: experiment config "
                                          "file[:arg].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "generate: where collect.db is written; other "
                               "commands: read DIR/collect.db unless --db is given.")
_DB = flags.DEFINE_string("db", None, "The collection database (collect.db).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "serve: interface to bind. The app has no "
                            "authentication; bind beyond loopback deliberately.")
_PORT = flags.DEFINE_integer("port", 8000, "serve: TCP port (0 = any free port).")
_LEASE_S = flags.DEFINE_float("lease_s", 600.0, "serve: seconds an annotator holds a "
                              "comparison before it may be handed to someone else.")
_OUT = flags.DEFINE_string("out", None, "export: the preference JSONL to write.")
_AGGREGATE = flags.DEFINE_enum("aggregate", "all", list(report.AGGREGATES),
                               "export: one pair per judgment, or per item by majority.")
_JSON = flags.DEFINE_bool("json", False, "stats: print JSON instead of text.")
_LABELER = flags.DEFINE_enum("labeler", None, ["gold", "reward"], "label: which scores decide.")
_REWARD_CKPT = flags.DEFINE_string("reward_checkpoint", None, "label --labeler=reward: a reward "
                                   "stage workdir (or its checkpoints/ directory).")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "label: Bradley-Terry label noise (0 = "
                                  "the higher score always wins).")
_ANNOTATOR = flags.DEFINE_string("annotator", None, "label: the name judgments are stored "
                                 "under (default: the labeler's name).")
_WORLD_SEED = flags.DEFINE_integer("world_seed", None, "label --labeler=gold: the review "
                                   "world's seed (default: the one generate recorded).")
_SEED = flags.DEFINE_integer("seed", 0, "label: seed of the label noise and left/right order.")


def _db_path() -> str:
  if _DB.value:
    return _DB.value
  if _WORKDIR.value:
    from rlhf_jax.collect.generate import DB_NAME
    return os.path.join(_WORKDIR.value, DB_NAME)
  raise app.UsageError("give --db=PATH/collect.db (or --workdir=DIR holding collect.db)")


def _generate() -> None:
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError("generate needs --config=experiments/collect/...py and --workdir=DIR")
  from rlhf_jax.collect import generate  # Imports JAX; the other commands do not need it.
  print(_CONFIG.value, flush=True)
  print(json.dumps(generate.run_generate(_CONFIG.value, _WORKDIR.value)), flush=True)


def _serve() -> None:
  from rlhf_jax.collect import server
  if _HOST.value not in ("127.0.0.1", "localhost", "::1"):
    logging.warning("binding %s: the annotation app has no authentication; anyone who can "
                    "reach this port can read the prompts and submit judgments", _HOST.value)
  httpd = server.AnnotationServer(_db_path(), _HOST.value, _PORT.value, _LEASE_S.value)
  print(f"serving {_db_path()} at {httpd.url} (Ctrl-C to stop)", flush=True)
  try:
    httpd.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    httpd.server_close()


def _stats() -> None:
  conn = db_lib.connect(_db_path())
  try:
    stats = report.collection_stats(conn)
  finally:
    conn.close()
  print(json.dumps(stats, indent=2) if _JSON.value else report.format_stats(stats), flush=True)


def _export() -> None:
  if not _OUT.value:
    raise app.UsageError("export needs --out=FILE.jsonl")
  conn = db_lib.connect(_db_path())
  try:
    counts = report.export_preferences(conn, _OUT.value, aggregate=_AGGREGATE.value)
  finally:
    conn.close()
  print(f"wrote {counts['pairs']} pairs to {_OUT.value} (not exported: {counts['ties']} ties, "
        f"{counts['skips']} skips, {counts['split_items']} items with a split vote)",
        flush=True)
  print(json.dumps(counts), flush=True)


def _label() -> None:
  if _LABELER.value is None:
    raise app.UsageError("label needs --labeler=gold or --labeler=reward")
  from rlhf_jax.collect import label
  conn = db_lib.connect(_db_path())
  try:
    if _LABELER.value == "gold":
      seed = _WORLD_SEED.value
      if seed is None:
        seed = db_lib.get_meta(conn).get("world_seed")
      if seed is None:
        raise app.UsageError("this round's prompts and policy are not from the review world, "
                             "so it has no gold reward; pass --world_seed=N if they are")
      scorer = label.gold_scorer(int(seed))
      name = _ANNOTATOR.value or "gold"
    else:
      if not _REWARD_CKPT.value:
        raise app.UsageError("--labeler=reward needs --reward_checkpoint=REWARD_WORKDIR")
      from rlhf_jax import parallel
      scorer = label.reward_model_scorer(_REWARD_CKPT.value, mesh=parallel.make_mesh())
      name = _ANNOTATOR.value or "reward-model"
    counts = label.label_queue(conn, scorer, labeler=_LABELER.value, annotator=name,
                               temperature=_TEMPERATURE.value, seed=_SEED.value)
  finally:
    conn.close()
  print(json.dumps(counts), flush=True)


def main(argv):
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"expected one command out of {', '.join(COMMANDS)}; got "
                         f"{argv[1:] or 'none'}")
  try:
    {"generate": _generate, "serve": _serve, "stats": _stats, "export": _export,
     "label": _label}[argv[1]]()
  except (FileNotFoundError, FileExistsError, ValueError) as e:
    # Expected user errors (a wrong path, an existing round, a bad config value): one clear
    # line and exit status 1; the traceback goes to the log for whoever debugs it.
    logging.info("collect %s failed", argv[1], exc_info=True)
    print(f"collect {argv[1]}: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
