"""Memory follows the transaction: a commit that fails (here SQLite's own "database or
disk is full", from ``PRAGMA max_page_count``) leaves no trace in the agent's caches or
alert state, the failure becomes a durable counter, and intake holds the messages
unacknowledged and stores them once the fault clears."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from edge_agent.config import AgentConfig
from edge_agent.counters import STORE_ERRORS
from edge_agent.pipeline import alerts, buffer
from edge_agent.pipeline.alerts import AlertEngine, AlertRule
from edge_agent.pipeline.intake import INFLIGHT_KEEP, RECEIVE_MAXIMUM, Intake
from edge_agent.store import Store
from shared.config import from_dict
from shared.readings import ReadingChunk, encode_chunk

T0 = (time.time_ns() // 10**10 - 10) * 10**10  # recent: not "from the future"
RULE = AlertRule(name="hot", sensor="n1/hot", kind="threshold", above=50.0)
NO_LIMIT = 1_073_741_823


def fill_up(store: Store) -> None:
    """No page may be added to the file: the next write that needs one fails."""
    pages = store.conn.execute("PRAGMA page_count").fetchone()[0]
    store.conn.execute(f"PRAGMA max_page_count = {pages}")


def big(sensor: str, value: float, n: int = 20_000) -> ReadingChunk:
    ts = T0 + np.arange(n, dtype=np.int64) * 1000
    return ReadingChunk("n1", sensor, "u", ts, np.full(n, value))


def test_a_rolled_back_commit_takes_the_caches_and_the_alerts_with_it(tmp_path: Path) -> None:
    s = Store(tmp_path / "a.sqlite")
    reg = buffer.SensorRegistry(s)
    engine = AlertEngine((RULE,), s)

    def hook(ts: np.ndarray, vals: np.ndarray) -> None:
        alerts.record(s, engine.evaluate(s, "n1", "hot", ts.tolist(), vals.tolist()))

    item = buffer.Incoming(big("hot", 99.0), b"digest-1", hook)
    fill_up(s)
    with pytest.raises(sqlite3.OperationalError, match="full"):
        buffer.store_many(s, reg, [item])
    # nothing of the failed transaction stays in memory ...
    assert engine.raised == set() and engine.state["hot"].prev_value is None
    assert s.unrecorded_errors == 1 and not s.conn.in_transaction
    s.conn.execute(f"PRAGMA max_page_count = {NO_LIMIT}")
    # ... so the same message, stored again once there is room, raises its alert
    res = buffer.store_many(s, reg, [item])
    assert res[0].stored == 20_000
    assert [r for (r,) in s.conn.execute("SELECT rule FROM alert_state WHERE raised = 1")] == [
        "hot"
    ]
    assert s.conn.execute("SELECT count(*) FROM alerts").fetchone()[0] == 1
    assert s.counters()[STORE_ERRORS] == 1 and s.unrecorded_errors == 0


def test_a_sensor_id_of_a_rolled_back_transaction_is_forgotten(tmp_path: Path) -> None:
    """Before: the cache kept the id of the rolled-back INSERT, and every later group of
    that sensor failed with FOREIGN KEY constraint failed until a restart."""
    s = Store(tmp_path / "a.sqlite")
    reg = buffer.SensorRegistry(s)
    fill_up(s)
    with pytest.raises(sqlite3.OperationalError):
        buffer.store_chunk(s, reg, big("new", 1.0))
    s.conn.execute(f"PRAGMA max_page_count = {NO_LIMIT}")
    assert buffer.store_chunk(s, reg, big("new", 1.0)).stored == 20_000
    assert s.conn.execute("SELECT id, name FROM sensors").fetchall() == [(1, "new")]


class FakeClient:
    """Stands in for paho behind Intake's injectable client: records PUBACKs."""

    def __init__(self) -> None:
        self.acks: list[int] = []

    def ack(self, mid: int, _qos: int) -> None:
        self.acks.append(mid)


def message(mid: int, topic: str, payload: bytes) -> mqtt.MQTTMessage:
    msg = mqtt.MQTTMessage(mid, topic.encode())
    msg.payload = payload
    msg.qos = 1
    return msg


def test_intake_holds_what_it_cannot_store_and_stores_it_once_it_can(tmp_path: Path) -> None:
    cfg = from_dict(
        AgentConfig,
        {
            "storage": {"path": str(tmp_path / "a.sqlite"), "group_commit_max": 4},
            "alerts": [{"name": "hot", "sensor": "n1/hot", "kind": "threshold", "above": 50.0}],
        },
    )
    fake = FakeClient()
    intake = Intake(cfg, client=fake)  # type: ignore[arg-type]
    try:
        hot = big("hot", 99.0)
        msgs = [
            message(1, "sensors/n1/hot", encode_chunk("u", hot.ts.tolist(), hot.values.tolist())),
            message(2, "sensors/n1/hot", b"{not json"),
            message(3, "sensors/n1/cold", encode_chunk("u", [T0 + 5], [1.0])),
        ]
        fill_up(intake.store)
        for m in msgs:
            intake._on_message(intake.client, None, m)
        intake.flush()
        assert fake.acks == [] and intake.failing  # nothing acknowledged, nothing lost
        assert intake.alerts.raised == set()
        intake.store.conn.execute(f"PRAGMA max_page_count = {NO_LIMIT}")
        deadline = time.monotonic() + 10
        while fake.acks != [1, 2, 3]:  # the next attempt after the backoff
            assert time.monotonic() < deadline, f"not stored after the fault: {fake.acks}"
            intake.flush()
            time.sleep(0.05)
        c = intake.store.counters()
        assert c["readings_stored"] == 20_001 and c["quarantined_bad-json"] == 1
        assert c[STORE_ERRORS] >= 1 and c["alerts_raised"] == 1
        assert not intake.failing
    finally:
        intake.store.close()


def test_the_buffer_and_its_wal_are_private(tmp_path: Path) -> None:
    """The buffer holds every reading of the site: 0600, and SQLite's -wal and -shm
    take the database file's mode."""
    import stat

    path = tmp_path / "buf.sqlite"
    store = Store(path)
    try:
        for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            assert p.exists(), p
            assert stat.S_IMODE(p.stat().st_mode) == 0o600, (p, oct(p.stat().st_mode))
    finally:
        store.close()


def test_the_buffer_does_not_import_pandas(tmp_path: Path) -> None:
    """sqlite-utils imports pandas wherever it is installed; the agent migrates its
    buffer with sqlite-utils, and must not carry pandas (and pyarrow) for good. A
    stand-in pandas on the path says whether anything imported it."""
    import os
    import subprocess
    import sys

    fake = tmp_path / "site" / "pandas"
    fake.mkdir(parents=True)
    marker = tmp_path / "pandas-imported"
    (fake / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}

    def buffer_code(name: str) -> str:
        return (
            "from edge_agent.store import Store\n"
            f"Store({str(tmp_path / name)!r}).close()\n"  # creates and migrates
            "import sqlite_utils.db\n"
            "assert sqlite_utils.db.pd is None\n"
        )

    subprocess.run([sys.executable, "-c", buffer_code("a.db")], env=env, check=True)
    assert not marker.exists(), "the buffer imported pandas"
    # the stand-in is what `import pandas` finds, also after the buffer hid it
    code = buffer_code("b.db") + "import pandas\n"
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    assert marker.exists()


def test_readings_follow_the_clocks_offset_to_the_cloud(tmp_path: Path) -> None:
    """An agent whose clock is an hour behind the cloud's (a Pi without a real-time
    clock, before NTP): once an ack has measured it, a reading stamped right by its
    node is taken at once, not held, and a reading without a time of its own (an
    ESPHome value) is stamped with the corrected time. Before that, the node's
    reading is held (edge_agent/pipeline/held.py), and let go when the offset is known."""
    cfg = from_dict(
        AgentConfig,
        {
            "storage": {"path": str(tmp_path / "a.sqlite")},
            "intake": {
                "sources": [{"name": "esphome", "topic": "esphome/{node}/{sensor}",
                             "format": "value"}]
            },
        },
    )  # fmt: skip
    fake = FakeClient()
    intake = Intake(cfg, client=fake)  # type: ignore[arg-type]
    hour = 3600 * 10**9
    right = time.time_ns()  # this clock; the node's (and the cloud's) is an hour ahead
    try:
        intake.offset_ns = lambda: 0  # not measured yet: the device's clock alone
        node = encode_chunk("C", [right + hour], [20.0])  # an hour ahead of this clock
        intake._on_message(intake.client, None, message(1, "sensors/n1/t", node))
        intake.flush()
        assert intake.store.counters()["readings_held"] == 1
        intake.offset_ns = lambda: hour  # the acks say the cloud is an hour ahead
        assert intake.release_held() == 1
        intake._on_message(intake.client, None, message(2, "esphome/n2/v", b"21.5"))
        intake.flush()
        stamped = intake.store.conn.execute(
            "SELECT t_max FROM chunks JOIN sensors ON sensors.id = sensor_id WHERE node = 'n2'"
        ).fetchone()[0]
        assert abs(stamped - (time.time_ns() + hour)) < 10 * 10**9
        intake.offset_ns = lambda: 300_000_000  # 0.3 s: noise, the clock as it is
        assert abs(intake.stamp_ns() - time.time_ns()) < 10**8
        assert fake.acks == [1, 2]
    finally:
        intake.store.close()


def test_a_redelivery_is_recognised_in_its_original_group_and_after_it(tmp_path: Path) -> None:
    """MQTT marks a redelivery (DUP, the same packet identifier). One that comes in
    the same group as its original (a reconnect while the group waited for its
    commit), or after the original's commit, is acknowledged, not stored; a new
    message with an equal value is stored; a DUP whose digest differs is stored."""
    cfg = from_dict(
        AgentConfig,
        {
            "storage": {"path": str(tmp_path / "a.sqlite"), "group_commit_max": 100},
            "intake": {
                "sources": [{"name": "esphome", "topic": "esphome/{node}/{sensor}",
                             "format": "value"}]
            },
        },
    )  # fmt: skip
    fake = FakeClient()
    intake = Intake(cfg, client=fake)  # type: ignore[arg-type]

    def dup(m: mqtt.MQTTMessage) -> mqtt.MQTTMessage:
        m.dup = True
        return m

    try:
        intake._on_message(fake, None, message(1, "esphome/n/t", b"21.5"))
        intake._on_message(fake, None, dup(message(1, "esphome/n/t", b"21.5")))  # same group
        intake.flush()
        intake._on_message(fake, None, dup(message(1, "esphome/n/t", b"21.5")))  # after it
        intake._on_message(fake, None, message(2, "esphome/n/t", b"21.5"))  # a new one
        intake._on_message(fake, None, dup(message(3, "esphome/n/t", b"21.6")))  # not seen
        intake.flush()
        c = intake.store.counters()
        assert c["source_esphome_readings"] == 3 and c["readings_stored"] == 3
        assert c["source_esphome_redelivered"] == 2
        assert fake.acks == [1, 1, 1, 2, 3]
    finally:
        intake.store.close()


def test_a_redelivery_long_after_its_original_is_recognised_across_a_restart(
    tmp_path: Path,
) -> None:
    """Mosquitto 2.0.11 does not hold to the agent's Receive Maximum (1,000): it
    redelivered messages committed more than 2,000 messages earlier. Those are
    recognised, also by a restarted agent; a message with the same identifier
    and payload one identifier cycle later (65,535 messages on) is new."""
    cfg = from_dict(
        AgentConfig,
        {
            "storage": {"path": str(tmp_path / "a.sqlite"), "group_commit_max": 1000,
                        "synchronous": "normal"},
            "intake": {
                "sources": [{"name": "esphome", "topic": "esphome/{node}/{sensor}",
                             "format": "value"}]
            },
        },
    )  # fmt: skip

    def dup(m: mqtt.MQTTMessage) -> mqtt.MQTTMessage:
        m.dup = True
        return m

    def send(intake: Intake, first: int, n: int) -> None:
        for mid in range(first, first + n):
            intake._on_message(intake.client, None, message(mid % 65535 + 1, "esphome/n/t", b"1"))
        intake.flush()

    fake = FakeClient()
    intake = Intake(cfg, client=fake)  # type: ignore[arg-type]
    try:
        send(intake, 0, 5000)
        # the first of them, again: 4,999 later messages were committed since
        intake._on_message(fake, None, dup(message(1, "esphome/n/t", b"1")))
        intake.flush()
        assert intake.store.counters()["source_esphome_redelivered"] == 1
    finally:
        intake.store.close()
    intake = Intake(cfg, client=FakeClient())  # type: ignore[arg-type]
    try:  # a restarted agent reads what the first one committed
        intake._on_message(intake.client, None, dup(message(2, "esphome/n/t", b"1")))
        intake.flush()
        assert intake.store.counters()["source_esphome_redelivered"] == 2
        send(intake, 5000, 65535 - 5000)  # one identifier cycle on: mid 1 again
        intake._on_message(intake.client, None, dup(message(1, "esphome/n/t", b"1")))
        intake.flush()
        c = intake.store.counters()
        assert c["source_esphome_redelivered"] == 2  # a new message, not the old mid 1
        assert c["readings_stored"] == 65535 + 1
        kept = intake.store.conn.execute(
            "SELECT sum(length(entries)) / 18 FROM inflight"
        ).fetchone()[0]
        # the newest INFLIGHT_KEEP, and those of the last groups since the last pruning
        assert INFLIGHT_KEEP <= kept <= INFLIGHT_KEEP + RECEIVE_MAXIMUM // 4 + 1000
    finally:
        intake.store.close()
