"""The forwarder's publishing decisions, with a fake MQTT client injected
(the broker itself is exercised by the integration tests)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

from edge_agent.config import AgentConfig
from edge_agent.pipeline import buffer, window
from edge_agent.pipeline.forward import Forwarder
from edge_agent.store import Store
from shared.config import from_dict
from shared.readings import ReadingChunk

W = 10_000_000_000
T0 = 1_800_000_000 * 10**9


@dataclass
class Info:
    mid: int
    rc: int = mqtt.MQTT_ERR_SUCCESS


@dataclass
class FakeClient:
    published: list[tuple[str, bytes]] = field(default_factory=list)
    mids: Any = field(default_factory=lambda: itertools.count(1))

    def publish(self, topic: str, payload: bytes, qos: int = 0, properties: Any = None) -> Info:
        self.published.append((topic, payload))
        return Info(next(self.mids))

    def max_inflight_messages_set(self, n: int) -> None:
        pass


def forwarder(
    tmp_path: Path, live_batches: int, old_batches: int, **forward: Any
) -> tuple[Forwarder, FakeClient]:
    cfg = from_dict(
        AgentConfig, {"storage": {"path": str(tmp_path / "a.sqlite")}, "forward": forward}
    )
    s = Store(cfg.storage.path)
    reg = buffer.SensorRegistry(s)
    n = live_batches + old_batches
    for k in range(n):
        buffer.store_chunk(
            s,
            reg,
            ReadingChunk(
                "n", "s", "u", np.array([T0 + k * W]), np.random.default_rng(k).normal(size=1)
            ),
        )
    window.close_until(s, device_id="d", width_ns=W, upto_ns=T0 + n * W, max_rows=1)
    s.conn.execute("UPDATE outbox SET created_ns = 0 WHERE seq <= ?", (old_batches,))
    fake = FakeClient()
    fwd = Forwarder(cfg, s, client=fake)  # type: ignore[arg-type]
    fwd.connected.set()
    return fwd, fake


def test_live_first_and_backfill_capped_in_bytes_per_second(tmp_path: Path) -> None:
    fwd, fake = forwarder(tmp_path, live_batches=3, old_batches=5, backfill_bytes_per_s=100)
    fwd.pump()
    # the 3 live batches all go; of the backfill only what one second's budget allows
    assert len(fake.published) == 4
    assert list(fwd._in_flight.values()) == [6, 7, 8, 1]  # live first, then the oldest
    fwd.pump()  # no time has passed: the budget is spent, nothing more goes
    assert len(fake.published) == 4


def test_no_cap_and_in_flight_limit(tmp_path: Path) -> None:
    fwd, fake = forwarder(tmp_path, live_batches=0, old_batches=10, max_in_flight=4)
    fwd.pump()
    assert sorted(fwd._in_flight.values()) == [1, 2, 3, 4]  # oldest first, 4 at a time
    fwd.pump()
    assert len(fake.published) == 4  # none acked yet: still 4 in flight


def test_a_batch_damaged_on_disk_is_dropped_and_counted_not_sent(tmp_path: Path) -> None:
    fwd, fake = forwarder(tmp_path, live_batches=0, old_batches=3)
    s = fwd.store
    (payload,) = s.conn.execute("SELECT payload FROM outbox WHERE seq = 2").fetchone()
    damaged = bytearray(payload)
    damaged[len(damaged) // 2] ^= 0x04  # one bit of rot on the SD card
    s.conn.execute("UPDATE outbox SET payload = ? WHERE seq = 2", (bytes(damaged),))
    fwd.pump()
    assert sorted(fwd._in_flight.values()) == [1, 3]
    assert all(p != bytes(damaged) for _, p in fake.published)
    assert s.conn.execute("SELECT count(*) FROM outbox WHERE seq = 2").fetchone()[0] == 0
    assert s.counters()["dropped_damaged_batches"] == 1


def test_each_batch_goes_to_the_topic_of_its_wire_version(tmp_path: Path) -> None:
    """forward.wire_version = 2: batches of v2 on telemetry/v2 (docs/wire-format.md
    §2.6, §2.14). The version is each payload's: batches closed before a change of
    the setting still go to v1's topic."""
    from shared.wire import decode_batch

    cfg = from_dict(
        AgentConfig,
        {"device_id": "pi-1", "storage": {"path": str(tmp_path / "a.sqlite")},
         "forward": {"wire_version": 2}},
    )  # fmt: skip
    s = Store(cfg.storage.path)
    reg = buffer.SensorRegistry(s)
    for k in range(4):
        values = np.round(np.random.default_rng(k).normal(20, 1, 5) * 16) / 16
        ts = T0 + k * W + np.arange(5, dtype=np.int64) * 10**9
        buffer.store_chunk(s, reg, ReadingChunk("n", "s", "u", ts, values))
    for k, version in ((1, 1), (2, 1), (3, 2), (4, 2)):  # the setting changes after two
        limits = window.Limits(100, wire_version=version)
        window.close_until(s, device_id="pi-1", width_ns=W, upto_ns=T0 + k * W, max_rows=limits)
    fake = FakeClient()
    fwd = Forwarder(cfg, s, client=fake)  # type: ignore[arg-type]
    fwd.connected.set()
    fwd.pump()
    topics = [t for t, _ in fake.published]
    assert topics == ["telemetry/v1/pi-1/batch"] * 2 + ["telemetry/v2/pi-1/batch"] * 2
    for topic, payload in fake.published:
        version = 2 if "/v2/" in topic else 1
        assert payload[4] == version
        b = decode_batch(payload, versions=(version,))
        assert b.count.tolist() == [5] and b.mean[0] == b.sum[0] / 5
