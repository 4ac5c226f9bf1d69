"""The agent's quarantine: local messages that are not valid readings, with the reason.

Bad input must never cost good data, so the quarantine has a cap of its own:
``storage.quarantine_max_bytes`` (payload bytes kept) and
``storage.quarantine_max_age_s``. Over either, the oldest entries go first,
counted as ``quarantine_dropped`` (and ``quarantine_dropped_bytes``). The disk
budget (:mod:`edge_agent.pipeline.budget`) frees the quarantine before anything else, too.
A message's first 64 KiB are kept, for a technician to look at with
``edge-agent quarantine``.

The running total of payload bytes lives in the ``state`` table and changes in
the transactions that add and delete entries, so the cap costs no table scan
per message.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from edge_agent import counters
from edge_agent.store import Store
from shared.errors import WireError

KEEP_BYTES = 65536  # of each message's payload
BYTES = "quarantine_bytes"  # state key: payload bytes in the table


@dataclass(frozen=True)
class Entry:
    id: int
    received_ns: int
    topic: str
    reason: str
    message: str
    bytes: int


def total_bytes(store: Store) -> int:
    """Payload bytes kept (computed once for a file from before the running total)."""
    value = store.get_state(BYTES, -1)
    if value < 0:
        row = store.conn.execute("SELECT coalesce(sum(length(payload)), 0) FROM quarantine")
        value = int(row.fetchone()[0])
    return value


def add(store: Store, topic: str, exc: WireError, payload: bytes, *, max_bytes: int) -> None:
    """Keep a message that is not valid readings, with its reason, within the cap (call
    inside the caller's transaction)."""
    kept = payload[:KEEP_BYTES]
    before = total_bytes(store)
    store.conn.execute(
        "INSERT INTO quarantine(received_ns, topic, reason, message, payload) "
        "VALUES (?, ?, ?, ?, ?)",
        (time.time_ns(), topic[:1024], exc.reason, str(exc)[:1024], kept),
    )
    store.add_counter(counters.quarantined(exc.reason), 1)
    total = before + len(kept)
    store.set_state(BYTES, total)
    if max_bytes and total > max_bytes:
        free(store, total - max_bytes)


def free(store: Store, need_bytes: int = 0, *, older_than_ns: int | None = None) -> int:
    """Delete the oldest entries: at least ``need_bytes`` of payload, and every entry
    received before ``older_than_ns``. Returns the bytes freed (call in a transaction)."""
    freed = dropped = 0
    total = total_bytes(store)
    while True:
        rows = store.conn.execute(
            "SELECT id, length(payload), received_ns FROM quarantine ORDER BY id LIMIT 64"
        ).fetchall()
        take = []
        for rid, size, received in rows:
            if freed >= need_bytes and (older_than_ns is None or received >= older_than_ns):
                break
            take.append((rid,))
            freed += int(size or 0)
        if not take:
            break
        store.conn.executemany("DELETE FROM quarantine WHERE id = ?", take)
        dropped += len(take)
        if len(take) < len(rows):
            break
    if dropped:
        store.add_counter(counters.QUARANTINE_DROPPED, dropped)
        store.add_counter(counters.QUARANTINE_DROPPED_BYTES, freed)
        store.set_state(BYTES, max(0, total - freed))
    return freed


def entries(store: Store, limit: int = 20, reason: str | None = None) -> list[Entry]:
    """The newest entries first (reading only)."""
    sql = "SELECT id, received_ns, topic, reason, message, length(payload) FROM quarantine"
    args: tuple[object, ...] = ()
    if reason:
        sql += " WHERE reason = ?"
        args = (reason,)
    rows = store.conn.execute(sql + " ORDER BY id DESC LIMIT ?", (*args, limit))
    return [
        Entry(int(i), int(t), str(tp), str(r), str(m), int(n or 0)) for i, t, tp, r, m, n in rows
    ]


def by_reason(store: Store) -> dict[str, int]:
    return {
        str(r): int(n)
        for r, n in store.conn.execute(
            "SELECT reason, count(*) FROM quarantine GROUP BY reason ORDER BY reason"
        )
    }


def payload(store: Store, entry_id: int) -> bytes | None:
    row = store.conn.execute("SELECT payload FROM quarantine WHERE id = ?", (entry_id,)).fetchone()
    return None if row is None else bytes(row[0])
