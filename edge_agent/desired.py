"""Desired configuration from the operators, with rollback (docs/commands.md,
"Desired configuration").

A ``config`` command carries a *fragment*: the settings an operator wants on the
device over its config file, limited to :data:`ALLOWED` (alert rules, sources and
their sampling, forward limits, health reporting: never a broker, a key, the
buffer's path or the device's id). A version's fragment replaces the one before
it whole; versions only go up (an older one is refused ``stale-config``).

The life of a version, in files next to the buffer (``storage.path``, which no
fragment can change), each written whole (a temporary file, fsync, rename)::

    <buffer>.desired.next.json    staged by the command, in its transaction's wake
    <buffer>.desired.json         in force (the config file, then this fragment over it)
    <buffer>.desired.prev.json    the one before it: where a rollback returns
    <buffer>.desired.status.json  version in force, state, and the trial's baseline

1. The command checks the fragment with the same checks as ``edge-agent config
   check`` (the config file with the fragment over it must load), stages it and
   answers ``done``; the agent then stops without closing its windows (nothing
   is lost: readings wait at the device broker, batches in the buffer) and starts
   again on the new config: state ``trial``.
2. For ``[commands] config_grace_s`` the agent watches what worked before the
   change: if the cloud acked messages in the grace period before it and acks
   none after it, or readings were stored before and none are after it, or the
   agent restarts more than :data:`MAX_TRIAL_STARTS` times (a crash loop), it
   returns to the previous fragment by itself: state ``rolled-back``, with the
   version it refused and why. Otherwise the version is ``applied``.

The health report carries the version in force, the state and a refused version
(shared/health.py), so the cloud sees desired against reported.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from edge_agent import counters
from edge_agent.config import AgentConfig
from edge_agent.pipeline.outbox import LAST_ACK
from edge_agent.store import Store
from shared.config import from_dict, read_toml
from shared.errors import ConfigError

log = logging.getLogger(__name__)

#: the settings a fragment may hold: a path names a leaf, or a list replaced whole
ALLOWED: frozenset[str] = frozenset(
    {
        "log_level",
        "alerts",
        "intake.sources",
        "intake.modbus",
        "window.width_s",
        "window.lateness_s",
        "window.max_age_s",
        "forward.backfill_bytes_per_s",
        "forward.batch_every_s",
        "forward.max_in_flight",
        "forward.max_windows_per_batch",
        "forward.max_sensors_per_batch",
        "forward.max_batch_bytes",
        "forward.live_window_s",
        "forward.message_expiry_s",
        "health.interval_s",
        "health.behind_after_s",
        "health.near_budget",
        "commands.raw_max_readings",
    }
)
#: settings an operator may expect to set, and why they are not remote settings
NOT_REMOTE: dict[str, str] = {
    "window.hop_s": "hopping windows cross any switch time, so the agent cannot change them "
    "under a running buffer (docs/commands.md, 'Desired configuration')"
}
#: a version still on trial after this many starts is rolled back (a crash loop)
MAX_TRIAL_STARTS = 3
#: the largest fragment, as JSON
MAX_FRAGMENT_BYTES = 8192

State = Literal["", "trial", "applied", "rolled-back"]


class BadFragment(ValueError):
    """A fragment the device will not take (refused ``bad-args``, or ``stale-config``)."""

    def __init__(self, message: str, reason: str = "bad-args") -> None:
        super().__init__(message)
        self.reason = reason


def check_keys(fragment: Mapping[str, Any], prefix: str = "") -> None:
    """Raise :class:`BadFragment` for a key outside :data:`ALLOWED`."""
    for key, value in fragment.items():
        path = f"{prefix}{key}"
        if path in ALLOWED:
            continue
        if any(a.startswith(path + ".") for a in ALLOWED) and isinstance(value, Mapping):
            check_keys(value, path + ".")
            continue
        if path in NOT_REMOTE:
            raise BadFragment(f"{path} may not be set remotely: {NOT_REMOTE[path]}")
        raise BadFragment(
            f"{path} may not be set remotely; allowed: {', '.join(sorted(ALLOWED))}"[:400]
        )


def merge(base: Mapping[str, Any], fragment: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``fragment`` over it: tables merged, everything else replaced."""
    out = dict(base)
    for key, value in fragment.items():
        old = out.get(key)
        if isinstance(old, Mapping) and isinstance(value, Mapping):
            out[key] = merge(old, value)
        else:
            out[key] = value
    return out


@dataclass(frozen=True)
class Status:
    """What the health report says of the config (shared/health.py)."""

    version: int = 0
    state: State = ""
    #: the version rolled back, and why
    rejected: int = 0
    reason: str = ""


def _write(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, separators=(",", ":"))
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.error("desired config: %s is unreadable (%s); ignored", path, exc)
        return None
    return obj if isinstance(obj, dict) else None


class Desired:
    """The desired config of one agent: its files, its trial, its rollback."""

    def __init__(self, config_path: str | Path | None) -> None:
        self.config_path = None if config_path is None else str(config_path)
        self.base = read_toml(config_path) if config_path is not None else {}
        buffer = Path(from_dict(AgentConfig, self.base, self._source()).storage.path)
        self.current = buffer.with_name(buffer.name + ".desired.json")
        self.prev = buffer.with_name(buffer.name + ".desired.prev.json")
        self.next = buffer.with_name(buffer.name + ".desired.next.json")
        self.status_file = buffer.with_name(buffer.name + ".desired.status.json")
        self.buffer = buffer
        #: set when the agent should stop and start again on its config
        self.restart = False
        self._on_trial = False  # a version on trial in this process (set by load)
        self._trial_from: float | None = None  # monotonic, this process's trial start

    def _source(self) -> str:
        return self.config_path or "<defaults>"

    # ---- at start ----------------------------------------------------------------

    def load(self) -> AgentConfig:
        """The config in force: the file, and the fragment over it. Raises ConfigError
        for a bad config file; a fragment that no longer loads is rolled back."""
        self._promote_committed()
        status = _read(self.status_file) or {}
        if status.get("state") == "trial":
            status["trial_starts"] = int(status.get("trial_starts", 0)) + 1
            _write(self.status_file, status)
            if status["trial_starts"] > MAX_TRIAL_STARTS:
                self.roll_back(f"restarted {MAX_TRIAL_STARTS} times during its trial")
        self.restart = False  # what a rollback above asked for happens now
        self._trial_from = None
        self._on_trial = (_read(self.status_file) or {}).get("state") == "trial"
        fragment = (_read(self.current) or {}).get("config") or {}
        try:
            return from_dict(AgentConfig, merge(self.base, fragment), self._source())
        except ConfigError as exc:
            if not fragment:
                raise
            self.roll_back(f"does not load: {exc}")
            self.restart = False
            fragment = (_read(self.current) or {}).get("config") or {}
            return from_dict(AgentConfig, merge(self.base, fragment), self._source())

    def _promote_committed(self) -> None:
        """A staged version whose command's transaction committed (the agent stopped
        between the commit and :meth:`activate`) is put in force; one whose
        transaction did not is forgotten (the broker delivers the command again)."""
        staged = _read(self.next)
        if staged is None:
            return
        committed = False
        try:
            conn = sqlite3.connect(f"file:{self.buffer}?mode=ro", uri=True)
            try:
                row = conn.execute(
                    "SELECT 1 FROM commands WHERE id = ?", (staged.get("command"),)
                ).fetchone()
                committed = row is not None
            finally:
                conn.close()
        except sqlite3.Error as exc:
            log.error("desired config: cannot tell whether version staged was recorded: %s", exc)
        if committed:
            self.activate()
        else:
            self.next.unlink(missing_ok=True)

    # ---- the command ---------------------------------------------------------------

    def status(self) -> Status:
        s = _read(self.status_file) or {}
        state = s.get("state", "")
        return Status(
            int(s.get("version", 0)),
            state if state in ("trial", "applied", "rolled-back") else "",
            int(s.get("rejected", 0)),
            str(s.get("reason", ""))[:200],
        )

    def stage(self, args: Mapping[str, Any], before: Mapping[str, bool]) -> dict[str, Any]:
        """Check a ``config`` command's arguments and stage its fragment (call inside
        the command's transaction; :meth:`activate` after it commits). ``before``:
        what worked before the change (the trial's baseline)."""
        unknown = set(args) - {"version", "config"}
        if unknown:
            raise BadFragment(f"unknown arguments {sorted(unknown)}; config takes version, config")
        version, fragment = args.get("version"), args.get("config")
        if type(version) is not int or not 0 < version < 2**63:
            raise BadFragment("version must be a positive integer")
        if not isinstance(fragment, Mapping):
            raise BadFragment("config must be a table of settings")
        if len(json.dumps(fragment)) > MAX_FRAGMENT_BYTES:
            raise BadFragment(f"config is over {MAX_FRAGMENT_BYTES} bytes as JSON")
        status = self.status()
        newest = max(
            status.version, status.rejected, int((_read(self.next) or {}).get("version", 0))
        )
        if version <= newest:
            raise BadFragment(f"version {version} is not above {newest}", "stale-config")
        check_keys(fragment)
        try:
            cfg = from_dict(AgentConfig, merge(self.base, fragment), f"config version {version}")
        except ConfigError as exc:
            raise BadFragment(str(exc)[:400]) from None
        if "width_s" in fragment.get("window", {}) and cfg.window.hop_ns != cfg.window.width_ns:
            raise BadFragment(
                f"window.width_s may not be set remotely: {NOT_REMOTE['window.hop_s']}"
            )
        return {"version": version, "config": dict(fragment), "before": dict(before)}

    def write_staged(self, staged: Mapping[str, Any], command_id: str) -> None:
        _write(self.next, {**staged, "command": command_id})

    def activate(self) -> None:
        """Put the staged version in force (on trial) and ask for a restart."""
        staged = _read(self.next)
        if staged is None:
            return
        old = _read(self.current)
        if old is not None:
            _write(self.prev, old)
        else:
            self.prev.unlink(missing_ok=True)
        _write(
            self.current, {k: staged[k] for k in ("version", "config", "command") if k in staged}
        )
        _write(
            self.status_file,
            {
                "version": staged["version"], "state": "trial", "since_ns": time.time_ns(),
                "trial_starts": 0, "before": staged.get("before", {}),
                "rejected": self.status().rejected, "reason": "",
            },
        )  # fmt: skip
        self.next.unlink(missing_ok=True)
        self.restart = True
        log.warning("desired config: version %s in force, on trial", staged["version"])

    # ---- the trial -----------------------------------------------------------------

    def tick(self, store: Store, grace_s: float, now_mono: float | None = None) -> None:
        """During a trial: after ``grace_s`` (this process's monotonic clock), apply or
        roll back. ``store``: the agent's buffer (edge_agent/store.py)."""
        if not self._on_trial or self.restart:
            return  # every tick: no file read unless a version is on trial
        s = _read(self.status_file)
        if s is None or s.get("state") != "trial":
            self._on_trial = False
            return
        now = time.monotonic() if now_mono is None else now_mono
        if self._trial_from is None:
            self._trial_from = now
        if now - self._trial_from < grace_s:
            return
        since = int(s.get("since_ns", 0))
        before = s.get("before", {})
        why = []
        if before.get("acking") and store.get_state(LAST_ACK) < since:
            why.append("no ack from the cloud")
        if before.get("intake") and not _stored_since(store, since):
            why.append("no reading stored")
        if why:
            self.roll_back(f"{' and '.join(why)} within {grace_s:g} s")
            with store.tx():
                store.add_counter(counters.CONFIG_ROLLED_BACK, 1)
            return
        s["state"] = "applied"
        _write(self.status_file, s)
        self._on_trial = False
        with store.tx():
            store.add_counter(counters.CONFIG_APPLIED, 1)
        log.info("desired config: version %s applied", s.get("version"))

    def roll_back(self, reason: str) -> None:
        """Return to the previous fragment (or none), and ask for a restart."""
        s = _read(self.status_file) or {}
        failed = int(s.get("version", 0))
        prev = _read(self.prev)
        if prev is not None:
            _write(self.current, prev)
        else:
            self.current.unlink(missing_ok=True)
        self.prev.unlink(missing_ok=True)
        _write(
            self.status_file,
            {"version": int((prev or {}).get("version", 0)), "state": "rolled-back",
             "rejected": failed, "reason": reason[:200]},
        )  # fmt: skip
        self.restart = True
        log.error("desired config: version %d rolled back: %s", failed, reason)


def baseline(store: Store, grace_s: float, now_ns: int) -> dict[str, bool]:
    """What worked in the ``grace_s`` before now: acks from the cloud, readings stored."""
    since = now_ns - int(grace_s * 1e9)
    return {"acking": store.get_state(LAST_ACK) >= since, "intake": _stored_since(store, since)}


def _stored_since(store: Store, since_ns: int) -> bool:
    """A reading was stored at or after ``since_ns`` (the newest chunks, by rowid)."""
    row = store.conn.execute(
        "SELECT max(received_ns) FROM (SELECT received_ns FROM chunks ORDER BY id DESC LIMIT 64)"
    ).fetchone()
    return row[0] is not None and int(row[0]) >= since_ns
