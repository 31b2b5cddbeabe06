"""The annotation server's API and the queue rules: submit, skip, double submit, unknown ids,
malformed bodies (clear 4xx, nothing stored), leases, re-annotation, concurrency; export
mapping and the statistics (hand-computed kappa and binomial p)."""
import collections
import json
import random
import socket
import threading
import time

import pytest

from rlhf_jax import data
from rlhf_jax.collect import db as db_lib
from rlhf_jax.collect import report
from test_collect_support import Client, make_round, rows, running_server


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


@pytest.mark.parametrize("body,headers,status,code,needle", [
    ("{not json", None, 400, "malformed_json", "not valid"),
    ("[1, 2]", None, 400, "bad_body", "JSON object"),
    ('"A"', None, 400, "bad_body", "JSON object"),
    ({"item_id": 1, "assignment_id": 1, "token": "t", "annotator": "alice"}, None, 400,
     "missing_fields", "choice"),
    ({"item_id": "1", "assignment_id": 1, "token": "t", "annotator": "alice", "choice": "A"},
     None, 400, "bad_field", "item_id"),
    ({"item_id": True, "assignment_id": 1, "token": "t", "annotator": "alice", "choice": "A"},
     None, 400, "bad_field", "item_id"),
    ({"item_id": 1, "assignment_id": 1, "token": "t", "annotator": "alice", "choice": "C"},
     None, 400, "bad_choice", "'C'"),
    ({"item_id": 1, "assignment_id": 1, "token": "t", "annotator": "alice", "choice": "A",
      "choise": "B"}, None, 400, "unknown_fields", "choise"),
    ({"item_id": 1, "assignment_id": 1, "token": "t", "annotator": "  ", "choice": "A"},
     None, 400, "bad_annotator", "empty"),
    ('{"choice": "A"}', {"Content-Type": "text/plain"}, 415, "unsupported_media_type",
     "application/json"),
    ("x" * 20000, {"Content-Type": "application/json"}, 413, "body_too_large", "at most"),
], ids=["bad_json", "array", "string", "missing", "str_id", "bool_id", "bad_choice", "unknown",
        "blank_annotator", "text_plain", "too_large"])
def test_malformed_bodies_are_clear_4xx_and_store_nothing(served, body, headers, status, code,
                                                          needle):
  db_path, _, client = served
  client.next("alice")  # An open assignment exists; nothing below may judge it.
  if isinstance(body, str) and headers is None:
    headers = {"Content-Type": "application/json"}
  got, answer = client.request("POST", "/api/judgment", body, headers)
  assert got == status, answer
  assert answer["error"]["code"] == code
  assert needle in answer["error"]["message"]
  assert _count(db_path) == 0
  # The connection (or a new one) still works after the error.
  assert client.request("GET", "/healthz")[0] == 200


def test_missing_content_length_is_411(served):
  db_path, httpd, _ = served
  with socket.create_connection(httpd.server_address[:2], timeout=10) as sock:
    sock.sendall(b"POST /api/judgment HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                 b"\r\nConnection: close\r\n\r\n")
    reply = b""
    while chunk := sock.recv(65536):
      reply += chunk
  head, _, payload = reply.partition(b"\r\n\r\n")
  assert head.startswith(b"HTTP/1.1 411")
  assert json.loads(payload)["error"]["code"] == "length_required"
  assert _count(db_path) == 0


def test_routes_methods_and_query_errors(served):
  _, _, client = served
  status, body = client.request("GET", "/api/next")
  assert status == 400 and body["error"]["code"] == "bad_annotator"
  status, body = client.request("GET", "/api/next?annotator=")
  assert status == 400 and "empty" in body["error"]["message"]
  status, body = client.request("GET", "/api/next?annotator=" + "x" * 65)
  assert status == 400
  status, body = client.request("POST", "/api/next?annotator=alice", {"x": 1})
  assert status == 405 and body["error"]["code"] == "method_not_allowed"
  status, body = client.request("GET", "/api/judgment")
  assert status == 405 and "POST" in body["error"]["message"]
  status, body = client.request("GET", "/api/nothing")
  assert status == 404 and body["error"]["code"] == "not_found"
  status, page = client.request("GET", "/")
  assert status == 200
  for text in ("Helpful", "Honest", "Harmless", "Concise", "Well formatted",
               "harmless &gt; honest &gt; helpful", 'id="choose-A"', 'id="choose-skip"'):
    assert text in page
  status, stats = client.request("GET", "/api/stats")
  assert status == 200 and stats["items"] == 18


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
        status, body = client.request("GET", f"/api/next?annotator={name}")
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
