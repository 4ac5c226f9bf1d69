"""A fleet of devices at the wire level: batches with correct (device_id, seq)
sequences, published to the cloud broker, with the cloud's acks consumed.

This is the load generator for cloud ingest. It does not run N edge agents: it
builds each device's batches the way an agent would (one tumbling window per
sensor per batch, with count, sum, min, max, mean, stddev, first, last, exact
p50/p90/p99 and a DDSketch; readings at the resolution of the part each sensor
stands for, firmware_sim/parts.py), all before the clock starts, then publishes them on
a schedule over one MQTT v5 connection. Like an agent, it resends a batch that
has no ack after ``ack_timeout_s``, and it keeps at most ``max_in_flight``
batches unacknowledged.

Ground truth: one JSON line per batch, ``{"device_id", "seq", "start_ns",
"width_ns", "node", "sensors", "counts"}``, where ``counts[i]`` is the number of readings
in the window of ``sensors[i]``. A test sums them and compares with InfluxDB.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from firmware_sim.parts import PARTS, quantize
from firmware_sim.sensors import signal
from shared import backoff
from shared.acks import decode_ack
from shared.auth import AuthConfig, apply_paho
from shared.errors import WireError
from shared.mqttprops import publish_properties
from shared.sketch import DDSketch
from shared.tls import TlsConfig, ssl_context
from shared.topics import DEFAULT_BATCH_PREFIX, DEFAULT_BATCH_PREFIX_V2, ack_topic, batch_topic
from shared.wire import (
    CONTENT_TYPE,
    CONTENT_TYPE_V2,
    FORMAT_VERSION,
    SensorRef,
    WindowSpec,
    encode_batch,
    make_batch,
)

log = logging.getLogger(__name__)
NODE = "n1"  # every simulated device has its sensors on one node
#: the fleet's sensors take these kinds in turn (firmware_sim/parts.py)
FLEET_KINDS = ("temperature", "humidity", "pressure", "adc", "vibration")


@dataclass(frozen=True)
class FleetSpec:
    devices: int
    batches: int  # per device
    sensors: int = 10
    interval_s: float = 10.0  # event time between one device's batches = window width
    speed: float = 1.0  # event seconds per wall-clock second; 0 = as fast as acks allow
    readings_per_window: int = 10
    #: unrounded Gaussian readings instead of each sensor's part resolution
    full_precision: bool = False
    #: the batches' wire format; 2 goes to prefix_v2 (docs/wire-format.md §2.14)
    wire_version: int = 1
    prefix_v2: str = DEFAULT_BATCH_PREFIX_V2
    host: str = "127.0.0.1"
    port: int = 1883
    prefix: str = DEFAULT_BATCH_PREFIX
    seed: int = 1
    start_ns: int = 0  # first window; 0 = so that the last window ends now
    max_in_flight: int = 1000
    ack_timeout_s: float = 30.0
    timeout_s: float = 600.0  # for every ack to arrive, from the first publish
    truth_path: str | None = None
    device_prefix: str = "fleet"
    client_id: str = "firmware-sim-fleet"
    reconnect_min_s: float = backoff.DEFAULT_MIN_S
    reconnect_max_s: float = backoff.DEFAULT_MAX_S
    auth: AuthConfig = field(default_factory=AuthConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)

    def __post_init__(self) -> None:
        for name in ("devices", "batches", "sensors", "readings_per_window", "max_in_flight"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.wire_version not in (1, 2):
            raise ValueError("wire_version must be 1 or 2")
        if self.interval_s <= 0 or self.speed < 0 or self.ack_timeout_s <= 0:
            raise ValueError("interval_s and ack_timeout_s must be > 0, speed >= 0")
        backoff.check(self.reconnect_min_s, self.reconnect_max_s)

    def device_id(self, i: int) -> str:
        return f"{self.device_prefix}-{i:05d}"


@dataclass
class FleetResult:
    batches: int = 0
    points: int = 0
    readings: int = 0
    payload_bytes: int = 0
    published: int = 0
    resent: int = 0
    acked: int = 0
    rejected: int = 0
    unacked: int = 0
    elapsed_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, float | int]:
        lat = np.array(self.latencies_s) if self.latencies_s else np.array([np.nan])
        return {
            "batches": self.batches,
            "points": self.points,
            "readings": self.readings,
            "payload_bytes": self.payload_bytes,
            "published": self.published,
            "resent": self.resent,
            "acked": self.acked,
            "rejected": self.rejected,
            "unacked": self.unacked,
            "elapsed_s": round(self.elapsed_s, 3),
            "points_per_s": round(self.points / self.elapsed_s, 1) if self.elapsed_s else 0.0,
            "ack_latency_p50_s": round(float(np.quantile(lat, 0.5)), 4),
            "ack_latency_p99_s": round(float(np.quantile(lat, 0.99)), 4),
        }


@dataclass
class _Pending:
    device: str
    seq: int
    payload: bytes
    first_sent: float = 0.0
    last_sent: float = 0.0


def _window_stats(v: np.ndarray) -> dict[str, float]:
    p50, p90, p99 = np.quantile(v, [0.5, 0.9, 0.99])
    return {
        "min": float(v.min()),
        "max": float(v.max()),
        "mean": float(v.mean()),
        "stddev": float(v.std()),
        "first": float(v[0]),
        "last": float(v[-1]),
        "sum": float(v.sum()),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
    }


def build_batches(spec: FleetSpec) -> tuple[list[tuple[float, _Pending]], list[dict[str, Any]]]:
    """Every batch of the fleet, with its due time (event seconds after the start)
    and its ground-truth record. Deterministic under ``spec.seed``."""
    rng = np.random.default_rng(spec.seed)
    width = int(spec.interval_s * 1e9)
    start = spec.start_ns or ((time.time_ns() // width) - spec.batches) * width
    start -= start % width
    kinds = [FLEET_KINDS[j % len(FLEET_KINDS)] for j in range(spec.sensors)]
    sensors = tuple(
        SensorRef(NODE, f"s{j:02d}", "" if spec.full_precision else PARTS[kinds[j]].unit)
        for j in range(spec.sensors)
    )
    names = [s.name for s in sensors]
    levels = rng.uniform(-20, 80, spec.sensors)
    offsets = rng.normal(0.0, 1.0, spec.sensors)  # sensors of a kind read a little apart
    work: list[tuple[float, _Pending]] = []
    truth: list[dict[str, Any]] = []
    for k in range(spec.batches):
        w_start = start + k * width
        for d in range(spec.devices):
            device = spec.device_id(d)
            counts = rng.integers(
                max(1, spec.readings_per_window // 2),
                spec.readings_per_window * 3 // 2 + 1,
                spec.sensors,
            )
            rows: dict[str, list[float]] = {}
            sketches = []
            for j in range(spec.sensors):
                n = int(counts[j])
                if spec.full_precision:
                    v = rng.normal(levels[j], 1.0 + j, n)
                else:
                    at = w_start + (np.arange(n, dtype=np.int64) * width) // n
                    v = quantize(signal(kinds[j], at, rng) + offsets[j], kinds[j])
                for name, val in _window_stats(v).items():
                    rows.setdefault(name, []).append(val)
                sketches.append(DDSketch.from_values(v).encode())
            batch = make_batch(
                device_id=device,
                seq=k + 1,
                created_ns=w_start + width,
                window=WindowSpec("tumbling", width),
                sensors=sensors,
                columns={
                    "sensor": list(range(spec.sensors)),
                    "start_ns": [w_start] * spec.sensors,
                    "count": counts,
                    "invalid": [0] * spec.sensors,
                    **rows,
                },
                sketch=tuple(sketches),
            )
            # a device's batch goes out when its window closes; devices are spread
            due = (k + 1 + d / spec.devices) * spec.interval_s
            payload = encode_batch(batch, version=spec.wire_version)
            work.append((due, _Pending(device, k + 1, payload)))
            truth.append(
                {
                    "device_id": device,
                    "seq": k + 1,
                    "start_ns": w_start,
                    "width_ns": width,
                    "node": NODE,
                    "sensors": names,
                    "counts": counts.tolist(),
                }
            )
    work.sort(key=lambda t: t[0])
    return work, truth


def read_truth(path: str | Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


class Fleet:
    def __init__(self, spec: FleetSpec) -> None:
        self.spec = spec
        self.result = FleetResult()
        self._cv = threading.Condition()
        self._pending: dict[tuple[str, int], _Pending] = {}
        self._sent_order: deque[tuple[float, _Pending]] = deque()  # (sent at, batch)
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=spec.client_id,
            protocol=mqtt.MQTTv5,
        )
        self._client.max_inflight_messages_set(min(spec.max_in_flight, 65535))
        self._client.max_queued_messages_set(0)
        backoff.set_paho(self._client, spec.reconnect_min_s, spec.reconnect_max_s)
        ctx = ssl_context(spec.tls)
        if ctx is not None:
            self._client.tls_set_context(ctx)
        apply_paho(self._client, spec.auth)
        self._client.on_message = self._on_message
        self._subscribed = threading.Event()
        self._client.on_subscribe = lambda *_a, **_k: self._subscribed.set()
        self._client.on_connect = self._on_connect

    def _on_connect(self, client: mqtt.Client, *_args: object) -> None:
        sock = client.socket()
        if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
            # acks' PUBACKs at once, not after the broker's delayed TCP ACK (~40 ms)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.subscribe(ack_topic("+", self.spec.prefix), qos=1)

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        parts = msg.topic.split("/")
        try:
            ack = decode_ack(bytes(msg.payload))
        except WireError as exc:
            log.warning("fleet: bad ack on %s: %s", msg.topic, exc)
            return
        now = time.monotonic()
        with self._cv:
            p = self._pending.pop((parts[-2], ack.seq), None)
            if p is None:
                return  # an ack for a resend we already had an ack for
            if ack.status == "stored":
                self.result.acked += 1
            else:
                self.result.rejected += 1
                log.warning("fleet: %s seq %d rejected: %s", p.device, p.seq, ack.reason)
            self.result.latencies_s.append(now - p.first_sent)
            self._cv.notify_all()

    def _publish(self, p: _Pending, now: float) -> None:
        v2 = p.payload[4:5] == b"\x02"
        self._client.publish(
            batch_topic(p.device, self.spec.prefix_v2 if v2 else self.spec.prefix),
            p.payload,
            qos=1,
            properties=publish_properties(
                CONTENT_TYPE_V2 if v2 else CONTENT_TYPE,
                [("seq", str(p.seq)), ("schema", "2" if v2 else str(FORMAT_VERSION))],
            ),
        )
        if p.first_sent == 0.0:
            p.first_sent = now
            self.result.published += 1
        else:
            self.result.resent += 1
        p.last_sent = now
        self._sent_order.append((now, p))

    def _resend_overdue(self, now: float) -> None:
        """Called with the lock held: resend batches whose ack is overdue."""
        while self._sent_order:
            sent_at, p = self._sent_order[0]
            if (p.device, p.seq) not in self._pending or p.last_sent != sent_at:
                self._sent_order.popleft()  # acked, or sent again since
                continue
            if now - sent_at < self.spec.ack_timeout_s:
                return
            self._sent_order.popleft()
            self._publish(p, now)

    def run(self) -> FleetResult:
        spec = self.spec
        work, truth = build_batches(spec)
        if spec.truth_path:
            Path(spec.truth_path).parent.mkdir(parents=True, exist_ok=True)
            with open(spec.truth_path, "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps(t) + "\n" for t in truth)
        r = self.result
        r.batches = len(work)
        r.points = len(work) * spec.sensors
        r.readings = sum(sum(t["counts"]) for t in truth)
        r.payload_bytes = sum(len(p.payload) for _, p in work)

        self._client.connect_async(spec.host, spec.port, keepalive=30)
        self._client.loop_start()
        try:
            wait_s = min(30.0, spec.timeout_s)
            if not self._subscribed.wait(wait_s):
                raise ConnectionError(
                    f"no subscription to the acks at {spec.host}:{spec.port} within {wait_s:g} s"
                )
            started = time.monotonic()
            deadline = started + spec.timeout_s
            first_due = work[0][0] if work else 0.0
            for due_event_s, p in work:
                due = started + ((due_event_s - first_due) / spec.speed if spec.speed else 0.0)
                with self._cv:
                    while True:
                        now = time.monotonic()
                        if now > deadline:
                            raise TimeoutError("the fleet's time is up before every batch was sent")
                        self._resend_overdue(now)
                        if len(self._pending) < spec.max_in_flight and now >= due:
                            break
                        wake = due if now < due else now + 0.5
                        self._cv.wait(min(wake - now, 0.5))
                    self._pending[(p.device, p.seq)] = p
                    self._publish(p, now)
            with self._cv:
                while self._pending and time.monotonic() < deadline:
                    self._resend_overdue(time.monotonic())
                    self._cv.wait(0.5)
                r.unacked = len(self._pending)
            r.elapsed_s = time.monotonic() - started
        except TimeoutError:
            with self._cv:
                r.unacked = r.batches - r.acked - r.rejected
            r.elapsed_s = time.monotonic() - started
        finally:
            self._client.disconnect()
            self._client.loop_stop()
        return r


def run_fleet(spec: FleetSpec) -> FleetResult:
    return Fleet(spec).run()
