"""The HTTP intake: InfluxDB's write endpoints (and JSON and CSV) on the device.

Endpoints (``[intake.http]``):

* ``POST /write`` (InfluxDB 1.x) and ``POST /api/v2/write`` (2.x): line protocol,
  ``?precision=`` ns/us/ms/s (1.x: n/u/ms/s/m/h), gzip bodies (all members of a
  multi-member one), an empty body answered 204, as Telegraf's
  ``outputs.influxdb``/``influxdb_v2``, every InfluxDB client library and Node-RED
  send them; ``db``, ``bucket``, ``org`` and ``rp`` are accepted and ignored;
* ``POST /api/v1/json?node=N``: a JSON object, read as the ``json`` format reads it;
* ``POST /api/v1/csv?node=N&sensor=S``: CSV, read as the ``csv`` format reads it
  (``?precision=s`` etc. for epoch times, ``?timezone=Z`` for local times without
  a zone, as a TOA5 logger writes them, else ``[intake.http] time_format``);
* ``GET /ping`` (204) and ``GET /health`` (200), as InfluxDB answers them;
* ``GET|POST /query``: ``CREATE DATABASE`` and ``SHOW DATABASES`` only
  (:mod:`edge_agent.sources.influxquery`), for clients that send them at start.

docs/devices.md, "Node-RED and InfluxDB clients", has every status code beside
InfluxDB's.

A write is answered **204 only after its readings are committed** to the buffer
(one transaction per body, :meth:`edge_agent.pipeline.intake.Intake.commit_now`). Lines
that cannot be read are quarantined and the others stored; the answer is then
400 with ``partial write: …``, as InfluxDB answers, so that a client does not
send the body again. A body that cannot be read at all is quarantined and
answered 400. When the buffer cannot take the body the answer is 503 with
``Retry-After``, and nothing of it is kept: the client sends it again.

Bounded, so that slow, idle or hostile clients cannot stop the others:

* at most ``max_pending`` connections may be reading their request head (request
  line and headers) at once, each within one deadline for the whole head
  (``head_timeout_s``, not per byte: a client sending a byte a second is closed
  like an idle one); more are answered 503;
* a request takes one of ``max_connections`` slots only once its head is in and
  its token checked; more are answered 503 with Retry-After;
* a body over ``max_body_bytes`` (also after gzip) gets 413, two bodies at most are
  decoded and committed at once, and a body that sends nothing for ``timeout_s``
  is disconnected.

The token is never kept or logged: the ``p``, ``u``, ``token`` and ``password``
parameters are masked in every topic the buffer or a log line shows, and the
``Authorization`` header is read, never written anywhere. A client that hangs up
early is a DEBUG line.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hmac
import json
import logging
import socket
import sqlite3
import sys
import threading
import time
import urllib.parse
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from edge_agent import counters
from edge_agent.pipeline.intake import Arrival, Intake, Outcome
from edge_agent.sources import csvrows, influxquery, timestamps
from edge_agent.sources.config import HttpConfig, SourceConfig
from edge_agent.sources.contract import Decoded, guard
from edge_agent.sources.counts import PendingCounts
from edge_agent.sources.jsonfields import decoder as json_decoder
from edge_agent.sources.lineproto import PRECISIONS, LineDecoder
from edge_agent.sources.naming import joined
from edge_agent.sources.transform import Transforms
from shared.config import Invalid
from shared.errors import StorageError, TelemetryError, WireError

log = logging.getLogger(__name__)

VERSION = "edge-agent"  # X-Influxdb-Version: clients only check that it is there
MAX_PARAMS = 20  # query parameters of a request; more get 400
WRITE_PATHS = {"/write": "http-v1", "/api/v2/write": "http-v2"}
#: the precisions each write endpoint takes, as InfluxDB's do (1.x also takes the
#: 2.x names; 2.x not 1.x's minutes and hours)
V1_PRECISIONS = frozenset(("n", "ns", "u", "us", "µ", "ms", "s", "m", "h"))
V2_PRECISIONS = frozenset(("ns", "us", "ms", "s"))
CHUNK_LINE_MAX = 1024


class ListenError(TelemetryError):
    """The HTTP intake cannot listen where its config says (a port in use)."""


class BodyError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


#: query parameters whose values are secrets (InfluxDB 1.x's u and p carry them)
SECRET_PARAMS = frozenset({"p", "u", "token", "password"})
BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n"
    b"Content-Length: 0\r\nConnection: close\r\n\r\n"
)
#: a client gone before the answer: its business, not the agent's error
HANGUPS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, TimeoutError)


def redact(query: str) -> str:
    """A query string with the values of :data:`SECRET_PARAMS` masked."""
    if not query:
        return query
    out = []
    for part in query.split("&"):
        key, eq, _ = part.partition("=")
        out.append(f"{key}=***" if eq and urllib.parse.unquote_plus(key) in SECRET_PARAMS else part)
    return "&".join(out)


class HeadDeadlines:
    """One thread that closes the connections whose request head is not in by its
    deadline (monotonic clock): a socket timeout is per read, so a client sending a
    byte at a time would otherwise hold its connection for ever."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._due: dict[socket.socket, float] = {}
        self._stopped = False
        self.expired = 0
        self.thread = threading.Thread(target=self._run, name="http-deadlines", daemon=True)

    def arm(self, sock: socket.socket, seconds: float) -> None:
        with self._cv:
            self._due[sock] = time.monotonic() + seconds
            self._cv.notify()

    def disarm(self, sock: socket.socket) -> None:
        with self._cv:
            self._due.pop(sock, None)

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()

    def _run(self) -> None:
        with self._cv:
            while not self._stopped:
                now = time.monotonic()
                late = [s for s, t in self._due.items() if t <= now]
                for sock in late:
                    del self._due[sock]
                    self.expired += 1
                    with contextlib.suppress(OSError):  # it may be closed already
                        sock.shutdown(socket.SHUT_RDWR)
                wait = min(self._due.values(), default=now + 60.0) - now
                self._cv.wait(max(0.01, wait))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], handler: type[_Handler], intake: HttpIntake) -> None:
        self.app = intake
        #: requests being served (taken once the head is in and authenticated)
        self.slots = threading.BoundedSemaphore(intake.cfg.max_connections)
        #: connections reading a request head (taken at accept, and again for each
        #: further request of a kept-alive connection)
        self.heads = threading.BoundedSemaphore(intake.cfg.max_pending)
        self.deadlines = HeadDeadlines()
        # the listen backlog: room for every connection the bounds above take, so
        # that they are accepted (and answered 503 beyond them) rather than left
        # unanswered in the kernel's queue (socketserver's default is 5)
        self.request_queue_size = intake.cfg.max_pending + intake.cfg.max_connections + 16
        family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        self.address_family = family
        super().__init__(addr, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.heads.acquire(blocking=False):
            self.app.count(counters.HTTP_REFUSED_BUSY)
            with contextlib.suppress(OSError):
                request.sendall(BUSY)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, HANGUPS):
            log.debug("http: %s went away: %s", client_address[0], exc)
            return
        log.exception("http: a request from %s failed", client_address[0])


class HttpIntake:
    """Serves the endpoints in a thread of its own; bound at construction, so that a
    port in use stops the agent's start with a clear error."""

    def __init__(self, cfg: HttpConfig, intake: Intake) -> None:
        self.cfg = cfg
        self.intake = intake
        self.token = cfg.token()
        transforms = intake.transforms
        self.lines = LineDecoder(
            transforms,
            node=cfg.node,
            node_tag=cfg.node_tag,
            sensor_tags=cfg.sensor_tags,
            ignore_tags=cfg.ignore_tags,
            max_bytes=cfg.max_body_bytes,
        )
        self.json_src = cfg.source("json", "http-json")
        self.csv_src = cfg.source("csv", "http-csv")
        self.transforms: Transforms = transforms
        self.counts = PendingCounts()
        self.databases = influxquery.Databases()
        #: bodies decoded and committed at once: the decoded lines take several times
        #: a body's bytes, and the commits queue for the buffer anyway
        self.decoding = threading.BoundedSemaphore(2)
        try:
            self.server = _Server((cfg.host, cfg.port), _Handler, self)
        except OSError as exc:
            raise ListenError(
                f"intake.http: cannot listen on {cfg.host}:{cfg.port}: {exc.strerror} "
                "(set intake.http.port or host)"
            ) from None
        self.server.timeout = cfg.timeout_s
        self.thread = threading.Thread(
            target=self.server.serve_forever, name="http-intake", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> None:
        self.server.deadlines.thread.start()
        self.thread.start()
        log.info("http: serving InfluxDB-compatible writes on %s:%d", self.cfg.host, self.port)

    def alive(self) -> bool:
        """Its threads run: the server's, and the one that enforces head deadlines."""
        return self.thread.is_alive() and self.server.deadlines.thread.is_alive()

    def stop(self) -> None:
        if self.thread.is_alive():
            self.server.shutdown()
        self.server.deadlines.stop()
        self.server.server_close()

    def count(self, name: counters.CounterName) -> None:
        self.counts.add(name)

    def authorized(self, headers: Any, query: dict[str, list[str]]) -> bool:
        if self.token is None:
            return True
        offered: list[str] = []
        auth = headers.get("Authorization", "")
        scheme, _, cred = auth.partition(" ")
        if scheme.lower() in ("token", "bearer"):
            offered.append(cred.strip())
        elif scheme.lower() == "basic":
            with contextlib.suppress(ValueError, UnicodeDecodeError):
                offered.append(base64.b64decode(cred, validate=True).decode().partition(":")[2])
        offered += query.get("p", [])[:1]
        want = self.token.encode()
        return any(hmac.compare_digest(o.encode(), want) for o in offered)

    def decode(
        self, path: str, query: dict[str, list[str]], body: bytes, now_ns: int
    ) -> tuple[str, Decoded | WireError]:
        """(source name, what the body holds or why not)."""
        first = {k: v[0] for k, v in query.items() if v}
        try:
            if path in WRITE_PATHS:
                precision = first.get("precision", "ns")
                if precision not in (V1_PRECISIONS if path == "/write" else V2_PRECISIONS):
                    raise WireError(
                        "bad-precision",
                        f"precision {precision[:20]!r}: /api/v2/write takes ns, us, ms, s; "
                        "/write n, u, ms, s, m, h",
                    )
                return WRITE_PATHS[path], self.lines.decode(
                    body, now_ns, precision, "the precision parameter"
                )
            node = joined(first.get("node", "")) or self.cfg.node
            if path == "/api/v1/json":
                dec = guard(
                    json_decoder(
                        _with_node(self.json_src, node),
                        self.transforms,
                        "[intake.http] time_format",
                    )
                )
                return "http-json", dec("http", body, now_ns)
            sensor = joined(first.get("sensor", "")) or ""
            src = _with_node(self.csv_src, node)
            setting = "[intake.http] time_format (or ?precision=s|ms|us|ns)"
            if "precision" in first:
                unit = PRECISIONS.get(first["precision"])
                if unit not in timestamps.NS_PER:
                    raise WireError("bad-precision", "precision: use ns, us, ms or s")
                src = dataclasses.replace(src, time_format=unit)  # type: ignore[arg-type]
                setting = "the precision parameter"
            elif "timezone" in first:  # local times without a zone (a TOA5 logger's)
                try:
                    timestamps.zone(first["timezone"])
                except Invalid as exc:
                    raise WireError("bad-timestamp", f"the timezone parameter: {exc}") from None
                src = dataclasses.replace(src, time_format="local", timezone=first["timezone"])
                setting = "the timezone parameter"

            def rows(_t: str, b: bytes, n: int) -> Decoded:
                return csvrows.decode_rows(src, self.transforms, node, sensor, b, n, setting)

            return "http-csv", guard(rows)("", body, now_ns)
        except WireError as exc:
            return (WRITE_PATHS.get(path, "http-" + path.rsplit("/", 1)[-1]), exc)
        except Exception as exc:  # noqa: BLE001 (a decoder bug: quarantined, not a dead thread)
            return "http", WireError("undecodable", f"{type(exc).__name__}: {exc}"[:500])


def gunzip(raw: bytes, limit: int) -> bytes:
    """A gzip body, every member of it (``cat a.gz b.gz`` is one valid gzip stream
    of two members, RFC 1952 §2.2), at most ``limit`` bytes; :class:`BodyError`."""
    parts: list[bytes] = []
    total = 0
    rest = raw
    while True:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            out = d.decompress(rest, limit + 1 - total)
        except zlib.error as exc:
            raise BodyError(400, f"not gzip: {exc}") from None
        total += len(out)
        if total > limit or d.unconsumed_tail:
            raise BodyError(413, f"the body is over {limit} bytes after gzip")
        if not d.eof:
            raise BodyError(400, "not gzip: the body ends inside a member")
        parts.append(out)
        rest = d.unused_data
        if not rest.strip(b"\0"):  # trailing zeros: padding some tools write
            return b"".join(parts)


def redact_line(line: str) -> str:
    """A request line (``POST /write?db=x&p=secret HTTP/1.1``) with its secrets masked."""
    head, sep, rest = line.partition("?")
    if not sep:
        return line
    query, space, tail = rest.partition(" ")
    return f"{head}?{redact(query)}{space}{tail}"


def _with_node(src: SourceConfig, node: str) -> SourceConfig:
    return dataclasses.replace(src, node=node, topic="http")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    server_version = "edge-agent"

    def setup(self) -> None:
        self._head_slot = True  # taken in _Server.process_request
        self._slot = False
        self._requests = 0
        try:
            super().setup()
            self.connection.settimeout(self.server.app.cfg.timeout_s)
        except BaseException:
            self._head_done()  # finish() is not called when setup() fails
            raise

    def handle_one_request(self) -> None:
        """One request: its head within ``head_timeout_s`` (one deadline for all of
        it, from the connection's start or, on a kept-alive connection, from the
        next request's first byte, which may take ``timeout_s``), holding a head
        slot; then its handler. A kept-alive connection takes a head slot again for
        its next request, or is closed if none is free."""
        server = self.server
        self._requests += 1
        if self._requests > 1:
            if not server.heads.acquire(blocking=False):
                self.close_connection = True
                return
            self._head_slot = True
            try:
                if not self.rfile.peek(1):  # type: ignore[attr-defined]  # a BufferedReader
                    self.close_connection = True  # the client closed it
                    return
            except OSError:  # idle for timeout_s, or reset
                self.close_connection = True
                return
        server.deadlines.arm(self.connection, server.app.cfg.head_timeout_s)
        try:
            super().handle_one_request()
        finally:
            self._head_done()
            self._slot_done()

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self._head_done()

    def _head_done(self) -> None:
        """The head is in (or the connection is done): no deadline, no head slot."""
        self.server.deadlines.disarm(self.connection)
        if self._head_slot:
            self._head_slot = False
            self.server.heads.release()

    def _slot_done(self) -> None:
        """The request's work is done: its slot goes back before the reply is
        written, so that a client that sends its next request as soon as it has
        read this reply never finds the slot still held."""
        if self._slot:
            self._slot = False
            self.server.slots.release()

    def _take_slot(self) -> bool:
        """A request slot for a request whose head is in and authenticated."""
        if self.server.slots.acquire(blocking=False):
            self._slot = True
            return True
        self.server.app.count(counters.HTTP_REFUSED_BUSY)
        self.close_connection = True
        self._error(503, "unavailable", "too many requests at once", Retry_After="1")
        return False

    def log_message(self, format: str, *args: Any) -> None:
        # args hold the request line, whose query may carry v1's u and p: masked
        shown = [redact_line(a) if isinstance(a, str) else a for a in args]
        log.debug("http: %s " + format, self.client_address[0], *shown)

    # -- replies

    def _reply(self, status: int, body: dict[str, Any] | None = None, **headers: str) -> None:
        data = json.dumps(body).encode() if body is not None else b""
        self._slot_done()
        self.send_response(status)
        self.send_header("X-Influxdb-Version", VERSION)
        self.send_header("X-Influxdb-Build", "OSS")
        if body is not None:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data and self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, code: str, message: str, **headers: str) -> None:
        # v1 clients read "error", v2 clients "code" and "message"
        self._reply(status, {"code": code, "message": message, "error": message}, **headers)

    # -- GET

    def do_GET(self) -> None:
        self._head_done()
        url = urllib.parse.urlsplit(self.path)
        path = url.path
        if path == "/ping":
            self._reply(204)
        elif path == "/query":
            self._query(url.query, b"")
        elif path == "/health":
            self._reply(
                200,
                {
                    "name": "edge-agent",
                    "status": "pass",
                    "message": "ready for writes",
                    "checks": [],
                },
            )
        else:
            self._error(404, "not found", f"no such endpoint: {path[:100]}")

    do_HEAD = do_GET

    # -- POST

    def do_POST(self) -> None:
        self._head_done()
        app = self.server.app
        url = urllib.parse.urlsplit(self.path)
        try:
            query = urllib.parse.parse_qs(url.query, max_num_fields=MAX_PARAMS)
        except ValueError:  # more fields than that
            app.count(counters.HTTP_REFUSED_BODY)
            self._discard_body()
            self._error(400, "invalid", f"more than {MAX_PARAMS} query parameters")
            return
        if url.path == "/query":
            self._query(url.query, None)
            return
        if url.path not in (*WRITE_PATHS, "/api/v1/json", "/api/v1/csv"):
            self._discard_body()
            self._error(404, "not found", f"no such endpoint: {url.path[:100]}")
            return
        if not app.authorized(self.headers, query):
            app.count(counters.HTTP_UNAUTHORIZED)
            self._discard_body()
            self._error(401, "unauthorized", "unauthorized access")
            return
        if not self._take_slot():
            return
        try:
            body = self._read_body()
        except BodyError as exc:
            app.count(counters.HTTP_REFUSED_BODY)
            self.close_connection = True
            self._error(
                exc.status, "invalid" if exc.status != 413 else "request too large", str(exc)
            )
            return
        if not body and url.path in WRITE_PATHS:
            app.count(counters.HTTP_EMPTY_WRITES)
            self._reply(204)  # as InfluxDB 1.x answers an empty write
            return
        try:
            with app.decoding:
                now = app.intake.stamp_ns()
                source, item = app.decode(url.path, query, body, now)
                where = f"http {url.path}?{redact(url.query)}"[:1024]  # no token kept
                arrival = Arrival(where, body, source, item)
                outcome = app.intake.commit_now(arrival)
        except (sqlite3.Error, StorageError) as exc:
            app.count(counters.HTTP_STORE_UNAVAILABLE)
            log.error("http: the buffer cannot take a body now (%s); answered 503", exc)
            self._error(503, "unavailable", "the buffer cannot take writes now", Retry_After="1")
            return
        self._answer(item, outcome)

    def _answer(self, item: Decoded | WireError, outcome: Outcome) -> None:
        if isinstance(item, WireError):
            self._error(400, "invalid", str(item))
        elif item.rejected:
            first = item.rejects[0] if item.rejects else None
            why = f"; the first: {first.reason}: {first.message}" if first else ""
            self._error(
                400,
                "invalid",
                f"partial write: {outcome.stored} readings stored, lines or rows "
                f"quarantined: {item.rejected}{why}",
            )
        else:
            self._reply(204)

    def _query(self, query_string: str, body: bytes | None) -> None:
        """``/query`` (GET: ``body`` b""; POST: None, read here): ``q`` from the URL or
        a form body, as InfluxDB 1.x takes it."""
        app = self.server.app
        try:
            params = urllib.parse.parse_qs(query_string, max_num_fields=MAX_PARAMS)
            if body is None:
                body = b""
                ctype = self.headers.get("Content-Type", "").lower()
                length = self.headers.get("Content-Length", "0")
                if not length.isdigit() or int(length) > influxquery.MAX_QUERY * 2:
                    raise ValueError("a /query body over 8 KiB")
                body = self.rfile.read(int(length))
                if ctype.startswith("application/x-www-form-urlencoded"):
                    form = urllib.parse.parse_qs(body.decode("utf-8"), max_num_fields=MAX_PARAMS)
                    params = {**form, **params}
        except (ValueError, UnicodeDecodeError) as exc:
            self.close_connection = True
            self._error(400, "invalid", str(exc)[:200])
            return
        if not app.authorized(self.headers, params):
            app.count(counters.HTTP_UNAUTHORIZED)
            self._error(401, "unauthorized", "unauthorized access")
            return
        status, answer = influxquery.answer(params.get("q", [""])[0], app.databases)
        app.count(counters.HTTP_QUERIES)
        self._reply(status, answer)

    def _discard_body(self) -> None:
        self.close_connection = True

    def _read_body(self) -> bytes:
        limit = self.server.app.cfg.max_body_bytes
        te = self.headers.get("Transfer-Encoding", "").lower()
        if te == "chunked":
            raw = self._read_chunked(limit)
        elif te:
            raise BodyError(501, f"Transfer-Encoding {te[:40]!r} is not supported")
        else:
            length = self.headers.get("Content-Length")
            if length is None:
                raise BodyError(411, "a Content-Length (or chunked encoding) is needed")
            if not length.isdigit() or len(length) > 12:
                raise BodyError(400, "a bad Content-Length")
            if int(length) > limit:
                raise BodyError(413, f"a body of {length} bytes, limit {limit}")
            raw = self.rfile.read(int(length))
            if len(raw) != int(length):
                raise BodyError(400, "the body ended early")
        enc = self.headers.get("Content-Encoding", "identity").lower().strip()
        if enc in ("", "identity"):
            return raw
        if enc != "gzip":
            raise BodyError(415, f"Content-Encoding {enc[:40]!r}: identity or gzip")
        return gunzip(raw, limit)

    def _read_chunked(self, limit: int) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(CHUNK_LINE_MAX)
            if not line.endswith(b"\n"):
                raise BodyError(400, "a bad chunk header")
            size_text = line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise BodyError(400, "a bad chunk size") from None
            if size < 0:
                raise BodyError(400, "a bad chunk size")
            if size == 0:
                while self.rfile.readline(CHUNK_LINE_MAX) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(parts)
            total += size
            if total > limit:
                raise BodyError(413, f"a body over {limit} bytes")
            data = self.rfile.read(size)
            if len(data) != size:
                raise BodyError(400, "the body ended early")
            parts.append(data)
            self.rfile.readline(CHUNK_LINE_MAX)
