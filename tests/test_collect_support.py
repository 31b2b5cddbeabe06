"""Shared helpers of the collection tests (no tests here): a small round written straight into
SQLite (no policy, no JAX), a running annotation server, and a tiny JSON HTTP client that
signs in as any annotator (registering them, once per database, on first use).

Named test_collect_* only so that it sits with the tests it serves; pytest collects nothing
from it."""
import contextlib
import http.client
import json
import os
import sqlite3
import threading

from rlhf_jax import data
from rlhf_jax.collect import db as db_lib
from rlhf_jax.collect import server as server_lib


def make_round(path, *, n_prompts=6, k=3, repeat_fraction=0.25, seed=0, review_world=False):
  """n_prompts prompts x k distinct responses -> n_prompts * k(k-1)/2 items; synthetic text,
  or (review_world=True) prompts and continuations drawn from the review world's process."""
  conn = db_lib.create(path, {"world_seed": 0 if review_world else None})
  if review_world:
    world = data.ReviewWorld()
    texts = world.sample_prompts(n_prompts, seed=seed)
    samples = world.sample_continuations(texts, k, seed=seed)
    prompts = [(t, f"review_world:{i}") for i, t in enumerate(texts)]
    responses = [[db_lib.Response(r, True, len(r.split())) for r in rs] for rs in samples]
  else:
    prompts = [(f"prompt number {i}", f"test:{i}") for i in range(n_prompts)]
    responses = [[db_lib.Response(f"response {j} to prompt {i}" + " word" * j, j != 1, 5 + j)
                  for j in range(k)] for i in range(n_prompts)]
  summary = db_lib.add_round(conn, prompts, responses, repeat_fraction=repeat_fraction,
                             seed=seed)
  conn.close()
  return summary


def make_custom_round(path, prompts, responses):
  """One round of given texts: prompts[i] with the responses responses[i] (all pairs)."""
  conn = db_lib.create(path, {"world_seed": None})
  summary = db_lib.add_round(
      conn, [(p, f"test:{i}") for i, p in enumerate(prompts)],
      [[db_lib.Response(r, True, len(r.split())) for r in rs] for rs in responses],
      repeat_fraction=0.0)
  conn.close()
  return summary


@contextlib.contextmanager
def running_server(db_path, lease_s=600.0, **kwargs):
  httpd = server_lib.AnnotationServer(db_path, "127.0.0.1", 0, lease_s=lease_s, **kwargs)
  thread = httpd.start_background()
  try:
    yield httpd
  finally:
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


_KEYS: dict[tuple[str, str], str] = {}  # (database path, name) -> login key
_KEYS_LOCK = threading.Lock()


def key_for(db_path, name):
  """`name`'s login key on this database, registering them on first use."""
  db_path = os.fspath(db_path)
  with _KEYS_LOCK:
    if (db_path, name) not in _KEYS:
      conn = db_lib.connect(db_path)
      try:
        _KEYS[db_path, name] = db_lib.add_annotator(conn, name)[1]
      finally:
        conn.close()
    return _KEYS[db_path, name]


class Client:
  """One keep-alive connection per client, like one browser tab; `as_=NAME` signs a request
  in as NAME (the page's Authorization: Bearer header)."""

  def __init__(self, httpd):
    self.db_path = httpd.db_path
    self.host, self.port = httpd.server_address[:2]
    self.conn = http.client.HTTPConnection(self.host, self.port, timeout=30)

  def auth(self, name):
    return {"Authorization": f"Bearer {key_for(self.db_path, name)}"}

  def request(self, method, path, body=None, headers=None, *, as_=None, raw=False):
    """(status, JSON body or text); with raw=True, (status, headers, bytes)."""
    headers = {**(self.auth(as_) if as_ else {}), **(headers or {})}
    if isinstance(body, (dict, list)):
      body = json.dumps(body)
      headers = {"Content-Type": "application/json", **headers}
    self.conn.request(method, path, body=body, headers=headers)
    response = self.conn.getresponse()
    payload = response.read()
    if response.getheader("Connection", "").lower() == "close":
      self.conn.close()  # http.client reconnects on the next request.
    if raw:
      return response.status, response.headers, payload
    ctype = response.getheader("Content-Type", "")
    return response.status, (json.loads(payload) if ctype.startswith("application/json")
                             else payload.decode())

  def next_response(self, annotator):
    status, body = self.request("POST", "/api/next", as_=annotator)
    assert status == 200, body
    return body

  def next(self, annotator):
    return self.next_response(annotator)["assignment"]

  def submit(self, assignment, annotator, choice):
    return self.request("POST", "/api/judgment", {
        "item_id": assignment["item_id"], "assignment_id": assignment["assignment_id"],
        "token": assignment["token"], "choice": choice}, as_=annotator)

  def close(self):
    self.conn.close()


def rows(db_path, sql, *args):
  conn = sqlite3.connect(db_path)
  conn.row_factory = sqlite3.Row
  try:
    return conn.execute(sql, args).fetchall()
  finally:
    conn.close()
