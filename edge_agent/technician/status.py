"""What the agent's SQLite file says about its state: for the CLI, tests and the demo.

Reads through a read-only connection, so it works while the agent runs and
while it is stopped, with no network.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from edge_agent import control
from edge_agent import counters as counter_names
from edge_agent.lock import holder_pid, is_locked, lock_path
from edge_agent.pipeline import buffer, held
from edge_agent.pipeline.snapshot import buffer_snapshot
from edge_agent.store import (
    GENERATION,
    INTAKE_SESSION,
    LAST_STORE_ERROR,
    SCHEMA_VERSION,
    Store,
)


def open_readonly(path: str | Path) -> Store:
    """A read-only connection; a file from an older agent is migrated first (the
    migrations only add tables and columns, which an older agent ignores)."""
    if not Path(path).exists():
        raise FileNotFoundError(f"no agent buffer at {path}")
    store = Store(path, readonly=True)
    if store.conn.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
        store.close()
        Store(path).close()
        store = Store(path, readonly=True)
    return store


def source_counts(counters: dict[str, int]) -> dict[str, dict[str, int]]:
    """Intake per source (``source_<name>_<kind>`` counters, kinds as in
    :data:`edge_agent.counters.SOURCE_KINDS`), by source name."""
    out: dict[str, dict[str, int]] = {}
    for key, value in counters.items():
        if not key.startswith("source_"):
            continue
        name, _, kind = key[len("source_") :].rpartition("_")
        if name and kind in counter_names.SOURCE_KINDS:
            out.setdefault(name, dict.fromkeys(counter_names.SOURCE_KINDS, 0))[kind] = value
    return dict(sorted(out.items()))


def read_status(path: str | Path, now_ns: int | None = None) -> dict[str, Any]:
    """``now_ns``: the wall clock to measure ages against (tests); by default ages of
    the agent's own clock readings are on the monotonic clock (edge_agent/clock.py)."""
    given_now, now_ns = now_ns, time.time_ns() if now_ns is None else now_ns
    store = open_readonly(path)
    try:
        c = store.conn
        states = {
            str(s): int(n)
            for s, n in c.execute("SELECT state, count(*) FROM outbox GROUP BY state")
        }
        snap = buffer_snapshot(store)
        # The lock says whether an agent runs; the heartbeat whether it is healthy
        # (a tick that cannot write the file, on a full disk say, stops beating).
        beating = control.agent_running(store, given_now)
        running = is_locked(path) or beating
        beat_age = control.heartbeat_age_s(store, given_now)
        clock = control.clock_offset(store) if beating else None
        last_error = store.get_state(LAST_STORE_ERROR)
        counters = snap.counters
        pid = holder_pid(lock_path(path)) or store.get_state(control.PID)
        return {
            "buffer": str(path),
            "running": running,
            "healthy": beating,
            "agent_pid": pid if running else None,
            "heartbeat_age_s": beat_age if running else None,
            # the cloud's clock minus this device's, as the running agent measured it
            "clock_offset_s": clock[0] if clock else None,
            "clock_rtt_s": clock[1] if clock else None,
            "clock_measured_age_s": clock[2] if clock else None,
            "held_readings": held.count(store),
            "intake_session": store.get_state(INTAKE_SESSION),
            "generation": store.get_state(GENERATION),
            "intake_connected": beating and bool(store.get_state(control.INTAKE_UP)),
            "forward_connected": beating and bool(store.get_state(control.FORWARD_UP)),
            "store_errors": counters.get(counter_names.STORE_ERRORS, 0),
            "last_store_error_ns": last_error or None,
            "last_ack_ns": snap.last_ack_ns,
            "last_ack_age_s": snap.last_ack_age_s(now_ns),
            "backlog_batches": snap.backlog_batches,
            "backlog_readings": snap.backlog_readings,
            "backlog_bytes": snap.backlog_bytes,
            "oldest_unsent_age_s": snap.oldest_unsent_age_s(now_ns),
            "outbox": states,
            "counters": counters,
            "drops": snap.drops,
            "sources": source_counts(counters),
            "closed_until_ns": store.get_state(buffer.CLOSED_UNTIL),
            "max_event_ns": store.get_state(buffer.MAX_TS),
            "sensors": int(c.execute("SELECT count(*) FROM sensors").fetchone()[0]),
            "raw_chunks": int(c.execute("SELECT count(*) FROM chunks").fetchone()[0]),
            "quarantined": snap.quarantined,
            "quarantine_bytes": snap.quarantine_bytes,
            "quarantine_dropped": counters.get(counter_names.QUARANTINE_DROPPED, 0),
            "open_alerts": [
                {"rule": str(r), "since_ns": int(t)}
                for r, t in c.execute(
                    "SELECT rule, since_ns FROM alert_state WHERE raised = 1 ORDER BY rule"
                )
            ],
            "unsent_alerts": snap.alerts_unsent,
            "unsent_health": int(c.execute("SELECT count(*) FROM health").fetchone()[0]),
            "used_bytes": snap.used_bytes,
            "file_bytes": sum(
                p.stat().st_size for p in (Path(path), Path(f"{path}-wal")) if p.exists()
            ),
        }
    finally:
        store.close()
