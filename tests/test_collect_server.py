"""The annotation server's API and the queue rules: submit, skip, double submit, unknown ids,
malformed bodies (clear 4xx, nothing stored), leases, re-annotation, concurrency; export
mapping and the statistics (hand-computed kappa and binomial p). Then the attacks a tester
ran against the server, each answered with its 4xx and the database unchanged afterwards:
unauthenticated or forged identity, leases from GET/HEAD or made-up names, foreign Host and
Origin, bodies that used to raise (deep nesting, huge ids, non-ASCII tokens), odd methods,
half-open and trickling connections; and case-folded names, the end-of-queue accounting,
the old-database upgrade and the CLI."""
import collections
import hashlib
import json
import random
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO_ROOT
from rlhf_jax import data
from rlhf_jax.collect import db as db_lib
from rlhf_jax.collect import page, report
from rlhf_jax.collect import server as server_lib
from test_collect_support import Client, key_for, make_round, rows, running_server

TABLES = ("meta", "prompts", "responses", "items", "assignments", "judgments", "annotators")


@pytest.fixture
def round_db(tmp_path):
  path = tmp_path / "collect.db"
  make_round(path)  # 6 prompts x 3 pairs = 18 items, round(0.25 * 18) = 4 re-annotated.
  return path


@pytest.fixture
def served(round_db):
  with running_server(round_db) as httpd:
    client = Client(httpd)
    yield round_db, httpd, client
    client.close()


def _count(db_path, table="judgments"):
  return rows(db_path, f"SELECT COUNT(*) AS n FROM {table}")[0]["n"]


def snapshot(db_path):
  """Every row of every table: what an attack must leave exactly as it was."""
  return {t: [tuple(r) for r in rows(db_path, f"SELECT * FROM {t} ORDER BY 1")]
          for t in TABLES}


def raw_request(httpd, lines, body=b"", timeout=10):
  """Sends a hand-made request (a list of request-line and header lines) on a fresh socket and
  reads until the server closes it; returns (status, headers, body bytes)."""
  data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
  with socket.create_connection(httpd.server_address[:2], timeout=timeout) as sock:
    sock.sendall(data)
    reply = b""
    while chunk := sock.recv(65536):
      reply += chunk
  head, _, payload = reply.partition(b"\r\n\r\n")
  status_line, *header_lines = head.decode("latin-1").split("\r\n")
  headers = {}
  for line in header_lines:
    name, _, value = line.partition(":")
    headers[name.strip().lower()] = value.strip()
  return int(status_line.split()[1]), headers, payload


def host_of(httpd):
  return f"127.0.0.1:{httpd.server_address[1]}"


def assert_json_error(status, headers, payload, expected_status, code=None):
  """A 4xx JSON error with the security headers, as every refusal must be."""
  assert status == expected_status, (status, payload[:300])
  assert headers["content-type"].startswith("application/json"), headers
  for name, value in server_lib.SECURITY_HEADERS.items():
    assert headers.get(name.lower()) == value, (name, headers)
  error = json.loads(payload)["error"]
  if code is not None:
    assert error["code"] == code, error
  assert error["message"]
  return error


def test_round_layout(round_db):
  items = rows(round_db, "SELECT * FROM items")
  assert len(items) == 18
  assert sum(i["target_judgments"] == 2 for i in items) == 4
  assert sorted(i["queue_order"] for i in items) == list(range(18))
  for i in items:
    a, b = (rows(round_db, "SELECT prompt_id FROM responses WHERE id = ?", r)[0][0]
            for r in (i["response_a"], i["response_b"]))
    assert a == b == i["prompt_id"]
  mode = rows(round_db, "PRAGMA journal_mode")[0][0]
  assert mode == "wal"


def test_submit_stores_once_and_double_submit_is_409(served):
  db_path, _, client = served
  a = client.next("alice")
  assert set(a) == {"assignment_id", "token", "item_id", "prompt", "A", "B", "expires_at"}
  assert "response_a" not in json.dumps(a)  # Blind: no response ids on the page.
  status, body = client.submit(a, "alice", "B")
  assert status == 201, body
  assert body["judgment"]["choice"] == "B"
  stored = rows(db_path, "SELECT j.*, s.right_response FROM judgments j JOIN assignments s ON "
                "s.id = j.assignment_id")
  assert len(stored) == 1
  assert stored[0]["winner_response"] == stored[0]["right_response"]
  assert stored[0]["annotator"] == "alice" and stored[0]["created_at"] > 0
  # The shown right text is the winner's text.
  winner_text = rows(db_path, "SELECT text FROM responses WHERE id = ?",
                     stored[0]["winner_response"])[0]["text"]
  assert winner_text == a["B"]["text"]

  for choice in ("B", "A"):  # The same assignment again, same or different answer.
    status, body = client.submit(a, "alice", choice)
    assert status == 409 and body["error"]["code"] == "already_submitted", body
    assert body["error"]["judgment"]["choice"] == "B"
  assert _count(db_path) == 1


def test_skip_is_stored_not_counted_and_item_goes_to_someone_else(served):
  db_path, _, client = served
  a = client.next("alice")
  assert client.submit(a, "alice", "skip")[0] == 201
  assert rows(db_path, "SELECT choice, winner_response FROM judgments")[0][:] == ("skip", None)
  # Alice is not shown the skipped item again; Bob gets it (the lowest queue_order item).
  seen = {client.next("alice")["item_id"]}
  assert a["item_id"] not in seen
  assert client.next("bob")["item_id"] == a["item_id"]
  stats = report.collection_stats(db_lib.connect(db_path))
  assert stats["skips"] == 1 and stats["items_judged"] == 0 and stats["exportable_pairs"] == 0


def test_reload_resumes_the_same_assignment(served):
  _, _, client = served
  first = client.next("alice")
  again = client.next("alice")
  assert again == first  # Same item, same token, same left/right order.


def test_unknown_item_and_assignment_are_404(served):
  db_path, _, client = served
  a = client.next("alice")
  status, body = client.submit(dict(a, item_id=99999), "alice", "A")
  assert status == 404 and body["error"]["code"] == "unknown_item"
  assert "99999" in body["error"]["message"]
  status, body = client.submit(dict(a, assignment_id=99999), "alice", "A")
  assert status == 404 and body["error"]["code"] == "unknown_assignment"
  other_item = rows(db_path, "SELECT id FROM items WHERE id <> ? LIMIT 1", a["item_id"])[0][0]
  status, body = client.submit(dict(a, item_id=other_item), "alice", "A")
  assert status == 400 and body["error"]["code"] == "item_mismatch"
  status, body = client.submit(dict(a, token="forged"), "alice", "A")
  assert status == 403 and body["error"]["code"] == "bad_token"
  status, body = client.submit(a, "mallory", "A")
  assert status == 403 and body["error"]["code"] == "wrong_annotator"
  assert _count(db_path) == 0
  assert client.submit(a, "alice", "A")[0] == 201  # The real submission still works.


_OK = {"item_id": 1, "assignment_id": 1, "token": "t", "choice": "A"}


@pytest.mark.parametrize("body,headers,status,code,needle", [
    ("{not json", None, 400, "malformed_json", "not valid"),
    ("[1, 2]", None, 400, "bad_body", "JSON object"),
    ('"A"', None, 400, "bad_body", "JSON object"),
    ({k: v for k, v in _OK.items() if k != "choice"}, None, 400, "missing_fields", "choice"),
    (dict(_OK, item_id="1"), None, 400, "bad_field", "item_id"),
    (dict(_OK, item_id=True), None, 400, "bad_field", "item_id"),
    (dict(_OK, item_id=1.0), None, 400, "bad_field", "item_id"),
    (dict(_OK, choice="C"), None, 400, "bad_choice", "'C'"),
    (dict(_OK, choise="B"), None, 400, "unknown_fields", "choise"),
    # Identity is the key's: a body cannot name an annotator.
    (dict(_OK, annotator="bob"), None, 400, "unknown_fields", "annotator"),
    # Used to be HTTP 500: RecursionError, OverflowError in SQLite, int() digit limit.
    ("[" * 5000 + "]" * 5000, None, 400, "malformed_json", "nests too deeply"),
    ('{"a":' * 2000 + "1" + "}" * 2000, None, 400, "malformed_json", "nests too deeply"),
    (dict(_OK, item_id=2**63), None, 400, "bad_field", "2^63"),
    (dict(_OK, assignment_id=2**64 + 1), None, 400, "bad_field", "2^63"),
    (dict(_OK, item_id=-1), None, 400, "bad_field", "positive"),
    (dict(_OK, item_id=0), None, 400, "bad_field", "positive"),
    ('{"item_id": ' + "9" * 5000 + "}", None, 400, "malformed_json", "not valid"),
    ('{"item_id": NaN, "assignment_id": 1, "token": "t", "choice": "A"}', None, 400,
     "bad_field", "item_id"),
    (b'{"choice": "\xff"}', None, 400, "malformed_json", "UTF-8"),
    ('{"choice": "A"}', {"Content-Type": "text/plain"}, 415, "unsupported_media_type",
     "application/json"),
    ("x" * 20000, {"Content-Type": "application/json"}, 413, "body_too_large", "at most"),
    ("{}", {"Content-Type": "application/json", "Content-Length": "+2"}, 400, "bad_length",
     "Content-Length"),
], ids=["bad_json", "array", "string", "missing", "str_id", "bool_id", "float_id",
        "bad_choice", "unknown", "annotator_field", "deep_array", "deep_object", "id_2_63",
        "id_2_64", "negative_id", "zero_id", "5000_digits", "nan", "bad_utf8", "text_plain",
        "too_large", "plus_length"])
def test_malformed_bodies_are_clear_4xx_and_store_nothing(served, body, headers, status, code,
                                                          needle):
  db_path, _, client = served
  client.next("alice")  # An open assignment exists; nothing below may judge it.
  before = snapshot(db_path)
  if isinstance(body, (str, bytes)) and headers is None:
    headers = {"Content-Type": "application/json"}
  got, answer = client.request("POST", "/api/judgment", body, headers, as_="alice")
  assert got == status, answer
  assert answer["error"]["code"] == code
  assert needle in answer["error"]["message"]
  assert snapshot(db_path) == before
  # The connection (or a new one) still works after the error.
  assert client.request("GET", "/healthz")[0] == 200


@pytest.mark.parametrize("token", ["tökén", "\ud800", "x" * 10000, "", "forged"],
                         ids=["non_ascii", "lone_surrogate", "long", "empty", "forged"])
def test_wrong_tokens_are_403_never_500(served, token):
  db_path, _, client = served
  a = client.next("alice")
  before = snapshot(db_path)
  status, body = client.submit(dict(a, token=token), "alice", "A")
  assert status == 403 and body["error"]["code"] == "bad_token", body
  assert snapshot(db_path) == before
  assert client.submit(a, "alice", "A")[0] == 201


def test_missing_content_length_is_411(served):
  db_path, httpd, client = served
  before = snapshot(db_path)
  status, headers, payload = raw_request(httpd, [
      "POST /api/judgment HTTP/1.1", f"Host: {host_of(httpd)}",
      f"Authorization: Bearer {key_for(db_path, 'alice')}", "Content-Type: application/json",
      "Connection: close"])
  assert_json_error(status, headers, payload, 411, "length_required")
  # Chunked bodies are refused too (no Content-Length to bound them by).
  status, headers, payload = raw_request(httpd, [
      "POST /api/judgment HTTP/1.1", f"Host: {host_of(httpd)}",
      f"Authorization: Bearer {key_for(db_path, 'alice')}", "Content-Type: application/json",
      "Transfer-Encoding: chunked", "Connection: close"], b"2\r\n{}\r\n0\r\n\r\n")
  assert_json_error(status, headers, payload, 400, "transfer_encoding")
  before["annotators"] = snapshot(db_path)["annotators"]  # alice's registration only.
  assert snapshot(db_path) == before


def test_routes_methods_and_query_errors(served):
  db_path, _, client = served
  status, body = client.request("POST", "/api/next?annotator=alice", as_="bob")
  assert status == 400 and body["error"]["code"] == "unexpected_query"
  status, body = client.request("POST", "/api/next", {"annotator": "alice"}, as_="bob")
  assert status == 400 and body["error"]["code"] == "bad_body"
  assert client.request("POST", "/api/next", {}, as_="bob")[0] == 200
  status, body = client.request("GET", "/api/next")
  assert status == 405 and body["error"]["code"] == "method_not_allowed"
  status, body = client.request("GET", "/api/judgment")
  assert status == 405 and "POST" in body["error"]["message"]
  status, body = client.request("GET", "/api/nothing")
  assert status == 404 and body["error"]["code"] == "not_found"
  status, text = client.request("GET", "/")
  assert status == 200
  for needle in ("Helpful", "Honest", "Harmless", "Concise", "Well formatted",
                 "harmless &gt; honest &gt; helpful", 'id="choose-A"', 'id="choose-skip"'):
    assert needle in text
  status, stats = client.request("GET", "/api/stats", as_="bob")
  assert status == 200 and stats["items"] == 18
  assert _count(db_path, "assignments") == 1  # bob's one lease; nothing else made any.


def test_leases_are_exclusive_and_expire(round_db):
  conn = db_lib.connect(round_db)
  t0 = 1_000_000.0
  a = db_lib.next_assignment(conn, "alice", lease_s=60, now=t0)
  b = db_lib.next_assignment(conn, "bob", lease_s=60, now=t0 + 1)
  assert a["item_id"] != b["item_id"]  # Never the same item to two people at once.
  # Alice walks away; after the lease, her item goes to Carol.
  c = db_lib.next_assignment(conn, "carol", lease_s=60, now=t0 + 61)
  assert c["item_id"] == a["item_id"]
  with pytest.raises(db_lib.CollectError) as err:
    db_lib.submit_judgment(conn, assignment_id=a["assignment_id"], item_id=a["item_id"],
                           token=a["token"], annotator="alice", choice="A", now=t0 + 70)
  assert err.value.status == 409 and err.value.code == "lease_expired"
  # Bob's lease also expired, but nobody took his item: his late answer still counts.
  db_lib.submit_judgment(conn, assignment_id=b["assignment_id"], item_id=b["item_id"],
                         token=b["token"], annotator="bob", choice="A", now=t0 + 70)
  assert rows(round_db, "SELECT annotator FROM judgments")[0][0] == "bob"
  conn.close()


def _judge_all(conn, annotator, choose, now):
  """Judges until the queue has nothing for `annotator`; returns the assignments served."""
  served = []
  while (a := db_lib.next_assignment(conn, annotator, now=now)) is not None:
    served.append(a)
    db_lib.submit_judgment(conn, assignment_id=a["assignment_id"], item_id=a["item_id"],
                           token=a["token"], annotator=annotator, choice=choose(a), now=now)
    now += 1
  return served


def test_reannotation_goes_to_another_annotator(round_db):
  conn = db_lib.connect(round_db)
  now = 1e6
  for name in ("alice", "bob"):  # Both have judged something: there is "another annotator".
    a = db_lib.next_assignment(conn, name, now=now)
    db_lib.submit_judgment(conn, assignment_id=a["assignment_id"], item_id=a["item_id"],
                           token=a["token"], annotator=name, choice="A", now=now)
  _judge_all(conn, "alice", lambda a: "A", now + 1)
  _judge_all(conn, "bob", lambda a: "B", now + 100)
  for (item,) in conn.execute("SELECT id FROM items WHERE target_judgments = 2").fetchall():
    who = [r[0] for r in conn.execute("SELECT annotator FROM judgments WHERE item_id = ? "
                                      "ORDER BY created_at", (item,))]
    assert len(who) == 2 and len(set(who)) == 2, who
  stats = report.collection_stats(conn)
  assert stats["judgments_needed"] == 0 and stats["items_complete"] == 18
  assert stats["agreement"]["items"] == 4 and stats["agreement"]["same_annotator_items"] == 0
  # Alice always pressed A (left), Bob B (right) after his first A: the position statistics
  # count presses, while agreement is on content (the randomised order decides it).
  assert stats["position_bias"]["left_wins"] == stats["by_annotator"]["alice"] + 1
  conn.close()


def test_single_annotator_self_repeats_come_last(round_db):
  conn = db_lib.connect(round_db)
  served = _judge_all(conn, "alice", lambda a: "A", 1e6)
  items = [a["item_id"] for a in served]
  assert len(set(items[:18])) == 18  # Every item once before any repeat.
  repeat = {r[0] for r in conn.execute("SELECT id FROM items WHERE target_judgments = 2")}
  assert set(items[18:]) == repeat
  stats = report.collection_stats(conn)
  assert stats["agreement"]["same_annotator_items"] == 4
  conn.close()


def test_concurrent_annotators_never_share_an_item_and_store_each_judgment_once(served):
  db_path, httpd, _ = served
  errors, counts = [], collections.Counter()
  lock = threading.Lock()
  open_items: dict[int, str] = {}

  def annotate(name):
    client = Client(httpd)
    rng = random.Random(name)
    try:
      while True:
        body = client.next_response(name)
        a = body["assignment"]
        if a is None:
          # Nothing for me now; a re-annotation of my own item waits for someone else, so
          # stop only when the whole queue is done.
          if body["progress"]["remaining"] == 0:
            return
          time.sleep(0.01)
          continue
        with lock:  # The server must never hand an item out twice at once.
          if a["item_id"] in open_items:
            errors.append(f"item {a['item_id']} leased to {open_items[a['item_id']]} and {name}")
          open_items[a["item_id"]] = name
        choice = rng.choice(["A", "B", "tie"])
        with lock:
          del open_items[a["item_id"]]
        status, body = client.submit(a, name, choice)
        if status != 201:
          errors.append(f"{name}: {status} {body}")
        with lock:
          counts[name] += 1
    except Exception as e:  # pylint: disable=broad-except
      errors.append(repr(e))
    finally:
      client.close()

  threads = [threading.Thread(target=annotate, args=(f"ann{i}",)) for i in range(6)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=60)
  assert not errors, errors[:5]
  judged = rows(db_path, "SELECT item_id, COUNT(*) AS n, COUNT(DISTINCT annotator) AS who "
                "FROM judgments GROUP BY item_id")
  targets = {r["id"]: r["target_judgments"] for r in rows(db_path, "SELECT * FROM items")}
  assert {r["item_id"]: r["n"] for r in judged} == targets
  assert all(r["who"] == r["n"] for r in judged)  # Repeats by a different annotator.
  assert sum(counts.values()) == _count(db_path) == 22


def test_concurrent_double_submission_stores_once(served):
  db_path, httpd, client = served
  a = client.next("alice")
  results = []

  def submit():
    c = Client(httpd)
    results.append(c.submit(a, "alice", "A")[0])
    c.close()

  threads = [threading.Thread(target=submit) for _ in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=30)
  assert sorted(results) == [201] + [409] * 7
  assert _count(db_path) == 1


def test_export_maps_left_right_back_to_chosen_rejected(served, tmp_path):
  db_path, _, client = served
  rng = random.Random(0)
  shown = {}
  sides = collections.Counter()
  for name in ("alice", "bob"):
    while (a := client.next(name)) is not None:
      choice = rng.choice(["A", "B", "A", "B", "tie", "skip"])
      assert client.submit(a, name, choice)[0] == 201
      if choice in ("A", "B"):
        winner = a[choice]["text"]
        loser = a["B" if choice == "A" else "A"]["text"]
        shown.setdefault(a["item_id"], []).append((winner, loser))
        sides[choice] += 1
  # Both orders were served (randomised per assignment) and recorded.
  orders = rows(db_path, "SELECT s.left_response = i.response_a AS a_left FROM assignments s "
                "JOIN items i ON i.id = s.item_id")
  assert {r[0] for r in orders} == {0, 1}
  out = tmp_path / "prefs.jsonl"
  counts = report.export_preferences(db_lib.connect(db_path), out)
  pairs = data.read_preferences(str(out))
  assert len(pairs) == counts["pairs"] == sum(sides.values())
  stats = report.collection_stats(db_lib.connect(db_path))
  assert counts["ties"] == stats["ties"] and counts["skips"] == stats["skips"]
  records = [json.loads(l) for l in out.read_text().splitlines()]
  got = collections.defaultdict(list)
  for rec, pair in zip(records, pairs):
    assert pair.prompt.startswith("prompt number")
    got[rec["item_id"]].append((pair.chosen, pair.rejected))
  assert {k: sorted(v) for k, v in got.items()} == {k: sorted(v) for k, v in shown.items()}
  assert stats["position_bias"]["left_wins"] == sides["A"]
  assert stats["position_bias"]["preferring_judgments"] == sum(sides.values())


def test_export_majority_drops_split_votes(round_db, tmp_path):
  conn = db_lib.connect(round_db)
  # One re-annotation item judged both ways (split), one judged the same way twice.
  split, same = [r[0] for r in conn.execute(
      "SELECT id FROM items WHERE target_judgments = 2 ORDER BY id LIMIT 2")]
  db_lib.record_labels(conn, [(split, "a", "x"), (split, "b", "y"), (same, "b", "x"),
                              (same, "b", "y")], labeler="test")
  counts = report.export_preferences(conn, tmp_path / "m.jsonl", aggregate="majority")
  assert counts["pairs"] == 1 and counts["split_items"] == 1
  counts = report.export_preferences(conn, tmp_path / "all.jsonl", aggregate="all")
  assert counts["pairs"] == 4
  stats = report.collection_stats(conn)
  assert stats["agreement"]["items"] == 2 and stats["agreement"]["agreement_rate"] == 0.5
  conn.close()


def test_cohens_kappa_and_binomial_by_hand():
  # p_o = 4/5; marginals (a2, b2, t1) and (a1, b3, t1): p_e = (2 + 6 + 1) / 25 = 0.36;
  # kappa = (0.8 - 0.36) / 0.64 = 0.6875.
  assert report.cohens_kappa(["a", "a", "b", "b", "tie"],
                             ["a", "b", "b", "b", "tie"]) == pytest.approx(0.6875)
  assert report.cohens_kappa(["a", "b"], ["b", "a"]) == pytest.approx(-1.0)
  assert report.cohens_kappa(["a", "a"], ["a", "a"]) is None  # p_e = 1: undefined.
  assert report.cohens_kappa([], []) is None
  # 9 of 10 left wins: P(X <= 1) + P(X >= 9) = 2 * 11 / 1024.
  assert report.binomial_two_sided_p(9, 10) == pytest.approx(22 / 1024)
  assert report.binomial_two_sided_p(5, 10) == pytest.approx(1.0)
  assert report.binomial_two_sided_p(0, 0) is None


def test_stats_on_a_known_round(round_db):
  conn = db_lib.connect(round_db)
  items = [r[0] for r in conn.execute("SELECT id FROM items WHERE target_judgments = 2 "
                                      "ORDER BY id")]
  # Four re-annotated items: outcomes (a, a), (b, b), (a, b), (tie, tie): p_o = 3/4,
  # first (a2, b1, t1), second (a1, b2, t1): p_e = (2 + 2 + 1) / 16; kappa = 7/11.
  labels = [(items[0], "a", "x"), (items[0], "a", "y"), (items[1], "b", "x"),
            (items[1], "b", "y"), (items[2], "a", "x"), (items[2], "b", "y"),
            (items[3], "tie", "x"), (items[3], "tie", "y")]
  db_lib.record_labels(conn, labels, labeler="test")
  s = report.collection_stats(conn)
  assert s["agreement"]["items"] == 4
  assert s["agreement"]["agreement_rate"] == pytest.approx(0.75)
  assert s["agreement"]["cohens_kappa"] == pytest.approx((0.75 - 5 / 16) / (1 - 5 / 16))
  assert s["ties"] == 2 and s["exportable_pairs"] == 6 and s["items_complete"] == 4
  assert s["judgments_needed"] == 14  # The 14 single-judgment items.
  text = report.format_stats(s)
  assert "Cohen's kappa 0.636" in text and "left won" in text
  conn.close()


def test_connect_refuses_missing_or_foreign_databases(tmp_path):
  with pytest.raises(FileNotFoundError, match="no such collection database"):
    db_lib.connect(tmp_path / "missing.db")
  other = tmp_path / "other.db"
  import sqlite3
  sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
  with pytest.raises(ValueError, match="schema version"):
    db_lib.connect(other)
  make_round(tmp_path / "r.db")
  with pytest.raises(FileExistsError):
    db_lib.create(tmp_path / "r.db", {})


# ---------------------------------------------------------------------------------------------
# Attacks: identity
# ---------------------------------------------------------------------------------------------


def test_api_needs_a_valid_key(served):
  db_path, httpd, client = served
  a = client.next("alice")
  key_for(db_path, "bob")
  before = snapshot(db_path)
  body = {k: a[k] for k in ("item_id", "assignment_id", "token")} | {"choice": "A"}
  forged = "A" * 43  # Well-formed, but nobody's key.
  for method, path, payload in (("POST", "/api/next", None), ("POST", "/api/judgment", body),
                                ("GET", "/api/stats", None)):
    for auth, code in ((None, "unauthorized"), (f"Bearer {forged}", "bad_key"),
                       (("Bearer " + "ключ" * 10).encode(), "bad_key"), ("Bearer", "bad_key"),
                       (f"Basic {key_for(db_path, 'alice')}", "unauthorized"),
                       (f"Bearer {key_for(db_path, 'alice')[:-1]}", "bad_key")):
      headers = {} if auth is None else {"Authorization": auth}
      status, resp_headers, raw = client.request(method, path, payload, headers, raw=True)
      assert_json_error(status, {k.lower(): v for k, v in resp_headers.items()}, raw, 401, code)
      assert resp_headers["WWW-Authenticate"].startswith("Bearer")
  # The old way of saying who you are does nothing.
  status, answer = client.request("GET", "/api/next?annotator=alice")
  assert status == 405, answer
  # Two Authorization headers (a proxy's and the client's, say): refused, not guessed.
  status, headers, payload = raw_request(httpd, [
      "POST /api/next HTTP/1.1", f"Host: {host_of(httpd)}", "Content-Length: 0",
      f"Authorization: Bearer {key_for(db_path, 'bob')}",
      f"Authorization: Bearer {key_for(db_path, 'alice')}", "Connection: close"])
  assert_json_error(status, headers, payload, 401, "unauthorized")
  assert snapshot(db_path) == before


def test_an_annotator_cannot_act_for_another(served):
  db_path, _, client = served
  a = client.next("alice")
  before = snapshot(db_path)
  # Bob holds alice's assignment id and token (read off her screen): still not his.
  status, body = client.submit(a, "bob", "A")
  assert status == 403 and body["error"]["code"] == "wrong_annotator", body
  before["annotators"] = snapshot(db_path)["annotators"]  # bob's registration.
  assert snapshot(db_path) == before
  # Bob's own next never hands him alice's open lease.
  assert client.next("bob")["item_id"] != a["item_id"]


def test_annotators_see_counts_but_no_names(served):
  db_path, _, client = served
  for name in ("alice", "bob"):
    assert client.submit(client.next(name), name, "A")[0] == 201
  status, _, raw = client.request("GET", "/api/stats", as_="alice", raw=True)
  assert status == 200
  stats = json.loads(raw)
  assert "by_annotator" not in stats and stats["annotators_with_judgments"] == 2
  assert stats["judgments"] == 2
  assert b"alice" not in raw and b"bob" not in raw
  # The admin's view (the database file) has them.
  full = report.collection_stats(db_lib.connect(db_path))
  assert full["by_annotator"] == {"alice": 1, "bob": 1}


def test_keys_are_stored_hashed_and_replace_revokes_the_old_link(served):
  db_path, _, client = served
  conn = db_lib.connect(db_path)
  name, key = db_lib.add_annotator(conn, "Carol")
  assert name == "carol" and re.fullmatch(r"[A-Za-z0-9_-]{43}", key)
  stored = rows(db_path, "SELECT * FROM annotators WHERE name = 'carol'")[0]
  assert stored["key_sha256"] == hashlib.sha256(key.encode()).hexdigest()
  conn.close()
  for path in (db_path, db_path.with_name(db_path.name + "-wal")):
    if path.exists():
      assert key.encode() not in path.read_bytes()  # The key itself is nowhere on disk.
  headers = {"Authorization": f"Bearer {key}"}
  assert client.request("POST", "/api/next", headers=headers)[1]["annotator"] == "carol"
  conn = db_lib.connect(db_path)
  with pytest.raises(db_lib.CollectError, match="already exists") as err:
    db_lib.add_annotator(conn, "CAROL")
  assert err.value.status == 409
  _, new_key = db_lib.add_annotator(conn, "carol", replace=True)
  conn.close()
  status, body = client.request("POST", "/api/next", headers=headers)
  assert status == 401 and body["error"]["code"] == "bad_key"
  status, body = client.request("POST", "/api/next", headers={"Authorization":
                                                              f"Bearer {new_key}"})
  assert status == 200 and body["annotator"] == "carol"


# ---------------------------------------------------------------------------------------------
# Attacks: leases
# ---------------------------------------------------------------------------------------------


def test_get_and_head_never_lease(served):
  db_path, httpd, client = served
  key_for(db_path, "alice")
  before = snapshot(db_path)
  for method in ("GET", "HEAD"):
    for path in ("/api/next", "/api/next?annotator=alice"):
      status, headers, _ = client.request(method, path, as_="alice", raw=True)
      assert status == 405 and headers["Allow"] == "POST"
    for path in ("/", "/page.js", "/page.css", "/healthz", "/api/stats"):
      assert client.request(method, path, as_="alice", raw=True)[0] == 200
  # What an <img src="http://127.0.0.1:PORT/api/next?annotator=x"> on another page sends.
  status, headers, payload = raw_request(httpd, [
      "GET /api/next?annotator=x HTTP/1.1", f"Host: {host_of(httpd)}", "Accept: image/*",
      "Sec-Fetch-Site: cross-site", "Sec-Fetch-Mode: no-cors", "Sec-Fetch-Dest: image",
      "Connection: close"])
  assert_json_error(status, headers, payload, 405, "method_not_allowed")
  assert snapshot(db_path) == before


def test_made_up_names_cannot_reserve_the_queue(served):
  db_path, _, client = served
  key_for(db_path, "alice")
  before = snapshot(db_path)
  rng = random.Random(0)
  for i in range(24):  # The tester's 24 made-up annotators, now with made-up keys.
    fake = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789_-") for _ in range(43))
    status, body = client.request("POST", "/api/next", headers={
        "Authorization": f"Bearer {fake}"})
    assert status == 401, (i, body)
  assert snapshot(db_path) == before
  # A real annotator gets the head of the queue, and asking again does not take more.
  first = client.next("alice")
  assert first["item_id"] == rows(db_path, "SELECT id FROM items ORDER BY queue_order "
                                  "LIMIT 1")[0][0]
  for _ in range(10):
    assert client.next("alice") == first
  assert _count(db_path, "assignments") == 1


# ---------------------------------------------------------------------------------------------
# Attacks: Host and Origin (DNS rebinding, cross-site requests)
# ---------------------------------------------------------------------------------------------


def test_host_must_name_this_server(served):
  db_path, httpd, _ = served
  port = httpd.server_address[1]
  auth = f"Authorization: Bearer {key_for(db_path, 'alice')}"
  before = snapshot(db_path)
  for path, method in (("/", "GET"), ("/healthz", "GET"), ("/page.js", "GET"),
                       ("/api/next", "POST"), ("/api/stats", "GET")):
    for hosts in ([f"evil.example:{port}"], ["evil.example"], [f"127.0.0.1:{port + 1}"],
                  [f"127.0.0.2:{port}"], [], [f"127.0.0.1:{port}", "evil.example"]):
      status, headers, payload = raw_request(httpd, [
          f"{method} {path} HTTP/1.1", *(f"Host: {h}" for h in hosts), auth,
          "Content-Length: 0", "Connection: close"])
      assert_json_error(status, headers, payload, 400, "bad_host")
    # HTTP/1.0 without Host: same.
    status, headers, payload = raw_request(httpd, [f"{method} {path} HTTP/1.0", auth,
                                                   "Content-Length: 0"])
    assert_json_error(status, headers, payload, 400, "bad_host")
  # An absolute-form target cannot smuggle another authority past the Host check.
  status, headers, payload = raw_request(httpd, [
      f"GET http://evil.example:{port}/healthz HTTP/1.1", "Host: evil.example",
      "Connection: close"])
  assert_json_error(status, headers, payload, 400, "bad_host")
  assert snapshot(db_path) == before
  # The loopback names of the served address all work (a browser may use any of them).
  for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST:{port}",
               f"[::1]:{port}"):
    status, _, payload = raw_request(httpd, ["GET /healthz HTTP/1.1", f"Host: {host}",
                                             "Connection: close"])
    assert status == 200 and json.loads(payload) == {"ok": True}


def test_origin_must_be_this_server(served):
  db_path, httpd, client = served
  port = httpd.server_address[1]
  key_for(db_path, "alice")
  before = snapshot(db_path)
  for headers, code in (({"Origin": "http://evil.example"}, "bad_origin"),
                        ({"Origin": "null"}, "bad_origin"),
                        ({"Origin": f"http://127.0.0.1:{port + 1}"}, "bad_origin"),
                        ({"Origin": f"http://127.0.0.1:{port}.evil.example"}, "bad_origin"),
                        ({"Sec-Fetch-Site": "cross-site"}, "cross_site"),
                        ({"Sec-Fetch-Site": "same-site"}, "cross_site")):
    for method, path in (("POST", "/api/next"), ("GET", "/api/stats")):
      status, body = client.request(method, path, headers=headers, as_="alice")
      assert status == 403 and body["error"]["code"] == code, (headers, body)
  assert snapshot(db_path) == before
  for origin in (f"http://127.0.0.1:{port}", f"http://localhost:{port}"):
    status, body = client.request("POST", "/api/next", headers={
        "Origin": origin, "Sec-Fetch-Site": "same-origin"}, as_="alice")
    assert status == 200 and body["assignment"] is not None


def test_served_addresses_and_public_url(round_db):
  hosts, origins = server_lib.served_addresses("127.0.0.1", 8000)
  assert {"127.0.0.1:8000", "localhost:8000", "[::1]:8000"} <= hosts
  assert "http://localhost:8000" in origins
  hosts, origins = server_lib.served_addresses("10.1.2.3", 8000)
  assert hosts == {"10.1.2.3:8000"} and origins == {"http://10.1.2.3:8000"}
  with pytest.raises(ValueError, match="public_url"):
    server_lib.served_addresses("0.0.0.0", 8000)
  hosts, origins = server_lib.served_addresses("0.0.0.0", 8000,
                                               "https://Annotate.Lab.example:443/")
  assert hosts == {"annotate.lab.example"} and origins == {"https://annotate.lab.example"}
  for bad in ("ftp://x/", "http://x/sub/path", "http://x:99999/", "http:///"):
    with pytest.raises(ValueError, match="public_url"):
      server_lib.served_addresses("127.0.0.1", 8000, bad)
  # Behind a proxy: the proxy's name is accepted, and the login link uses it.
  with running_server(round_db, public_url="http://annotate.lab.example:8443/") as httpd:
    assert httpd.url == "http://annotate.lab.example:8443/"
    for host, status in (("annotate.lab.example:8443", 200), (host_of(httpd), 200),
                         ("annotate.lab.example", 400)):
      got, _, _ = raw_request(httpd, ["GET /healthz HTTP/1.1", f"Host: {host}",
                                      "Connection: close"])
      assert got == status, host


# ---------------------------------------------------------------------------------------------
# Attacks: methods and malformed requests
# ---------------------------------------------------------------------------------------------


def test_every_method_and_malformed_request_gets_a_json_4xx_with_headers(served):
  db_path, httpd, _ = served
  host = f"Host: {host_of(httpd)}"
  key_for(db_path, "alice")
  before = snapshot(db_path)
  for method in ("PATCH", "OPTIONS", "TRACE", "PUT", "DELETE", "PROPFIND", "FOO"):
    status, headers, payload = raw_request(httpd, [f"{method} /api/judgment HTTP/1.1", host,
                                                   "Connection: close"])
    assert_json_error(status, headers, payload, 405, "method_not_allowed")
    assert headers["allow"] == "POST"
    status, headers, payload = raw_request(httpd, [f"{method} /nowhere HTTP/1.1", host,
                                                   "Connection: close"])
    assert_json_error(status, headers, payload, 404, "not_found")
  for lines, status_code, code in (
      (["GARBAGE"], 400, "bad_request"),
      (["GET /"], 400, "bad_request"),  # HTTP/0.9: no Host, no headers; not served.
      (["GET / HTTP/1.1 extra"], 400, "bad_request"),
      (["GET / HTTP/x.y", host], 400, "bad_request"),
      (["GET /" + "a" * 70000 + " HTTP/1.1", host], 414, "uri_too_long"),
      (["GET / HTTP/1.1", host, *(f"X-{i}: {i}" for i in range(120))], 431,
       "headers_too_large"),
      (["GET / HTTP/1.1", host, "X-Long: " + "a" * 70000], 431, "headers_too_large"),
      (["GET / HTTP/2.0", host], 505, "http_version_not_supported")):
    status, headers, payload = raw_request(httpd, lines)
    assert_json_error(status, headers, payload, status_code, code)
  assert snapshot(db_path) == before


def test_page_has_no_inline_code_and_headers_forbid_it(served):
  _, _, client = served
  status, headers, raw = client.request("GET", "/", raw=True)
  html = raw.decode()
  assert status == 200
  csp = headers["Content-Security-Policy"]
  assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
  assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
  assert "require-trusted-types-for 'script'" in csp
  assert re.findall(r"<script\b[^>]*>", html) == ['<script src="/page.js" defer>']
  assert "<style" not in html and not re.search(r"\sstyle=", html)
  assert not re.search(r"\son[a-z]+=", html)  # No inline event handlers either.
  status, headers, raw = client.request("GET", "/page.js", raw=True)
  assert status == 200 and headers["Content-Type"].startswith("text/javascript")
  assert raw.decode() == page.SCRIPT and "innerHTML" not in page.SCRIPT
  status, headers, raw = client.request("GET", "/page.css", raw=True)
  assert status == 200 and headers["Content-Type"].startswith("text/css")
  assert "overflow-wrap: anywhere" in raw.decode()


def test_page_script_marks_exactly_the_bidi_controls():
  names = re.search(r"const BIDI_NAMES = \{(.*?)\};", page.SCRIPT, re.S).group(1)
  marked = {chr(int(h, 16)) for h in re.findall(r'"\\u([0-9A-F]{4})":', names)}
  assert marked == report.BIDI_CONTROLS
  split = re.search(r"const BIDI_SPLIT = /\(\[(.*?)\]\)/;", page.SCRIPT).group(1)
  ranges = re.findall(r"\\u([0-9A-F]{4})(?:-\\u([0-9A-F]{4}))?", split)
  in_split = {chr(c) for lo, hi in ranges for c in range(int(lo, 16), int(hi or lo, 16) + 1)}
  assert in_split == report.BIDI_CONTROLS
  # Unicode's Bidi_Control property, from the standard library's own tables.
  import unicodedata
  assert report.BIDI_CONTROLS == {chr(c) for c in range(0x10000)
                                  if unicodedata.bidirectional(chr(c)) in
                                  ("LRE", "RLE", "PDF", "LRO", "RLO", "LRI", "RLI", "FSI",
                                   "PDI")} | {"\u061c", "\u200e", "\u200f"}


# ---------------------------------------------------------------------------------------------
# Attacks: slow and idle connections
# ---------------------------------------------------------------------------------------------


def _closed_within(sock, seconds):
  """True when the server closes (or resets) the connection within `seconds`."""
  sock.settimeout(seconds)
  try:
    while sock.recv(65536):
      pass  # An error answer may come first; the close is what counts.
    return True
  except (ConnectionResetError, BrokenPipeError):
    return True
  except socket.timeout:
    return False


def test_half_open_connections_time_out(round_db):
  with running_server(round_db, io_timeout_s=0.5, request_timeout_s=30) as httpd:
    threads_before = threading.active_count()
    socks = [socket.create_connection(httpd.server_address[:2], timeout=5) for _ in range(40)]
    try:
      for i, sock in enumerate(socks):  # Idle, or stopped half-way through a request line.
        if i % 2:
          sock.sendall(b"POST /api/judgment HTTP/1.1\r\nHost: ")
      start = time.monotonic()
      assert all(_closed_within(sock, 5) for sock in socks)
      assert time.monotonic() - start < 5
    finally:
      for sock in socks:
        sock.close()
    deadline = time.monotonic() + 5
    while threading.active_count() > threads_before and time.monotonic() < deadline:
      time.sleep(0.05)
    assert threading.active_count() <= threads_before  # Their threads are gone too.
    assert Client(httpd).request("GET", "/healthz")[0] == 200


def test_trickling_request_is_cut_at_the_request_deadline(round_db):
  with running_server(round_db, io_timeout_s=2, request_timeout_s=1) as httpd:
    sock = socket.create_connection(httpd.server_address[:2], timeout=5)
    start, cut = time.monotonic(), False
    try:
      for byte in b"GET /healthz HTTP/1.1\r\nX-Slow: " + b"a" * 100:
        try:
          sock.sendall(bytes([byte]))  # One byte per 0.2 s: each read is well within 2 s.
        except (BrokenPipeError, ConnectionResetError):
          cut = True
          break
        if _closed_within(sock, 0.2):
          cut = True
          break
    finally:
      sock.close()
    assert cut and time.monotonic() - start < 4


def test_connections_beyond_the_limit_get_503(round_db):
  with running_server(round_db, io_timeout_s=3, max_connections=3) as httpd:
    idle = [socket.create_connection(httpd.server_address[:2], timeout=5) for _ in range(3)]
    try:
      time.sleep(0.3)  # Accepted, each on its thread, waiting for a request line.
      with socket.create_connection(httpd.server_address[:2], timeout=5) as extra:
        reply = b""
        while chunk := extra.recv(65536):  # Answered on accept, before any request.
          reply += chunk
      head, _, payload = reply.partition(b"\r\n\r\n")
      assert head.startswith(b"HTTP/1.1 503 ")
      assert json.loads(payload)["error"]["code"] == "busy"
      assert b"Content-Security-Policy: " + server_lib.SECURITY_HEADERS[
          "Content-Security-Policy"].encode() in head
    finally:
      for sock in idle:
        sock.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # The slots come back as their threads end.
      status, _, _ = raw_request(httpd, ["GET /healthz HTTP/1.1", f"Host: {host_of(httpd)}",
                                         "Connection: close"])
      if status == 200:
        break
      time.sleep(0.1)
    assert status == 200


# ---------------------------------------------------------------------------------------------
# Names, the end of the queue, old databases
# ---------------------------------------------------------------------------------------------


def test_names_are_case_folded(round_db):
  assert db_lib.check_annotator("  Alice ") == "alice"
  assert db_lib.check_annotator("ＡＬＩＣＥ") == "alice"  # Fullwidth letters: NFKC.
  assert db_lib.check_annotator("Straße") == db_lib.check_annotator("STRASSE") == "strasse"
  for bad in ("ali\u202ece", "bob\u200b", "tab\there", "\ud800", "", "x" * 65):
    with pytest.raises(db_lib.CollectError) as err:
      db_lib.check_annotator(bad)
    assert err.value.status == 400
  conn = db_lib.connect(round_db)
  assert db_lib.add_annotator(conn, "Alice")[0] == "alice"
  with pytest.raises(db_lib.CollectError, match="already exists"):
    db_lib.add_annotator(conn, "ALICE")
  # "Alice" resumes alice's lease, and never gets her items as a second opinion.
  first = db_lib.next_assignment(conn, "alice", now=1e6)
  assert db_lib.next_assignment(conn, "Alice", now=1e6) == first
  db_lib.submit_judgment(conn, assignment_id=first["assignment_id"], item_id=first["item_id"],
                         token=first["token"], annotator="ALICE", choice="A", now=1e6)
  served = [first["item_id"]]
  while (a := db_lib.next_assignment(conn, "Alice", now=1e6)) is not None:
    served.append(a["item_id"])
    db_lib.submit_judgment(conn, assignment_id=a["assignment_id"], item_id=a["item_id"],
                           token=a["token"], annotator="alice", choice="A", now=1e6)
  assert {r[0] for r in conn.execute("SELECT DISTINCT annotator FROM judgments")} == {"alice"}
  stats = report.collection_stats(conn)
  # One person: every re-annotation is a self-repeat, none counts as agreement of two.
  assert stats["agreement"]["same_annotator_items"] == stats["agreement"]["items"] == 4
  conn.close()


def _one_item_round(path, target):
  conn = db_lib.create(path, {})
  db_lib.add_round(conn, [("p", "test:0")], [[db_lib.Response("left text", True, 2),
                                               db_lib.Response("right text", True, 2)]],
                   repeat_fraction=1.0 if target == 2 else 0.0)
  return conn


def _judge(conn, name, choice, now):
  a = db_lib.next_assignment(conn, name, now=now)
  assert a is not None, name
  db_lib.submit_judgment(conn, assignment_id=a["assignment_id"], item_id=a["item_id"],
                         token=a["token"], annotator=name, choice=choice, now=now)
  return a


def test_reannotation_skipped_by_the_other_annotator_is_not_needed_for_ever(tmp_path):
  conn = _one_item_round(tmp_path / "c.db", target=2)
  for name in ("alice", "bob"):
    db_lib.add_annotator(conn, name)
  _judge(conn, "alice", "A", 1e6)
  # Bob has not seen it: the second opinion is his to give, not alice's.
  assert db_lib.next_assignment(conn, "alice", now=1e6 + 1) is None
  p = db_lib.progress(conn, "alice", now=1e6 + 1)
  assert p == dict(remaining=1, leased=0, for_you=0, for_others=1, no_annotator_left=0,
                   judged_by_you=1)
  _judge(conn, "bob", "skip", 1e6 + 2)
  # Nobody else can: alice re-annotates it herself (self-consistency), and the queue ends.
  assert db_lib.progress(conn, "alice", now=1e6 + 3)["for_you"] == 1
  a = _judge(conn, "alice", "B", 1e6 + 3)
  assert a["item_id"] == 1
  assert db_lib.progress(conn, "alice", now=1e6 + 4)["remaining"] == 0
  stats = report.collection_stats(conn)
  assert stats["judgments_needed"] == 0 and stats["agreement"]["same_annotator_items"] == 1
  conn.close()


def test_a_comparison_everyone_skipped_is_reported_not_waited_for(tmp_path):
  conn = _one_item_round(tmp_path / "c.db", target=1)
  for name in ("alice", "bob"):
    db_lib.add_annotator(conn, name)
  _judge(conn, "alice", "skip", 1e6)
  assert db_lib.progress(conn, "alice", now=1e6)["for_others"] == 1  # bob may still.
  _judge(conn, "bob", "skip", 1e6)
  for name in ("alice", "bob"):
    assert db_lib.next_assignment(conn, name, now=1e6) is None
    assert db_lib.progress(conn, name, now=1e6)["no_annotator_left"] == 1
  stats = report.collection_stats(conn)
  assert stats["judgments_needed"] == stats["judgments_no_annotator_left"] == 1
  assert "1 that no annotator can give" in report.format_stats(stats)
  db_lib.add_annotator(conn, "carol")  # A new annotator can.
  assert db_lib.progress(conn, "alice", now=1e6)["for_others"] == 1
  _judge(conn, "carol", "A", 1e6)
  assert db_lib.progress(conn, now=1e6)["remaining"] == 0
  conn.close()


@pytest.mark.parametrize("seed", range(4))
def test_progress_agrees_with_the_queue(tmp_path, seed):
  """Random annotators, random skips: `for_you` is non-zero exactly when next_assignment has
  something new, the parts add up, and when everyone's queue is empty whatever is still
  needed is reported as needing a new annotator."""
  path = tmp_path / "c.db"
  make_round(path, n_prompts=3, k=3, repeat_fraction=0.5, seed=seed)
  conn = db_lib.connect(path)
  names = ["ann0", "ann1", "ann2"]
  for name in names[:2]:
    db_lib.add_annotator(conn, name)  # ann2 is unregistered: known by its judgments only.
  rng, now, served = random.Random(seed), 1e6, True
  while served:  # Rounds in random order, until one round serves nobody anything.
    served = False
    for name in rng.sample(names, len(names)):
      p = db_lib.progress(conn, name, now=now)
      assert p["leased"] + p["for_you"] + p["for_others"] + p["no_annotator_left"] == (
          p["remaining"])
      a = db_lib.next_assignment(conn, name, now=now)
      assert (a is not None) == (p["for_you"] > 0), (name, p)
      if a is None:
        continue
      served = True
      choice = rng.choice(["A", "B", "tie", "skip", "skip"])
      db_lib.submit_judgment(conn, assignment_id=a["assignment_id"], item_id=a["item_id"],
                             token=a["token"], annotator=name, choice=choice, now=now)
      now += 1
  final = db_lib.progress(conn, now=now)
  assert final["remaining"] == final["no_annotator_left"] and final["for_others"] == 0
  conn.close()


def test_an_old_database_opens_and_is_upgraded_in_place(tmp_path):
  path = tmp_path / "collect.db"
  make_round(path)
  conn = db_lib.connect(path)
  a = db_lib.next_assignment(conn, "alice")
  db_lib.submit_judgment(conn, assignment_id=a["assignment_id"], item_id=a["item_id"],
                         token=a["token"], annotator="alice", choice="A")
  conn.close()
  # Back to what a schema-1 server wrote: no annotators table, version 1.
  import sqlite3
  raw = sqlite3.connect(path)
  raw.execute("DROP TABLE annotators")
  raw.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
  raw.commit()
  raw.close()
  old = snapshot_without_annotators(path)
  errors = []

  def open_it():
    try:
      db_lib.connect(path).close()
    except Exception as e:  # pylint: disable=broad-except
      errors.append(repr(e))

  # Eight processes' worth of connections at once (a server's request threads): one upgrade.
  threads = [threading.Thread(target=open_it) for _ in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=60)
  assert not errors, errors
  for _ in range(2):  # Opening again changes nothing.
    conn = db_lib.connect(path)
    assert db_lib.get_meta(conn)["schema_version"] == db_lib.SCHEMA_VERSION == 2
    assert db_lib.annotators(conn) == []
    conn.close()
  new = snapshot_without_annotators(path)
  old["meta"] = [r for r in old["meta"] if r[0] != "schema_version"]
  new["meta"] = [r for r in new["meta"] if r[0] != "schema_version"]
  assert new == old  # Not one existing row rewritten.
  conn = db_lib.connect(path)
  _, key = db_lib.add_annotator(conn, "Alice")  # Her old judgments are hers.
  assert db_lib.progress(conn, "alice")["judged_by_you"] == 1
  conn.close()
  with running_server(path) as httpd:
    client = Client(httpd)
    status, body = client.request("POST", "/api/next", headers={"Authorization":
                                                                f"Bearer {key}"})
    assert status == 200 and body["progress"]["judged_by_you"] == 1
    assert body["assignment"]["item_id"] != a["item_id"]
    client.close()


def snapshot_without_annotators(path):
  return {t: [tuple(r) for r in rows(path, f"SELECT * FROM {t} ORDER BY 1")]
          for t in TABLES if t != "annotators"}


def test_bidi_controls_are_counted_in_export_and_stats(tmp_path):
  from test_collect_support import make_custom_round
  path = tmp_path / "c.db"
  make_custom_round(path, ["plain prompt", "evil \u202eprompt"],
                    [["a b", "c d"], ["x \u2066y\u2069", "plain"]])
  conn = db_lib.connect(path)
  db_lib.record_labels(conn, [(1, "a", "x"), (2, "b", "x")], labeler="test")
  counts = report.export_preferences(conn, tmp_path / "p.jsonl")
  assert counts["pairs"] == 2 and counts["pairs_with_bidi_controls"] == 1
  records = [json.loads(l) for l in (tmp_path / "p.jsonl").read_text().splitlines()]
  assert "\u202e" in records[1]["prompt"]  # Exported exactly as stored.
  stats = report.collection_stats(conn)
  assert stats["texts_with_bidi_controls"] == {"prompts": 1, "responses": 1}
  assert "1 prompts, 1 responses" in report.format_stats(stats)
  conn.close()


# ---------------------------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------------------------


def _cli(*args):
  return subprocess.run([sys.executable, "-m", "rlhf_jax.collect", *map(str, args)],
                        capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)


def test_cli_add_annotator_prints_a_login_link_that_works(round_db):
  proc = _cli("add-annotator", "Dora", f"--db={round_db}", "--port=8123")
  assert proc.returncode == 0, proc.stderr
  link = proc.stdout.strip().splitlines()[-1]
  match = re.fullmatch(r"http://127\.0\.0\.1:8123/#key=([A-Za-z0-9_-]{43})", link)
  assert match, proc.stdout
  conn = db_lib.connect(round_db)
  assert db_lib.authenticate(conn, match.group(1)) == "dora"
  conn.close()
  proc = _cli("add-annotator", "DORA", f"--db={round_db}")
  assert proc.returncode == 1 and "already exists" in proc.stderr
  assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
  proc = _cli("add-annotator", "dora", f"--db={round_db}", "--replace",
              "--public_url=https://annotate.lab.example/")
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip().splitlines()[-1].startswith("https://annotate.lab.example/#key=")
  conn = db_lib.connect(round_db)
  assert db_lib.authenticate(conn, match.group(1)) is None  # The old link is dead.
  conn.close()
  for args in (["add-annotator"], ["add-annotator", "a", "b"],
               ["add-annotator", "x", f"--db={round_db}", "--host=0.0.0.0"]):
    proc = _cli(*args)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_cli_generate_without_a_policy_is_one_clear_line(tmp_path):
  proc = _cli("generate", "--config=experiments/collect/review_world.py",
              f"--workdir={tmp_path / 'round'}")
  assert proc.returncode == 1
  assert proc.stderr.strip() == ("collect generate: required config values are unset: "
                                 "config.policy.path (set them with --config.KEY=VALUE)")
  assert not (tmp_path / "round").exists()


def _documented_collect_commands():
  """Every `python -m rlhf_jax.collect ...` command in the README and the round's config."""
  texts = [(REPO_ROOT / "README.md").read_text(),
           (REPO_ROOT / "experiments" / "collect" / "review_world.py").read_text()]
  commands = []
  for text in texts:
    joined = re.sub(r"\\\n\s*", " ", text)
    for line in joined.splitlines():
      if "python -m rlhf_jax.collect " in line:
        commands.append(line[line.index("python -m"):].split("#")[0].split())
  return commands


def test_documented_collect_commands_parse():
  """The README's and review_world.py's collect commands name real commands, flags and config
  keys (the README once sent generate off without config.policy.path)."""
  commands = _documented_collect_commands()
  assert {c[3] for c in commands} >= {"generate", "add-annotator", "serve", "export"}
  probe = _cli_flags()
  from conftest import experiment_config
  for command in commands:
    assert command[3] in probe["commands"], command
    positional = [t for t in command[4:] if not t.startswith("--")]
    assert len(positional) == (1 if command[3] == "add-annotator" else 0), command
    for token in command[4:]:
      if not token.startswith("--"):
        continue
      name = token[2:].split("=")[0]
      if name.startswith("config."):
        config = experiment_config("collect/review_world.py", arg="", tiny=False)
        node = config
        for part in name.split(".")[1:]:
          assert part in node, (command, name)
          node = node[part]
      else:
        assert name in probe["flags"], (command, name)
    if command[3] == "generate":
      assert any(t.startswith("--config.policy.path=") for t in command), command


def _cli_flags():
  out = subprocess.run([sys.executable, "-c", (
      "import json; from absl import flags; import rlhf_jax.collect.__main__ as m; "
      "print(json.dumps({'flags': list(flags.FLAGS), 'commands': list(m.COMMANDS)}))")],
      capture_output=True, text=True, cwd=REPO_ROOT, timeout=120, check=True)
  return json.loads(out.stdout)
