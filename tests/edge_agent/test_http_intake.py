"""The HTTP intake with real clients: influxdb-client (the library every InfluxDB
tool is built on), plain HTTP for CSV, gzip and chunked bodies, a token, limits,
and hostile requests; the agent answers 204 only after the readings are committed."""

from __future__ import annotations

import gzip
import http.client
import json
import os
import random
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from influxdb_client import InfluxDBClient, Point, WritePrecision
from influxdb_client.client.write_api import SYNCHRONOUS
from influxdb_client.rest import ApiException

from devstack.pipeline import BIN, Pipeline, PipelineSpec, Proc
from devstack.services import Service, free_port, wait_until
from edge_agent.store import Store
from edge_agent.technician.status import read_status

pytestmark = pytest.mark.integration

TOKEN = "s3cret-token-for-tests"


class Agent:
    def __init__(self, pipe: Pipeline, proc: Proc, port: int) -> None:
        self.pipe, self.proc, self.port = pipe, proc, port

    def counters(self) -> dict[str, int]:
        return {k: int(v) for k, v in read_status(self.pipe.agent_db)["counters"].items()}

    def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, bytes, dict[str, str]]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(
                method,
                path,
                body=body,
                headers={"Authorization": f"Token {TOKEN}", **(headers or {})},
            )
            resp = conn.getresponse()
            return resp.status, resp.read(), dict(resp.getheaders())
        finally:
            conn.close()


@pytest.fixture
def agent(fresh: Callable[[str], Service], tmp_path: Path) -> Iterator[Agent]:
    broker = fresh("mosquitto")
    port = free_port()
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    os.chmod(token_file, 0o600)
    pipe = Pipeline(
        PipelineSpec(
            workdir=tmp_path / "run",
            local_port=broker.port,
            cloud_port=broker.port,
            targets=[],
            agent_tables={
                "intake": {
                    "http": {
                        "enabled": True,
                        "port": port,
                        "max_connections": 3,
                        "max_pending": 20,
                        "head_timeout_s": 2.0,
                        "max_body_bytes": 65536,
                        "timeout_s": 5.0,
                        "token_file": str(token_file),
                    }
                },
                "health": {"interval_s": 0},
                "log_level": "DEBUG",  # request lines are logged: the token must not be
            },
        )
    )
    try:
        proc = pipe.start_agent()
        yield Agent(pipe, proc, port)
        assert proc.popen.poll() is None, "the agent died"
    finally:
        pipe.stop_all()


def test_influxdb_client_writes_are_durable_when_it_returns(agent: Agent) -> None:
    now = time.time_ns()
    points = [
        Point("climate")
        .tag("host", "n1")
        .field("temperature", 21.5 + i)
        .time(now + i * 10**9, WritePrecision.NS)
        for i in range(100)
    ]
    with InfluxDBClient(url=f"http://127.0.0.1:{agent.port}", token=TOKEN, org="o") as client:
        write = client.write_api(write_options=SYNCHRONOUS)
        write.write(bucket="b", record=points)
        # no polling: the 204 came after the commit, so the file already holds them
        c = agent.counters()
        assert c["source_http-v2_readings"] == 100 and c["readings_stored"] == 100
        # the same body again (a client's retry after a lost answer) is stored once
        write.write(bucket="b", record=points)
        c = agent.counters()
        assert c["readings_stored"] == 100 and c["duplicates_ignored"] == 100
        # a bad line: InfluxDB's "partial write" 400, the good lines stored
        with pytest.raises(ApiException) as exc:
            write.write(bucket="b", record=f"m,host=n1 f=1 {now}\nm,host=n1 f=abc\n")
        assert exc.value.status == 400 and b"partial write" in exc.value.body.encode()
        assert agent.counters()["readings_stored"] == 101
    # the wrong token
    with InfluxDBClient(url=f"http://127.0.0.1:{agent.port}", token="wrong", org="o") as client:
        with pytest.raises(ApiException) as exc:
            client.write_api(write_options=SYNCHRONOUS).write(bucket="b", record="m f=1")
        assert exc.value.status == 401
    assert agent.counters()["readings_stored"] == 101


def test_csv_json_v1_gzip_and_chunked_over_plain_http(agent: Agent) -> None:
    t = time.time_ns() // 10**9
    status, body, _ = agent.request(
        "POST", "/api/v1/csv?node=logger&precision=s",
        f"ts,level,temp\n{t},1.5,9.5\n{t + 1},1.75,\n".encode(),
    )  # fmt: skip
    assert status == 204, body
    status, body, _ = agent.request(
        "POST", "/api/v1/csv?node=logger&sensor=flow&precision=s", f"{t},3.5\n".encode()
    )
    assert status == 204, body
    status, body, _ = agent.request(
        "POST", "/api/v1/json?node=plc", b'{"pressure": 2.5, "valve": "ON", "label": "x"}'
    )
    assert status == 204, body
    status, body, _ = agent.request(
        "POST", "/write?db=x&precision=ms&u=any&p=" + TOKEN, f"m,host=v1 f=1 {t}000".encode(),
        headers={"Authorization": ""},
    )  # fmt: skip
    assert status == 204, body
    status, body, _ = agent.request(
        "POST", "/api/v2/write?precision=s", gzip.compress(f"g,host=gz f=2 {t}".encode()),
        headers={"Content-Encoding": "gzip"},
    )  # fmt: skip
    assert status == 204, body
    # chunked transfer encoding, as Telegraf streams a gzip body
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
    conn.request(
        "POST",
        "/api/v2/write?precision=s",
        body=iter([f"c,host=ch f=1 {t}\n".encode(), f"c,host=ch f=2 {t + 1}\n".encode()]),
        headers={"Authorization": f"Token {TOKEN}", "Transfer-Encoding": "chunked"},
        encode_chunked=True,
    )
    resp = conn.getresponse()
    assert resp.status == 204, resp.read()
    conn.close()
    c = agent.counters()
    assert c["source_http-csv_readings"] == 4
    assert c["source_http-json_readings"] == 2
    assert c["source_http-v1_readings"] == 1
    assert c["source_http-v2_readings"] == 3
    assert c["readings_stored"] == 10


def curl(agent: Agent, *args: str, stdin: bytes | None = None) -> tuple[int, bytes]:
    """(HTTP status, body) of a curl request to the agent, with its token."""
    res = subprocess.run(
        ["curl", "-sS", "-o", "-", "-w", "\n%{http_code}", "-H", f"Authorization: Token {TOKEN}",
         *(a.replace("AGENT", f"http://127.0.0.1:{agent.port}") for a in args)],
        input=stdin, capture_output=True, timeout=30, check=True,
    )  # fmt: skip
    body, _, code = res.stdout.rpartition(b"\n")
    return int(code), body


def test_influxdb_1x_compatibility_where_clients_notice(agent: Agent, tmp_path: Path) -> None:
    """What InfluxDB 1.x clients meet at start and in their writes
    (https://docs.influxdata.com/influxdb/v1/tools/api/): /query's CREATE DATABASE
    (Telegraf's outputs.influxdb sends it as a form POST) and SHOW DATABASES
    (node-influx), precisions m and h, an empty write, and a gzip body of two
    members (what `cat a.gz b.gz | curl --data-binary @-` sends)."""
    status, body = curl(agent, "-XPOST", "AGENT/query", "--data-urlencode",
                        'q=CREATE DATABASE "telegraf"')  # fmt: skip
    assert (status, json.loads(body)) == (200, {"results": [{"statement_id": 0}]})
    status, body = curl(agent, "-G", "AGENT/query", "--data-urlencode", "q=SHOW DATABASES")
    assert status == 200
    assert json.loads(body)["results"][0]["series"][0] == {
        "name": "databases", "columns": ["name"], "values": [["telegraf"]],
    }  # fmt: skip
    status, body = curl(agent, "-G", "AGENT/query", "--data-urlencode", "q=SELECT * FROM m")
    assert status == 400 and b"takes writes" in body
    t_min = time.time_ns() // (60 * 10**9)
    t_hour = time.time_ns() // (3600 * 10**9)
    assert curl(agent, "-XPOST", "AGENT/write?db=x&precision=m",
                "--data-binary", f"p,host=prec f=1 {t_min}")[0] == 204  # fmt: skip
    assert curl(agent, "-XPOST", "AGENT/write?db=x&precision=h",
                "--data-binary", f"p,host=prec g=2 {t_hour}")[0] == 204  # fmt: skip
    # 2.x takes no minutes: refused as InfluxDB 2 refuses them
    assert curl(agent, "-XPOST", "AGENT/api/v2/write?precision=m",
                "--data-binary", f"p,host=prec f=1 {t_min}")[0] == 400  # fmt: skip
    before = agent.counters()
    assert curl(agent, "-XPOST", "AGENT/write?db=x", "--data-binary", "")[0] == 204
    assert curl(agent, "-XPOST", "AGENT/api/v2/write?bucket=x", "--data-binary", "")[0] == 204
    t = time.time_ns()
    (tmp_path / "a.gz").write_bytes(gzip.compress(f"z,host=gz f=1 {t}\n".encode()))
    (tmp_path / "b.gz").write_bytes(gzip.compress(f"z,host=gz f=2 {t + 1}\n".encode()))
    both = subprocess.run(["cat", tmp_path / "a.gz", tmp_path / "b.gz"], capture_output=True,
                          check=True).stdout  # fmt: skip
    status, body = curl(agent, "-XPOST", "AGENT/write?db=x", "-H", "Content-Encoding: gzip",
                        "--data-binary", "@-", stdin=both)  # fmt: skip
    assert status == 204, body
    c = agent.counters()
    assert c["source_http-v1_readings"] - before.get("source_http-v1_readings", 0) == 2
    # request counters reach the buffer at the agent's next tick
    wait_until(lambda: agent.counters().get("http_empty_writes", 0) == 2, 10, "the count")
    store = Store(agent.pipe.agent_db, readonly=True)
    try:
        rows = store.conn.execute(
            "SELECT s.name, c.t_min FROM chunks c JOIN sensors s ON s.id = c.sensor_id "
            "WHERE s.node = 'prec' ORDER BY s.name"
        ).fetchall()
    finally:
        store.close()
    assert rows == [("p.f", t_min * 60 * 10**9), ("p.g", t_hour * 3600 * 10**9)]


def test_limits_and_hostile_requests(agent: Agent) -> None:
    # over max_body_bytes, plain and after gzip: 413, nothing kept
    status, _, _ = agent.request("POST", "/api/v2/write", b"m f=1\n" * 20000)
    assert status == 413
    bomb = gzip.compress(b"m f=1\n" * 200_000)
    status, _, _ = agent.request("POST", "/api/v2/write", bomb, {"Content-Encoding": "gzip"})
    assert status == 413
    status, _, _ = agent.request("POST", "/api/v2/write", b"x", {"Content-Encoding": "br"})
    assert status == 415
    status, _, _ = agent.request("POST", "/nowhere", b"x")
    assert status == 404
    status, _, headers = agent.request("GET", "/ping")
    assert status == 204 and "X-Influxdb-Version" in headers
    status, body, _ = agent.request("GET", "/health")
    assert status == 200 and json.loads(body)["status"] == "pass"
    status, _, _ = agent.request("POST", "/api/v2/write?precision=h", b"m f=1")
    assert status == 400
    # bodies that are not line protocol: each answered 400 and quarantined with a reason
    rng = random.Random(5)
    before = agent.counters().get("source_http-v2_rejected", 0)
    for _ in range(40):
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
        status, _, _ = agent.request("POST", "/api/v2/write", junk)
        assert status == 400
    assert agent.counters()["source_http-v2_rejected"] - before >= 40
    # raw garbage on the socket: the server answers or closes, and stays up
    for raw in (
        b"\x00\xff garbage\r\n\r\n",
        b"POST /write HTTP/1.1\r\nContent-Length: x\r\n\r\n",
        b"POST /api/v2/write HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ):
        with socket.create_connection(("127.0.0.1", agent.port), timeout=10) as s:
            s.sendall(raw)
            s.recv(4096)
    # more connections still reading their head than max_pending (20): answered 503
    idle = [socket.create_connection(("127.0.0.1", agent.port), timeout=10) for _ in range(20)]
    try:
        wait_until(lambda: busy_answer(agent.port) == 503, 10, "a 503 for the 21st connection")
    finally:
        for s in idle:
            s.close()
    wait_until(lambda: agent.request("GET", "/ping")[0] == 204, 10, "the slots to free")
    # many query parameters: 400, not a traceback
    many = "&".join(f"k{i}=v" for i in range(50))
    status, body, _ = agent.request("POST", f"/api/v2/write?{many}", b"m f=1")
    assert status == 400 and b"query parameters" in body
    assert agent.counters().get("readings_stored", 0) == 0
    log = (agent.pipe.dir / "edge-agent.log").read_text()
    assert "Traceback" not in log and "ERROR" not in log


def test_slow_and_idle_clients_do_not_stop_a_legitimate_one(agent: Agent) -> None:
    """Slowloris: 8 clients that send their request head a byte at a time (each byte
    well within the socket timeout), and 8 that connect and send nothing. None of
    them holds a request slot; each is closed at the one deadline of its head
    (head_timeout_s = 2 s), and a real client's writes go through meanwhile."""
    head = b"POST /api/v2/write HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
    slow = [socket.create_connection(("127.0.0.1", agent.port), timeout=10) for _ in range(8)]
    idle = [socket.create_connection(("127.0.0.1", agent.port), timeout=10) for _ in range(8)]
    started = time.monotonic()
    closed_at: dict[int, float] = {}
    try:
        t0 = time.time_ns() // 10**9 * 10**9
        for k in range(3):  # the legitimate client, while they hold on
            status, _, _ = agent.request(
                "POST", "/api/v2/write", f"m,host=n1 f={k} {t0 + k}".encode()
            )
            assert status == 204
        deadline = started + 15
        i = 0
        while len(closed_at) < len(slow) and time.monotonic() < deadline:
            for j, sock in enumerate(slow):  # a byte to each, every 0.2 s
                if j in closed_at:
                    continue
                try:
                    sock.sendall(head[i % len(head) : i % len(head) + 1])
                except OSError:
                    closed_at[j] = time.monotonic() - started
            i += 1
            time.sleep(0.2)  # the slowloris's own pace, bounded by the deadline above
        assert len(closed_at) == len(slow), "a byte-a-time client kept its connection"
        assert max(closed_at.values()) < 8, closed_at  # the 2 s deadline, not per byte
        for sock in idle:  # closed too: the server answers EOF
            sock.settimeout(10)
            assert sock.recv(1) == b""
    finally:
        for sock in slow + idle:
            sock.close()
    assert agent.counters()["readings_stored"] == 3


def test_the_token_is_never_kept_or_logged(agent: Agent) -> None:
    """InfluxDB 1.x clients send the password as ?p=; the quarantine keeps where a
    bad body came from, and the debug log the request line: neither the token."""
    conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
    conn.request("POST", f"/write?db=x&u=telegraf&p={TOKEN}", body=b"not line protocol")
    assert conn.getresponse().status == 400
    conn.close()
    # a client that hangs up before its body: a DEBUG line, not an ERROR traceback
    with socket.create_connection(("127.0.0.1", agent.port), timeout=10) as sock:
        sock.sendall(f"POST /write?p={TOKEN} HTTP/1.1\r\nContent-Length: 100\r\n\r\nab".encode())
    wait_until(
        lambda: agent.counters().get("source_http-v1_rejected", 0) == 1, 10, "the quarantine"
    )
    store = Store(agent.pipe.agent_db, readonly=True)
    topics = [t for (t,) in store.conn.execute("SELECT topic FROM quarantine")]
    store.close()
    assert topics and all(TOKEN not in t for t in topics), topics
    assert any("p=***" in t for t in topics)
    log = (agent.pipe.dir / "edge-agent.log").read_text()
    assert "p=***" in log and TOKEN not in log
    assert "Traceback" not in log and "ERROR" not in log


def test_a_network_listener_without_a_token_is_a_config_error(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'[storage]\npath = "{tmp_path}/b.sqlite"\n[intake.http]\nenabled = true\n'
        'host = "0.0.0.0"\n'
    )
    res = subprocess.run([str(BIN / "edge-agent"), "config", "check", str(cfg)],
                         capture_output=True, timeout=60, check=False)  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert b"intake.http.token_file" in res.stderr and str(cfg).encode() in res.stderr


def test_a_client_that_waits_for_each_reply_is_never_told_busy(agent: Agent) -> None:
    """Two slow uploads hold two of the three request slots; a client that sends
    its next write as soon as it has read a reply must always find the third free
    (the slot went back before the reply was written: a CI run once saw a 503
    here, the slot still held by the thread that had just answered)."""
    head = b"POST /api/v2/write HTTP/1.1\r\nHost: x\r\nAuthorization: Token %s\r\n" % TOKEN.encode()
    slow = [socket.create_connection(("127.0.0.1", agent.port), timeout=10) for _ in range(2)]
    try:
        for s in slow:
            s.sendall(head + b"Content-Length: 100\r\n\r\nm f=1")
        t0 = time.time_ns() // 10**9 * 10**9
        statuses = []
        for k in range(200):
            conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=10)
            try:
                conn.request("POST", "/api/v2/write", body=f"q,host=n1 f={k} {t0 + k}".encode(),
                             headers={"Authorization": f"Token {TOKEN}"})  # fmt: skip
                resp = conn.getresponse()
                resp.read()
                statuses.append(resp.status)
            finally:
                conn.close()
        assert statuses == [204] * 200
    finally:
        for s in slow:
            s.close()


def busy_answer(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/ping")
        return conn.getresponse().status
    except (ConnectionError, http.client.HTTPException):
        return 0
    finally:
        conn.close()


def test_a_port_in_use_stops_the_start_with_the_key(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = tmp_path / "agent.toml"
        cfg.write_text(
            f'[storage]\npath = "{tmp_path}/b.sqlite"\n[intake.http]\nenabled = true\n'
            f"port = {port}\n[health]\ninterval_s = 0\n"
        )
        res = subprocess.run([str(BIN / "edge-agent"), "run", "-c", str(cfg)],
                             capture_output=True, timeout=60, check=False)  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert b"intake.http" in res.stderr and b"port" in res.stderr
