"""The outbox: encoded batches waiting to leave the device, keyed by ``seq``.

``seq`` comes from the ``next_seq`` state value, incremented in the same
transaction that inserts the batch, so it is per-device, strictly increasing and
never reused, even across restarts and pruning.

Row states: ``pending`` (not yet accepted by the broker) → ``sent`` (the broker
sent PUBACK). End-to-end acknowledgements from the cloud (a later state,
``acked``) and the deletion that follows them come with the delivery work; see
``docs/architecture.md``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from edge_agent.store import Store
from shared.wire import Batch, encode_batch

NEXT_SEQ = "next_seq"


@dataclass(frozen=True)
class Outgoing:
    seq: int
    payload: bytes


def next_seq(store: Store) -> int:
    """Reserve the next seq; call inside a transaction."""
    seq = store.get_state(NEXT_SEQ, 1)
    store.set_state(NEXT_SEQ, seq + 1)
    return seq


def add(store: Store, batch: Batch) -> None:
    """Append an encoded batch; call inside the transaction that reserved its seq."""
    store.conn.execute(
        "INSERT INTO outbox(seq, created_ns, windows, readings, payload, state) "
        "VALUES (?, ?, ?, ?, ?, 'pending')",
        (batch.seq, batch.created_ns, batch.rows, batch.readings, encode_batch(batch)),
    )
    store.add_counter("batches_created", 1)
    store.add_counter("windows_closed", batch.rows)


def pending(store: Store, limit: int, exclude: Iterable[int] = ()) -> list[Outgoing]:
    """Oldest pending batches first, skipping the seqs in ``exclude``."""
    skip = set(exclude)
    out: list[Outgoing] = []
    rows = store.conn.execute(
        "SELECT seq, payload FROM outbox WHERE state = 'pending' ORDER BY seq LIMIT ?",
        (limit + len(skip),),
    )
    for seq, payload in rows:
        if seq not in skip:
            out.append(Outgoing(int(seq), bytes(payload)))
        if len(out) >= limit:
            break
    return out


def mark_sent(store: Store, seqs: Iterable[int]) -> int:
    """Record PUBACKs; returns how many rows changed state."""
    now = time.time_ns()
    changed = 0
    with store.tx():
        for seq in seqs:
            cur = store.conn.execute(
                "UPDATE outbox SET state = 'sent', sent_ns = ? WHERE seq = ? AND state = 'pending'",
                (now, seq),
            )
            changed += cur.rowcount
        store.add_counter("batches_sent", changed)
    return changed


def count_pending(store: Store) -> int:
    return int(
        store.conn.execute("SELECT count(*) FROM outbox WHERE state = 'pending'").fetchone()[0]
    )
