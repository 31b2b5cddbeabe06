"""The annotation server: a small JSON API and one HTML page over the collection database.

Framework: the standard library (`http.server.ThreadingHTTPServer` + `sqlite3`). The app has
a handful of routes, one page, a handful of annotators on a lab network, and all of its
correctness lives in SQLite transactions (see `db`), not in the web layer; a framework
(Flask, FastAPI) would add a dependency and a WSGI/ASGI server to pin and audit for no
behaviour we need. ThreadingHTTPServer answers each request on its own thread, and each
request opens its own SQLite connection (connections must not cross threads), so concurrent
annotators are serialised only where it matters: inside `BEGIN IMMEDIATE` transactions.

Who may do what. Each annotator has a secret login key, made by whoever runs the round:
`python -m rlhf_jax.collect add-annotator NAME` prints a login link `http://HOST:PORT/#key=KEY`
(only the key's SHA-256 is stored: `db.add_annotator`). The key sits in the link's fragment,
which browsers never send to a server (so it is in no access log and no Referer); the page
moves it into sessionStorage, takes it out of the address bar and sends it as
`Authorization: Bearer KEY` on every API call. Identity comes from the key alone: no request
can name an annotator. Annotators see the round's counts without names (`report.public_stats`);
who judged what is for whoever holds the database file (`collect stats`).

Routes:
  GET  /                the annotation page (no data; it signs in with the key of its link)
  GET  /page.js         its script, and
  GET  /page.css        its style: served files, so the CSP needs no 'unsafe-inline'
  GET  /healthz         200 {"ok": true}
  POST /api/next        body empty or {} -> 200 {"annotator", "assignment": {...} | null,
                        "progress": {...}}; the only route that leases a comparison
  POST /api/judgment    body {"item_id", "assignment_id", "token",
                        "choice": "A"|"B"|"tie"|"skip"} -> 201 {"judgment", "progress"}
  GET  /api/stats       200 counts, agreement, position bias, no annotator names
Every /api/ route needs the key. Errors are JSON {"error": {"code", "message"}} with a 4xx
status: 400 malformed request, Host, body or field; 401 no key or an unknown one; 403 token
or annotator mismatch, or a foreign Origin; 404 unknown item/assignment/route; 405 wrong
method (any method, PATCH and friends included); 409 already submitted / lease expired;
411 no Content-Length; 413 body too large; 415 not application/json. Beyond requests:
503 when max_connections are already open, 505 for an HTTP version above 1.1.

Defences, each against an attack tests/test_collect_server.py replays:
  - Host must name this server (its host:port; for a loopback bind also localhost,
    127.0.0.1 and [::1] at that port; plus `public_url`'s, e.g. a reverse proxy): a page whose
    DNS name was rebound to 127.0.0.1 sends its own name as Host and is refused.
  - Origin, when a browser sends one, must be this server's, and API calls a browser marks
    Sec-Fetch-Site cross-site or same-site are refused. (Another origin also cannot attach
    the Authorization header without a CORS preflight, which is never granted.)
  - GET and HEAD change nothing: a lease comes only from an authenticated POST /api/next,
    and one annotator holds at most one lease, so made-up names or an <img> on another page
    cannot reserve the queue.
  - Time: every socket read or write times out after io_timeout_s, every request (from the
    wait for its first byte) is cut after request_timeout_s, and at most max_connections are
    served at once: half-open or trickling connections cannot pin threads for ever.
  - Every answer, errors included, carries the security headers: a CSP without
    'unsafe-inline' and with Trusted Types required (no code path may write HTML), nosniff,
    no-referrer, no-store, no framing.

It binds 127.0.0.1 by default. With the keys it can face a lab network (--host=ADDRESS, or
--host=0.0.0.0 with --public_url), but it speaks plain HTTP: keys and texts cross that network
in clear unless an SSH tunnel or a TLS reverse proxy carries them.
"""
import contextlib
import http
import http.server
import json
import os
import socket
import threading
import time
import urllib.parse
from typing import Any

from absl import logging

from rlhf_jax.collect import db as db_lib
from rlhf_jax.collect import page, report

MAX_BODY_BYTES = 16 * 1024
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
_JUDGMENT_FIELDS = {"item_id": int, "assignment_id": int, "token": str, "choice": str}
_CSP = "; ".join([
    "default-src 'none'", "script-src 'self'", "style-src 'self'", "connect-src 'self'",
    "base-uri 'none'", "form-action 'none'", "frame-ancestors 'none'",
    # The page writes text only (textContent, createElement); with Trusted Types required
    # and no policy allowed, any innerHTML-style sink would throw instead of parsing markup.
    "require-trusted-types-for 'script'", "trusted-types 'none'"])
SECURITY_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    # Another site's <img>/<script> pointing here gets nothing it could read.
    "Cross-Origin-Resource-Policy": "same-origin",
}
# path -> (methods, handler method name, needs the annotator's key)
_ROUTES = {
    "/": (("GET", "HEAD"), "_page", False),
    "/page.js": (("GET", "HEAD"), "_script", False),
    "/page.css": (("GET", "HEAD"), "_style", False),
    "/healthz": (("GET", "HEAD"), "_health", False),
    "/api/next": (("POST",), "_next", True),
    "/api/judgment": (("POST",), "_judgment", True),
    "/api/stats": (("GET", "HEAD"), "_stats", True),
}
# http.server's own refusals, as stable codes.
_BASE_ERRORS = {400: "bad_request", 408: "request_timeout", 414: "uri_too_long",
                431: "headers_too_large", 505: "http_version_not_supported"}


def parse_json(body: bytes) -> Any:
  """The body as JSON, or a CollectError(400). Anything json refuses is the client's
  mistake: nesting deeper than the parser's recursion limit, integers longer than Python's
  4300-digit limit, bad UTF-8."""
  try:
    return json.loads(body.decode("utf-8"))
  except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError: ValueError
    reason = "it nests too deeply" if isinstance(e, RecursionError) else str(e)[:200]
    raise db_lib.CollectError(400, "malformed_json", f"the body is not valid UTF-8 JSON: "
                              f"{reason}") from None


def parse_judgment(body: bytes) -> dict[str, Any]:
  """The POST /api/judgment body as validated fields, or a CollectError(400) naming the
  problem. Unknown fields are errors too: a misspelt "choise" must not pass silently, and an
  "annotator" field would suggest a request could choose who it speaks for."""
  obj = parse_json(body)
  if not isinstance(obj, dict):
    raise db_lib.CollectError(400, "bad_body", f"the body must be a JSON object, got "
                              f"{type(obj).__name__}")
  unknown = sorted(set(obj) - set(_JUDGMENT_FIELDS))
  if unknown:
    raise db_lib.CollectError(400, "unknown_fields", f"unknown fields {unknown}; expected "
                              f"{sorted(_JUDGMENT_FIELDS)} (the annotator is the key's)")
  missing = sorted(set(_JUDGMENT_FIELDS) - set(obj))
  if missing:
    raise db_lib.CollectError(400, "missing_fields", f"missing fields {missing}")
  for name, kind in _JUDGMENT_FIELDS.items():
    if kind is int:
      db_lib.check_id(name, obj[name])
    elif not isinstance(obj[name], str):
      raise db_lib.CollectError(400, "bad_field", f"field {name!r} must be a string, got "
                                f"{type(obj[name]).__name__}")
  return obj


def _netloc(host: str, port: int | None) -> str:
  host = f"[{host}]" if ":" in host else host
  return (host if port is None else f"{host}:{port}").lower()


def served_addresses(host: str, port: int, public_url: str | None = None
                     ) -> tuple[frozenset[str], frozenset[str]]:
  """(Host header values, Origin values) a request to this server may carry.

  A wildcard bind ("0.0.0.0", "::", "") is reachable under names the server cannot know, so
  it needs public_url: the address annotators open (their login links use it too).
  """
  hosts: set[str] = set()
  if host in ("", "0.0.0.0", "::"):
    if not public_url:
      raise ValueError(f"host={host!r} listens on every interface, so the server cannot tell "
                       "its own address from a rebound DNS name: give the address annotators "
                       "open, e.g. --public_url=http://annotate.lab.example:8000/")
  elif host in LOOPBACK_HOSTS or host.startswith("127."):
    hosts |= {_netloc(h, port) for h in (*LOOPBACK_HOSTS, host)}
  else:
    hosts.add(_netloc(host, port))
  origins = {f"http://{h}" for h in hosts}
  if public_url:
    url = urllib.parse.urlsplit(public_url)
    try:
      public_port = url.port
    except ValueError:
      public_port = -1
    if (url.scheme not in ("http", "https") or not url.hostname or public_port == -1
        or url.path not in ("", "/") or url.query or url.fragment or url.username):
      raise ValueError(f"public_url={public_url!r}: expected http(s)://HOST[:PORT]/, the "
                       "address annotators open (a reverse proxy's, say)")
    if public_port == {"http": 80, "https": 443}[url.scheme]:
      public_port = None  # Browsers leave a default port out of Host and Origin.
    netloc = _netloc(url.hostname, public_port)
    hosts.add(netloc)
    origins.add(f"{url.scheme}://{netloc}")
  return frozenset(hosts), frozenset(origins)


def base_url(host: str, port: int, public_url: str | None = None) -> str:
  """The address annotators open: public_url when given, else http://host:port/."""
  served_addresses(host, port, public_url)  # Refuses a wildcard host without public_url.
  if public_url:
    return public_url.rstrip("/") + "/"
  return f"http://{_netloc(host, port)}/"


def login_url(base: str, key: str) -> str:
  """The link that signs an annotator in: the key rides in the fragment, which browsers do
  not send to the server (no access log, no Referer); the page reads it from there."""
  return f"{base}#key={key}"


class _Handler(http.server.BaseHTTPRequestHandler):
  server: "AnnotationServer"
  protocol_version = "HTTP/1.1"  # Keep-alive: the page makes two requests per comparison.
  # Headers and body go out in two writes; with Nagle on, the second waits for the client's
  # delayed ACK (~40 ms per response on Linux).
  disable_nagle_algorithm = True

  # ---- plumbing ------------------------------------------------------------------------------

  def setup(self):
    self.timeout = self.server.io_timeout_s  # StreamRequestHandler puts it on the socket.
    super().setup()

  def handle(self):
    try:
      super().handle()
    except OSError:
      # Reset, broken pipe, a read timeout, or a connection cut by the request deadline:
      # there is nobody left to answer.
      self.close_connection = True

  def handle_one_request(self):
    self.server.watch(self)
    try:
      super().handle_one_request()
    finally:
      self.server.unwatch(self)

  def parse_request(self):
    ok = super().parse_request()
    if ok and self.request_version == "HTTP/0.9":  # "GET /" alone: no Host, no headers.
      self.send_error(400, "HTTP/0.9 requests are not served; use HTTP/1.1")
      return False
    return ok

  def version_string(self):
    return "rlhf_jax-collect"  # Not the Python version.

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    logging.info("%s %s", self.address_string(), format % args)

  def send_error(self, code, message=None, explain=None):
    """http.server's own refusals (a malformed request line or header, a URI or header too
    long, an HTTP version it does not speak, an unknown method) as JSON with the security
    headers, like every other answer. An unknown method is routed: 405 (or 404), as PATCH."""
    del explain
    self.close_connection = True
    if self.request_version == "HTTP/0.9":
      # Before its version is parsed every request counts as HTTP/0.9, which gets a bare body:
      # answer with a status line and headers instead (nobody speaks 0.9 any more).
      self.request_version = "HTTP/1.0"
    if code == http.HTTPStatus.NOT_IMPLEMENTED and self.command:
      self._route()
      return
    self._json(code, {"error": {"code": _BASE_ERRORS.get(code, "bad_request"),
                                "message": message or http.HTTPStatus(code).phrase}})

  def _send(self, status: int, body: bytes, content_type: str,
            headers: dict[str, str] | None = None) -> None:
    self.send_response(status)
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(body)))
    for k, v in {**SECURITY_HEADERS, **(headers or {})}.items():
      self.send_header(k, v)
    if self.close_connection:
      self.send_header("Connection", "close")
    self.end_headers()
    if self.command != "HEAD":
      self.wfile.write(body)

  def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
    self._send(status, json.dumps(obj).encode(), "application/json; charset=utf-8", headers)

  def _route(self) -> None:
    method = self.command
    path, _, query = self.path.partition("?")
    # parse_request decided from the client's headers whether keep-alive is possible.
    self._keep_alive = not self.close_connection
    if method not in ("GET", "HEAD") or "Content-Length" in self.headers or (
        "Transfer-Encoding" in self.headers):
      # A body left (partly) unread would be parsed as the next request on a kept-alive
      # connection; routes that read their body whole re-enable keep-alive.
      self.close_connection = True
    extra_headers = None
    try:
      self._check_host()
      route = _ROUTES.get(path)
      if route is None:
        raise db_lib.CollectError(404, "not_found", f"no route {path[:200]!r}; the API is "
                                  "POST /api/next, POST /api/judgment, GET /api/stats")
      methods, handler, needs_key = route
      if method not in methods:
        extra_headers = {"Allow": ", ".join(methods)}
        raise db_lib.CollectError(405, "method_not_allowed", f"{method} {path} is not "
                                  f"supported; use {' or '.join(methods)}")
      if not needs_key:
        getattr(self, handler)()
        return
      self._check_origin()
      if query:
        raise db_lib.CollectError(400, "unexpected_query", f"{path} takes no query string; "
                                  "the annotator is the one whose key is sent")
      with self.server.connection() as conn:
        annotator = self._authenticate(conn)
        getattr(self, handler)(conn, annotator)
    except db_lib.CollectError as err:
      if err.status == 401:
        extra_headers = {"WWW-Authenticate": 'Bearer realm="annotation"'}
      self._json(err.status, err.to_json(), extra_headers)
    except OSError:
      raise  # The connection is gone (handle() ends it); nothing can be answered.
    except Exception:  # pylint: disable=broad-except
      # A bug must not kill the thread silently or leak a traceback to the page.
      logging.exception("annotation server: %s %s failed", method, self.path)
      self.close_connection = True
      self._json(500, {"error": {"code": "internal", "message": "internal error; see the "
                                 "server log"}})

  # http.server's naming. Every other method (PATCH, OPTIONS, TRACE, made-up ones) reaches
  # _route through send_error(501) and is answered 405 or 404 like these.
  def do_GET(self):  # noqa: N802
    self._route()

  def do_HEAD(self):  # noqa: N802
    self._route()

  def do_POST(self):  # noqa: N802
    self._route()

  # ---- checks -----------------------------------------------------------------------------

  def _check_host(self) -> None:
    hosts = self.headers.get_all("Host") or []
    if len(hosts) != 1:
      raise db_lib.CollectError(400, "bad_host", "a request must carry exactly one Host "
                                f"header (got {len(hosts)})")
    if hosts[0].strip().lower() not in self.server.allowed_hosts:
      raise db_lib.CollectError(400, "bad_host", f"Host {hosts[0][:100]!r} is not this "
                                f"server's address; open {self.server.url} (a server behind "
                                "a proxy or on a wildcard address names it with --public_url)")

  def _check_origin(self) -> None:
    origins = self.headers.get_all("Origin") or []
    if len(origins) > 1 or (origins and origins[0].strip().lower()
                            not in self.server.allowed_origins):
      raise db_lib.CollectError(403, "bad_origin", f"requests from origin "
                                f"{', '.join(o[:100] for o in origins)!r} are not accepted; "
                                f"use the page at {self.server.url}")
    site = self.headers.get("Sec-Fetch-Site")
    if site is not None and site.strip().lower() not in ("same-origin", "none"):
      raise db_lib.CollectError(403, "cross_site", f"API calls from another site "
                                f"(Sec-Fetch-Site: {site[:40]}) are not accepted")

  def _authenticate(self, conn) -> str:
    values = self.headers.get_all("Authorization") or []
    if not values:
      raise db_lib.CollectError(401, "unauthorized", "this API needs your login key: open "
                                "the login link you were given (the page sends the key as "
                                "Authorization: Bearer KEY); `python -m rlhf_jax.collect "
                                "add-annotator NAME` makes links")
    scheme, _, key = values[0].strip().partition(" ")
    if len(values) != 1 or scheme.lower() != "bearer":
      raise db_lib.CollectError(401, "unauthorized", "send exactly one Authorization: Bearer "
                                "KEY header")
    name = db_lib.authenticate(conn, key.strip())
    if name is None:
      raise db_lib.CollectError(401, "bad_key", "this login key is not valid (mistyped, or "
                                "replaced by a newer link): ask for a new login link")
    return name

  def _read_body(self, *, required: bool) -> bytes | None:
    """The request body, read whole (then keep-alive is safe again); None when there is none
    and `required` is False."""
    if "Transfer-Encoding" in self.headers:
      raise db_lib.CollectError(400, "transfer_encoding", "send the body with a "
                                "Content-Length; Transfer-Encoding is not accepted")
    lengths = self.headers.get_all("Content-Length") or []
    length = lengths[0].strip() if lengths else None
    if len(lengths) > 1 or (length is not None and not (length.isascii() and length.isdigit())):
      raise db_lib.CollectError(400, "bad_length", f"Content-Length {lengths[:2]!r} is not "
                                "one non-negative integer")
    length = None if length is None else int(length)
    content_type = self.headers.get("Content-Type", "")
    if (required or length) and content_type.split(";")[0].strip().lower() != (
        "application/json"):
      raise db_lib.CollectError(415, "unsupported_media_type", "send the body as "
                                f"Content-Type: application/json (got {content_type[:100]!r})")
    if length is None:
      if required:
        raise db_lib.CollectError(411, "length_required", "a Content-Length header is "
                                  "required")
      return None
    if length > MAX_BODY_BYTES:
      raise db_lib.CollectError(413, "body_too_large", f"the body must be at most "
                                f"{MAX_BODY_BYTES} bytes, got {length}")
    body = self.rfile.read(length)
    if len(body) != length:
      raise ConnectionAbortedError("the client sent less than its Content-Length")
    self.close_connection = not self._keep_alive
    if not body and not required:
      return None
    return body

  # ---- routes -----------------------------------------------------------------------------

  def _page(self):
    self._send(200, page.PAGE.encode(), "text/html; charset=utf-8")

  def _script(self):
    self._send(200, page.SCRIPT.encode(), "text/javascript; charset=utf-8")

  def _style(self):
    self._send(200, page.STYLE.encode(), "text/css; charset=utf-8")

  def _health(self):
    self._json(200, {"ok": True})

  def _next(self, conn, annotator: str):
    body = self._read_body(required=False)
    if body is not None:
      obj = parse_json(body)
      if obj != {}:
        raise db_lib.CollectError(400, "bad_body", "POST /api/next takes an empty body or {} "
                                  "(the annotator is the one whose key is sent)")
    assignment = db_lib.next_assignment(conn, annotator, lease_s=self.server.lease_s)
    self._json(200, {"annotator": annotator, "assignment": assignment,
                     "progress": db_lib.progress(conn, annotator)})

  def _judgment(self, conn, annotator: str):
    fields = parse_judgment(self._read_body(required=True))
    judgment = db_lib.submit_judgment(conn, labeler="human", annotator=annotator, **fields)
    self._json(201, {"judgment": judgment, "progress": db_lib.progress(conn, annotator)})

  def _stats(self, conn, annotator: str):
    del annotator
    self._json(200, report.public_stats(report.collection_stats(conn)))


class AnnotationServer(http.server.ThreadingHTTPServer):
  """ThreadingHTTPServer over one collection database; `port=0` picks a free port.

  public_url: the address annotators open when it is not host:port itself (a reverse proxy,
  a wildcard bind); requests must name it (Host, Origin), and `url` is it.
  io_timeout_s: the longest a socket read or write may wait (also an idle keep-alive wait).
  request_timeout_s: the longest one request may take, from the wait for its first byte.
  max_connections: connections served at once; more are answered 503 and closed.
  """

  daemon_threads = True
  allow_reuse_address = True
  # The listen backlog (socketserver's default is 5): a burst of connections, a page load or
  # an attack, waits in the kernel for accept() instead of SYN retries seconds apart.
  request_queue_size = 128

  def __init__(self, db_path: str | os.PathLike, host: str = "127.0.0.1", port: int = 0,
               lease_s: float = 600.0, *, public_url: str | None = None,
               io_timeout_s: float = 10.0, request_timeout_s: float = 30.0,
               max_connections: int = 64):
    for name, value in (("lease_s", lease_s), ("io_timeout_s", io_timeout_s),
                        ("request_timeout_s", request_timeout_s),
                        ("max_connections", max_connections)):
      if not value > 0:
        raise ValueError(f"{name}={value} must be > 0")
    self.db_path = os.fspath(db_path)
    db_lib.connect(self.db_path).close()  # Fail now (and upgrade an old file), not later.
    served_addresses(host, 1, public_url)  # A bad host/public_url fails before binding.
    self.lease_s = float(lease_s)
    self.io_timeout_s = float(io_timeout_s)
    self.request_timeout_s = float(request_timeout_s)
    self.max_connections = int(max_connections)
    self.public_url = public_url
    self._slots = threading.BoundedSemaphore(self.max_connections)
    self._deadlines: dict[_Handler, float] = {}
    self._deadlines_lock = threading.Lock()
    if ":" in host:
      self.address_family = socket.AF_INET6
    super().__init__((host, port), _Handler)
    self.allowed_hosts, self.allowed_origins = served_addresses(
        host, self.server_address[1], public_url)

  @property
  def url(self) -> str:
    """The address annotators open (login links are this plus #key=KEY)."""
    return base_url(self.server_address[0], self.server_address[1], self.public_url)

  def login_url(self, key: str) -> str:
    return login_url(self.url, key)

  def connection(self):
    """A fresh connection for this request's thread, closed when the block ends."""
    return contextlib.closing(db_lib.connect(self.db_path))

  def start_background(self) -> threading.Thread:
    """Serves on a daemon thread (tests, notebooks); stop with `shutdown()` + `server_close()`."""
    thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                              name="annotation-server", daemon=True)
    thread.start()
    return thread

  # ---- connection limits ------------------------------------------------------------------

  def watch(self, handler: _Handler) -> None:
    with self._deadlines_lock:
      self._deadlines[handler] = time.monotonic() + self.request_timeout_s

  def unwatch(self, handler: _Handler) -> None:
    with self._deadlines_lock:
      self._deadlines.pop(handler, None)

  def service_actions(self):
    """Between polls of serve_forever: cuts the connections whose request runs past
    request_timeout_s (a client that trickles bytes faster than io_timeout_s would otherwise
    hold its thread for ever). Shutting the socket down wakes the blocked read."""
    now = time.monotonic()
    with self._deadlines_lock:
      late = [h for h, deadline in self._deadlines.items() if deadline < now]
      for handler in late:
        del self._deadlines[handler]
    for handler in late:
      try:
        handler.connection.shutdown(socket.SHUT_RDWR)
      except OSError:
        pass

  def shutdown_request(self, request):
    """Closes a served connection gracefully: after our FIN, reads (briefly) what the client
    still sends. Closing with unread bytes, the rest of a refused request, makes the kernel
    reset the connection, and a reset can destroy the error answer just written."""
    try:
      request.shutdown(socket.SHUT_WR)
      request.settimeout(0.2)
      deadline = time.monotonic() + 1.0
      while time.monotonic() < deadline and request.recv(65536):
        pass
    except OSError:
      pass
    self.close_request(request)

  def process_request(self, request, client_address):
    if not self._slots.acquire(blocking=False):
      self._refuse_busy(request)
      return
    try:
      super().process_request(request, client_address)
    except BaseException:
      self._slots.release()
      raise

  def process_request_thread(self, request, client_address):
    try:
      super().process_request_thread(request, client_address)
    finally:
      self._slots.release()

  def _refuse_busy(self, request) -> None:
    """503 on a connection beyond max_connections, from the accepting thread: a short write
    with a short timeout, then close, so the accept loop is never held up."""
    body = json.dumps({"error": {"code": "busy", "message": f"the server already serves "
                                 f"{self.max_connections} connections; try again shortly"}})
    head = ["HTTP/1.1 503 Service Unavailable", "Content-Type: application/json; charset=utf-8",
            f"Content-Length: {len(body)}", "Retry-After: 5", "Connection: close",
            *(f"{k}: {v}" for k, v in SECURITY_HEADERS.items())]
    try:
      request.settimeout(0.5)
      request.sendall(("\r\n".join(head) + "\r\n\r\n" + body).encode())
      request.shutdown(socket.SHUT_WR)
    except OSError:
      pass
    self.close_request(request)  # No lingering here: this is the accepting thread.

