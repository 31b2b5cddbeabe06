"""The comparison store: one SQLite file (stdlib `sqlite3`, WAL mode) per collection round.

Why SQLite: a round is a few thousand comparisons and a handful of annotators on one machine;
one file in the workdir needs no server, copies with `cp`, and WAL mode lets the annotation
server's request threads read while one of them writes. Every read-modify-write (hand out an
item, store a judgment) runs in a `BEGIN IMMEDIATE` transaction, which takes SQLite's write
lock up front, so two threads (or two processes) can never both see an item as free and both
take it.

Schema (version 2; a version-1 file is upgraded in place by `connect`, see `_MIGRATIONS`):

  meta(key, value)                       generate config, world seed, schema version, ...
  prompts(id, text, source)
  responses(id, prompt_id, sample_index, text, finished, num_tokens)
  items(id, prompt_id, response_a, response_b, queue_order, target_judgments)
      one comparison of two distinct responses to one prompt; target_judgments is 2 for the
      ~10% of items drawn for re-annotation (agreement), else 1.
  assignments(id, item_id, annotator, token, left_response, right_response, is_repeat,
              served_at, expires_at)
      one showing of an item to one annotator: which response was on the left (randomised
      per assignment and recorded), a secret token the submission must quote, and a lease.
  judgments(id, assignment_id UNIQUE, item_id, annotator, labeler, choice, winner_response,
            created_at, seconds)
      choice is what was pressed: "A" (left), "B" (right), "tie" or "skip"; winner_response
      resolves A/B to a response id, so nothing downstream needs the left/right order.
      UNIQUE(assignment_id) makes a double submission impossible at the storage level too.
  annotators(name PRIMARY KEY, key_sha256 UNIQUE, created_at)          (version 2)
      the people the annotation server lets in (`add_annotator`). Only the SHA-256 of each
      login key is stored: a copy of the database does not let anyone sign in.

Annotator names are case-folded (NFKC + casefold, `check_annotator`) wherever they enter,
so "Alice" and "alice" are one person: she cannot re-annotate her own items under another
spelling, and her second look is not counted as agreement between two people.

Queue rules (`next_assignment`), in order, for annotator X:
  1. X's own open lease, if any (a page reload resumes the same comparison, same order).
  2. A re-annotation: an item drawn for two judgments that has one (not X's), and no open
     lease. Served as soon as it is available, so agreement accrues from the start.
  3. A fresh item: no judgment (skips do not count) and no open lease, not skipped by X, in
     the seeded random `queue_order`.
  4. A re-annotation by the same annotator, of an item X judged (not skipped) once, when no
     other person can give the second judgment: every other annotator (registered, or with
     human judgments in this database) has judged or skipped it already. "To another
     annotator where there is one": with a single annotator this measures self-consistency
     instead of leaving the agreement sample empty, and a re-annotation skipped by the only
     other annotator does not stay needed for ever.
An item is never leased to two annotators at once: a re-annotation is handed out only after
the first judgment is stored. Leases expire after `lease_s`; a late submission is still
accepted unless the item was handed out again in the meantime (then 409 `lease_expired`).
"""
import contextlib
import dataclasses
import hashlib
import json
import os
import random
import re
import secrets
import sqlite3
import time
import unicodedata
from typing import Any, Iterator, Sequence

SCHEMA_VERSION = 2
CHOICES = ("A", "B", "tie", "skip")
MAX_ANNOTATOR_LEN = 64
# Ids are SQLite INTEGERs (signed 64 bit); anything outside is refused before it reaches
# SQLite, whose binding would raise OverflowError.
MAX_ID = 2**63 - 1
# Login keys: secrets.token_urlsafe(32) (43 characters). The pattern is what a key may look
# like at all; anything else is refused before it is hashed or looked up.
KEY_PATTERN = re.compile(r"[A-Za-z0-9_-]{20,128}")

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE prompts (
  id INTEGER PRIMARY KEY,
  text TEXT NOT NULL,
  source TEXT NOT NULL
);
CREATE TABLE responses (
  id INTEGER PRIMARY KEY,
  prompt_id INTEGER NOT NULL REFERENCES prompts(id),
  sample_index INTEGER NOT NULL,
  text TEXT NOT NULL,
  finished INTEGER NOT NULL,
  num_tokens INTEGER NOT NULL
);
CREATE TABLE items (
  id INTEGER PRIMARY KEY,
  prompt_id INTEGER NOT NULL REFERENCES prompts(id),
  response_a INTEGER NOT NULL REFERENCES responses(id),
  response_b INTEGER NOT NULL REFERENCES responses(id),
  queue_order INTEGER NOT NULL UNIQUE,
  target_judgments INTEGER NOT NULL CHECK (target_judgments IN (1, 2)),
  CHECK (response_a <> response_b)
);
CREATE TABLE assignments (
  id INTEGER PRIMARY KEY,
  item_id INTEGER NOT NULL REFERENCES items(id),
  annotator TEXT NOT NULL,
  token TEXT NOT NULL UNIQUE,
  left_response INTEGER NOT NULL REFERENCES responses(id),
  right_response INTEGER NOT NULL REFERENCES responses(id),
  is_repeat INTEGER NOT NULL,
  served_at REAL NOT NULL,
  expires_at REAL NOT NULL
);
CREATE TABLE judgments (
  id INTEGER PRIMARY KEY,
  assignment_id INTEGER NOT NULL UNIQUE REFERENCES assignments(id),
  item_id INTEGER NOT NULL REFERENCES items(id),
  annotator TEXT NOT NULL,
  labeler TEXT NOT NULL,
  choice TEXT NOT NULL CHECK (choice IN ('A', 'B', 'tie', 'skip')),
  winner_response INTEGER REFERENCES responses(id),
  created_at REAL NOT NULL,
  seconds REAL NOT NULL
);
CREATE INDEX assignments_item ON assignments(item_id);
CREATE INDEX assignments_annotator ON assignments(annotator);
CREATE INDEX judgments_item ON judgments(item_id);
CREATE INDEX judgments_annotator ON judgments(annotator);
"""
# Version 2. Names are check_annotator's; only the SHA-256 (hex) of each login key is stored.
_ANNOTATORS_TABLE = """
CREATE TABLE IF NOT EXISTS annotators (
  name TEXT PRIMARY KEY,
  key_sha256 TEXT NOT NULL UNIQUE,
  created_at REAL NOT NULL
)"""
_SCHEMA += _ANNOTATORS_TABLE

# Upgrades, applied in order by `connect` to an older file: version -> statements that bring a
# file of that version to the next. Each statement is idempotent (IF NOT EXISTS), and the
# upgrade runs in one BEGIN IMMEDIATE transaction that re-reads the version, so two processes
# opening the same old file at once upgrade it once. Existing rows are never rewritten.
_MIGRATIONS = {1: [_ANNOTATORS_TABLE]}


class CollectError(Exception):
  """A request the store refuses: `status` is the HTTP status the server answers with,
  `code` a stable machine-readable key, the message says what is wrong and what to do."""

  def __init__(self, status: int, code: str, message: str, **details: Any):
    super().__init__(message)
    self.status = status
    self.code = code
    self.message = message
    self.details = details

  def to_json(self) -> dict[str, Any]:
    return {"error": {"code": self.code, "message": self.message, **self.details}}


# ---------------------------------------------------------------------------------------------
# Connections and transactions
# ---------------------------------------------------------------------------------------------


def connect(path: str | os.PathLike, *, create: bool = False) -> sqlite3.Connection:
  """A connection in autocommit mode (transactions are explicit, see `transaction`).

  create=False refuses a path that is not an existing collection database, so a typo in
  --db is an error rather than a fresh empty file. One connection per thread: sqlite3
  connections must not be shared between threads.
  """
  path = os.fspath(path)
  if not create and not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such collection database (create one with "
                            "`python -m rlhf_jax.collect generate`)")
  conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=True)
  conn.row_factory = sqlite3.Row
  conn.execute("PRAGMA busy_timeout = 30000")
  conn.execute("PRAGMA foreign_keys = ON")
  mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
  if mode.lower() != "wal":
    conn.close()
    raise RuntimeError(f"{path}: SQLite refused WAL mode (got {mode!r}); the database must "
                       "live on a local filesystem")
  conn.execute("PRAGMA synchronous = NORMAL")  # Durable at checkpoints; safe under WAL.
  if not create:
    version = _schema_version(conn)
    if version in _MIGRATIONS:
      version = _upgrade(conn)
    if version != SCHEMA_VERSION:
      conn.close()
      raise ValueError(f"{path}: not a collection database of schema version "
                       f"{SCHEMA_VERSION} (found {version!r})")
  return conn


def _upgrade(conn: sqlite3.Connection) -> int | None:
  """Brings an older collection database to SCHEMA_VERSION; returns the version it ends at."""
  with transaction(conn):
    version = _schema_version(conn)  # Again, under the write lock.
    while version in _MIGRATIONS:
      for statement in _MIGRATIONS[version]:
        conn.execute(statement)
      version += 1
      set_meta(conn, {"schema_version": version})
  return version


def _schema_version(conn: sqlite3.Connection) -> int | None:
  try:
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
  except sqlite3.DatabaseError:
    return None
  return int(row[0]) if row else None


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
  """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on any error): the write lock is taken before the
  first read, so a read-check-write sequence is atomic across threads and processes."""
  conn.execute("BEGIN IMMEDIATE")
  try:
    yield conn
  except BaseException:
    conn.execute("ROLLBACK")
    raise
  conn.execute("COMMIT")


def create(path: str | os.PathLike, meta: dict[str, Any]) -> sqlite3.Connection:
  """Creates a fresh database (refusing an existing file) and returns a connection to it."""
  path = os.fspath(path)
  if os.path.exists(path):
    raise FileExistsError(f"{path} already exists; collect into a fresh workdir (or move the "
                          "old round away)")
  conn = connect(path, create=True)
  with transaction(conn):
    for statement in filter(str.strip, _SCHEMA.split(";")):
      conn.execute(statement)
    set_meta(conn, {"schema_version": SCHEMA_VERSION, "created_at": time.time(), **meta})
  return conn


def set_meta(conn: sqlite3.Connection, values: dict[str, Any]) -> None:
  conn.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                   [(k, json.dumps(v)) for k, v in values.items()])


def get_meta(conn: sqlite3.Connection) -> dict[str, Any]:
  return {r["key"]: json.loads(r["value"]) for r in conn.execute("SELECT key, value FROM meta")}


# ---------------------------------------------------------------------------------------------
# Writing a round
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Response:
  text: str
  finished: bool
  num_tokens: int


@dataclasses.dataclass(frozen=True)
class RoundSummary:
  prompts: int
  responses: int
  items: int
  repeat_items: int
  empty_responses: int  # Not paired: a reader cannot hold an empty response.
  duplicate_responses: int  # Identical to another sample of the same prompt: not paired.
  prompts_without_pair: int  # Fewer than two distinct non-empty responses.


def add_round(conn: sqlite3.Connection, prompts: Sequence[tuple[str, str]],
              responses: Sequence[Sequence[Response]], *, pairs_per_prompt: int = 0,
              repeat_fraction: float = 0.1, seed: int = 0) -> RoundSummary:
  """Stores prompts, their sampled responses and the comparison items built from them.

  prompts: (text, source) per prompt; responses: the k samples of each prompt.
  Items are pairs of distinct, non-empty responses of one prompt: all k(k-1)/2 of them, or a
  seeded random `pairs_per_prompt` of them (0 = all). Which response is "a" is the sample
  order; what annotators see left/right is drawn per assignment. The queue order is a seeded
  shuffle (prompts interleave), and round(repeat_fraction * items) items, drawn by the same
  seed, get target_judgments = 2.
  """
  if len(prompts) != len(responses):
    raise ValueError(f"{len(prompts)} prompts but {len(responses)} response lists")
  if not 0.0 <= repeat_fraction <= 1.0:
    raise ValueError(f"repeat_fraction={repeat_fraction} must be in [0, 1]")
  if pairs_per_prompt < 0:
    raise ValueError(f"pairs_per_prompt={pairs_per_prompt} must be >= 0 (0 = all pairs)")
  rng = random.Random(seed)
  pairs: list[tuple[int, int, int]] = []
  empty = duplicates = unpaired = n_responses = 0
  with transaction(conn):
    if conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]:
      raise ValueError("this database already holds a round; use a fresh one")
    for (text, source), samples in zip(prompts, responses):
      prompt_id = conn.execute("INSERT INTO prompts(text, source) VALUES (?, ?)",
                               (text, source)).lastrowid
      usable: list[int] = []
      seen: set[str] = set()
      for index, r in enumerate(samples):
        rid = conn.execute(
            "INSERT INTO responses(prompt_id, sample_index, text, finished, num_tokens) "
            "VALUES (?, ?, ?, ?, ?)", (prompt_id, index, r.text, int(r.finished),
                                       int(r.num_tokens))).lastrowid
        n_responses += 1
        if not r.text.strip():
          empty += 1
        elif r.text in seen:
          duplicates += 1
        else:
          seen.add(r.text)
          usable.append(rid)
      combos = [(a, b) for i, a in enumerate(usable) for b in usable[i + 1:]]
      if not combos:
        unpaired += 1
      if pairs_per_prompt and len(combos) > pairs_per_prompt:
        combos = rng.sample(combos, pairs_per_prompt)
      pairs.extend((prompt_id, a, b) for a, b in combos)
    order = list(range(len(pairs)))
    rng.shuffle(order)
    n_repeat = round(repeat_fraction * len(pairs))
    repeat = set(rng.sample(range(len(pairs)), n_repeat))
    conn.executemany(
        "INSERT INTO items(prompt_id, response_a, response_b, queue_order, target_judgments) "
        "VALUES (?, ?, ?, ?, ?)",
        [(p, a, b, order[i], 2 if i in repeat else 1) for i, (p, a, b) in enumerate(pairs)])
  return RoundSummary(len(prompts), n_responses, len(pairs), n_repeat, empty, duplicates,
                      unpaired)


# ---------------------------------------------------------------------------------------------
# Handing out items
# ---------------------------------------------------------------------------------------------


def check_annotator(name: Any) -> str:
  """The one spelling an annotator's name is stored and compared in: stripped, NFKC-normalised
  and case-folded ("Alice", "ALICE" and "alice" are one person), non-empty, at most
  MAX_ANNOTATOR_LEN printable characters (no control, bidi or other formatting characters,
  which could make two different names look the same)."""
  if not isinstance(name, str):
    raise CollectError(400, "bad_annotator", f"an annotator name must be a string, got "
                       f"{type(name).__name__}")
  if not name.strip():
    raise CollectError(400, "bad_annotator", "the annotator name is empty: give a name (or an "
                       "anonymous id) so judgments can be attributed and agreement measured")
  if not name.strip().isprintable():  # Before normalising: NFKC must not launder a control.
    raise CollectError(400, "bad_annotator", f"the annotator name {name!r} holds control or "
                       "formatting characters; use printable characters only")
  name = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold()).strip()
  if len(name) > MAX_ANNOTATOR_LEN or not name.isprintable():
    raise CollectError(400, "bad_annotator", f"an annotator name must be at most "
                       f"{MAX_ANNOTATOR_LEN} printable characters")
  return name


def _key_sha256(key: str) -> str:
  return hashlib.sha256(key.encode("ascii")).hexdigest()


def add_annotator(conn: sqlite3.Connection, name: str, *, replace: bool = False,
                  now: float | None = None) -> tuple[str, str]:
  """Lets a person into the annotation server: returns (their canonical name, login key).

  The key is returned once and never stored, only its SHA-256: whoever holds the database
  file cannot sign in as anyone. An existing name is refused (409 annotator_exists) unless
  replace=True, which issues a new key and so revokes the old one (a lost or leaked link).
  """
  name = check_annotator(name)
  key = secrets.token_urlsafe(32)
  with transaction(conn):
    exists = conn.execute("SELECT 1 FROM annotators WHERE name = ?", (name,)).fetchone()
    if exists and not replace:
      raise CollectError(409, "annotator_exists", f"annotator {name!r} already exists; "
                         "issue a new login link with --replace (the old link stops working)")
    conn.execute("INSERT OR REPLACE INTO annotators(name, key_sha256, created_at) "
                 "VALUES (?, ?, ?)", (name, _key_sha256(key),
                                      time.time() if now is None else now))
  return name, key


def authenticate(conn: sqlite3.Connection, key: Any) -> str | None:
  """The annotator whose login key this is, or None (malformed, unknown or replaced key).

  Looked up by the key's SHA-256: how long the lookup takes can tell an attacker about a hash
  of their own guess, never about a stored key."""
  if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
    return None
  row = conn.execute("SELECT name FROM annotators WHERE key_sha256 = ?",
                     (_key_sha256(key),)).fetchone()
  return row[0] if row else None


def annotators(conn: sqlite3.Connection) -> list[str]:
  """The registered annotators' names, sorted."""
  return [r[0] for r in conn.execute("SELECT name FROM annotators ORDER BY name")]


# Counts per item: non-skip judgments, open (unjudged, unexpired) leases, and the asking
# annotator's judgments (all, and non-skip).
_ITEM_COUNTS = """
  SELECT i.id, i.queue_order, i.target_judgments,
    (SELECT COUNT(*) FROM judgments j WHERE j.item_id = i.id AND j.choice <> 'skip') AS done,
    (SELECT COUNT(*) FROM assignments s WHERE s.item_id = i.id AND s.expires_at > :now
       AND NOT EXISTS (SELECT 1 FROM judgments j WHERE j.assignment_id = s.id)) AS open,
    (SELECT COUNT(*) FROM judgments j WHERE j.item_id = i.id AND j.annotator = :who) AS mine,
    (SELECT COUNT(*) FROM judgments j WHERE j.item_id = i.id AND j.annotator = :who
       AND j.choice <> 'skip') AS mine_done,
    (SELECT MIN(j.created_at) FROM judgments j WHERE j.item_id = i.id
       AND j.choice <> 'skip') AS first_at
  FROM items i
"""
# The people who could give a judgment: registered annotators and anyone with human
# judgments here (a database used through the library, without registrations). Machine
# labellers are not people the queue serves.
_PEOPLE = ("SELECT name FROM annotators "
           "UNION SELECT annotator FROM judgments WHERE labeler = 'human'")


def _pick_item(conn: sqlite3.Connection, annotator: str, now: float) -> tuple[int, bool] | None:
  """(item id, is_repeat) by the queue rules in the module docstring, or None."""
  args = {"now": now, "who": annotator}
  base = f"WITH c AS ({_ITEM_COUNTS}) SELECT id FROM c WHERE open = 0 AND "
  row = conn.execute(base + "target_judgments = 2 AND done = 1 AND mine = 0 "
                     "ORDER BY first_at, id LIMIT 1", args).fetchone()
  if row:
    return row[0], True
  row = conn.execute(base + "done = 0 AND mine = 0 ORDER BY queue_order LIMIT 1",
                     args).fetchone()
  if row:
    return row[0], False
  # Rule 4: judged once, by this annotator (never twice by the same person), and every other
  # person has already judged or skipped it.
  row = conn.execute(
      f"WITH c AS ({_ITEM_COUNTS}), people AS ({_PEOPLE}) SELECT id FROM c WHERE open = 0 "
      "AND target_judgments = 2 AND done = 1 AND mine = 1 AND mine_done = 1 AND NOT EXISTS ("
      "  SELECT 1 FROM people p WHERE p.name <> :who AND NOT EXISTS ("
      "    SELECT 1 FROM judgments j WHERE j.item_id = c.id AND j.annotator = p.name)) "
      "ORDER BY first_at, id LIMIT 1", args).fetchone()
  if row:
    return row[0], True
  return None


def _assignment_json(conn: sqlite3.Connection, assignment: sqlite3.Row) -> dict[str, Any]:
  """What the page needs: the texts in display order, never the response ids (blinding)."""
  item = conn.execute("SELECT i.id, p.text FROM items i JOIN prompts p ON p.id = i.prompt_id "
                      "WHERE i.id = ?", (assignment["item_id"],)).fetchone()
  sides = {}
  for side in ("left", "right"):
    r = conn.execute("SELECT text, finished FROM responses WHERE id = ?",
                     (assignment[f"{side}_response"],)).fetchone()
    sides[side] = {"text": r["text"], "truncated": not r["finished"]}
  return {"assignment_id": assignment["id"], "token": assignment["token"],
          "item_id": item["id"], "prompt": item["text"], "A": sides["left"],
          "B": sides["right"], "expires_at": assignment["expires_at"]}


def progress(conn: sqlite3.Connection, annotator: str | None = None,
             now: float | None = None) -> dict[str, int]:
  """The judgments the queue still needs (`remaining`: targets not met), and who can give them.

  Every needed judgment is counted in exactly one of:
    leased             its item is leased right now (back in the queue if the lease runs out);
    for_you            the queue would serve it to `annotator` (only when one is given);
    for_others         another person can give it: they have not seen the item (or, rule 4,
                       may re-annotate their own judgment);
    no_annotator_left  no person can: each one judged or skipped the item already; it needs a
                       new annotator or a machine labeller (`collect label`).
  With an annotator, `judged_by_you` too. The page uses this to say why a queue is empty.
  """
  now = time.time() if now is None else now
  who = check_annotator(annotator) if annotator is not None else None
  needing = conn.execute(
      f"WITH c AS ({_ITEM_COUNTS}) SELECT id, target_judgments, done, open FROM c "
      "WHERE done < target_judgments", {"now": now, "who": who or ""}).fetchall()
  seen: dict[int, dict[str, list[int]]] = {r["id"]: {} for r in needing}
  for item_id, name, not_skip in conn.execute(
      "SELECT item_id, annotator, choice <> 'skip' FROM judgments"):
    if item_id in seen:
      counts = seen[item_id].setdefault(name, [0, 0])
      counts[0] += 1
      counts[1] += not_skip
  people = {r[0] for r in conn.execute(_PEOPLE)}

  def can_take(person: str, item: sqlite3.Row) -> bool:
    """Whether the queue rules (module docstring) would serve this item to `person`."""
    judged = seen[item["id"]]
    if person not in judged:
      return True  # Rules 2 and 3: the item needs a judgment and this person has not seen it.
    return (item["target_judgments"] == 2 and item["done"] == 1 and judged[person] == [1, 1]
            and all(p in judged for p in people if p != person))  # Rule 4.

  out = dict(remaining=0, leased=0, for_others=0, no_annotator_left=0)
  if who is not None:
    out["for_you"] = 0
  for item in needing:
    need = item["target_judgments"] - item["done"]
    out["remaining"] += need
    if item["open"]:
      out["leased"] += need
    elif who is not None and can_take(who, item):
      out["for_you"] += need
    elif any(can_take(p, item) for p in people if p != who):
      out["for_others"] += need
    else:
      out["no_annotator_left"] += need
  if who is not None:
    out["judged_by_you"] = conn.execute("SELECT COUNT(*) FROM judgments WHERE annotator = ?",
                                        (who,)).fetchone()[0]
  return out


def next_assignment(conn: sqlite3.Connection, annotator: str, *, lease_s: float = 600.0,
                    now: float | None = None, rng: random.Random | None = None
                    ) -> dict[str, Any] | None:
  """The annotator's next comparison (a new or resumed lease), or None when nothing is left
  for them. Left/right order is drawn here, per assignment, and stored."""
  annotator = check_annotator(annotator)
  if lease_s <= 0:
    raise ValueError(f"lease_s={lease_s} must be > 0")
  rng = rng or random.SystemRandom()
  with transaction(conn):
    now = time.time() if now is None else now
    mine = conn.execute(
        "SELECT * FROM assignments s WHERE s.annotator = ? AND s.expires_at > ? AND NOT EXISTS "
        "(SELECT 1 FROM judgments j WHERE j.assignment_id = s.id) ORDER BY s.id DESC LIMIT 1",
        (annotator, now)).fetchone()
    if mine is None:
      picked = _pick_item(conn, annotator, now)
      if picked is None:
        return None
      item_id, is_repeat = picked
      a, b = conn.execute("SELECT response_a, response_b FROM items WHERE id = ?",
                          (item_id,)).fetchone()
      left, right = (a, b) if rng.random() < 0.5 else (b, a)
      assignment_id = conn.execute(
          "INSERT INTO assignments(item_id, annotator, token, left_response, right_response, "
          "is_repeat, served_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
          (item_id, annotator, secrets.token_urlsafe(16), left, right, int(is_repeat), now,
           now + lease_s)).lastrowid
      mine = conn.execute("SELECT * FROM assignments WHERE id = ?",
                          (assignment_id,)).fetchone()
    return _assignment_json(conn, mine)


# ---------------------------------------------------------------------------------------------
# Storing judgments
# ---------------------------------------------------------------------------------------------


def submit_judgment(conn: sqlite3.Connection, *, assignment_id: int, item_id: int, token: str,
                    annotator: str, choice: str, labeler: str = "human",
                    now: float | None = None) -> dict[str, Any]:
  """Stores one judgment for an assignment, exactly once; returns it as a dict.

  Raises CollectError: 404 unknown item/assignment, 400 item/assignment mismatch or a bad
  choice, 403 wrong token or annotator, 409 already submitted (nothing stored again) or
  lease expired and the item was handed to someone else since.
  """
  annotator = check_annotator(annotator)
  for name, value in (("item_id", item_id), ("assignment_id", assignment_id)):
    check_id(name, value)
  if choice not in CHOICES:
    raise CollectError(400, "bad_choice", f"'choice' must be one of {list(CHOICES)}, got "
                       f"{choice!r}")
  with transaction(conn):
    now = time.time() if now is None else now
    if conn.execute("SELECT 1 FROM items WHERE id = ?", (item_id,)).fetchone() is None:
      raise CollectError(404, "unknown_item", f"no item with id {item_id}")
    s = conn.execute("SELECT * FROM assignments WHERE id = ?", (assignment_id,)).fetchone()
    if s is None:
      raise CollectError(404, "unknown_assignment", f"no assignment with id {assignment_id}; "
                         "fetch one from POST /api/next")
    if s["item_id"] != item_id:
      raise CollectError(400, "item_mismatch", f"assignment {assignment_id} is for item "
                         f"{s['item_id']}, not item {item_id}")
    # compare_digest takes ASCII str or bytes only: anything else is simply not the token.
    if not (isinstance(token, str) and token.isascii()
            and secrets.compare_digest(token.encode("ascii"), s["token"].encode("ascii"))):
      raise CollectError(403, "bad_token", f"the token does not match assignment "
                         f"{assignment_id}")
    if s["annotator"] != annotator:
      raise CollectError(403, "wrong_annotator", f"assignment {assignment_id} was handed to "
                         f"another annotator, not to {annotator!r}")
    done = conn.execute("SELECT * FROM judgments WHERE assignment_id = ?",
                        (assignment_id,)).fetchone()
    if done is not None:
      raise CollectError(409, "already_submitted", f"assignment {assignment_id} was already "
                         f"judged ({done['choice']!r}); nothing was stored again",
                         judgment=_judgment_json(done))
    if s["expires_at"] <= now:
      later = conn.execute("SELECT 1 FROM assignments WHERE item_id = ? AND id > ? LIMIT 1",
                           (item_id, assignment_id)).fetchone()
      if later is not None:
        raise CollectError(409, "lease_expired", f"the lease on assignment {assignment_id} "
                           "expired and the item was handed out again; fetch the next one")
    winner = {"A": s["left_response"], "B": s["right_response"]}.get(choice)
    judgment_id = conn.execute(
        "INSERT INTO judgments(assignment_id, item_id, annotator, labeler, choice, "
        "winner_response, created_at, seconds) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (assignment_id, item_id, annotator, labeler, choice, winner, now,
         max(now - s["served_at"], 0.0))).lastrowid
    return _judgment_json(conn.execute("SELECT * FROM judgments WHERE id = ?",
                                       (judgment_id,)).fetchone())


def check_id(name: str, value: Any) -> int:
  """A row id as SQLite can hold it: a positive integer below 2^63 (not a bool)."""
  if isinstance(value, bool) or not isinstance(value, int):
    raise CollectError(400, "bad_field", f"field {name!r} must be an integer, got "
                       f"{type(value).__name__}")
  if not 0 < value <= MAX_ID:
    raise CollectError(400, "bad_field", f"field {name!r} must be a positive integer below "
                       f"2^63, got {value}")
  return value


def _judgment_json(row: sqlite3.Row) -> dict[str, Any]:
  return {"judgment_id": row["id"], "assignment_id": row["assignment_id"],
          "item_id": row["item_id"], "annotator": row["annotator"], "choice": row["choice"],
          "created_at": row["created_at"]}


def record_labels(conn: sqlite3.Connection, labels: Sequence[tuple[int, str, str]], *,
                  labeler: str, now: float | None = None, rng: random.Random | None = None
                  ) -> int:
  """Stores machine judgments as assignment + judgment rows, the way a human's are stored
  (left/right drawn and recorded), so export and stats need no special case.

  labels: (item_id, outcome, annotator) with outcome "a", "b" (which of the item's responses
  wins) or "tie". One transaction: a labelling run lands completely or not at all.
  """
  rng = rng or random.Random(0)
  now = time.time() if now is None else now
  with transaction(conn):
    for item_id, outcome, annotator in labels:
      annotator = check_annotator(annotator)
      if outcome not in ("a", "b", "tie"):
        raise ValueError(f"label outcome {outcome!r} for item {item_id}: expected a, b or tie")
      a, b = conn.execute("SELECT response_a, response_b FROM items WHERE id = ?",
                          (item_id,)).fetchone()
      left, right = (a, b) if rng.random() < 0.5 else (b, a)
      repeat = conn.execute("SELECT COUNT(*) FROM judgments WHERE item_id = ? AND choice <> "
                            "'skip'", (item_id,)).fetchone()[0] > 0
      assignment_id = conn.execute(
          "INSERT INTO assignments(item_id, annotator, token, left_response, right_response, "
          "is_repeat, served_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
          (item_id, annotator, secrets.token_urlsafe(16), left, right, int(repeat), now,
           now)).lastrowid
      winner = {"a": a, "b": b}.get(outcome)
      shown = "tie" if winner is None else ("A" if winner == left else "B")
      conn.execute(
          "INSERT INTO judgments(assignment_id, item_id, annotator, labeler, choice, "
          "winner_response, created_at, seconds) VALUES (?, ?, ?, ?, ?, ?, ?, 0)",
          (assignment_id, item_id, annotator, labeler, shown, winner, now))
  return len(labels)
