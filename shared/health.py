"""The health report (device → cloud on ``telemetry/v1/<device_id>/health``), built
by ``edge_agent.pipeline.health`` and decoded and checked here, at the boundary.

A UTF-8 JSON object, at most 4 KiB::

    {"seq": 913, "ts_ns": 1732600000000000000, "version": "0.1.0", "reason": "interval",
     "state": "behind", "problems": ["behind"], "uptime_s": 86400.0,
     "intake_up": true, "forward_up": true,
     "backlog_batches": 12, "backlog_readings": 21600, "backlog_bytes": 9120,
     "oldest_unsent_age_s": 700.2, "last_ack_age_s": 1.2,
     "drops": {"dropped_late": 3}, "quarantined": 0, "quarantine_bytes": 0,
     "disk_used_bytes": 1048576, "disk_budget_bytes": 268435456, "store_errors": 0,
     "readings_stored": 1234567, "alerts_open": 1, "alerts_unsent": 0,
     "clock_offset_s": -0.012, "clock_rtt_s": 0.030}

``seq`` shares the device's counter with batches and alerts, so a report is
acknowledged and resent like them. ``ts_ns`` is the device clock when the report
was made. ``drops`` holds the agent's ``dropped_*`` counters since its buffer was
created (at most 32, names ``[a-z0-9_]``). ``oldest_unsent_age_s``,
``last_ack_age_s``, ``clock_offset_s`` and ``clock_rtt_s`` are null when not known.
``clock_offset_s`` is the cloud's clock minus the device's, from the time the
ingestor puts in its acks, within ± ``clock_rtt_s`` / 2.

``problems`` is a subset of :data:`PROBLEMS`; ``state`` is ``ok`` when it is empty,
otherwise its first member in the order of :data:`PROBLEMS` (the worst).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from shared import jsonwire
from shared.errors import WireError
from shared.jsonwire import printable

CONTENT_TYPE = "application/json"
MAX_HEALTH_BYTES = 4096
MAX_DROP_KINDS = 32
DROP_KIND = re.compile(r"[a-z0-9_]{1,48}")

#: Worst first: ``state`` is the first of these that holds.
PROBLEMS = (
    "store-failing",  # a write to the buffer failed since the last report
    "intake-down",  # not subscribed to the device's local broker
    "dropping",  # a dropped_* counter grew since the last report
    "near-budget",  # the buffer uses more than health.near_budget of storage.max_bytes
    "link-down",  # not connected to the cloud broker
    "behind",  # the oldest unsent data is older than health.behind_after_s
)
REASONS = ("start", "interval", "change", "stop")

#: The agent's drop counters (docs/edge-agent.md). Each is a field of its own in
#: InfluxDB; any other name a report carries is added into ``dropped_other``, so a
#: device cannot grow the measurement's field keys.
KNOWN_DROPS = (
    "dropped_late",
    "dropped_too_old",
    "dropped_future",
    "dropped_store_unavailable",
    "dropped_budget_batches",
    "dropped_budget_windows",
    "dropped_budget_readings",
    "dropped_damaged_batches",
    "dropped_damaged_alerts",
    "dropped_damaged_health",
    "dropped_damaged_results",
    "dropped_damaged_raw",
    "dropped_budget_raw",
    "dropped_budget_captures",
    "dropped_health",
)

INT_FIELDS = (
    "backlog_batches",
    "backlog_readings",
    "backlog_bytes",
    "quarantined",
    "quarantine_bytes",
    "disk_used_bytes",
    "disk_budget_bytes",
    "store_errors",
    "readings_stored",
    "alerts_open",
    "alerts_unsent",
)
OPTIONAL_FLOAT_FIELDS = ("oldest_unsent_age_s", "last_ack_age_s", "clock_offset_s", "clock_rtt_s")


@dataclass(frozen=True)
class HealthReport:
    """One report; :data:`FIELDS` are its keys on the wire, every one required."""

    seq: int
    ts_ns: int
    version: str
    reason: str
    problems: tuple[str, ...]
    uptime_s: float
    intake_up: bool
    forward_up: bool
    backlog_batches: int = 0
    backlog_readings: int = 0
    backlog_bytes: int = 0
    quarantined: int = 0
    quarantine_bytes: int = 0
    disk_used_bytes: int = 0
    disk_budget_bytes: int = 0
    store_errors: int = 0
    readings_stored: int = 0
    alerts_open: int = 0
    alerts_unsent: int = 0
    oldest_unsent_age_s: float | None = None
    last_ack_age_s: float | None = None
    clock_offset_s: float | None = None
    clock_rtt_s: float | None = None
    drops: dict[str, int] = field(default_factory=dict)
    #: the device's buffer generation (docs/wire-format.md §2.3); 0 = none, and then
    #: not on the wire (optional: not in :data:`FIELDS`)
    generation: int = 0
    #: the desired config (docs/commands.md): the version in force (0 = the config
    #: file alone), its state ("trial", "applied", "rolled-back"; "" = none) and the
    #: version last rolled back (0 = none). Optional, not on the wire when unset.
    config_version: int = 0
    config_state: str = ""
    config_rejected: int = 0

    @property
    def state(self) -> str:
        return state_of(self.problems)

    @property
    def disk_used_ratio(self) -> float:
        """Buffer use over its budget; 0.0 without a budget."""
        return self.disk_used_bytes / self.disk_budget_bytes if self.disk_budget_bytes else 0.0

    @property
    def dropped_total(self) -> int:
        return sum(self.drops.values())

    def encode(self) -> bytes:
        obj = asdict(self)
        obj["problems"] = list(self.problems)
        obj["state"] = self.state
        for key in OPTIONAL_FIELDS:
            if not obj[key]:
                del obj[key]
        return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


#: keys a report may leave out (absent = 0 or "")
OPTIONAL_FIELDS = ("generation", "config_version", "config_state", "config_rejected")
CONFIG_STATES = ("", "trial", "applied", "rolled-back")
FIELDS = (*(f.name for f in fields(HealthReport) if f.name not in OPTIONAL_FIELDS), "state")


def state_of(problems: tuple[str, ...] | set[str] | frozenset[str]) -> str:
    """``ok``, or the worst of ``problems``."""
    for p in PROBLEMS:
        if p in problems:
            return p
    return "ok"


def decode_health(payload: bytes) -> HealthReport:
    """Parse and check untrusted bytes; raise :class:`WireError` (``bad-health`` or
    ``too-large``) for anything but a report as documented."""
    obj: Any = jsonwire.loads(
        payload, reason="bad-health", what="a health report", max_bytes=MAX_HEALTH_BYTES
    )
    if not isinstance(obj, dict):
        raise WireError("bad-health", "not a JSON object")

    def bad(msg: str) -> WireError:
        return WireError("bad-health", msg)

    absent = [k for k in FIELDS if k not in obj]
    if absent:
        raise bad(f"missing {', '.join(absent)}")

    def integer(key: str) -> int:
        v = obj.get(key)
        if type(v) is not int or not 0 <= v < 2**63:
            raise bad(f"{key!r} must be an integer in [0, 2^63)")
        return v

    def number(key: str, *, optional: bool = False) -> float | None:
        v = obj.get(key)
        if v is None and optional:
            return None
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise bad(f"{key!r} must be a finite number" + (" or null" if optional else ""))
        return float(v)

    def flag(key: str) -> bool:
        v = obj.get(key)
        if not isinstance(v, bool):
            raise bad(f"{key!r} must be true or false")
        return v

    version, reason = obj.get("version"), obj.get("reason")
    if not isinstance(version, str) or not 0 < len(version) <= 32 or not printable(version):
        raise bad("'version' must be 1-32 printable characters")
    if reason not in REASONS:
        raise bad(f"'reason' must be one of {REASONS}")
    problems = obj.get("problems")
    if (
        not isinstance(problems, list)
        or not all(isinstance(p, str) and p in PROBLEMS for p in problems)
        or len(set(problems)) != len(problems)
    ):
        raise bad(f"'problems' must be a list of distinct names from {PROBLEMS}")
    drops = obj.get("drops")
    if not isinstance(drops, dict) or len(drops) > MAX_DROP_KINDS:
        raise bad(f"'drops' must be an object of at most {MAX_DROP_KINDS} counters")
    for k, v in drops.items():
        if not DROP_KIND.fullmatch(k) or type(v) is not int or not 0 <= v < 2**63:
            raise bad("'drops' must map names of [a-z0-9_] to integers in [0, 2^63)")
    uptime = number("uptime_s")
    assert uptime is not None
    generation = obj.get("generation", 0)
    if type(generation) is not int or not 0 <= generation < 2**63:
        raise bad("'generation' must be an integer in [0, 2^63)")
    config = {k: obj.get(k, 0) for k in ("config_version", "config_rejected")}
    if any(type(v) is not int or not 0 <= v < 2**63 for v in config.values()):
        raise bad("'config_version' and 'config_rejected' must be integers in [0, 2^63)")
    config_state = obj.get("config_state", "")
    if config_state not in CONFIG_STATES:
        raise bad(f"'config_state' must be one of {CONFIG_STATES[1:]}")
    report = HealthReport(
        seq=integer("seq"),
        ts_ns=integer("ts_ns"),
        version=version,
        reason=reason,
        problems=tuple(problems),
        uptime_s=uptime,
        intake_up=flag("intake_up"),
        forward_up=flag("forward_up"),
        drops=dict(drops),
        generation=generation,
        config_state=config_state,
        **config,
        **{k: integer(k) for k in INT_FIELDS},
        **{k: number(k, optional=True) for k in OPTIONAL_FLOAT_FIELDS},  # type: ignore[arg-type]
    )
    if uptime < 0:
        raise bad("'uptime_s' must be >= 0")
    if obj.get("state") != report.state:
        raise bad(f"'state' must be {report.state!r}, the worst of 'problems'")
    return report
