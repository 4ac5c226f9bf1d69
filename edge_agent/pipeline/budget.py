"""The disk budget: keep the agent's SQLite file within ``storage.max_bytes``.

When the pages in use exceed the budget, the documented policy frees space in
this order, each step only as far as needed:

0. the quarantine's oldest entries (bad input must never cost good data):
   counted as ``quarantine_dropped``; then the oldest unsent health reports
   (edge_agent/pipeline/health.py), all but the newest: counted as ``dropped_health``;
   then the message digests that recognise redeliveries beyond the newest
   :data:`MIN_DIGESTS` (a broker redelivers at most its in-flight window, 20
   messages by Mosquitto's default; the rest are kept only for convenience):
   counted as ``budget_pruned_digests``, not a loss;
1. raw reading chunks whose windows are closed (already summarised and in the
   outbox) and too old to be revised by late readings, oldest first, but for
   those a pending capture around an alert needs (edge_agent/pipeline/captures.py):
   counted as ``budget_pruned_chunks``; no reading is lost to delivery, only the
   raw detail kept for inspection and export;
2. raw readings an operator asked for (a ``raw`` command, edge_agent/pipeline/rawdata.py)
   that the cloud has not acked, oldest message first: counted as
   ``dropped_budget_raw`` (messages); copies, not telemetry, but the answer to the
   request is then incomplete; then the pending captures, oldest first, each
   counted as ``dropped_budget_captures``, and the chunks they kept (step 1);
3. readings held for being stamped ahead of the clock (edge_agent/pipeline/held.py),
   oldest first: counted as ``dropped_future``;
4. the oldest unacknowledged batches in the outbox: counted as
   ``dropped_budget_batches``, ``dropped_budget_windows`` and
   ``dropped_budget_readings``: these readings will never reach the cloud.

Raw chunks of open windows are never dropped, so intake never stops. SQLite does
not shrink its file when rows are deleted, it reuses the freed pages; so the
file grows to about the budget and stays there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from edge_agent import counters
from edge_agent.pipeline import buffer, captures, held, quarantine
from edge_agent.store import Store

log = logging.getLogger(__name__)

STEP_ROWS = 64  # rows deleted per step before the size is checked again
#: digests always kept, whatever the budget (buffer.KEEP_DIGESTS without pressure)
MIN_DIGESTS = 1_000


@dataclass(frozen=True)
class BudgetResult:
    used_bytes: int
    pruned_chunks: int = 0
    dropped_batches: int = 0
    dropped_readings: int = 0


def used_bytes(store: Store) -> int:
    """Bytes in pages that hold data (the file minus its free pages), WAL not counted."""
    c = store.conn
    page_size = int(c.execute("PRAGMA page_size").fetchone()[0])
    pages = int(c.execute("PRAGMA page_count").fetchone()[0])
    free = int(c.execute("PRAGMA freelist_count").fetchone()[0])
    return (pages - free) * page_size


def _prune_chunks(store: Store, max_bytes: int, closed: int) -> int:
    """Raw chunks of closed windows, oldest first, but for those a pending capture
    needs, until the data fits; returns how many went."""
    pruned = 0
    while used_bytes(store) > max_bytes:
        oldest = store.conn.execute(
            f"SELECT id, t_max FROM chunks WHERE t_max < ? AND {buffer.NOT_CAPTURED} "
            "ORDER BY t_max LIMIT ?",
            (closed, STEP_ROWS),
        ).fetchall()
        if not oldest:
            break
        store.conn.executemany("DELETE FROM chunks WHERE id = ?", [(i,) for i, _ in oldest])
        pruned += len(oldest)
        buffer.gone_before(store, int(oldest[-1][1]) + 1)
    return pruned


def enforce(store: Store, max_bytes: int, *, keep_raw_after_ns: int | None = None) -> BudgetResult:
    """Apply the drop policy until the data fits in ``max_bytes`` (0 = no budget).

    Raw chunks newer than ``keep_raw_after_ns`` are kept even in closed windows: a
    late reading may still revise those windows, and a revision computed from
    partly deleted raw data would replace a right window with a wrong one.
    """
    used = used_bytes(store)
    if max_bytes <= 0 or used <= max_bytes:
        return BudgetResult(used)
    pruned = batches = readings = windows = 0
    with store.tx():
        while used_bytes(store) > max_bytes and quarantine.free(store, 1):
            pass  # the oldest bad messages first: a few at a time, then measure again
        reports = 0
        while used_bytes(store) > max_bytes:  # then old health reports: not data
            cur = store.conn.execute(
                "DELETE FROM health WHERE seq IN (SELECT seq FROM health ORDER BY seq LIMIT ?) "
                "AND seq < (SELECT max(seq) FROM health)",
                (STEP_ROWS // 8,),
            )
            if cur.rowcount == 0:
                break
            reports += cur.rowcount
        store.add_counter(counters.DROPPED_HEALTH, reports)
        digests = 0
        while used_bytes(store) > max_bytes:  # then digests beyond the redelivery window
            cur = store.conn.execute(
                "DELETE FROM received WHERE rowid IN (SELECT rowid FROM received "
                "WHERE rowid <= (SELECT max(rowid) FROM received) - ? ORDER BY rowid LIMIT ?)",
                (MIN_DIGESTS, STEP_ROWS * 4),
            )
            if cur.rowcount == 0:
                break
            digests += cur.rowcount
        store.add_counter(counters.BUDGET_PRUNED_DIGESTS, digests)
        closed = store.get_state(buffer.CLOSED_UNTIL)
        if keep_raw_after_ns is not None:
            closed = min(closed, keep_raw_after_ns)
        pruned += _prune_chunks(store, max_bytes, closed)
        raw_dropped = 0
        while used_bytes(store) > max_bytes:  # copies an operator asked for
            cur = store.conn.execute(
                "DELETE FROM raw WHERE seq IN (SELECT seq FROM raw ORDER BY seq LIMIT ?)",
                (STEP_ROWS // 8,),
            )
            if cur.rowcount == 0:
                break
            raw_dropped += cur.rowcount
        store.add_counter(counters.DROPPED_BUDGET_RAW, raw_dropped)
        while used_bytes(store) > max_bytes and captures.drop_oldest(store):
            pruned += _prune_chunks(store, max_bytes, closed)
        while used_bytes(store) > max_bytes and held.drop_oldest(store, STEP_ROWS // 4):
            pass
        while used_bytes(store) > max_bytes:
            rows = store.conn.execute(
                "SELECT seq, windows, readings FROM outbox ORDER BY seq LIMIT ?", (STEP_ROWS // 8,)
            ).fetchall()
            if not rows:
                break
            store.conn.executemany("DELETE FROM outbox WHERE seq = ?", [(r[0],) for r in rows])
            batches += len(rows)
            windows += sum(int(r[1]) for r in rows)
            readings += sum(int(r[2]) for r in rows)
        store.add_counter(counters.BUDGET_PRUNED_CHUNKS, pruned)
        store.add_counter(counters.DROPPED_BUDGET_BATCHES, batches)
        store.add_counter(counters.DROPPED_BUDGET_WINDOWS, windows)
        store.add_counter(counters.DROPPED_BUDGET_READINGS, readings)
        used = used_bytes(store)
        if used > max_bytes:
            store.add_counter(counters.BUDGET_OVERRUNS, 1)
    if batches:
        log.warning(
            "budget: dropped the %d oldest unsent batches (%d readings) to stay within %d bytes",
            batches,
            readings,
            max_bytes,
        )
    if used > max_bytes:
        log.error(
            "budget: %d bytes in use after dropping all it may; storage.max_bytes=%d is too "
            "small for the open windows",
            used,
            max_bytes,
        )
    return BudgetResult(used, pruned, batches, readings)
