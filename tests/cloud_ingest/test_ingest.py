"""The ingest service against a real broker, InfluxDB 1.x and a local archive.

Valid batches land once (resends overwrite); every kind of bad input is
quarantined with its reason and does not stop the service.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import signal
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cloud_ingest.config import IngestConfig
from cloud_ingest.ingest.process import Processor
from cloud_ingest.ingest.service import serve
from cloud_ingest.lake import archived_seqs
from cloud_ingest.sinks.archive import LocalArchive
from devstack import influxq
from devstack.pipeline import BIN, toml_dumps
from devstack.publish import publish_all
from devstack.services import Service, free_port, wait_until
from shared.acks import Ack, decode_ack
from shared.config import from_dict
from shared.wire import STAT_FIELDS, SensorRef, WindowSpec, encode_batch, make_batch

pytestmark = pytest.mark.integration
W = 10_000_000_000
T0 = 1_790_000_000 * 10**9


def batch_bytes(device: str, seq: int, rows: int = 3) -> bytes:
    b = make_batch(
        device_id=device,
        seq=seq,
        created_ns=0,
        window=WindowSpec("tumbling", W),
        sensors=(SensorRef("n1", "temp", "degC"),),
        columns={
            "sensor": np.zeros(rows),
            "start_ns": T0 + (seq * rows + np.arange(rows)) * W,
            "count": np.full(rows, 10),
            "invalid": np.zeros(rows),
            **{f: np.random.default_rng(seq).normal(20, 1, rows) for f in STAT_FIELDS},
        },
    )
    return encode_batch(b)


class Running:
    """cloud_ingest.ingest.service.serve() in a background thread with its own event loop."""

    def __init__(self, cfg: IngestConfig, ready: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.stop = asyncio.Event()
        self.result: Processor | None = None
        self.thread = threading.Thread(target=self._run, args=(cfg, ready), daemon=True)
        self.thread.start()
        wait_until(ready.exists, 30, "the ingestor to subscribe")

    def _run(self, cfg: IngestConfig, ready: Path) -> None:
        async def main() -> None:
            self.stop = asyncio.Event()
            self.result = await serve(cfg, self.stop, str(ready))

        try:
            self.loop.run_until_complete(main())
        finally:
            self.loop.close()

    def shutdown(self) -> Processor:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(30)
        assert not self.thread.is_alive() and self.result is not None
        return self.result


class AckCollector:
    """Subscribes to ack topics and keeps what arrives, as (topic, Ack)."""

    def __init__(self, port: int, topic_filter: str) -> None:
        self.got: list[tuple[str, Ack]] = []
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5
        )
        self.client.on_message = lambda _c, _u, m: self.got.append((m.topic, decode_ack(m.payload)))
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(topic_filter, qos=1)
        self.client.loop_start()
        wait_until(self.client.is_connected, 10, "the ack collector to connect")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def ingest_config(
    port: int, unique: str, influx: dict[str, object], archive: Path, **extra: dict[str, object]
) -> IngestConfig:
    mqtt_table = {"port": port, "client_id": f"ingest-{unique}", "topic_prefix": f"t{unique}/v1"}
    return from_dict(
        IngestConfig,
        {"mqtt": mqtt_table, "influx": influx, "archive": {"url": f"file://{archive}"}, **extra},
    )


def test_valid_once_bad_quarantined(
    mosquitto: Service, influxdb: Service, influx_db: str, tmp_path: Path, unique: str
) -> None:
    prefix = f"t{unique}/v1"
    archive = tmp_path / "archive"
    cfg = ingest_config(
        mosquitto.port,
        unique,
        {"url": influxdb.url, "database": influx_db},
        archive,
        limits={"max_payload_bytes": 2048},
        http={"listen": f"127.0.0.1:{(http_port := free_port())}"},
    )
    acks = AckCollector(mosquitto.port, f"{prefix}/+/ack")
    svc = Running(cfg, tmp_path / "ready")
    sends = [
        (f"{prefix}/dev-1/batch", batch_bytes("dev-1", 1)),
        (f"{prefix}/dev-1/batch", batch_bytes("dev-1", 1)),  # resend of seq 1
        (f"{prefix}/dev-1/batch", b"garbage, not a batch"),  # bad-magic
        (f"{prefix}/dev-2/batch", batch_bytes("dev-1", 2)),  # device-mismatch
        (f"{prefix}/dev-1/batch", batch_bytes("dev-1", 3, rows=400)),  # too-large
        (f"{prefix}/bad id/batch", batch_bytes("dev-1", 4)),  # bad-topic
        (f"{prefix}/dev-1/batch", batch_bytes("dev-1", 2)),  # valid after all that
    ]
    publish_all(mosquitto.port, sends)

    def quarantined() -> set[str]:
        q = archive / "quarantine"
        return {p.parent.name for p in q.rglob("*.json")} if q.exists() else set()

    expected = {
        "reason=bad-magic",
        "reason=device-mismatch",
        "reason=too-large",
        "reason=bad-topic",
    }
    wait_until(
        lambda: (
            quarantined() == expected
            and len(influxq.v1_windows(influxdb.url, influx_db)) == 6
            and len(acks.got) == 5
        ),
        30,
        "all messages handled",
    )
    # operability: /healthz while subscribed, /metrics with every counter
    base = f"http://127.0.0.1:{http_port}"
    with urllib.request.urlopen(f"{base}/healthz", timeout=5) as resp:
        assert resp.status == 200
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as resp:
        metrics = resp.read().decode()
    assert 'cloud_ingest_events_total{event="batches_written"} 2.0' in metrics
    assert 'cloud_ingest_events_total{event="duplicates"} 1.0' in metrics
    assert 'cloud_ingest_quarantined_total{reason="bad-magic"} 1.0' in metrics
    # one observation per write request (the two batches may have shared one)
    assert re.search(r'cloud_ingest_sink_seconds_count\{sink="influx"\} [12]\.0', metrics)
    assert "cloud_ingest_up 1.0" in metrics
    proc = svc.shutdown()
    acks.close()
    # stored for seq 1 (twice: the resend is answered at once) and 2; rejected where the
    # seq could be read; no ack where not even the topic's device is valid or the bytes
    # are not a batch
    # each ack carries the ingestor's clock (for the device's clock offset)
    assert all(abs(a.ts_ns - time.time_ns()) < 300 * 10**9 for _, a in acks.got)
    assert Counter((t, dataclasses.replace(a, ts_ns=0)) for t, a in acks.got) == Counter(
        [
            (f"{prefix}/dev-1/ack", Ack(1, "stored")),
            (f"{prefix}/dev-1/ack", Ack(1, "stored")),
            (f"{prefix}/dev-1/ack", Ack(2, "stored")),
            (f"{prefix}/dev-1/ack", Ack(3, "rejected", "too-large")),
            (f"{prefix}/dev-2/ack", Ack(2, "rejected", "device-mismatch")),
        ]
    )
    windows = influxq.v1_windows(influxdb.url, influx_db)
    assert len(windows) == 6 and influxq.total_count(windows) == 60
    # the resend of seq 1 overwrote its points with identical values
    assert {w["mean"] for w in windows.values()} <= set(
        np.random.default_rng(1).normal(20, 1, 3).tolist()
        + np.random.default_rng(2).normal(20, 1, 3).tolist()
    )
    assert archived_seqs(LocalArchive(archive)) == {"dev-1": {1, 2}}
    meta = [json.loads(p.read_text()) for p in (archive / "quarantine").rglob("*.json")]
    assert {m["reason"] for m in meta} == {r.split("=")[1] for r in expected}
    assert all(m["topic"] and m["message"] for m in meta)
    counters = proc.stats.counters
    assert counters["received"] == 7 and counters["batches_written"] == 2
    assert counters["duplicates"] == 1
    assert sum(v for k, v in counters.items() if k.startswith("quarantined_")) == 4


def test_influx_outage_blocks_and_recovers(
    mosquitto: Service,
    fresh: Callable[[str], Service],
    tmp_path: Path,
    unique: str,
) -> None:
    """While InfluxDB is down the batch is retried, not dropped; it lands after restart."""
    influx: Service = fresh("influxdb")
    influxq.create_database(influx.url, "t")
    prefix = f"t{unique}/v1"
    cfg = ingest_config(
        mosquitto.port,
        unique,
        {"url": influx.url, "database": "t", "timeout_s": 2.0},
        tmp_path / "archive",
        retry={"initial_s": 0.1, "max_s": 0.5},
    )
    svc = Running(cfg, tmp_path / "ready")
    influx.stop()
    batches = [(f"{prefix}/dev-1/batch", batch_bytes("dev-1", s)) for s in (1, 2)]
    publish_all(mosquitto.port, batches)
    archived = tmp_path / "archive" / "aggregates"
    wait_until(archived.exists, 30, "the archive write (independent of InfluxDB)")
    influx.start()
    wait_until(lambda: len(influxq.v1_windows(influx.url, "t")) == 6, 60, "InfluxDB to catch up")
    proc = svc.shutdown()
    assert proc.stats.counters["influx_retries"] >= 1
    assert proc.stats.counters["batches_written"] == 2


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
    return 0.0


def test_backpressure_the_broker_holds_what_cannot_be_written(
    mosquitto: Service, fresh: Callable[[str], Service], tmp_path: Path, unique: str
) -> None:
    """InfluxDB down, Receive Maximum 3: the ingestor holds at most 3 batches (one of a
    device in its retry loop, the next ones of that device waiting for it); the broker
    keeps the other 9. Nothing is acknowledged until written, and all 12 land once
    InfluxDB is back."""
    influx: Service = fresh("influxdb")
    influxq.create_database(influx.url, "t")
    prefix = f"t{unique}/v1"
    port = free_port()
    cfg = ingest_config(
        mosquitto.port,
        unique,
        {"url": influx.url, "database": "t", "timeout_s": 1.0},
        tmp_path / "archive",
        retry={"initial_s": 0.05, "max_s": 0.2},
        http={"listen": f"127.0.0.1:{port}"},
    )
    cfg = dataclasses.replace(cfg, mqtt=dataclasses.replace(cfg.mqtt, receive_maximum=3))
    svc = Running(cfg, tmp_path / "ready")
    influx.stop()
    publish_all(
        mosquitto.port, [(f"{prefix}/dev-1/batch", batch_bytes("dev-1", s)) for s in range(1, 13)]
    )

    def held() -> float:
        return metric(port, "cloud_ingest_queue_depth")

    wait_until(lambda: held() >= 3, 30, "three batches to reach the ingestor")
    # let the retry loop turn many times: more would have arrived if the broker sent them
    wait_until(
        lambda: metric(port, 'cloud_ingest_events_total{event="influx_retries"}') >= 20,
        30,
        "twenty retries against the stopped InfluxDB",
    )
    assert held() == 3
    influx.start()
    wait_until(
        lambda: metric(port, 'cloud_ingest_events_total{event="batches_written"}') == 12,
        60,
        "all 12 batches written",
    )
    proc = svc.shutdown()
    assert proc.stats.counters["received"] == 12
    assert len(influxq.v1_windows(influx.url, "t")) == 36


def test_never_more_than_receive_maximum_in_hand(
    mosquitto: Service, influxdb: Service, influx_db: str, tmp_path: Path, unique: str
) -> None:
    """A backlog of 60 batches with Receive Maximum 4: however many the broker sends
    at once (Mosquitto 2.0.11 sends more than 4 once PUBACKs flow), no group takes
    more than 4 and all 60 are written once."""
    prefix = f"t{unique}/v1"
    port = free_port()
    cfg = ingest_config(
        mosquitto.port,
        unique,
        {"url": influxdb.url, "database": influx_db},
        tmp_path / "archive",
        http={"listen": f"127.0.0.1:{port}"},
    )
    cfg = dataclasses.replace(cfg, mqtt=dataclasses.replace(cfg.mqtt, receive_maximum=4))
    Running(cfg, tmp_path / "ready-1").shutdown()  # the persistent session exists now
    publish_all(
        mosquitto.port, [(f"{prefix}/dev-1/batch", batch_bytes("dev-1", s)) for s in range(1, 61)]
    )
    svc = Running(cfg, tmp_path / "ready-2")
    wait_until(
        lambda: metric(port, 'cloud_ingest_events_total{event="batches_written"}') == 60,
        60,
        "the 60 batches written",
    )
    groups = metric(port, "cloud_ingest_group_messages_count")
    assert metric(port, 'cloud_ingest_group_messages_bucket{le="4.0"}') == groups >= 15
    assert metric(port, "cloud_ingest_in_hand") == 0
    proc = svc.shutdown()
    assert proc.stats.counters["received"] == 60 and proc.stats.counters["duplicates"] == 0
    assert len(influxq.v1_windows(influxdb.url, influx_db)) == 180


def test_json_logs_are_one_object_per_line_with_fields(
    mosquitto: Service, influxdb: Service, influx_db: str, tmp_path: Path, unique: str
) -> None:
    """``log_format = "json"``: the running command logs JSON Lines, and a quarantine
    record carries its reason and topic as keys of their own."""
    prefix = f"t{unique}/v1"
    cfg = tmp_path / "ingest.toml"
    cfg.write_text(
        toml_dumps(
            {
                "log_format": "json",
                "mqtt": {"port": mosquitto.port, "client_id": f"j{unique}", "topic_prefix": prefix},
                "influx": {"url": influxdb.url, "database": influx_db},
                "archive": {"url": f"file://{tmp_path / 'archive'}"},
            }
        )
    )
    ready, log = tmp_path / "ready", tmp_path / "ingest.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [str(BIN / "cloud-ingest"), "run", "-c", str(cfg), "--ready-file", str(ready)],
            stderr=fh,
        )
    try:
        wait_until(ready.exists, 30, "the ingestor to subscribe")
        publish_all(mosquitto.port, [(f"{prefix}/dev-1/batch", b"not a batch")])
        wait_until(lambda: b"quarantine" in log.read_bytes(), 30, "the quarantine log record")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert {"ts", "level", "logger", "msg"} <= set(records[0])
    (q,) = [r for r in records if r["msg"].startswith("quarantine")]
    assert q["level"] == "WARNING" and q["reason"] == "bad-magic"
    assert q["topic"] == f"{prefix}/dev-1/batch"


def test_a_dead_metrics_thread_stops_the_ingestor() -> None:
    """No silent death: the watcher sees the HTTP server's thread end and stops the
    service, which then exits 1 (run_service) for its manager to restart it."""
    from cloud_ingest.ingest.metrics import Liveness, MetricsServer
    from cloud_ingest.ingest.service import _watch_threads
    from cloud_ingest.ingest.writer import Stats

    metrics = MetricsServer(f"127.0.0.1:{free_port()}", Stats(), Liveness()).start()
    died: list[str] = []

    async def main() -> bool:
        stop = asyncio.Event()
        watcher = asyncio.create_task(_watch_threads(metrics, stop, died))
        await asyncio.sleep(0)
        metrics.server.shutdown()  # its thread ends, as if it had died
        await asyncio.wait_for(watcher, 10)
        return stop.is_set()

    try:
        assert asyncio.run(main()) is True
    finally:
        metrics.server.server_close()
    assert died == ["metrics-http"]


def test_device_acks_awaiting_the_brokers_puback_are_bounded(mosquitto: Service) -> None:
    """paho queues what it cannot send yet without a limit, and its message ids wrap
    at 65,535: under a flood (a fuzz soak) the acks awaiting the broker's PUBACK grew
    until publishing failed. At most MAX_ACKS_PENDING wait; the rest are not sent
    (the device's resend is answered). Here the PUBACKs are left unread."""
    from cloud_ingest.ingest.mqttclient import IngestClient

    cfg = from_dict(
        IngestConfig,
        {"mqtt": {"port": mosquitto.port, "client_id": "acks-bound", "receive_maximum": 2}},
    )

    async def main() -> tuple[list[bool], int]:
        async with IngestClient(cfg, 2) as client:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while client._fd < 0:  # the reader is put in place on the loop
                assert loop.time() < deadline, "the client did not take over its socket"
                await asyncio.sleep(0.01)
            loop.remove_reader(client._fd)  # the broker's PUBACKs stay unread
            client.max_acks_pending = 8  # MAX_ACKS_PENDING, made small
            sent = [client.tell("telemetry/v1/d/ack", b"{}") for _ in range(12)]
            return sent, client.acks_pending

    sent, pending = asyncio.run(main())
    assert sent == [True] * 8 + [False] * 4 and pending == 8
