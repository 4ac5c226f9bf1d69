"""Every counter the agent keeps in its buffer, defined once (as vector keeps its
internal events in ``src/internal_events/`` and telegraf in ``selfstat``).

:meth:`~edge_agent.store.Store.add_counter` takes only a :data:`CounterName`, which
only this module makes, so a name cannot be mistyped where it is counted. The
counters are exported in two places: ``edge-agent status`` (all of them, and the
``source_*`` ones as the per-source table) and the health report's ``drops`` (the
``dropped_*`` ones, which must be shared/health.py's ``KNOWN_DROPS``: the cloud
gives each a field of its own).
``tests/system/test_layers.py`` checks that every count goes through here and that the
drops agree with ``KNOWN_DROPS``.

Two families have a part that is not fixed here: ``quarantined_<reason>`` (the
reasons are the sources' and the wire decoders' slugs) and ``source_<name>_<kind>``
(the names are the config's sources; the kinds are :data:`SOURCE_KINDS`). The
others (``alerts_<state>``, ``commands_refused_<reason>``, ``<what>_sent`` …) are
in :data:`FIXED` member by member.
"""

from __future__ import annotations

from typing import Final, Literal, NewType

from shared.errors import COMMAND_REFUSALS

CounterName = NewType("CounterName", str)

#: name → what it counts
HELP: dict[CounterName, str] = {}


def _counter(name: str, what: str) -> CounterName:
    counter = CounterName(name)
    HELP[counter] = what
    return counter


# intake and the buffer (pipeline/intake.py, buffer.py, held.py)
READINGS_STORED: Final = _counter("readings_stored", "readings stored in the buffer")
READINGS_LATE_ACCEPTED: Final = _counter(
    "readings_late_accepted", "late readings taken into a window still open for them"
)
READINGS_HELD: Final = _counter("readings_held", "readings held: their time is ahead of ours")
READINGS_RELEASED: Final = _counter("readings_released", "held readings released")
READINGS_FILTERED: Final = _counter("readings_filtered", "readings a transform filtered out")
DUPLICATES_IGNORED: Final = _counter("duplicates_ignored", "readings stored before, ignored")
INTAKE_SESSIONS_LOST: Final = _counter(
    "intake_sessions_lost", "times the device broker came back without the agent's session"
)
INTAKE_OVERLAPPING_COPIES: Final = _counter(
    "intake_overlapping_copies", "extra copies of a message matched by two subscriptions"
)
DROPPED_LATE: Final = _counter("dropped_late", "readings for windows already closed")
DROPPED_TOO_OLD: Final = _counter("dropped_too_old", "readings older than the buffer keeps")
DROPPED_FUTURE: Final = _counter("dropped_future", "held readings dropped (clock too far ahead)")
DROPPED_STORE_UNAVAILABLE: Final = _counter(
    "dropped_store_unavailable", "readings dropped: the buffer could not be written"
)
# quarantine (pipeline/quarantine.py)
QUARANTINE_NOT_KEPT: Final = _counter(
    "quarantine_not_kept", "rejected parts counted, not kept (over the per-message limit)"
)
QUARANTINE_DROPPED: Final = _counter("quarantine_dropped", "quarantine entries aged out or pruned")
QUARANTINE_DROPPED_BYTES: Final = _counter("quarantine_dropped_bytes", "their bytes")
# windows and the outbox (pipeline/window.py, outbox.py)
WINDOWS_CLOSED: Final = _counter("windows_closed", "windows closed")
WINDOWS_REVISED: Final = _counter("windows_revised", "window revisions made by late readings")
WINDOWS_RESENT_REVISED: Final = _counter("windows_resent_revised", "revised windows sent")
BATCHES_CREATED: Final = _counter("batches_created", "batches made")
BATCHES_SPLIT_FOR_SIZE: Final = _counter("batches_split_for_size", "batches split for size")
ACKS_INVALID: Final = _counter("acks_invalid", "acks that could not be read")
ACKS_UNVERIFIED: Final = _counter("acks_unverified", "acks with a missing or wrong signature")
ACKS_DUPLICATE: Final = _counter("acks_duplicate", "acks for what was acked before")
ACKS_OTHER_GENERATION: Final = _counter(
    "acks_other_generation", "acks for another buffer generation"
)
HEALTH_REPORTS: Final = _counter("health_reports", "health reports made")
DROPPED_HEALTH: Final = _counter("dropped_health", "health reports dropped (budget, backlog)")
# the disk budget (pipeline/budget.py)
DROPPED_BUDGET_BATCHES: Final = _counter("dropped_budget_batches", "unsent batches pruned")
DROPPED_BUDGET_WINDOWS: Final = _counter("dropped_budget_windows", "their windows")
DROPPED_BUDGET_READINGS: Final = _counter(
    "dropped_budget_readings", "raw readings pruned before their windows closed"
)
DROPPED_BUDGET_RAW: Final = _counter(
    "dropped_budget_raw", "raw-readings messages an operator asked for, pruned unsent"
)
BUDGET_PRUNED_DIGESTS: Final = _counter("budget_pruned_digests", "redelivery digests pruned")
BUDGET_PRUNED_CHUNKS: Final = _counter("budget_pruned_chunks", "raw chunks pruned")
BUDGET_OVERRUNS: Final = _counter(
    "budget_overruns", "times the open windows alone exceeded the budget"
)
# the store and the technician (store.py, technician/repair.py)
STORE_ERRORS: Final = _counter("store_errors", "transactions SQLite failed")
REPAIR_LOST_ROWS: Final = _counter("repair_lost_rows", "rows `edge-agent repair` could not save")
# the HTTP intake (sources/http.py)
HTTP_QUERIES: Final = _counter("http_queries", "queries answered")
HTTP_EMPTY_WRITES: Final = _counter("http_empty_writes", "writes without a line")
HTTP_REFUSED_BODY: Final = _counter("http_refused_body", "writes refused for their body")
HTTP_REFUSED_BUSY: Final = _counter("http_refused_busy", "requests refused: too many at once")
HTTP_UNAUTHORIZED: Final = _counter("http_unauthorized", "requests without a valid token")
HTTP_STORE_UNAVAILABLE: Final = _counter(
    "http_store_unavailable", "writes refused: the buffer could not be written"
)

# commands from the operators (pipeline/commands.py)
COMMANDS_DONE: Final = _counter("commands_done", "commands run")
COMMANDS_FAILED: Final = _counter("commands_failed", "commands that failed while running")
COMMANDS_DROPPED_BUSY: Final = _counter(
    "commands_dropped_busy", "command messages dropped: too many waiting (the broker keeps none)"
)
CAPTURES_STARTED: Final = _counter("captures_started", "captures of raw readings around alerts")
CAPTURES_EXTENDED: Final = _counter(
    "captures_extended", "raises that extended their rule's pending capture"
)
CAPTURES_SENT: Final = _counter("captures_sent", "captures whose readings were queued to send")
CAPTURES_PARTIAL: Final = _counter(
    "captures_partial", "of those, with readings the buffer no longer held"
)
DROPPED_BUDGET_CAPTURES: Final = _counter(
    "dropped_budget_captures", "pending captures dropped for the disk budget"
)
CONFIG_APPLIED: Final = _counter(
    "config_applied", "desired config versions applied after their trial (desired.py)"
)
CONFIG_ROLLED_BACK: Final = _counter(
    "config_rolled_back", "desired config versions the device rolled back by itself"
)
WINDOW_WIDTH_CHANGES: Final = _counter(
    "window_width_changes", "changes of the window width the buffer took on (window.py)"
)
RAW_READINGS_QUEUED: Final = _counter(
    "raw_readings_queued", "readings copied for raw commands (pipeline/rawdata.py)"
)
COMMAND_REFUSED_PREFIX: Final = "commands_refused_"


def command_refused(reason: str) -> CounterName:
    """A command refused for ``reason`` (shared.errors.COMMAND_REFUSALS)."""
    return CounterName(COMMAND_REFUSED_PREFIX + reason)


#: what goes out to the cloud → its word in the counters' names
Outgoing = Literal["batches", "alerts", "health", "results", "raw"]
OUTGOING: Final[tuple[Outgoing, ...]] = ("batches", "alerts", "health", "results", "raw")
_SENT_FATES: Final = ("sent", "resent", "acked", "rejected", "stored_partly")


def outgoing(
    what: Outgoing, fate: Literal["sent", "resent", "acked", "rejected", "stored_partly"]
) -> CounterName:
    """``batches_sent``, ``alerts_acked``, ``health_resent`` …"""
    return CounterName(f"{what}_{fate}")


def dropped_damaged(what: Outgoing) -> CounterName:
    """Outgoing rows the SD card damaged (their checksum does not match)."""
    return CounterName(f"dropped_damaged_{what}")


def alerts(state: Literal["raised", "cleared"]) -> CounterName:
    return CounterName(f"alerts_{state}")


QUARANTINED_PREFIX: Final = "quarantined_"


def quarantined(reason: str) -> CounterName:
    return CounterName(QUARANTINED_PREFIX + reason)


#: what became of each source's messages and values (pipeline/intake.py,
#: docs/devices.md "What a value becomes"); errors are failed Modbus polls
SOURCE_KINDS: Final = (
    "messages",
    "readings",
    "invalid",
    "text",
    "excluded",
    "filtered",
    "retained",
    "redelivered",
    "rejected",
    "errors",
)


def source(name: str, kind: str) -> CounterName:
    """``source_<name>_<kind>``; ``kind`` one of :data:`SOURCE_KINDS`."""
    return CounterName(f"source_{name}_{kind}")


#: every name of a fixed family member
FIXED: Final[frozenset[CounterName]] = frozenset(
    [
        *HELP,
        *(outgoing(w, f) for w in OUTGOING for f in _SENT_FATES),
        *map(dropped_damaged, OUTGOING),
        alerts("raised"),
        alerts("cleared"),
        *map(command_refused, COMMAND_REFUSALS),
    ]
)


def is_registered(name: str) -> bool:
    """A name this module makes."""
    if name in FIXED:
        return True
    if name.startswith(QUARANTINED_PREFIX):
        return len(name) > len(QUARANTINED_PREFIX)
    if name.startswith("source_"):
        src, _, kind = name[len("source_") :].rpartition("_")
        return bool(src) and kind in SOURCE_KINDS
    return False


#: the drop counters, which the health report carries (shared/health.py KNOWN_DROPS)
DROPS: Final[frozenset[CounterName]] = frozenset(n for n in FIXED if n.startswith("dropped_"))
