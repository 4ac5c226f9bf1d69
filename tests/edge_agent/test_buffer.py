"""The agent's SQLite buffer, windowing and outbox, on a real SQLite file."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.pipeline import buffer, held, outbox, window
from edge_agent.store import SCHEMA_VERSION, Store
from edge_agent.technician.status import read_status
from shared.errors import StorageError, WireError
from shared.readings import ReadingChunk, decode_chunk, encode_chunk
from shared.wire import decode_batch

W = 10_000_000_000
T0 = 1_800_000_000 * 10**9


def chunk(sensor: str, ts: list[int], vals: list[float], node: str = "n1") -> ReadingChunk:
    return ReadingChunk(node, sensor, "u", np.array(ts, dtype=np.int64), np.array(vals))


def close(store: Store, upto: int, max_rows: int = 1000) -> list[int]:
    return window.close_until(store, device_id="dev", width_ns=W, upto_ns=upto, max_rows=max_rows)


def test_windows_close_once_and_seq_is_monotonic_across_restarts(tmp_path: Path) -> None:
    db = tmp_path / "agent.sqlite"
    s = Store(db)
    reg = buffer.SensorRegistry(s)
    buffer.store_chunk(s, reg, chunk("a", [T0, T0 + 1, T0 + W + 5], [1.0, 3.0, 7.0]))
    buffer.store_chunk(s, reg, chunk("b", [T0 + 2], [4.0]))
    assert close(s, T0 + W) == [1]
    assert close(s, T0 + W) == []  # already closed: nothing twice
    s.close()

    s = Store(db)  # restart: state comes back from the file
    assert close(s, T0 + 2 * W) == [2]
    rows = s.conn.execute("SELECT seq, payload FROM outbox ORDER BY seq").fetchall()
    b1, b2 = (decode_batch(bytes(p)) for _, p in rows)
    assert (b1.seq, b2.seq) == (1, 2)
    assert sorted(b1.count.tolist()) == [1, 2] and b1.mean.tolist() == [2.0, 4.0]
    assert b2.count.tolist() == [1] and b2.first.tolist() == [7.0]
    assert s.counters()["windows_closed"] == 3
    s.close()


def test_late_readings_are_dropped_and_counted(tmp_path: Path) -> None:
    s = Store(tmp_path / "a.sqlite")
    reg = buffer.SensorRegistry(s)
    buffer.store_chunk(s, reg, chunk("a", [T0 + W + 1], [1.0]))
    close(s, T0 + W)
    res = buffer.store_chunk(s, reg, chunk("a", [T0 + 5, T0 + W + 2], [9.0, 2.0]))
    assert (res.stored, res.late) == (1, 1)
    c = s.counters()
    assert c["dropped_late"] == 1 and c["readings_stored"] == 2


def test_batches_split_at_max_rows(tmp_path: Path) -> None:
    s = Store(tmp_path / "a.sqlite")
    reg = buffer.SensorRegistry(s)
    for i in range(5):
        buffer.store_chunk(s, reg, chunk(f"s{i}", [T0 + i], [float(i)]))
    seqs = close(s, T0 + W, max_rows=2)
    assert seqs == [1, 2, 3]
    sizes = [
        decode_batch(bytes(p)).rows
        for (p,) in s.conn.execute("SELECT payload FROM outbox ORDER BY seq")
    ]
    assert sizes == [2, 2, 1]


def test_outbox_lifecycle_resend_and_ack(tmp_path: Path) -> None:
    s = Store(tmp_path / "a.sqlite")
    reg = buffer.SensorRegistry(s)
    for k in range(3):
        buffer.store_chunk(s, reg, chunk("a", [T0 + k * W], [1.0]))
    close(s, T0 + 3 * W, max_rows=1)
    now = 10**18
    assert [o.seq for o in outbox.due(s, 10, now_ns=now)] == [1, 2, 3]
    assert [o.seq for o in outbox.due(s, 10, exclude=[1], now_ns=now)] == [2, 3]
    rng = random.Random(0)
    kw = {"timeout_s": 10.0, "max_backoff_s": 25.0, "rng": rng}
    assert outbox.mark_sent(s, [2], now_ns=now, **kw) == 1  # PUBACK: now awaits the cloud
    assert [o.seq for o in outbox.due(s, 10, now_ns=now)] == [1, 3]
    assert read_status(s.path)["outbox"] == {"pending": 2, "sent": 1}
    # no ack within the timeout (10 s +-20 %): due again, and the next wait doubles
    assert [o.seq for o in outbox.due(s, 10, now_ns=now + 12 * 10**9)] == [1, 2, 3]
    outbox.mark_sent(s, [2], now_ns=now + 12 * 10**9, **kw)
    nxt = s.conn.execute("SELECT next_try_ns FROM outbox WHERE seq = 2").fetchone()[0]
    assert 16 * 10**9 <= nxt - (now + 12 * 10**9) <= 24 * 10**9
    gen = outbox.generation(s)
    assert gen > 0  # every buffer has one (docs/wire-format.md §2.3)
    assert (
        decode_batch(bytes(s.conn.execute("SELECT payload FROM outbox").fetchone()[0])).generation
        == gen
    )
    # an ack for seq 2 of a buffer this one replaced is not this buffer's seq 2
    assert outbox.acknowledge(s, 2, stored=True, generation=gen + 1) is False
    assert s.counters()["acks_other_generation"] == 1
    assert outbox.acknowledge(s, 2, stored=True, generation=gen) is True
    assert outbox.acknowledge(s, 2, stored=True) is False  # a duplicate ack
    assert outbox.acknowledge(s, 3, stored=False) is True  # rejected by the cloud
    c = s.counters()
    assert (c["batches_acked"], c["batches_rejected"], c["acks_duplicate"]) == (1, 1, 1)
    assert c["batches_resent"] == 1 and outbox.count_unacked(s) == 1


def test_backoff_is_capped_and_jittered() -> None:
    rng = random.Random(1)
    waits = [outbox.backoff_ns(a, 30.0, 600.0, rng) / 1e9 for a in range(1, 12)]
    assert 24 <= waits[0] <= 36 and 48 <= waits[1] <= 72
    assert all(480 <= w <= 720 for w in waits[6:])  # capped at 600 s +-20 %
    assert len(set(waits)) == len(waits)


def test_prune_keeps_open_windows(tmp_path: Path) -> None:
    s = Store(tmp_path / "a.sqlite")
    reg = buffer.SensorRegistry(s)
    buffer.store_chunk(s, reg, chunk("a", [T0], [1.0]))
    buffer.store_chunk(s, reg, chunk("a", [T0 + W], [1.0]))
    assert buffer.prune(s, T0 + 10 * W) == 0  # nothing closed yet: nothing may go
    close(s, T0 + W)
    assert buffer.prune(s, T0 + 10 * W) == 1


def test_schema_version_recorded_and_newer_file_refused(tmp_path: Path) -> None:
    s = Store(tmp_path / "a.sqlite")
    assert s.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    s.conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    s.close()
    with pytest.raises(StorageError, match="newer agent"):
        Store(tmp_path / "a.sqlite")


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("sensors/n1", b"{}", "bad-topic"),
        ("sensors/n 1/t", b"{}", "bad-topic"),
        ("sensors/n1/t", b"not json", "bad-json"),
        ("sensors/n1/t", b"[1]", "bad-json"),
        ("sensors/n1/t", b'{"ts": [1, 2], "values": [1.0]}', "bad-chunk"),
        ("sensors/n1/t", b'{"ts": [], "values": []}', "bad-chunk"),
        ("sensors/n1/t", b'{"ts": [1.5], "values": [1.0]}', "bad-chunk"),
        ("sensors/n1/t", b'{"ts": [-1], "values": [1.0]}', "bad-chunk"),
        ("sensors/n1/t", b'{"ts": [1], "values": ["x"]}', "bad-chunk"),
    ],
)
def test_bad_reading_messages(topic: str, payload: bytes, reason: str) -> None:
    with pytest.raises(WireError) as e:
        decode_chunk(topic, payload, "sensors")
    assert e.value.reason == reason


def test_reading_chunk_round_trip_is_exact() -> None:
    vals = [0.1, 1 / 3, -2.5e-308, 1e300]
    c = decode_chunk("sensors/n1/t", encode_chunk("u", [1, 2, 3, 4], vals), "sensors")
    assert c.values.tolist() == vals and c.ts.tolist() == [1, 2, 3, 4]
    nan = decode_chunk("sensors/n1/t", b'{"ts": [1, 2], "values": [NaN, null]}', "sensors")
    assert np.isnan(nan.values).all()


def test_redelivered_message_is_not_stored_twice(tmp_path: Path) -> None:
    """The agent died after committing, before its PUBACK: the broker sends it again."""
    s = Store(tmp_path / "a.sqlite")
    reg = buffer.SensorRegistry(s)
    payload = encode_chunk("u", [T0, T0 + 1], [1.0, 2.0])
    c = decode_chunk("sensors/n1/t", payload, "sensors")
    digest = buffer.message_digest("sensors/n1/t", payload)
    assert buffer.store_chunk(s, reg, c, digest).stored == 2
    close(s, T0 + W)  # even after its window closed, a redelivery is a duplicate, not late
    again = buffer.store_chunk(s, reg, c, digest)
    assert (again.stored, again.late, again.duplicate) == (0, 0, 2)
    assert s.counters() == {
        "readings_stored": 2,
        "duplicates_ignored": 2,
        "batches_created": 1,
        "windows_closed": 1,
    }


def test_digests_are_bounded(tmp_path: Path) -> None:
    s = Store(tmp_path / "a.sqlite")
    reg = buffer.SensorRegistry(s)
    for i in range(30):
        p = encode_chunk("u", [T0 + i], [1.0])
        buffer.store_chunk(
            s,
            reg,
            decode_chunk("sensors/n1/t", p, "sensors"),
            buffer.message_digest("sensors/n1/t", p),
        )
    buffer.prune(s, 0, keep_digests=10)
    assert s.conn.execute("SELECT count(*) FROM received").fetchone()[0] == 10


def test_readings_from_the_future_are_held_until_the_clock_allows_them(tmp_path: Path) -> None:
    s = Store(tmp_path / "a.sqlite")
    reg = buffer.SensorRegistry(s)
    res = buffer.store_chunk(
        s, reg, chunk("a", [T0, T0 + 10 * W, T0 + 11 * W], [1.0, 2.0, 3.0]), future_limit_ns=T0 + W
    )
    assert (res.stored, res.future) == (1, 2)
    assert s.get_state(buffer.MAX_TS) == T0  # the watermark did not jump ahead
    c = s.counters()
    assert c["readings_held"] == 2 and "dropped_future" not in c
    assert held.count(s) == 2
    # the limit moves (the clock was stepped, or its offset to the cloud is known)
    assert held.release(s, reg, limit_ns=T0 + 10 * W, late=None) == 0  # not all of it yet
    assert held.release(s, reg, limit_ns=T0 + 11 * W, late=None) == 2
    assert held.count(s) == 0 and s.get_state(buffer.MAX_TS) == T0 + 11 * W
    got = buffer.read_range(s, T0, T0 + 12 * W)
    assert [v.tolist() for _, v in got.values()] == [[1.0, 2.0, 3.0]]
    assert s.counters()["readings_released"] == 2 and "dropped_future" not in s.counters()


def test_held_readings_are_bounded_and_their_drops_counted(tmp_path: Path) -> None:
    s = Store(tmp_path / "a.sqlite")
    reg = buffer.SensorRegistry(s)
    for k in range(10):  # ten chunks of 100 readings, 1,600 bytes each
        ts = [T0 + 100 * W + k * 1000 + j for j in range(100)]
        buffer.store_chunk(s, reg, chunk("a", ts, [1.0] * 100), future_limit_ns=T0)
    assert held.count(s) == 1000 and s.get_state(buffer.HELD_BYTES) == 16_000
    assert held.expire(s, max_bytes=8_000, max_age_s=0) == 500  # the oldest five chunks
    assert held.count(s) == 500 and s.counters()["dropped_future"] == 500
    later = s.conn.execute("SELECT max(received_ns) FROM held").fetchone()[0] + 10**9
    assert held.expire(s, max_bytes=0, max_age_s=0.5, now_ns=later) == 500
    assert held.count(s) == 0 and s.get_state(buffer.HELD_BYTES) == 0
    assert s.counters()["dropped_future"] == 1000


def test_drain_order_live_first_then_backfill_oldest_first(tmp_path: Path) -> None:
    s = Store(tmp_path / "a.sqlite")
    reg = buffer.SensorRegistry(s)
    for k in range(6):
        buffer.store_chunk(s, reg, chunk("a", [T0 + k * W], [1.0]))
    close(s, T0 + 6 * W, max_rows=1)
    # pretend seqs 1-4 were made during an outage an hour ago, 5-6 just now
    now = 10**18
    s.conn.execute("UPDATE outbox SET created_ns = ? WHERE seq <= 4", (now - 3600 * 10**9,))
    s.conn.execute("UPDATE outbox SET created_ns = ? WHERE seq > 4", (now - 10**9,))
    got = outbox.due(s, 10, now_ns=now, live_since_ns=now - 60 * 10**9)
    assert [(o.seq, o.live) for o in got] == [
        (5, True),
        (6, True),
        (1, False),
        (2, False),
        (3, False),
        (4, False),
    ]
    assert [
        o.seq for o in outbox.due(s, 3, exclude=[5], now_ns=now, live_since_ns=now - 60 * 10**9)
    ] == [6, 1, 2]


def test_late_readings_revise_their_closed_window(tmp_path: Path) -> None:
    s = Store(tmp_path / "a.sqlite")
    reg = buffer.SensorRegistry(s)
    policy = buffer.LatePolicy(width_ns=W, max_age_ns=100 * W)
    buffer.store_chunk(s, reg, chunk("a", [T0 + 1, T0 + 2], [1.0, 3.0]), late=policy)
    buffer.store_chunk(s, reg, chunk("b", [T0 + 3], [5.0]), late=policy)
    buffer.store_chunk(s, reg, chunk("a", [T0 + 3 * W], [0.0]), late=policy)
    assert close(s, T0 + W) == [1]
    # two late readings for sensor a's closed window, one for the still open window
    res = buffer.store_chunk(
        s, reg, chunk("a", [T0 + 5, T0 + W + 1, T0 + 6], [8.0, 1.0, 0.0]), late=policy
    )
    assert (res.stored, res.revised, res.late) == (3, 2, 0)
    seqs = window.revise(s, device_id="dev", width_ns=W, max_rows=100, ready_until_ns=T0 + W)
    assert (
        seqs == [2]
        and window.revise(s, device_id="dev", width_ns=W, max_rows=100, ready_until_ns=T0 + W) == []
    )
    (payload,) = s.conn.execute("SELECT payload FROM outbox WHERE seq = 2").fetchone()
    b = decode_batch(bytes(payload))
    # only sensor a's window is sent again, computed from all four of its readings
    assert b.rows == 1 and b.sensors[b.sensor[0]].name == "a"
    assert (b.count[0], b.revision[0], b.sum[0], b.first[0], b.last[0]) == (4, 1, 12.0, 1.0, 0.0)
    # another late reading: revision 2
    buffer.store_chunk(s, reg, chunk("a", [T0 + 7], [2.0]), late=policy)
    (seq,) = window.revise(s, device_id="dev", width_ns=W, max_rows=100, ready_until_ns=T0 + W)
    (payload,) = s.conn.execute("SELECT payload FROM outbox WHERE seq = ?", (seq,)).fetchone()
    assert decode_batch(bytes(payload)).revision.tolist() == [2]
    c = s.counters()
    assert c["windows_revised"] == 2 and c["readings_late_accepted"] == 3
    assert c["windows_closed"] == 2  # first versions only; revisions are counted apart


def test_readings_too_old_for_a_revision_are_dropped_and_counted(tmp_path: Path) -> None:
    s = Store(tmp_path / "a.sqlite")
    reg = buffer.SensorRegistry(s)
    policy = buffer.LatePolicy(width_ns=W, max_age_ns=5 * W)
    buffer.store_chunk(s, reg, chunk("a", [T0, T0 + 20 * W], [1.0, 2.0]), late=policy)
    close(s, T0 + 20 * W)
    res = buffer.store_chunk(s, reg, chunk("a", [T0 + 1, T0 + 18 * W], [9.0, 9.0]), late=policy)
    assert (res.stored, res.revised, res.late) == (1, 1, 1)
    assert s.counters()["dropped_too_old"] == 1


def test_hopping_windows_and_their_revisions(tmp_path: Path) -> None:
    s = Store(tmp_path / "a.sqlite")
    reg = buffer.SensorRegistry(s)
    hop = W // 2
    policy = buffer.LatePolicy(width_ns=W, max_age_ns=100 * W, hop_ns=hop)
    ts = [T0 + k * hop // 5 for k in range(25)]  # every second for 25 s (hop 5 s, width 10 s)
    buffer.store_chunk(s, reg, chunk("a", ts, [float(k) for k in range(25)]), late=policy)
    (seq,) = window.close_until(
        s, device_id="d", width_ns=W, upto_ns=T0 + 2 * W, max_rows=99, hop_ns=hop
    )
    (payload,) = s.conn.execute("SELECT payload FROM outbox WHERE seq = ?", (seq,)).fetchone()
    b = decode_batch(bytes(payload))
    assert b.window.kind == "hopping" and b.window.hop_ns == hop
    # windows ending by T0 + 20 s: [-5, 5), [0, 10), [5, 15), [10, 20), one row each
    assert b.start_ns.tolist() == [T0 - hop, T0, T0 + hop, T0 + 2 * hop]
    assert b.count.tolist() == [5, 10, 10, 10]
    assert b.first.tolist() == [0.0, 0.0, 5.0, 10.0]
    # a late reading at T0 + 12 s belongs to the closed [5, 15) and [10, 20) windows
    # (and to the open [15, 25), which has not been sent)
    res = buffer.store_chunk(s, reg, chunk("a", [T0 + 12 * hop // 5 + 1], [100.0]), late=policy)
    assert res.revised == 1
    seqs = window.revise(
        s, device_id="d", width_ns=W, max_rows=99, hop_ns=hop, ready_until_ns=T0 + 2 * W
    )
    (payload,) = s.conn.execute("SELECT payload FROM outbox WHERE seq = ?", seqs).fetchone()
    r = decode_batch(bytes(payload))
    assert r.start_ns.tolist() == [T0 + hop, T0 + 2 * hop]
    assert r.count.tolist() == [11, 11] and r.revision.tolist() == [1, 1]
    assert r.max.tolist() == [100.0, 100.0]


def test_status_of_a_file_from_an_older_agent(tmp_path: Path) -> None:
    """A technician's newer CLI on a buffer written by an older agent: migrated, not a crash."""
    import sqlite3

    from edge_agent.store import MIGRATIONS

    db = tmp_path / "old.sqlite"
    conn = sqlite3.connect(db)
    import sqlite_utils

    MIGRATIONS[0](sqlite_utils.Database(conn))  # schema version 1 only
    conn.execute("PRAGMA user_version=1")
    conn.commit()
    conn.close()
    st = read_status(db)
    assert st["open_alerts"] == [] and st["outbox"] == {}


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 100), st.floats(allow_nan=True, allow_infinity=False)),
        min_size=1,
        max_size=30,
    ),
    st.sampled_from([None, 0, 15]),
    st.booleans(),
)
def test_one_reading_path_equals_the_array_path(
    readings: list[tuple[int, float]], max_age_s: int | None, with_future: bool
) -> None:
    """buffer._store_single (no numpy, for one-reading messages) leaves the same rows,
    dirty marks and counters as buffer._store_many."""
    import tempfile

    from edge_agent.pipeline.buffer import _store_many, _store_single

    s0, S = 10**18, 10**9
    out = []
    with tempfile.TemporaryDirectory() as d:
        for fn in (_store_single, _store_many):
            store = Store(Path(d) / f"{fn.__name__}.sqlite")
            reg = buffer.SensorRegistry(store)
            late = None if max_age_s is None else buffer.LatePolicy(10 * S, max_age_s * S)
            results = []
            newest = 0
            for i, (sec, v) in enumerate(readings):
                newest = max(newest, sec)
                chunk = ReadingChunk("n", "s", "", np.array([s0 + sec * S]), np.array([v]))
                with store.tx():
                    results.append(
                        fn(store, reg, chunk, s0 + 30 * S if with_future else None, late, None)
                    )
                    if i % 3 == 2:  # windows close now and then: later readings are late
                        store.set_state(buffer.CLOSED_UNTIL, s0 + (newest // 10) * 10 * S)
            rows = store.conn.execute(
                "SELECT sensor_id, t_min, t_max, n, ts, vals, crc FROM chunks ORDER BY id"
            ).fetchall()
            dirty = store.conn.execute("SELECT * FROM dirty ORDER BY 1, 2").fetchall()
            out.append((results, rows, dirty, store.counters()))
            store.close()
    assert out[0] == out[1]


def test_batches_stay_within_a_day_their_sensors_and_their_bytes(tmp_path: Path) -> None:
    """What the cloud takes from a device (docs/cloud-ingest.md, "What one device can
    cost the fleet"): a batch never spans two UTC days, names at most max_sensors
    sensors, and is at most max_bytes encoded; seqs stay without gaps."""
    s = Store(tmp_path / "a.sqlite")
    reg = buffer.SensorRegistry(s)
    day = 86_400 * 10**9
    midnight = (T0 // day + 1) * day
    for i in range(12):  # 12 sensors with a reading either side of midnight
        buffer.store_chunk(s, reg, chunk(f"s{i}", [midnight - W, midnight + 1], [1.0, 2.0]))
    limits = window.Limits(max_rows=1000, max_sensors=5, max_bytes=1_000_000)
    seqs = window.close_until(
        s, device_id="dev", width_ns=W, upto_ns=midnight + 2 * W, max_rows=limits
    )
    got = [decode_batch(bytes(p)) for (p,) in s.conn.execute("SELECT payload FROM outbox")]
    assert seqs == list(range(1, len(got) + 1))
    assert all(len({b.start_ns.min() // day, b.start_ns.max() // day}) == 1 for b in got)
    assert all(len(set(b.sensor.tolist())) <= 5 for b in got)
    assert sum(b.rows for b in got) == 24
    small = window.Limits(max_rows=1000, max_sensors=1000, max_bytes=4096)
    rng = np.random.default_rng(0)
    for i in range(300):  # one window of 300 sensors: tens of KB with their sketches
        vals = rng.normal(0, 1000, 50).tolist()
        ts = [midnight + 3 * W + j for j in range(50)]
        buffer.store_chunk(s, reg, chunk(f"t{i}", ts, vals))
    more = window.close_until(
        s, device_id="dev", width_ns=W, upto_ns=midnight + 5 * W, max_rows=small
    )
    sizes = [
        len(bytes(p))
        for (p,) in s.conn.execute("SELECT payload FROM outbox WHERE seq >= ?", (more[0],))
    ]
    assert len(sizes) > 1 and max(sizes) <= 4096
    assert more == list(range(seqs[-1] + 1, seqs[-1] + 1 + len(more)))  # no gaps
    assert s.counters()["batches_split_for_size"] >= 1
