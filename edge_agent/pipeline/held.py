"""Readings held back: stamped further ahead than the device's clock allows.

A reading stamped more than ``window.max_future_s`` ahead of the device's clock
cannot go into the buffer as it is: it would drag the watermark ahead and make
every other sensor's readings late. But the clock that is wrong may be the
device's own: a Raspberry Pi has no real-time clock and boots with a stale time
until NTP steps it, while the sensor nodes stamp correctly. So such readings are
not dropped: :func:`edge_agent.pipeline.buffer.hold` keeps them in the ``held``
table (acknowledged to the node, durable like every reading), and
:func:`release` moves them into the buffer once the limit allows them, that is
once the device's clock has caught up, or once the agent knows its clock's
offset to the cloud's (edge_agent/clock.py) and the corrected clock allows them.

Held readings are bounded: the oldest go first beyond ``storage.held_max_bytes``
or after ``storage.held_max_age_s`` (and under the disk budget, before any
batch), counted as ``dropped_future``: a node whose clock is really ahead costs
that much disk at most. ``edge-agent status`` shows how many are held.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from edge_agent import counters
from edge_agent.pipeline import buffer
from edge_agent.store import Store, crc
from shared.readings import ReadingChunk

log = logging.getLogger(__name__)

RELEASE_ROWS = 256  # held chunks moved into the buffer per transaction

AfterStore = Callable[[str, str], Callable[[Any, Any], None] | None]


def count(store: Store) -> int:
    """Readings held now."""
    return int(store.conn.execute("SELECT coalesce(sum(n), 0) FROM held").fetchone()[0])


def release(
    store: Store,
    registry: buffer.SensorRegistry,
    *,
    limit_ns: int,
    late: buffer.LatePolicy | None,
    after_store: AfterStore | None = None,
) -> int:
    """Move the held chunks whose readings are all at or before ``limit_ns`` into the
    buffer, through the same policies as on arrival, in transactions of their own;
    returns the readings moved."""
    first = store.conn.execute("SELECT min(t_max) FROM held").fetchone()[0]  # an index
    if first is None or first > limit_ns:
        return 0  # nothing the clock allows yet: no transaction
    moved = 0
    while True:
        with store.tx():
            now, more = release_some(
                store, registry, limit_ns=limit_ns, late=late, after_store=after_store
            )
        moved += now
        if not more:
            return moved


def release_some(
    store: Store,
    registry: buffer.SensorRegistry,
    *,
    limit_ns: int,
    late: buffer.LatePolicy | None,
    after_store: AfterStore | None = None,
) -> tuple[int, bool]:
    """:func:`release` of up to :data:`RELEASE_ROWS` chunks inside the caller's
    transaction: (readings moved, True if more may be waiting). A chunk whose
    checksum no longer matches (damaged on the SD card) is dropped, counted as
    ``dropped_future``."""
    rows = store.conn.execute(
        "SELECT id, node, sensor, unit, n, ts, vals, crc FROM held WHERE t_max <= ? "
        "ORDER BY id LIMIT ?",
        (limit_ns, RELEASE_ROWS),
    ).fetchall()
    if not rows:
        return 0, False
    freed = damaged = moved = 0
    for _id, node, sensor, unit, n, tsb, vb, check in rows:
        tsb, vb = bytes(tsb), bytes(vb)
        freed += len(tsb) + len(vb)
        if (check is not None and crc(tsb, vb) != check) or len(tsb) != 8 * n:
            damaged += int(n)
            continue
        chunk = ReadingChunk(
            str(node),
            str(sensor),
            str(unit),
            np.frombuffer(tsb, dtype="<i8").astype(np.int64),
            np.frombuffer(vb, dtype="<f8").astype(np.float64),
        )
        buffer.store_one(
            store,
            registry,
            chunk,
            future_limit_ns=limit_ns,
            late=late,
            after_store=after_store(chunk.node, chunk.sensor) if after_store else None,
        )
        moved += int(n)
    store.conn.executemany("DELETE FROM held WHERE id = ?", [(r[0],) for r in rows])
    _less(store, freed)
    store.add_counter(counters.READINGS_RELEASED, moved)
    store.add_counter(counters.DROPPED_FUTURE, damaged)
    if moved:
        log.info("held: %d readings released into the buffer (the clock allows them now)", moved)
    return moved, len(rows) == RELEASE_ROWS


def expire(store: Store, *, max_bytes: int, max_age_s: float, now_ns: int | None = None) -> int:
    """Drop the oldest held chunks beyond ``max_bytes`` (0: no cap) or received more
    than ``max_age_s`` ago (0: no limit); returns the readings dropped (counted as
    ``dropped_future``)."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    dropped = 0
    with store.tx():
        if max_age_s:
            old = store.conn.execute(
                "SELECT coalesce(sum(n), 0), coalesce(sum(length(ts) + length(vals)), 0) "
                "FROM held WHERE received_ns < ?",
                (now_ns - int(max_age_s * 1e9),),
            ).fetchone()
            if old[0]:
                store.conn.execute(
                    "DELETE FROM held WHERE received_ns < ?", (now_ns - int(max_age_s * 1e9),)
                )
                dropped += int(old[0])
                store.add_counter(counters.DROPPED_FUTURE, int(old[0]))
                _less(store, int(old[1]))
        while max_bytes and store.get_state(buffer.HELD_BYTES) > max_bytes:
            freed = drop_oldest(store, 1)
            if not freed:
                break
            dropped += freed
    if dropped:
        log.warning(
            "held: dropped %d readings stamped ahead of the clock, held too long or over "
            "storage.held_max_bytes (counted as dropped_future)",
            dropped,
        )
    return dropped


def drop_oldest(store: Store, rows: int) -> int:
    """Drop the ``rows`` oldest held chunks (inside the caller's transaction); returns
    the readings dropped, counted as ``dropped_future`` (also the disk budget's step)."""
    got = store.conn.execute(
        "SELECT id, n, length(ts) + length(vals) FROM held ORDER BY id LIMIT ?", (rows,)
    ).fetchall()
    if not got:
        return 0
    store.conn.executemany("DELETE FROM held WHERE id = ?", [(r[0],) for r in got])
    _less(store, sum(int(r[2]) for r in got))
    n = sum(int(r[1]) for r in got)
    store.add_counter(counters.DROPPED_FUTURE, n)
    return n


def _less(store: Store, freed: int) -> None:
    store.set_state(buffer.HELD_BYTES, max(0, store.get_state(buffer.HELD_BYTES) - freed))
