"""Durable raw readings: one row per received chunk, columns stored as BLOBs.

A chunk is what one sensor node message carried: a run of readings of one
sensor. Its timestamps and values are stored as little-endian int64/float64
BLOBs, so writing and reading back costs one row per chunk, not one per reading
(see ``docs/architecture.md`` for why, and ``bench/durable_path.py`` for the
numbers).

Readings older than the ``closed_until`` watermark belong to windows that are
already closed and sent. They are stored all the same and their windows marked
*dirty* (:class:`LatePolicy`); :func:`edge_agent.pipeline.window.revise` sends a revised
version of each dirty window. Readings too old for that (``window.max_age_s``)
are dropped and counted. Readings stamped further ahead than the device's clock
allows are *held* (the ``held`` table, :mod:`edge_agent.pipeline.held`) until it
does: the device's clock may be the one that is wrong.
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edge_agent import counters
from edge_agent.store import Store, crc
from shared.readings import ReadingChunk
from shared.wire import SensorRef

CLOSED_UNTIL = "closed_until"  # state key: windows ending at or before this are closed
MAX_TS = "max_ts"  # state key: newest event time stored
#: state key: readings before this time may have been deleted (retention, the disk
#: budget); from it on, every stored reading is still there
GONE_BEFORE = "raw_gone_before_ns"
#: SQL: a chunk no pending capture needs (edge_agent/pipeline/captures.py)
NOT_CAPTURED = (
    "NOT EXISTS (SELECT 1 FROM captures c JOIN sensors s ON s.node = c.node "
    "AND s.name = c.sensor WHERE s.id = chunks.sensor_id AND chunks.t_max >= c.start_ns "
    "AND chunks.t_min < c.end_ns)"
)


def gone_before(store: Store, deleted_until_ns: int) -> None:
    """Chunks whose newest reading is before ``deleted_until_ns`` were deleted; call
    inside their transaction."""
    if deleted_until_ns > store.get_state(GONE_BEFORE):
        store.set_state(GONE_BEFORE, deleted_until_ns)


@dataclass(frozen=True)
class StoreResult:
    stored: int
    late: int  # dropped: late with no revisions, or too old for one
    future: int = 0  # held: stamped beyond the future limit (edge_agent/pipeline/held.py)
    duplicate: int = 0
    revised: int = 0  # stored, for windows already closed: they will be revised


class SensorRegistry:
    """Maps (node, name) to the sensors table's id, creating rows on first sight.

    A row created in a transaction that rolls back is forgotten with it, so that
    the cache never holds an id that the file does not have.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._ids: dict[tuple[str, str], int] = {}

    def id_for(self, node: str, name: str, unit: str) -> int:
        key = (node, name)
        if key not in self._ids:
            row = self.store.conn.execute(
                "SELECT id FROM sensors WHERE node = ? AND name = ?", key
            ).fetchone()
            if row is None:
                cur = self.store.conn.execute(
                    "INSERT INTO sensors(node, name, unit) VALUES (?, ?, ?)", (node, name, unit)
                )
                row = (cur.lastrowid,)
                self.store.on_rollback(lambda: self._ids.pop(key, None))
            self._ids[key] = int(row[0])
        return self._ids[key]


def load_sensors(store: Store) -> dict[int, SensorRef]:
    return {
        int(i): SensorRef(node, name, unit or "")
        for i, node, name, unit in store.conn.execute("SELECT id, node, name, unit FROM sensors")
    }


def message_digest(topic: str, payload: bytes) -> bytes:
    """Identity of a sensor message, for recognising redeliveries."""
    return hashlib.blake2b(topic.encode() + b"\0" + payload, digest_size=16).digest()


def seen_before(store: Store, digest: bytes) -> bool:
    """True if a message with this digest was stored already (a redelivery); else
    remember it (inside the caller's transaction) and return False."""
    cur = store.conn.execute(
        "INSERT OR IGNORE INTO received(digest, received_ns) VALUES (?, ?)",
        (digest, time.time_ns()),
    )
    return cur.rowcount == 0


@dataclass(frozen=True)
class LatePolicy:
    """What to do with a reading whose window is already closed.

    ``max_age_ns`` 0: drop it (counted as ``dropped_late``). Otherwise keep it and
    mark its window for a revision, unless it is older than the newest event time
    minus ``max_age_ns`` (counted as ``dropped_too_old``).
    """

    width_ns: int
    max_age_ns: int = 0
    hop_ns: int = 0  # hopping windows; 0 = tumbling
    #: tumbling windows whose width changed: (from_ns, width_ns) in time order, the
    #: width of the windows from each time on (:func:`window_widths`)
    widths: tuple[tuple[int, int], ...] = ()

    def closed_windows_of(self, ts: npt.NDArray[np.int64], closed: int) -> npt.NDArray[np.int64]:
        """Starts of the already closed windows (ending at or before ``closed``) that
        contain any of the readings at ``ts``."""
        if len(self.widths) > 1:
            width = widths_at(self.widths, ts)
            starts = (ts // width) * width
            return np.unique(starts[starts + width <= closed])
        hop = self.hop_ns or self.width_ns
        base = (ts // hop) * hop
        starts = np.concatenate([base - j * hop for j in range(self.width_ns // hop)])
        return np.unique(starts[starts + self.width_ns <= closed])


def window_widths(store: Store) -> tuple[tuple[int, int], ...]:
    """The tumbling windows' widths over time: (from_ns, width_ns), in time order."""
    rows = store.conn.execute("SELECT from_ns, width_ns FROM window_widths ORDER BY from_ns")
    return tuple((int(a), int(b)) for a, b in rows)


def widths_at(
    widths: tuple[tuple[int, int], ...], ts: npt.NDArray[np.int64]
) -> npt.NDArray[np.int64]:
    """The width of the window holding each time in ``ts``."""
    froms = np.array([f for f, _ in widths], dtype=np.int64)
    width = np.array([w for _, w in widths], dtype=np.int64)
    return width[np.maximum(np.searchsorted(froms, ts, side="right") - 1, 0)]


def store_one(
    store: Store,
    registry: SensorRegistry,
    chunk: ReadingChunk,
    digest: bytes | None = None,
    *,
    future_limit_ns: int | None = None,
    late: LatePolicy | None = None,
    after_store: Callable[[npt.NDArray[np.int64], npt.NDArray[np.float64]], None] | None = None,
) -> StoreResult:
    """Store the readings of ``chunk`` (inside the caller's transaction), applying
    the late-data and future policies.

    Returns how many readings were stored, how many of those were late (for a
    closed window, which is then marked for revision), how many were dropped
    (late with no revisions, or too old for a revision), and how many were held
    (stamped beyond ``future_limit_ns``: a node with a broken clock must not drag
    the watermark ahead and make everyone else late, but the clock that is wrong
    may be the device's own; :mod:`edge_agent.pipeline.held`). A redelivery of a message
    already stored (same ``digest``, see :func:`message_digest`) is ignored. Once
    the caller's transaction commits the outcome is durable, and the message may be
    acknowledged to the node's broker.
    """
    if digest is not None and seen_before(store, digest):
        store.add_counter(counters.DUPLICATES_IGNORED, len(chunk))
        return StoreResult(stored=0, late=0, duplicate=len(chunk))
    if len(chunk) == 1:
        return _store_single(store, registry, chunk, future_limit_ns, late, after_store)
    return _store_many(store, registry, chunk, future_limit_ns, late, after_store)


_TS = struct.Struct("<q")
_VAL = struct.Struct("<d")


def _store_single(
    store: Store,
    registry: SensorRegistry,
    chunk: ReadingChunk,
    future_limit_ns: int | None,
    late: LatePolicy | None,
    after_store: Callable[[npt.NDArray[np.int64], npt.NDArray[np.float64]], None] | None,
) -> StoreResult:
    """:func:`_store_many` for one reading, without numpy: what real devices send
    (ESPHome's one value per message) spent most of its time in numpy's per-call
    cost. ``tests/edge_agent/test_buffer.py`` holds the two to the same rows and counters."""
    t = int(chunk.ts[0])
    closed = store.get_state(CLOSED_UNTIL)
    is_late = t < closed
    keep = not is_late
    dropped_late = too_old = 0
    if late is None or late.max_age_ns <= 0:
        dropped_late = int(is_late)
    elif is_late:
        if t < store.get_state(MAX_TS) - late.max_age_ns:
            too_old = 1
        else:
            keep = True
    future = 0
    if future_limit_ns is not None and t > future_limit_ns:
        future = 1
        keep = False
        hold(store, chunk.node, chunk.sensor, chunk.unit, chunk.ts, chunk.values)
    stored = accepted_late = 0
    if keep:
        stored = 1
        sid = registry.id_for(chunk.node, chunk.sensor, chunk.unit)
        ts_blob, vals_blob = _TS.pack(t), _VAL.pack(float(chunk.values[0]))
        store.conn.execute(
            "INSERT INTO chunks(sensor_id, t_min, t_max, n, ts, vals, received_ns, crc) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (sid, t, t, 1, ts_blob, vals_blob, time.time_ns(), crc(ts_blob, vals_blob)),
        )
        if t > store.get_state(MAX_TS):
            store.set_state(MAX_TS, t)
        if after_store is not None:  # same transaction: alerts and readings together
            after_store(chunk.ts, chunk.values)
        if is_late and late is not None:
            accepted_late = 1
            starts = late.closed_windows_of(chunk.ts, closed)
            store.conn.executemany(
                "INSERT OR IGNORE INTO dirty(sensor_id, start_ns) VALUES (?, ?)",
                [(sid, int(st)) for st in starts.tolist()],
            )
    store.add_counter(counters.READINGS_STORED, stored)
    store.add_counter(counters.READINGS_LATE_ACCEPTED, accepted_late)
    store.add_counter(counters.DROPPED_LATE, dropped_late)
    store.add_counter(counters.DROPPED_TOO_OLD, too_old)
    return StoreResult(
        stored=stored, late=dropped_late + too_old, future=future, revised=accepted_late
    )


def _store_many(
    store: Store,
    registry: SensorRegistry,
    chunk: ReadingChunk,
    future_limit_ns: int | None,
    late: LatePolicy | None,
    after_store: Callable[[npt.NDArray[np.int64], npt.NDArray[np.float64]], None] | None,
) -> StoreResult:
    closed = store.get_state(CLOSED_UNTIL)
    is_late = chunk.ts < closed
    keep = ~is_late
    dropped_late = too_old = accepted_late = 0
    if late is None or late.max_age_ns <= 0:
        dropped_late = int(is_late.sum())
    else:
        old = is_late & (chunk.ts < store.get_state(MAX_TS) - late.max_age_ns)
        too_old = int(old.sum())
        keep |= is_late & ~old
    future = 0
    if future_limit_ns is not None:
        ahead = chunk.ts > future_limit_ns
        future = int(ahead.sum())
        if future:
            keep &= ~ahead
            hold(store, chunk.node, chunk.sensor, chunk.unit, chunk.ts[ahead], chunk.values[ahead])
    ts, vals = chunk.ts[keep], chunk.values[keep]
    if len(ts):
        order = np.argsort(ts, kind="stable")
        ts, vals = ts[order], vals[order]
        sid = registry.id_for(chunk.node, chunk.sensor, chunk.unit)
        ts_blob, vals_blob = ts.astype("<i8").tobytes(), vals.astype("<f8").tobytes()
        store.conn.execute(
            "INSERT INTO chunks(sensor_id, t_min, t_max, n, ts, vals, received_ns, crc) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                sid,
                int(ts[0]),
                int(ts[-1]),
                len(ts),
                ts_blob,
                vals_blob,
                time.time_ns(),
                crc(ts_blob, vals_blob),
            ),
        )
        if int(ts[-1]) > store.get_state(MAX_TS):
            store.set_state(MAX_TS, int(ts[-1]))
        late_ts = ts[ts < closed]
        accepted_late = len(late_ts)
        if after_store is not None:  # same transaction: alerts and readings together
            after_store(ts, vals)
        if accepted_late and late is not None:
            starts = late.closed_windows_of(late_ts, closed)
            store.conn.executemany(
                "INSERT OR IGNORE INTO dirty(sensor_id, start_ns) VALUES (?, ?)",
                [(sid, int(st)) for st in starts.tolist()],
            )
    store.add_counter(counters.READINGS_STORED, len(ts))
    store.add_counter(counters.READINGS_LATE_ACCEPTED, accepted_late)
    store.add_counter(counters.DROPPED_LATE, dropped_late)
    store.add_counter(counters.DROPPED_TOO_OLD, too_old)
    return StoreResult(
        stored=len(ts), late=dropped_late + too_old, future=future, revised=accepted_late
    )


HELD_BYTES = "held_bytes"  # state: the BLOB bytes in the held table


def hold(
    store: Store,
    node: str,
    sensor: str,
    unit: str,
    ts: npt.NDArray[np.int64],
    vals: npt.NDArray[np.float64],
) -> None:
    """Keep readings stamped beyond the future limit in ``held`` (inside the caller's
    transaction), counted as ``readings_held``: released into the buffer once the
    device's clock (or its known offset to the cloud's) allows them
    (:func:`edge_agent.pipeline.held.release`)."""
    ts_blob, vals_blob = ts.astype("<i8").tobytes(), vals.astype("<f8").tobytes()
    store.conn.execute(
        "INSERT INTO held(node, sensor, unit, n, t_min, t_max, ts, vals, received_ns, crc) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            node,
            sensor,
            unit,
            len(ts),
            int(ts.min()),
            int(ts.max()),
            ts_blob,
            vals_blob,
            time.time_ns(),
            crc(ts_blob, vals_blob),
        ),
    )
    store.set_state(HELD_BYTES, store.get_state(HELD_BYTES) + len(ts_blob) + len(vals_blob))
    store.add_counter(counters.READINGS_HELD, len(ts))


def store_chunk(
    store: Store,
    registry: SensorRegistry,
    chunk: ReadingChunk,
    digest: bytes | None = None,
    *,
    future_limit_ns: int | None = None,
    late: LatePolicy | None = None,
    after_store: Callable[[npt.NDArray[np.int64], npt.NDArray[np.float64]], None] | None = None,
) -> StoreResult:
    """:func:`store_one` in a transaction of its own: durable on return."""
    with store.tx():
        return store_one(
            store,
            registry,
            chunk,
            digest,
            future_limit_ns=future_limit_ns,
            late=late,
            after_store=after_store,
        )


@dataclass(frozen=True)
class Incoming:
    """One sensor message for :func:`store_many`."""

    chunk: ReadingChunk
    digest: bytes | None = None
    after_store: Callable[[npt.NDArray[np.int64], npt.NDArray[np.float64]], None] | None = None


def store_many(
    store: Store,
    registry: SensorRegistry,
    items: list[Incoming],
    *,
    future_limit_ns: int | None = None,
    late: LatePolicy | None = None,
) -> list[StoreResult]:
    """Group commit: several messages in one transaction (one fsync), all or none."""
    with store.tx():
        return [
            store_one(
                store,
                registry,
                it.chunk,
                it.digest,
                future_limit_ns=future_limit_ns,
                late=late,
                after_store=it.after_store,
            )
            for it in items
        ]


def read_range(
    store: Store, start_ns: int, end_ns: int, sensor_ids: Collection[int] | None = None
) -> dict[int, tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]]:
    """All stored readings with ``start_ns <= ts < end_ns``, per sensor id, sorted by ts
    (of the sensors ``sensor_ids`` only, if given)."""
    parts: dict[int, tuple[list[npt.NDArray[np.int64]], list[npt.NDArray[np.float64]]]] = {}
    rows = store.conn.execute(
        "SELECT sensor_id, ts, vals FROM chunks WHERE t_max >= ? AND t_min < ?",
        (start_ns, end_ns),
    )
    for sid, tsb, vb in rows:
        if sensor_ids is not None and sid not in sensor_ids:
            continue
        ts = np.frombuffer(tsb, dtype="<i8")
        vals = np.frombuffer(vb, dtype="<f8")
        sel = (ts >= start_ns) & (ts < end_ns)
        if sel.any():
            t_list, v_list = parts.setdefault(int(sid), ([], []))
            t_list.append(ts[sel].astype(np.int64))
            v_list.append(vals[sel].astype(np.float64))
    out: dict[int, tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]] = {}
    for sid, (t_list, v_list) in parts.items():
        ts = np.concatenate(t_list)
        vals = np.concatenate(v_list)
        order = np.argsort(ts, kind="stable")
        out[sid] = (ts[order], vals[order])
    return out


#: Message digests kept for recognising redeliveries. A broker only redelivers
#: messages that were in flight (sent, not yet acknowledged), at most its
#: max_inflight_messages per session (Mosquitto's default: 20), so the newest
#: few thousand are plenty.
KEEP_DIGESTS = 10_000


#: Topics whose last retained value is remembered (``retained = "once"``); the
#: least recently changed are forgotten beyond this (their value is then stored
#: once more at the next subscription).
KEEP_RETAINED = 100_000


def prune(store: Store, older_than_ns: int, *, keep_digests: int = KEEP_DIGESTS) -> int:
    """Delete chunks whose newest reading is older than ``older_than_ns`` *and* lies
    in closed windows, but for those a pending capture needs, and all but the
    newest ``keep_digests`` message digests.
    Returns the number of chunks deleted."""
    with store.tx():
        limit = min(older_than_ns, store.get_state(CLOSED_UNTIL))
        cur = store.conn.execute(f"DELETE FROM chunks WHERE t_max < ? AND {NOT_CAPTURED}", (limit,))
        if cur.rowcount:
            gone_before(store, limit)
        store.conn.execute("DELETE FROM revisions WHERE start_ns < ?", (limit,))
        store.conn.execute(
            "DELETE FROM received WHERE rowid <= (SELECT max(rowid) FROM received) - ?",
            (keep_digests,),
        )
        store.conn.execute(
            "DELETE FROM retained WHERE rowid <= (SELECT max(rowid) FROM retained) - ?",
            (KEEP_RETAINED,),
        )
        return int(cur.rowcount)
