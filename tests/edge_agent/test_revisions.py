"""A window's versions leave the device in order, numbered from 0, without a storm after
a flush: on a real SQLite file, with the agent's own tick where it matters."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from edge_agent import control
from edge_agent.agent import Agent
from edge_agent.config import AgentConfig
from edge_agent.pipeline import buffer, outbox, window
from edge_agent.store import Store
from shared.config import from_dict
from shared.errors import ConfigError
from shared.readings import ReadingChunk
from shared.wire import decode_batch

S = 10**9
W = 10 * S
T0 = 1_800_000_000 * 10**9
LATE = buffer.LatePolicy(width_ns=W, max_age_ns=100 * W)


def put(store: Store, reg: buffer.SensorRegistry, sensor: str, ts: list[int]) -> None:
    chunk = ReadingChunk("n1", sensor, "u", np.array(ts, dtype=np.int64), np.ones(len(ts)))
    buffer.store_chunk(store, reg, chunk, late=LATE)


def revise(store: Store, until: int = T0 + W) -> list[int]:
    return window.revise(store, device_id="d", width_ns=W, max_rows=100, ready_until_ns=until)


def rows(store: Store, seq: int) -> list[tuple[str, int, int, int]]:
    """(sensor, window start, count, revision) of each row of batch ``seq``."""
    (payload,) = store.conn.execute("SELECT payload FROM outbox WHERE seq = ?", (seq,)).fetchone()
    b = decode_batch(bytes(payload))
    return [
        (b.sensors[i].name, st, c, r)
        for i, st, c, r in zip(
            b.sensor.tolist(),
            b.start_ns.tolist(),
            b.count.tolist(),
            b.revision.tolist(),
            strict=True,
        )
    ]


def due(store: Store) -> list[int]:
    return [o.seq for o in outbox.due(store, 100)]


def batches(store: Store) -> list[list[tuple[str, int, int, int]]]:
    return [rows(store, q) for (q,) in store.conn.execute("SELECT seq FROM outbox ORDER BY seq")]


def test_a_later_version_leaves_only_after_the_earlier_one_is_acknowledged(
    tmp_path: Path,
) -> None:
    s = Store(tmp_path / "a.sqlite")
    reg = buffer.SensorRegistry(s)
    put(s, reg, "a", [T0 + 1])
    put(s, reg, "b", [T0 + 3 * W])
    assert window.close_until(s, device_id="d", width_ns=W, upto_ns=T0 + W, max_rows=100) == [1]
    put(s, reg, "a", [T0 + 2])  # late: the window is revised
    assert revise(s) == [2]
    assert rows(s, 2) == [("a", T0, 2, 1)]
    # revision 1 waits while revision 0's batch has no cloud ack, sent or not
    assert due(s) == [1]
    outbox.mark_sent(s, [1], timeout_s=30, max_backoff_s=60)
    assert due(s) == []
    put(s, reg, "a", [T0 + 3])
    assert revise(s) == [3] and rows(s, 3) == [("a", T0, 3, 2)]
    assert outbox.acknowledge(s, 1, stored=True)
    assert due(s) == [2]  # revision 2 waits for revision 1 now, not for 0
    # a dropped batch (the disk budget) frees the one waiting for it as well
    s.conn.execute("DELETE FROM outbox WHERE seq = 2")
    assert due(s) == [3]
    assert s.conn.execute("SELECT count(*) FROM outbox_after").fetchone()[0] == 0


def test_a_window_first_sent_because_of_late_readings_is_revision_0(tmp_path: Path) -> None:
    """docs/wire-format.md §2.4: 0 for a window's first version, however it comes."""
    s = Store(tmp_path / "a.sqlite")
    reg = buffer.SensorRegistry(s)
    put(s, reg, "a", [T0 + 1])
    put(s, reg, "a", [T0 + 3 * W])
    window.close_until(s, device_id="d", width_ns=W, upto_ns=T0 + W, max_rows=100)
    put(s, reg, "slow", [T0 + 5, T0 + 6])  # its window closed without it
    (seq,) = revise(s)
    assert rows(s, seq) == [("slow", T0, 2, 0)]
    assert due(s) == [1, seq]  # nothing earlier of that window to wait for
    put(s, reg, "slow", [T0 + 7])
    (seq2,) = revise(s)
    assert rows(s, seq2) == [("slow", T0, 3, 1)]
    c = s.counters()
    assert c["windows_closed"] == 2 and c["windows_revised"] == 1


def test_a_flush_on_a_live_agent_sends_one_revision_not_one_per_tick(tmp_path: Path) -> None:
    cfg = from_dict(
        AgentConfig,
        {"storage": {"path": str(tmp_path / "a.sqlite")}, "window": {"lateness_s": 2.0}},
    )
    agent = Agent(cfg)  # not started: no broker, ticks driven here
    s, reg = agent.intake.store, agent.intake.registry
    try:
        put(s, reg, "a", [T0 + 1 * S])
        control.request_flush(agent.store)
        agent.tick()
        assert batches(s) == [[("a", T0, 1, 0)]]
        for k in range(2, 9):  # readings keep coming into the flushed window
            put(s, reg, "a", [T0 + k * S])
            agent.tick()
        assert len(batches(s)) == 1  # no revision while the window would still be open
        put(s, reg, "a", [T0 + W + 3 * S])  # the watermark passes the window's end
        agent.tick()
        assert batches(s) == [[("a", T0, 1, 0)], [("a", T0, 8, 1)]]
        agent.tick()
        assert len(batches(s)) == 2
    finally:
        agent.intake.store.close()
        agent.store.close()
        agent.lock.release()


def test_batch_every_s_sends_the_windows_closed_meanwhile_in_one_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """forward.batch_every_s: a batch a minute holds the minute's six window closes
    (docs/benchmarks.md: half the uplink bytes); a flush does not wait for it."""
    clock = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: clock[0])
    cfg = from_dict(
        AgentConfig,
        {
            "storage": {"path": str(tmp_path / "a.sqlite")},
            "window": {"width_s": 10.0, "lateness_s": 0.0},
            "forward": {"batch_every_s": 60.0},
        },
    )
    agent = Agent(cfg)  # not started: no broker, ticks driven here
    s, reg = agent.intake.store, agent.intake.registry
    try:
        for sensor in ("a", "b"):
            put(s, reg, sensor, [T0 + S, T0 + W + S])
        agent.tick()  # the first tick closes at once
        assert batches(s) == [[("a", T0, 1, 0), ("b", T0, 1, 0)]]
        for k in range(2, 7):  # five more windows close while the minute runs
            clock[0] += 10.0
            for sensor in ("a", "b"):
                put(s, reg, sensor, [T0 + k * W + S])
            agent.tick()
            assert len(batches(s)) == 1
        clock[0] += 10.0
        agent.tick()
        second = batches(s)[1]
        assert sorted(second) == [
            (sensor, T0 + k * W, 1, 0) for sensor in ("a", "b") for k in range(1, 6)
        ]
        assert len(batches(s)) == 2
        put(s, reg, "a", [T0 + 7 * W + S])
        control.request_flush(agent.store)  # a technician's flush does not wait
        agent.tick()
        assert len(batches(s)) == 3
    finally:
        agent.intake.store.close()
        agent.store.close()
        agent.lock.release()


def test_a_bad_batch_every_s_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"forward\.batch_every_s: must be 0-86400"):
        from_dict(AgentConfig, {"forward": {"batch_every_s": -1}})
