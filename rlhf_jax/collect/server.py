"""The annotation server: a small JSON API and one HTML page over the collection database.

Framework: the standard library (`http.server.ThreadingHTTPServer` + `sqlite3`). The app has
four routes, one page with inline JS/CSS, a handful of annotators on a lab network, and all
of its correctness lives in SQLite transactions (see `db`), not in the web layer; a framework
(Flask, FastAPI) would add a dependency and a WSGI/ASGI server to pin and audit for no
behaviour we need. ThreadingHTTPServer answers each request on its own thread, and each
request opens its own SQLite connection (connections must not cross threads), so concurrent
annotators are serialised only where it matters: inside `BEGIN IMMEDIATE` transactions.

Routes:
  GET  /                          the annotation page
  GET  /api/next?annotator=NAME   200 {"assignment": {...} | null, "progress": {...}}
  POST /api/judgment              body {"item_id", "assignment_id", "token", "annotator",
                                  "choice": "A"|"B"|"tie"|"skip"} -> 201 {"judgment": {...}}
  GET  /api/stats                 200 counts, agreement, position bias (report.collection_stats)
  GET  /healthz                   200 {"ok": true}
Errors are JSON {"error": {"code", "message"}} with a 4xx status: 400 malformed or invalid
body/query, 403 token or annotator mismatch, 404 unknown item/assignment/route, 405 wrong
method, 409 already submitted / lease expired, 411 no Content-Length, 413 body too large,
415 not application/json.

It binds 127.0.0.1 by default: there is no authentication (the per-assignment token only stops
one annotator from submitting for another by accident or guess), so exposing it beyond the
machine is a deliberate choice (`--host`), e.g. behind an SSH tunnel or a reverse proxy.
"""
import contextlib
import http.server
import json
import os
import threading
import urllib.parse
from typing import Any

from absl import logging

from rlhf_jax.collect import db as db_lib
from rlhf_jax.collect import page, report

MAX_BODY_BYTES = 16 * 1024
_JUDGMENT_FIELDS = {"item_id": int, "assignment_id": int, "token": str, "annotator": str,
                    "choice": str}
_SECURITY_HEADERS = {
    # Inline script/style only; the page talks to this origin and nothing else.
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                               "style-src 'unsafe-inline'; connect-src 'self'; "
                               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def parse_judgment(body: bytes) -> dict[str, Any]:
  """The POST /api/judgment body as validated fields, or a CollectError(400) naming the
  problem. Unknown fields are errors too: a misspelt "choise" must not pass silently."""
  try:
    obj = json.loads(body.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise db_lib.CollectError(400, "malformed_json", f"the body is not valid UTF-8 JSON: {e}")
  if not isinstance(obj, dict):
    raise db_lib.CollectError(400, "bad_body", f"the body must be a JSON object, got "
                              f"{type(obj).__name__}")
  unknown = sorted(set(obj) - set(_JUDGMENT_FIELDS))
  if unknown:
    raise db_lib.CollectError(400, "unknown_fields", f"unknown fields {unknown}; expected "
                              f"{sorted(_JUDGMENT_FIELDS)}")
  missing = sorted(set(_JUDGMENT_FIELDS) - set(obj))
  if missing:
    raise db_lib.CollectError(400, "missing_fields", f"missing fields {missing}")
  for name, kind in _JUDGMENT_FIELDS.items():
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, kind):
      raise db_lib.CollectError(400, "bad_field", f"field {name!r} must be a "
                                f"{'string' if kind is str else 'integer'}, got "
                                f"{type(value).__name__}")
  return obj


class _Handler(http.server.BaseHTTPRequestHandler):
  server: "AnnotationServer"
  protocol_version = "HTTP/1.1"  # Keep-alive: the page makes two requests per comparison.
  # Headers and body go out in two writes; with Nagle on, the second waits for the client's
  # delayed ACK (~40 ms per response on Linux).
  disable_nagle_algorithm = True

  # ---- plumbing ------------------------------------------------------------------------------

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    logging.info("%s %s", self.address_string(), format % args)

  def _send(self, status: int, body: bytes, content_type: str,
            headers: dict[str, str] | None = None) -> None:
    self.send_response(status)
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(body)))
    for k, v in {**_SECURITY_HEADERS, **(headers or {})}.items():
      self.send_header(k, v)
    if self.close_connection:
      self.send_header("Connection", "close")
    self.end_headers()
    if self.command != "HEAD":
      self.wfile.write(body)

  def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
    self._send(status, json.dumps(obj).encode(), "application/json; charset=utf-8", headers)

  def _error(self, err: db_lib.CollectError, headers: dict[str, str] | None = None) -> None:
    self._json(err.status, err.to_json(), headers)

  def _route(self, method: str) -> None:
    url = urllib.parse.urlsplit(self.path)
    routes = {"/": ("GET",), "/healthz": ("GET",), "/api/next": ("GET",),
              "/api/stats": ("GET",), "/api/judgment": ("POST",)}
    allowed = routes.get(url.path)
    if method != "GET":
      # An error may leave (part of) a request body unread; on a kept-alive connection those
      # bytes would be parsed as the next request. Successful POSTs read their body fully.
      self.close_connection = True
    try:
      if allowed is None:
        raise db_lib.CollectError(404, "not_found", f"no route {url.path!r}; the API is "
                                  "GET /api/next, POST /api/judgment, GET /api/stats")
      if method not in allowed:
        self._error(db_lib.CollectError(405, "method_not_allowed", f"{method} {url.path} is "
                                        f"not supported; use {', '.join(allowed)}"),
                    {"Allow": ", ".join(allowed)})
        return
      getattr(self, "_" + {"/": "page", "/healthz": "health", "/api/next": "next",
                           "/api/stats": "stats", "/api/judgment": "judgment"}[url.path])(url)
    except db_lib.CollectError as err:
      self._error(err)
    except Exception:  # pylint: disable=broad-except
      # A bug must not kill the thread silently or leak a traceback to the page.
      logging.exception("annotation server: %s %s failed", method, self.path)
      self._json(500, {"error": {"code": "internal", "message": "internal error; see the "
                                 "server log"}})

  def do_GET(self):  # noqa: N802 (http.server's naming)
    self._route("GET")

  def do_HEAD(self):  # noqa: N802
    self._route("GET")

  def do_POST(self):  # noqa: N802
    self._route("POST")

  def do_PUT(self):  # noqa: N802
    self._route("PUT")

  def do_DELETE(self):  # noqa: N802
    self._route("DELETE")

  # ---- routes -----------------------------------------------------------------------------

  def _page(self, url):
    del url
    self._send(200, page.PAGE.encode(), "text/html; charset=utf-8")

  def _health(self, url):
    del url
    self._json(200, {"ok": True})

  def _next(self, url):
    query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
    names = query.get("annotator", [])
    if len(names) != 1:
      raise db_lib.CollectError(400, "bad_annotator", "give exactly one ?annotator=NAME")
    annotator = db_lib.check_annotator(names[0])
    with self.server.connection() as conn:
      assignment = db_lib.next_assignment(conn, annotator, lease_s=self.server.lease_s)
      self._json(200, {"assignment": assignment,
                       "progress": db_lib.progress(conn, annotator)})

  def _stats(self, url):
    del url
    with self.server.connection() as conn:
      self._json(200, report.collection_stats(conn))

  def _judgment(self, url):
    del url
    content_type = self.headers.get("Content-Type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
      raise db_lib.CollectError(415, "unsupported_media_type", "send the judgment as "
                                f"Content-Type: application/json (got {content_type!r})")
    length = self.headers.get("Content-Length")
    if length is None:
      raise db_lib.CollectError(411, "length_required", "a Content-Length header is required")
    try:
      length = int(length)
    except ValueError:
      raise db_lib.CollectError(400, "bad_length", f"Content-Length {length!r} is not an "
                                "integer") from None
    if length > MAX_BODY_BYTES or length < 0:
      raise db_lib.CollectError(413, "body_too_large", f"the body must be at most "
                                f"{MAX_BODY_BYTES} bytes, got {length}")
    fields = parse_judgment(self.rfile.read(length))
    self.close_connection = False  # The body is consumed: keep-alive is safe again.
    with self.server.connection() as conn:
      judgment = db_lib.submit_judgment(conn, labeler="human", **fields)
      self._json(201, {"judgment": judgment, "progress": db_lib.progress(conn,
                                                                        judgment["annotator"])})


class AnnotationServer(http.server.ThreadingHTTPServer):
  """ThreadingHTTPServer over one collection database; `port=0` picks a free port."""

  daemon_threads = True
  allow_reuse_address = True

  def __init__(self, db_path: str | os.PathLike, host: str = "127.0.0.1", port: int = 0,
               lease_s: float = 600.0):
    if lease_s <= 0:
      raise ValueError(f"lease_s={lease_s} must be > 0")
    self.db_path = os.fspath(db_path)
    db_lib.connect(self.db_path).close()  # Fail now, not on the first request.
    self.lease_s = float(lease_s)
    super().__init__((host, port), _Handler)

  @property
  def url(self) -> str:
    host, port = self.server_address[:2]
    return f"http://{host}:{port}/"

  def connection(self):
    """A fresh connection for this request's thread, closed when the block ends."""
    return contextlib.closing(db_lib.connect(self.db_path))

  def start_background(self) -> threading.Thread:
    """Serves on a daemon thread (tests, notebooks); stop with `shutdown()` + `server_close()`."""
    thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                              name="annotation-server", daemon=True)
    thread.start()
    return thread
