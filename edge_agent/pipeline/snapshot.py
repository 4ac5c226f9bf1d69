"""What the buffer holds right now, read with one set of queries: the backlog,
the quarantine, the disk in use, the alerts and the counters. The health reports
(:mod:`edge_agent.pipeline.health`) and ``edge-agent status``
(:mod:`edge_agent.technician.status`) both read them from here."""

from __future__ import annotations

from dataclasses import dataclass

from edge_agent import counters
from edge_agent.pipeline import budget, outbox, quarantine
from edge_agent.store import Store


@dataclass(frozen=True)
class BufferSnapshot:
    backlog_batches: int
    backlog_readings: int
    backlog_bytes: int
    #: when the oldest unsent batch was made (wall clock, ns); None: nothing unsent
    oldest_unsent_ns: int | None
    #: when the last ack came (wall clock, ns); None: never
    last_ack_ns: int | None
    quarantined: int
    quarantine_bytes: int
    used_bytes: int
    alerts_open: int
    alerts_unsent: int
    counters: dict[str, int]

    @property
    def store_errors(self) -> int:
        return self.counters.get(counters.STORE_ERRORS, 0)

    @property
    def drops(self) -> dict[str, int]:
        """The ``dropped_*`` counters, by name."""
        return {k: v for k, v in sorted(self.counters.items()) if k.startswith("dropped_")}

    def oldest_unsent_age_s(self, now_ns: int) -> float | None:
        return None if self.oldest_unsent_ns is None else (now_ns - self.oldest_unsent_ns) / 1e9

    def last_ack_age_s(self, now_ns: int) -> float | None:
        return None if self.last_ack_ns is None else (now_ns - self.last_ack_ns) / 1e9


def buffer_snapshot(store: Store) -> BufferSnapshot:
    c = store.conn
    n, readings, size, oldest = c.execute(
        "SELECT count(*), coalesce(sum(readings), 0), coalesce(sum(length(payload)), 0), "
        "min(created_ns) FROM outbox"
    ).fetchone()
    last_ack = store.get_state(outbox.LAST_ACK)
    return BufferSnapshot(
        backlog_batches=int(n),
        backlog_readings=int(readings),
        backlog_bytes=int(size),
        oldest_unsent_ns=int(oldest) if oldest is not None else None,
        last_ack_ns=last_ack or None,
        quarantined=int(c.execute("SELECT count(*) FROM quarantine").fetchone()[0]),
        quarantine_bytes=quarantine.total_bytes(store),
        used_bytes=budget.used_bytes(store),
        alerts_open=int(
            c.execute("SELECT count(*) FROM alert_state WHERE raised = 1").fetchone()[0]
        ),
        alerts_unsent=int(c.execute("SELECT count(*) FROM alerts").fetchone()[0]),
        counters=store.counters(),
    )
