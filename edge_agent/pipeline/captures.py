"""A flight recorder on alerts: the raw readings around each raise, to the lake.

An alert rule with ``capture = { before_s = …, after_s = … }`` starts a capture
when it raises: the span ``[t − before_s, t + after_s)`` of the rule's sensor,
``t`` the alert's event time. The capture is recorded (table ``captures``) in the
transaction that records the alert, whose message names it (``capture``:
``alert-<seq>``, docs/wire-format.md §2.9). Once the device has stored readings
up to the span's end (its newest event time passes it), or ``after_s`` +
:data:`GRACE_S` have passed on the monotonic clock (a sensor that stopped
sending), the readings the buffer holds in the span are sent like a ``raw``
command's (edge_agent/pipeline/rawdata.py), with the capture's id as their
``request``: after every batch, under the backfill's byte budget, to the lake's
``raw`` table.

Bounds and conflicts, each counted:

- one pending capture per rule: a rule that raises again while its capture waits
  extends that capture (to at most :data:`MAX_SPAN_S`), and its alert names the
  same capture (``captures_extended``); so the table holds at most one row per rule;
- retention and the disk budget keep the raw chunks a pending capture needs
  (buffer.NOT_CAPTURED); a budget that cannot be met otherwise drops the oldest
  pending captures (``dropped_budget_captures``) before any reading or batch;
- readings the buffer no longer held when the capture began (its span reaches
  back past the retention), or more than ``[commands] raw_max_readings``, make it
  ``captures_partial``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edge_agent import counters
from edge_agent.pipeline import buffer, rawdata
from edge_agent.store import Store
from shared.config import Invalid

if TYPE_CHECKING:  # the config holds the alert rules, which hold a Capture
    from edge_agent.config import AgentConfig

log = logging.getLogger(__name__)

#: the longest a capture may reach before or after its alert
MAX_CAPTURE_S = 86_400.0
#: the longest span one capture grows to when its rule raises again meanwhile
MAX_SPAN_S = 2 * MAX_CAPTURE_S
#: a capture whose sensor has gone quiet is sent this long after ``after_s``
GRACE_S = 60.0


@dataclass(frozen=True)
class Capture:
    """``capture = { before_s = 60, after_s = 30 }`` in an ``[[alerts]]`` rule."""

    before_s: float = 60.0
    after_s: float = 60.0

    def __post_init__(self) -> None:
        for key in ("before_s", "after_s"):
            if not 0 <= getattr(self, key) <= MAX_CAPTURE_S:
                raise Invalid(key, f"must be 0-{MAX_CAPTURE_S:g} seconds")
        if self.before_s + self.after_s <= 0:
            raise Invalid("after_s", "a capture needs before_s or after_s above 0")


def start(
    store: Store, *, rule: str, node: str, sensor: str, ts_ns: int, capture: Capture, seq: int
) -> str:
    """Record the capture of the raise with seq ``seq`` (inside its transaction), or
    extend the rule's pending one; returns the capture's id."""
    end = ts_ns + int(capture.after_s * 1e9)
    row = store.conn.execute(
        "SELECT id, start_ns, end_ns FROM captures WHERE rule = ?", (rule,)
    ).fetchone()
    if row is not None:
        cid, first, last = str(row[0]), int(row[1]), int(row[2])
        new_end = min(max(last, end), first + int(MAX_SPAN_S * 1e9))
        store.conn.execute(
            "UPDATE captures SET end_ns = ?, after_s = max(after_s, ?) WHERE id = ?",
            (new_end, capture.after_s, cid),
        )
        store.add_counter(counters.CAPTURES_EXTENDED, 1)
        return cid
    cid = f"alert-{seq}"
    store.conn.execute(
        "INSERT INTO captures(id, rule, node, sensor, start_ns, end_ns, after_s, gone_ns) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (cid, rule, node, sensor, max(0, ts_ns - int(capture.before_s * 1e9)), end,
         capture.after_s, store.get_state(buffer.GONE_BEFORE)),
    )  # fmt: skip
    store.add_counter(counters.CAPTURES_STARTED, 1)
    return cid


class Recorder:
    """Sends the pending captures when they are due; the agent's tick calls :meth:`tick`."""

    def __init__(self, cfg: AgentConfig, store: Store) -> None:
        self.cfg = cfg
        self.store = store
        #: capture id → when it is due at the latest (monotonic s), set when first seen
        self._deadline: dict[str, float] = {}

    def tick(self, now_ns: int | None = None) -> int:
        """Send the captures that are due; returns how many."""
        rows = self.store.conn.execute(
            "SELECT id, node, sensor, start_ns, end_ns, after_s, gone_ns FROM captures"
        ).fetchall()
        if not rows:
            self._deadline.clear()
            return 0
        newest = self.store.get_state(buffer.MAX_TS)
        mono = time.monotonic()
        due = []
        for cid, node, sensor, first, last, after_s, gone in rows:
            deadline = self._deadline.setdefault(cid, mono + float(after_s) + GRACE_S)
            if newest >= last or mono >= deadline:
                due.append((str(cid), str(node), str(sensor), int(first), int(last), gone > first))
        for capture in due:
            self._send(*capture, now_ns=time.time_ns() if now_ns is None else now_ns)
        return len(due)

    def _send(
        self, cid: str, node: str, sensor: str, first: int, last: int, gone: bool, now_ns: int
    ) -> None:
        """``gone``: readings of the span were deleted before the capture began."""
        request = rawdata.RawRequest(f"{node}/{sensor}", first, last)
        with self.store.tx():
            answer: dict[str, Any] = rawdata.queue(self.store, self.cfg, cid, request, now_ns)
            self.store.conn.execute("DELETE FROM captures WHERE id = ?", (cid,))
            self.store.add_counter(counters.CAPTURES_SENT, 1)
            if gone or "next_from_ns" in answer:
                self.store.add_counter(counters.CAPTURES_PARTIAL, 1)
        self._deadline.pop(cid, None)
        log.info(
            "captures: %s sent, %d readings of %s/%s in %d messages",
            cid, answer["readings"], node, sensor, answer["messages"],
        )  # fmt: skip


def drop_oldest(store: Store) -> bool:
    """The disk budget's last resort before readings: forget the oldest pending
    capture (its chunks may then go). Inside the budget's transaction."""
    row = store.conn.execute("SELECT id FROM captures ORDER BY start_ns LIMIT 1").fetchone()
    if row is None:
        return False
    store.conn.execute("DELETE FROM captures WHERE id = ?", (row[0],))
    store.add_counter(counters.DROPPED_BUDGET_CAPTURES, 1)
    log.warning("captures: %s dropped: the disk budget needs its readings' space", row[0])
    return True
