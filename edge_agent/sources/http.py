"""The HTTP intake: InfluxDB's write endpoints (and JSON and CSV) on the device.

Endpoints (``[intake.http]``):

* ``POST /write`` (InfluxDB 1.x) and ``POST /api/v2/write`` (2.x): line protocol,
  ``?precision=`` ns/us/ms/s (1.x: n/u/ms/s), gzip bodies, as Telegraf's
  ``outputs.influxdb``/``influxdb_v2``, every InfluxDB client library and Node-RED
  send them; ``db``, ``bucket``, ``org`` and ``rp`` are accepted and ignored;
* ``POST /api/v1/json?node=N``: a JSON object, read as the ``json`` format reads it;
* ``POST /api/v1/csv?node=N&sensor=S``: CSV, read as the ``csv`` format reads it
  (``?precision=s`` etc. for epoch times, else ``[intake.http] time_format``);
* ``GET /ping`` (204) and ``GET /health`` (200), as InfluxDB answers them.

A write is answered **204 only after its readings are committed** to the buffer
(one transaction per body, :meth:`edge_agent.pipeline.intake.Intake.commit_now`). Lines
that cannot be read are quarantined and the others stored; the answer is then
400 with ``partial write: …``, as InfluxDB answers, so that a client does not
send the body again. A body that cannot be read at all is quarantined and
answered 400. When the buffer cannot take the body the answer is 503 with
``Retry-After``, and nothing of it is kept: the client sends it again.

Bounded: at most ``max_connections`` requests are served at once (more get 503),
a body over ``max_body_bytes`` (also after gzip) gets 413, two bodies at most are
decoded and committed at once, and a client that sends nothing for ``timeout_s``
is disconnected.
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
import threading
import time
import urllib.parse
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from edge_agent.pipeline.intake import Arrival, Intake, Outcome
from edge_agent.sources import csvrows
from edge_agent.sources.config import HttpConfig, SourceConfig
from edge_agent.sources.contract import Decoded, guard
from edge_agent.sources.counts import PendingCounts
from edge_agent.sources.jsonfields import decoder as json_decoder
from edge_agent.sources.lineproto import PRECISIONS, LineDecoder
from edge_agent.sources.naming import joined
from edge_agent.sources.transform import Transforms
from shared.errors import StorageError, TelemetryError, WireError

log = logging.getLogger("edge_agent.http")

VERSION = "edge-agent"  # X-Influxdb-Version: clients only check that it is there
WRITE_PATHS = {"/write": "http-v1", "/api/v2/write": "http-v2"}
CHUNK_LINE_MAX = 1024


class ListenError(TelemetryError):
    """The HTTP intake cannot listen where its config says (a port in use)."""


class BodyError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr: tuple[str, int], handler: type[_Handler], intake: HttpIntake) -> None:
        self.app = intake
        self.slots = threading.BoundedSemaphore(intake.cfg.max_connections)
        family = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
        self.address_family = family
        super().__init__(addr, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.app.count("http_refused_busy")
            with contextlib.suppress(OSError):
                request.sendall(
                    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n"
                    b"Content-Length: 0\r\nConnection: close\r\n\r\n"
                )
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
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
            max_bytes=cfg.max_body_bytes,
        )
        self.json_src = cfg.source("json", "http-json")
        self.csv_src = cfg.source("csv", "http-csv")
        self.transforms: Transforms = transforms
        self.counts = PendingCounts()
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
        self.thread.start()
        log.info("http: serving InfluxDB-compatible writes on %s:%d", self.cfg.host, self.port)

    def stop(self) -> None:
        if self.thread.is_alive():
            self.server.shutdown()
        self.server.server_close()

    def count(self, name: str) -> None:
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
                if precision not in PRECISIONS:
                    raise WireError(
                        "bad-precision", f"precision {precision[:20]!r}: use ns, us, ms or s"
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
                if unit is None:
                    raise WireError("bad-precision", "precision: use ns, us, ms or s")
                src = dataclasses.replace(src, time_format=unit)  # type: ignore[arg-type]
                setting = "the precision parameter"

            def rows(_t: str, b: bytes, n: int) -> Decoded:
                return csvrows.decode_rows(src, self.transforms, node, sensor, b, n, setting)

            return "http-csv", guard(rows)("", body, now_ns)
        except WireError as exc:
            return (WRITE_PATHS.get(path, "http-" + path.rsplit("/", 1)[-1]), exc)
        except Exception as exc:  # noqa: BLE001 (a decoder bug: quarantined, not a dead thread)
            return "http", WireError("undecodable", f"{type(exc).__name__}: {exc}"[:500])


def _with_node(src: SourceConfig, node: str) -> SourceConfig:
    return dataclasses.replace(src, node=node, topic="http")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    server_version = "edge-agent"

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.app.cfg.timeout_s)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http: %s " + format, self.client_address[0], *args)

    # -- replies

    def _reply(self, status: int, body: dict[str, Any] | None = None, **headers: str) -> None:
        data = json.dumps(body).encode() if body is not None else b""
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
        path = urllib.parse.urlsplit(self.path).path
        if path == "/ping":
            self._reply(204)
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
        app = self.server.app
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query, max_num_fields=20)
        if url.path not in (*WRITE_PATHS, "/api/v1/json", "/api/v1/csv"):
            self._discard_body()
            self._error(404, "not found", f"no such endpoint: {url.path[:100]}")
            return
        if not app.authorized(self.headers, query):
            app.count("http_unauthorized")
            self._discard_body()
            self._error(401, "unauthorized", "unauthorized access")
            return
        try:
            body = self._read_body()
        except BodyError as exc:
            app.count("http_refused_body")
            self.close_connection = True
            self._error(
                exc.status, "invalid" if exc.status != 413 else "request too large", str(exc)
            )
            return
        try:
            with app.decoding:
                now = time.time_ns()
                source, item = app.decode(url.path, query, body, now)
                arrival = Arrival(f"http {url.path}?{url.query}"[:1024], body, source, item)
                outcome = app.intake.commit_now(arrival)
        except (sqlite3.Error, StorageError) as exc:
            app.count("http_store_unavailable")
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
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            out = d.decompress(raw, limit + 1)
        except zlib.error as exc:
            raise BodyError(400, f"not gzip: {exc}") from None
        if len(out) > limit or d.unconsumed_tail:
            raise BodyError(413, f"the body is over {limit} bytes after gzip")
        return out

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
