"""The agent's health report to the cloud: what the technician's ``status`` shows,
sent so that the cloud can see a fleet (the message: shared/health.py).

A report is made at start, every ``health.interval_s``, at once when the set of
problems changes (at most one such report every :data:`CHANGE_EVERY_S`, so that
a flapping state cannot fill the buffer), and at a clean stop. Problems (worst first, ``PROBLEMS``):

* ``store-failing``: ``store_errors`` grew within the last interval;
* ``intake-down``: not subscribed to the local broker;
* ``dropping``: a ``dropped_*`` counter grew within the last interval;
* ``near-budget``: the buffer uses more than ``health.near_budget`` of
  ``storage.max_bytes``;
* ``link-down``: not connected to the cloud broker;
* ``behind``: the oldest unsent batch is older than ``health.behind_after_s``.

Reports are stored in the ``health`` table, in a transaction of their own, and
leave like alerts (after alerts, before batches), acknowledged and resent until
the cloud has them. At most ``health.max_unsent`` wait: beyond that the oldest is
deleted and counted as ``dropped_health`` (a day of reports at the default
interval; the newest say more about the device than the oldest). Under the disk
budget (edge_agent/pipeline/budget.py) old reports go before any reading, all but the
newest.

The clock offset comes from the cloud's time in its acks (edge_agent/clock.py):
for a message published once, the ack's ``ts_ns`` against the midpoint of
publish and receipt, within ± half the round trip; of the last samples taken
since the wall clock last stepped, the one with the shortest round trip.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any

from edge_agent import counters
from edge_agent.clock import Clock
from edge_agent.config import AgentConfig
from edge_agent.desired import Status
from edge_agent.pipeline import budget, outbox
from edge_agent.pipeline.snapshot import buffer_snapshot
from edge_agent.store import Store, crc
from shared.health import PROBLEMS, HealthReport

CHECK_EVERY_S = 1.0  # the problems are checked at most this often
#: at most one report for a change of state this often: a state that flaps (the
#: buffer near its budget, trimmed, near again) must not fill the buffer with reports
CHANGE_EVERY_S = 10.0
#: "near-budget" clears only this far below health.near_budget (hysteresis)
NEAR_BUDGET_CLEAR = 0.05


def agent_version() -> str:
    try:
        return metadata.version("iot-telemetry")[:32]
    except metadata.PackageNotFoundError:
        return "unknown"


class Reporter:
    def __init__(
        self,
        cfg: AgentConfig,
        store: Store,
        clock: Clock,
        config_status: Callable[[], Status] | None = None,
    ) -> None:
        """``config_status``: the desired config's (edge_agent/desired.py)."""
        self.cfg = cfg
        self.store = store
        self.clock = clock
        self.config_status = config_status
        self.version = agent_version()
        self._started = time.monotonic()
        self._next_report = 0.0
        self._next_check = 0.0
        self._next_change = 0.0
        self._problems: frozenset[str] | None = None  # as last reported
        self._drops = self._errors = -1
        self._drops_grew = self._errors_grew = float("-inf")

    def tick(self, *, intake_up: bool, forward_up: bool, stopping: bool = False) -> bool:
        """Make a report if one is due; True if one was made."""
        if not self.cfg.health.interval_s:
            return False  # reports are off
        now = time.monotonic()
        if now < self._next_check and not stopping:
            return False
        self._next_check = now + CHECK_EVERY_S
        problems = self._check(now, intake_up=intake_up, forward_up=forward_up)
        if stopping:
            reason = "stop"
        elif self._problems is None:
            reason = "start"
        elif problems != self._problems and now >= self._next_change:
            reason = "change"
        elif now >= self._next_report:
            reason = "interval"
        else:
            return False
        self._store(self._report(reason, problems, intake_up, forward_up))
        self._problems = problems
        self._next_report = now + self.cfg.health.interval_s
        self._next_change = now + CHANGE_EVERY_S
        return True

    def _check(self, now: float, *, intake_up: bool, forward_up: bool) -> frozenset[str]:
        h, counts = self.cfg.health, self.store.counters()
        drops = sum(v for k, v in counts.items() if k.startswith("dropped_"))
        errors = counts.get(counters.STORE_ERRORS, 0)
        if self._drops >= 0 and drops > self._drops:
            self._drops_grew = now
        if self._errors >= 0 and errors > self._errors:
            self._errors_grew = now
        self._drops, self._errors = drops, errors
        oldest = self.store.conn.execute(
            "SELECT created_ns FROM outbox ORDER BY seq LIMIT 1"
        ).fetchone()
        max_bytes = self.cfg.storage.max_bytes
        near = h.near_budget
        if self._problems is not None and "near-budget" in self._problems:
            near -= NEAR_BUDGET_CLEAR  # raised: it clears only well below the mark
        found = {
            "store-failing": now - self._errors_grew < h.interval_s,
            "intake-down": not intake_up,
            "dropping": now - self._drops_grew < h.interval_s,
            "near-budget": bool(max_bytes) and budget.used_bytes(self.store) > near * max_bytes,
            "link-down": not forward_up,
            "behind": oldest is not None
            and time.time_ns() - int(oldest[0]) > h.behind_after_s * 1e9,
        }
        return frozenset(p for p in PROBLEMS if found[p])

    def _report(
        self, reason: str, problems: frozenset[str], intake_up: bool, forward_up: bool
    ) -> HealthReport:
        now_ns = time.time_ns()
        snap = buffer_snapshot(self.store)
        clock = self.clock.estimate()
        return HealthReport(
            seq=0,  # given when stored
            ts_ns=now_ns,
            version=self.version,
            reason=reason,
            problems=tuple(p for p in PROBLEMS if p in problems),
            uptime_s=round(time.monotonic() - self._started, 3),
            intake_up=intake_up,
            forward_up=forward_up,
            backlog_batches=snap.backlog_batches,
            backlog_readings=snap.backlog_readings,
            backlog_bytes=snap.backlog_bytes,
            quarantined=snap.quarantined,
            quarantine_bytes=snap.quarantine_bytes,
            disk_used_bytes=snap.used_bytes,
            disk_budget_bytes=self.cfg.storage.max_bytes,
            store_errors=snap.store_errors,
            readings_stored=snap.counters.get(counters.READINGS_STORED, 0),
            alerts_open=snap.alerts_open,
            alerts_unsent=snap.alerts_unsent,
            oldest_unsent_age_s=snap.oldest_unsent_age_s(now_ns),
            last_ack_age_s=snap.last_ack_age_s(now_ns),
            clock_offset_s=clock.offset_s if clock else None,
            clock_rtt_s=clock.rtt_s if clock else None,
            drops={k: v for k, v in snap.drops.items() if v},
            **self._config_fields(),
        )

    def _config_fields(self) -> dict[str, Any]:
        if self.config_status is None:
            return {}
        s = self.config_status()
        return {"config_version": s.version, "config_state": s.state, "config_rejected": s.rejected}

    def _store(self, report: HealthReport) -> None:
        """Give the report its seq and keep it; drop the oldest beyond ``max_unsent``."""
        with self.store.tx():
            seq = outbox.next_seq(self.store)
            generation = outbox.generation(self.store)
            payload = dataclasses.replace(report, seq=seq, generation=generation).encode()
            self.store.conn.execute(
                "INSERT INTO health(seq, created_ns, payload, state, crc, generation) "
                "VALUES (?, ?, ?, 'pending', ?, ?)",
                (seq, report.ts_ns, payload, crc(payload), generation),
            )
            self.store.add_counter(counters.HEALTH_REPORTS, 1)
            over = self.store.conn.execute(
                "DELETE FROM health WHERE seq IN (SELECT seq FROM health ORDER BY seq DESC "
                "LIMIT -1 OFFSET ?)",
                (self.cfg.health.max_unsent,),
            ).rowcount
            if over:
                self.store.add_counter(counters.DROPPED_HEALTH, over)
