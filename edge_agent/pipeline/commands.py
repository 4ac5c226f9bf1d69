"""Commands from the operators (docs/commands.md, docs/wire-format.md §2.11): each
verified, run at most once, and answered with a result that is kept in the buffer
and sent until the cloud acks it, like an alert.

What a command message becomes, in one transaction (so that a crash leaves either
nothing, and the broker delivers it again, or all of it):

- it does not verify (``too-large``, ``bad-command``, ``unknown-key``,
  ``bad-signature``): counted as ``commands_refused_<reason>``, nothing else. An
  unsigned or forged message is nobody's to answer.
- it verifies: its id is recorded in ``commands`` until it expires, and a result
  (§2.12) goes into ``results``: ``refused`` with ``wrong-device``, ``expired`` (on
  the device's clock), ``unknown-command`` or ``bad-args``, else ``done`` (or ``failed``) with
  what the command returned. Each counted.
- its id is in ``commands`` already: ``commands_refused_replayed``, and nothing
  else; its result is in ``results`` until the cloud has it. A replay by someone
  who recorded the message, and the broker's redelivery after a crash between the
  commit and its PUBACK, look the same and are treated the same.

The kinds (:data:`KINDS`) take the store, the config, the command and the clock's
time, and return the result's object; they run inside the transaction (a ``raw`` command's
messages are stored with its result, or neither is). A kind raises
:class:`~edge_agent.pipeline.rawdata.BadArgs` for arguments it does not take.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from edge_agent import counters
from edge_agent.config import AgentConfig
from edge_agent.desired import BadFragment, Desired, baseline
from edge_agent.pipeline import outbox, rawdata
from edge_agent.store import Store, crc
from shared.commands import Command, Result, Status, load_public, verify
from shared.errors import WireError

log = logging.getLogger(__name__)

#: ids are forgotten this long after their command expired (a device clock that
#: steps back by less cannot make an expired command valid and new again)
FORGET_AFTER_NS = 86_400 * 10**9


def _ping(store: Store, cfg: AgentConfig, cmd: Command, now_ns: int) -> dict[str, Any]:
    """The device is there, and its clock."""
    return {"ts_ns": now_ns}


def _raw(store: Store, cfg: AgentConfig, cmd: Command, now_ns: int) -> dict[str, Any]:
    """The buffer's readings of some sensors in a time range (edge_agent/pipeline/rawdata.py)."""
    request = rawdata.RawRequest.from_args(cmd.args, now_ns)
    return rawdata.queue(store, cfg, cmd.id, request, now_ns)


def _status(store: Store, cfg: AgentConfig, cmd: Command, now_ns: int) -> dict[str, Any]:
    """What a technician's ``edge-agent status`` would say first, in brief."""
    from edge_agent.pipeline.snapshot import buffer_snapshot

    snap = buffer_snapshot(store)
    return {
        "backlog_batches": snap.backlog_batches,
        "backlog_readings": snap.backlog_readings,
        "quarantined": snap.quarantined,
        "used_bytes": snap.used_bytes,
        "alerts_open": snap.alerts_open,
    }


#: kind → what runs it
KINDS: Mapping[str, Callable[[Store, AgentConfig, Command, int], dict[str, Any]]] = {
    "ping": _ping,
    "status": _status,
    "raw": _raw,
}


class CommandRunner:
    """Runs the command messages the forwarder received, on the agent's thread."""

    def __init__(
        self,
        cfg: AgentConfig,
        store: Store,
        now: Callable[[], int] = time.time_ns,
        desired: Desired | None = None,
    ) -> None:
        """``desired``: the agent's desired config (edge_agent/desired.py); without
        it, ``config`` commands fail."""
        self.cfg = cfg
        self.device_id = cfg.device_id
        self.store = store
        self.now = now
        self.desired = desired
        self.keys = {k.id: load_public(Path(k.file)) for k in cfg.commands.keys}

    def _config(self, cmd: Command, now_ns: int) -> dict[str, Any]:
        """Stage a desired config (edge_agent/desired.py); put in force after the commit."""
        desired = self.desired
        if desired is None:
            raise RuntimeError("this agent was started without a config file to build on")
        grace = self.cfg.commands.config_grace_s
        staged = desired.stage(cmd.args, baseline(self.store, grace, now_ns))
        desired.write_staged(staged, cmd.id)
        self.store.on_rollback(lambda: desired.next.unlink(missing_ok=True))
        return {"version": staged["version"], "state": "trial", "grace_s": grace}

    def handle(self, payload: bytes) -> str:
        """One command message: what became of it (``done``, ``failed`` or the
        reason it was refused)."""
        try:
            cmd = verify(payload, self.keys)
        except WireError as exc:
            log.warning("commands: refused a message that does not verify: %s", exc)
            with self.store.tx():
                self.store.add_counter(counters.command_refused(exc.reason), 1)
            return exc.reason
        now = self.now()
        store = self.store
        with store.tx():
            store.conn.execute(
                "DELETE FROM commands WHERE expires_ns < ?", (now - FORGET_AFTER_NS,)
            )
            if store.conn.execute("SELECT 1 FROM commands WHERE id = ?", (cmd.id,)).fetchone():
                store.add_counter(counters.command_refused("replayed"), 1)
                log.warning(
                    "commands: %s (%s) was answered before; not run again", cmd.id, cmd.kind
                )
                return "replayed"
            status: Status
            reason, out = "", {}
            if cmd.device_id != self.device_id:
                status, reason = "refused", "wrong-device"
            elif cmd.expires_ns <= now:
                status, reason = "refused", "expired"
            elif cmd.kind not in KINDS and cmd.kind != "config":
                status, reason = "refused", "unknown-command"
            else:
                status = "done"
                try:
                    if cmd.kind == "config":
                        out = self._config(cmd, now)
                    else:
                        out = KINDS[cmd.kind](store, self.cfg, cmd, now)
                except rawdata.BadArgs as exc:
                    status, reason, out = "refused", "bad-args", {"message": str(exc)[:500]}
                except BadFragment as exc:
                    status, reason, out = "refused", exc.reason, {"message": str(exc)[:500]}
                except Exception as exc:
                    log.exception("commands: %s (%s) failed", cmd.id, cmd.kind)
                    status, reason, out = "failed", f"{type(exc).__name__}: {exc}"[:200], {}
            if status == "refused":
                store.add_counter(counters.command_refused(reason), 1)
                log.warning("commands: refused %s (%s): %s", cmd.id, cmd.kind, reason)
            else:
                store.add_counter(
                    counters.COMMANDS_DONE if status == "done" else counters.COMMANDS_FAILED, 1
                )
                log.info("commands: %s (%s) %s", cmd.id, cmd.kind, status)
            seq = outbox.next_seq(store)
            generation = outbox.generation(store)
            result = Result(seq, cmd.id, status, reason, now, out, generation, cmd.kind)
            data = result.encode()
            store.conn.execute(
                "INSERT INTO results(seq, created_ns, payload, state, crc, generation) "
                "VALUES (?, ?, ?, 'pending', ?, ?)",
                (seq, now, data, crc(data), generation),
            )
            store.conn.execute(
                "INSERT INTO commands(id, kind, status, received_ns, expires_ns, result_seq) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (cmd.id, cmd.kind, status, now, cmd.expires_ns, seq),
            )
        if cmd.kind == "config" and status == "done" and self.desired is not None:
            self.desired.activate()  # committed: in force at the agent's restart
        return status if status != "refused" else reason
