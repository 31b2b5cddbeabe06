"""CLI: python -m rlhf_jax.collect {generate,add-annotator,serve,stats,export,label} [flags].

  generate       --config=experiments/collect/review_world.py[:runlocal]
                 --config.policy.path=SFT_WORKDIR --workdir=DIR
  add-annotator  NAME --db=DIR/collect.db [--port=8000] [--public_url=URL] [--replace]
                 prints NAME's login link (the key is shown once; only its hash is stored)
  serve          --db=DIR/collect.db [--host=127.0.0.1] [--port=8000] [--lease_s=600]
                 [--public_url=URL]
  stats          --db=DIR/collect.db [--json]
  export         --db=DIR/collect.db --out=FILE.jsonl [--aggregate=all|majority]
  label          --db=DIR/collect.db --labeler=gold|reward [--reward_checkpoint=RM_WORKDIR]
                 [--temperature=0] [--annotator=NAME] [--world_seed=N]
`--workdir=DIR` stands in for `--db=DIR/collect.db` everywhere. Thin by design: every command
is a library call (rlhf_jax.collect.*) that tests and notebooks can make directly.

A mistake the user can fix (a wrong path, an unset config value, an existing annotator) is
one line on stderr and exit status 1; its traceback is logged only with --verbosity=1.
Third-party INFO lines (JAX's backend probing, ...) are off unless --verbosity is given.
"""
import json
import logging as std_logging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from rlhf_jax.collect import db as db_lib
from rlhf_jax.collect import report

COMMANDS = ("generate", "add-annotator", "serve", "stats", "export", "label")

_CONFIG = config_flags.DEFINE_config_file("config", None, "generate: experiment config "
                                          "file[:arg].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "generate: where collect.db is written; other "
                               "commands: read DIR/collect.db unless --db is given.")
_DB = flags.DEFINE_string("db", None, "The collection database (collect.db).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "serve, add-annotator: interface to bind "
                            "(and the links' host). Beyond loopback the traffic is plain HTTP: "
                            "use an SSH tunnel or a TLS reverse proxy.")
_PORT = flags.DEFINE_integer("port", 8000, "serve, add-annotator: TCP port (serve: 0 = any "
                             "free port).")
_PUBLIC_URL = flags.DEFINE_string("public_url", None, "serve, add-annotator: the address "
                                  "annotators open when it is not http://HOST:PORT/ (a reverse "
                                  "proxy, or --host=0.0.0.0); requests must name it.")
_REPLACE = flags.DEFINE_bool("replace", False, "add-annotator: give an existing annotator a "
                             "new login link; the old one stops working.")
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


class _OwnInfoOnly(std_logging.Filter):
  """Warnings from anywhere, INFO lines only from rlhf_jax (as rlhf_jax.main does)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return (record.levelno >= std_logging.WARNING
            or os.sep + "rlhf_jax" + os.sep in record.pathname)


def _quiet_third_party() -> None:
  if flags.FLAGS["verbosity"].present:
    return
  logging.get_absl_handler().addFilter(_OwnInfoOnly())


def _generate() -> None:
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError("generate needs --config=experiments/collect/...py and --workdir=DIR")
  from rlhf_jax import configs
  configs.check_required(_CONFIG.value)  # Before JAX starts and before anything is printed.
  from rlhf_jax.collect import generate  # Imports JAX; the other commands do not need it.
  print(_CONFIG.value, flush=True)
  print(json.dumps(generate.run_generate(_CONFIG.value, _WORKDIR.value)), flush=True)


def _add_annotator(name: str) -> None:
  from rlhf_jax.collect import server
  base = server.base_url(_HOST.value, _PORT.value, _PUBLIC_URL.value)
  conn = db_lib.connect(_db_path())
  try:
    name, key = db_lib.add_annotator(conn, name, replace=_REPLACE.value)
    # Judgments stored before names were case-folded, under another spelling of this name,
    # do not count as this annotator's (the queue may show them those items again).
    other_spellings = sorted(
        r[0] for r in conn.execute("SELECT DISTINCT annotator FROM judgments")
        if r[0] != name and _fold(r[0]) == name)
  finally:
    conn.close()
  print(f"{'new login link for' if _REPLACE.value else 'added annotator'} {name!r}; send this "
        "link to them privately (it is their password, shown only now):", flush=True)
  print(server.login_url(base, key), flush=True)
  if other_spellings:
    print(f"note: judgments stored under {other_spellings} are not counted as {name!r}'s",
          file=sys.stderr, flush=True)


def _fold(name: str) -> str | None:
  try:
    return db_lib.check_annotator(name)
  except db_lib.CollectError:
    return None


def _serve() -> None:
  from rlhf_jax.collect import server
  httpd = server.AnnotationServer(_db_path(), _HOST.value, _PORT.value, _LEASE_S.value,
                                  public_url=_PUBLIC_URL.value)
  if _HOST.value not in server.LOOPBACK_HOSTS:
    logging.warning("binding %s: annotators sign in with their keys, but over plain HTTP; "
                    "carry it through an SSH tunnel or a TLS reverse proxy", _HOST.value)
  conn = db_lib.connect(_db_path())
  try:
    names = db_lib.annotators(conn)
  finally:
    conn.close()
  print(f"serving {_db_path()} at {httpd.url} (Ctrl-C to stop); registered annotators: "
        + (", ".join(names) if names else "none yet, so nobody can sign in: python -m "
           "rlhf_jax.collect add-annotator NAME prints a login link"), flush=True)
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
  if counts["pairs_with_bidi_controls"]:
    print(f"{counts['pairs_with_bidi_controls']} exported pairs hold bidi control characters "
          "(U+202E and friends): annotators saw them as marks, but a reader that obeys them "
          "displays those texts reordered", flush=True)
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
  command = argv[1] if len(argv) > 1 else None
  if command not in COMMANDS:
    raise app.UsageError(f"expected one command out of {', '.join(COMMANDS)}; got "
                         f"{argv[1:] or 'none'}")
  if len(argv) != (3 if command == "add-annotator" else 2):
    raise app.UsageError("add-annotator takes one NAME" if command == "add-annotator" else
                         f"{command} takes no arguments besides flags; got {argv[2:]}")
  _quiet_third_party()
  try:
    if command == "add-annotator":
      _add_annotator(argv[2])
    else:
      {"generate": _generate, "serve": _serve, "stats": _stats, "export": _export,
       "label": _label}[command]()
  except (FileNotFoundError, FileExistsError, ValueError, db_lib.CollectError) as e:
    # Expected user errors (a wrong path, an existing round, a bad config value or name): one
    # clear line and exit status 1; the traceback only for whoever debugs (--verbosity=1).
    logging.vlog(1, "collect %s failed", command, exc_info=True)
    print(f"collect {command}: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
