"""The outbox: encoded batches waiting to leave the device, keyed by ``seq``.

``seq`` comes from the ``next_seq`` state value, incremented in the same
transaction that inserts the batch, so it is per-device, strictly increasing and
never reused, even across restarts.

A batch's life::

    pending ──publish──▶ (in flight) ──PUBACK──▶ sent ──cloud ack "stored"───▶ deleted
       ▲                                          │   └─cloud ack "rejected"─▶ deleted, counted
       └────────── next_try_ns passes, no ack ────┘

Alerts (:mod:`edge_agent.pipeline.alerts`), health reports (:mod:`edge_agent.pipeline.health`),
commands' results (:mod:`edge_agent.pipeline.commands`) and raw readings on request
(:mod:`edge_agent.pipeline.rawdata`) live the same life in tables of their own,
``alerts``, ``health``, ``results`` and ``raw``, and share the seq counter, so the
cloud acknowledges them all the same way.

``sent`` only means the broker has the batch; the row stays until the cloud
ingestor says InfluxDB and the archive hold it (``forward.end_to_end_ack``). A
sent batch without an ack is due again after ``ack_timeout_s`` × 2^(attempts−1),
capped at ``max_backoff_s``, with ±20 % jitter so a fleet coming back online
does not resend in lockstep. ``next_try_ns`` is on the monotonic clock of the
boot in the state ``boot_id`` (edge_agent/clock.py): a step of the wall clock
never delays a resend, and after a reboot every sent batch is due at once
(:func:`resume`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from edge_agent import counters
from edge_agent.clock import boot_id, mono_ns
from edge_agent.store import GENERATION, Store, crc
from shared.wire import Batch, encode_batch

NEXT_SEQ = "next_seq"
LAST_ACK = "last_ack_ns"
BOOT_ID = "boot_id"  # state: the boot whose monotonic clock next_try_ns is on

Kind = Literal["batch", "alert", "health", "result", "raw"]
#: The table of each kind, and the word its counters use (``batches_sent``, …).
TABLES: dict[Kind, tuple[str, counters.Outgoing]] = {
    "batch": ("outbox", "batches"),
    "alert": ("alerts", "alerts"),
    "health": ("health", "health"),
    "result": ("results", "results"),
    "raw": ("raw", "raw"),
}


@dataclass(frozen=True)
class Outgoing:
    seq: int
    payload: bytes
    attempts: int
    live: bool = False
    kind: Kind = "batch"
    crc: int | None = None  # of the payload as written; None in rows from older agents

    @property
    def intact(self) -> bool:
        """The payload is what was written (the SD card did not damage it)."""
        return self.crc is None or crc(self.payload) == self.crc


_WORD = dict(TABLES.values())


def resume(store: Store) -> None:
    """At the agent's start: if the resend times were set during another boot (their
    monotonic clock is gone), every sent message is due now."""
    this = boot_id()
    if store.get_state(BOOT_ID) == this and this:
        return
    with store.tx():
        for table in _WORD:
            store.conn.execute(f"UPDATE {table} SET next_try_ns = 0 WHERE state = 'sent'")
        store.set_state(BOOT_ID, this)


def generation(store: Store) -> int:
    """The buffer's generation (docs/wire-format.md §2.3); every message made now
    carries it, and its ack must name it."""
    return store.get_state(GENERATION)


def next_seq(store: Store) -> int:
    """Reserve the next seq; call inside a transaction."""
    seq = store.get_state(NEXT_SEQ, 1)
    store.set_state(NEXT_SEQ, seq + 1)
    return seq


def add(store: Store, batch: Batch, payload: bytes | None = None) -> None:
    """Append a batch (``payload``: its encoding, if already made); call inside the
    transaction that reserved its seq."""
    payload = encode_batch(batch) if payload is None else payload
    store.conn.execute(
        "INSERT INTO outbox(seq, created_ns, windows, readings, payload, state, crc, generation) "
        "VALUES (?, ?, ?, ?, ?, 'pending', ?, ?)",
        (
            batch.seq,
            batch.created_ns,
            batch.rows,
            batch.readings,
            payload,
            crc(payload),
            batch.generation,
        ),
    )
    store.add_counter(counters.BATCHES_CREATED, 1)
    first = int((batch.revision == 0).sum())
    store.add_counter(counters.WINDOWS_CLOSED, first)
    store.add_counter(counters.WINDOWS_RESENT_REVISED, batch.rows - first)


def add_wait(store: Store, seq: int, before: int) -> None:
    """Batch ``seq`` is not sent while batch ``before`` is unacknowledged: it carries a
    later version of a window that ``before`` carries. Nothing is recorded if
    ``before`` has already left the outbox. Call inside a transaction."""
    store.conn.execute(
        "INSERT OR IGNORE INTO outbox_after(seq, after) SELECT ?, seq FROM outbox WHERE seq = ?",
        (seq, before),
    )


def due(
    store: Store,
    limit: int,
    exclude: Iterable[int] = (),
    now_ns: int | None = None,
    live_since_ns: int | None = None,
) -> list[Outgoing]:
    """Batches to publish now: pending ones, and sent ones whose ack is overdue
    (``now_ns``: the monotonic clock, see the module doc).

    Drain order: alerts first (:mod:`edge_agent.pipeline.alerts`), then health reports
    (:mod:`edge_agent.pipeline.health`); then the *live* batches
    (created at or after ``live_since_ns``, oldest first), so that dashboards come
    back to life at once after an outage;
    then the *backfill* (older batches, oldest first). Without ``live_since_ns``
    everything is backfill, oldest first. Raw readings an operator asked for
    (:mod:`edge_agent.pipeline.rawdata`) come after every batch. A batch that waits for another
    (:func:`add_wait`: it holds a later version of one of its windows) is not due
    until that one is acknowledged or dropped, whatever the order above.
    """
    now_ns = mono_ns() if now_ns is None else now_ns
    skip = set(exclude)
    out: list[Outgoing] = []
    # alerts, then commands' results, then health reports, before every batch
    kind: Kind
    for kind in ("alert", "result", "health"):
        for seq, payload, attempts, check in store.conn.execute(
            f"SELECT seq, payload, attempts, crc FROM {TABLES[kind][0]} "
            "WHERE state = 'pending' OR (state = 'sent' AND next_try_ns <= ?) "
            "ORDER BY seq LIMIT ?",
            (now_ns, limit + len(skip)),
        ):
            if len(out) >= limit:
                return out
            if seq not in skip:
                out.append(Outgoing(int(seq), bytes(payload), int(attempts), True, kind, check))
    base = (
        "SELECT seq, payload, attempts, crc FROM outbox "
        "WHERE (state = 'pending' OR (state = 'sent' AND next_try_ns <= ?)) "
        "AND NOT EXISTS (SELECT 1 FROM outbox_after d WHERE d.seq = outbox.seq) "
    )
    queries: list[tuple[str, tuple[int, ...], bool]] = []
    if live_since_ns is not None:
        queries.append(
            (base + "AND created_ns >= ? ORDER BY seq LIMIT ?", (now_ns, live_since_ns), True)
        )
        queries.append(
            (base + "AND created_ns < ? ORDER BY seq LIMIT ?", (now_ns, live_since_ns), False)
        )
    else:
        queries.append((base + "ORDER BY seq LIMIT ?", (now_ns,), False))
    for sql, args, live in queries:
        for seq, payload, attempts, check in store.conn.execute(sql, (*args, limit + len(skip))):
            if len(out) >= limit:
                return out
            if seq not in skip:
                out.append(Outgoing(int(seq), bytes(payload), int(attempts), live, crc=check))
    # last, raw readings an operator asked for: below every batch, and under the
    # backfill's byte budget (not live)
    for seq, payload, attempts, check in store.conn.execute(
        "SELECT seq, payload, attempts, crc FROM raw "
        "WHERE state = 'pending' OR (state = 'sent' AND next_try_ns <= ?) ORDER BY seq LIMIT ?",
        (now_ns, limit + len(skip)),
    ):
        if len(out) >= limit:
            return out
        if seq not in skip:
            out.append(Outgoing(int(seq), bytes(payload), int(attempts), False, "raw", check))
    return out


def backoff_ns(attempts: int, timeout_s: float, max_s: float, rng: random.Random) -> int:
    """Delay before a sent batch without an ack is due again."""
    base = min(timeout_s * 2 ** max(0, attempts - 1), max_s)
    return int(base * rng.uniform(0.8, 1.2) * 1e9)


def mark_sent(
    store: Store,
    seqs: Iterable[int],
    *,
    timeout_s: float,
    max_backoff_s: float,
    rng: random.Random | None = None,
    now_ns: int | None = None,
) -> int:
    """Record PUBACKs and schedule the resend in case no ack follows (``now_ns``: the
    monotonic clock); returns rows changed."""
    rng = rng or random.Random()
    now_ns = mono_ns() if now_ns is None else now_ns
    wall_ns = time.time_ns()
    changed = 0
    with store.tx():
        for seq in seqs:
            table, row = _find(store, seq, "attempts")
            if row is None:
                continue  # acked (and deleted) before its PUBACK was processed
            attempts = int(row[0]) + 1
            store.conn.execute(
                f"UPDATE {table} SET state = 'sent', sent_ns = ?, attempts = ?, next_try_ns = ? "
                "WHERE seq = ?",
                (
                    wall_ns,
                    attempts,
                    now_ns + backoff_ns(attempts, timeout_s, max_backoff_s, rng),
                    seq,
                ),
            )
            changed += 1
            what = _WORD[table]
            store.add_counter(counters.outgoing(what, "sent"), 1)
            if attempts > 1:
                store.add_counter(counters.outgoing(what, "resent"), 1)
    return changed


def acknowledge(
    store: Store,
    seq: int,
    *,
    stored: bool,
    generation: int | None = None,
    partly: bool = False,
    now_ns: int | None = None,
) -> bool:
    """The cloud's verdict on a batch: delete it; returns False if it was already gone,
    or if the ack names another generation than the message's (an ack meant for a
    buffer this one replaced: counted as ``acks_other_generation`` and ignored).
    ``generation`` None: not checked (the broker's PUBACK as the verdict).
    ``partly``: stored, but some of its windows were refused by a quota of the
    cloud (counted as ``batches_stored_partly`` besides ``batches_acked``)."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    with store.tx():
        table, row = _find(store, seq, "generation")
        store.set_state(LAST_ACK, now_ns)
        if row is None:
            store.add_counter(counters.ACKS_DUPLICATE, 1)
            return False
        if generation is not None and row[0] != generation:
            store.add_counter(counters.ACKS_OTHER_GENERATION, 1)
            return False
        if partly:
            store.add_counter(counters.outgoing(_WORD[table], "stored_partly"), 1)
        store.conn.execute(f"DELETE FROM {table} WHERE seq = ?", (seq,))
        what = _WORD[table]
        store.add_counter(counters.outgoing(what, "acked" if stored else "rejected"), 1)
    return True


def _find(store: Store, seq: int, column: str) -> tuple[str, tuple[int, ...] | None]:
    """The table (outbox, alerts or health) holding ``seq`` and its ``column``; seqs
    are shared."""
    for table in _WORD:
        row = store.conn.execute(f"SELECT {column} FROM {table} WHERE seq = ?", (seq,)).fetchone()
        if row is not None:
            return table, tuple(row)
    return "outbox", None


def drop_damaged(store: Store, item: Outgoing) -> None:
    """A batch or alert whose payload no longer matches its checksum: it cannot be
    sent (the cloud would refuse it, or never answer), so it is dropped, counted."""
    table, what = TABLES[item.kind]
    with store.tx():
        store.conn.execute(f"DELETE FROM {table} WHERE seq = ?", (item.seq,))
        store.add_counter(counters.dropped_damaged(what), 1)


def count_unacked(store: Store) -> int:
    """Batches, alerts and health reports not yet acknowledged by the cloud."""
    return sum(int(store.conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) for t in _WORD)


def count_unacked_upto(store: Store, seq: int) -> int:
    """Batches up to ``seq`` not yet acknowledged by the cloud (what a flush waits for)."""
    row = store.conn.execute("SELECT count(*) FROM outbox WHERE seq <= ?", (seq,)).fetchone()
    return int(row[0])


def count_pending(store: Store) -> int:
    return int(
        store.conn.execute("SELECT count(*) FROM outbox WHERE state = 'pending'").fetchone()[0]
    )
