"""How the technician CLI and a running agent talk: through the SQLite file.

The CLI must work with no network and whether or not the agent runs, so there is
no socket: the agent writes a heartbeat (and its broker connections) into the
``state`` table every few seconds, and reads requests (a flush) from it. A CLI
command that needs the agent checks the heartbeat first and, with the agent
stopped, does the work on the file itself.
"""

from __future__ import annotations

import os
import time

from edge_agent.clock import ClockSample, boot_id, mono_ns
from edge_agent.config import AgentConfig
from edge_agent.pipeline import window
from edge_agent.store import Store

HEARTBEAT = "heartbeat_ns"  # the wall clock at the last beat (for people)
HEARTBEAT_MONO = "heartbeat_mono_ns"  # the monotonic clock at the last beat
HEARTBEAT_BOOT = "heartbeat_boot_id"  # ... of this boot (edge_agent/clock.py)
PID = "agent_pid"
#: the agent's clock against the cloud's at the last beat (edge_agent/clock.py):
#: milliseconds, cloud minus device, within ± half the round trip; the monotonic
#: time it was measured at (0: not known)
CLOCK_OFFSET_MS = "clock_offset_ms"
CLOCK_RTT_MS = "clock_rtt_ms"
CLOCK_MEASURED_MONO = "clock_measured_mono_ns"
INTAKE_UP = "intake_connected"
FORWARD_UP = "forward_connected"
FLUSH_REQUESTED = "flush_requested_ns"
FLUSH_DONE = "flush_done_ns"

HEARTBEAT_EVERY_S = 2.0
#: A heartbeat older than this means the agent is not running (or hung).
STALE_AFTER_S = 10.0


def beat(
    store: Store,
    *,
    intake_up: bool,
    forward_up: bool,
    clock: ClockSample | None = None,
) -> None:
    with store.tx():
        store.set_state(HEARTBEAT, time.time_ns())
        store.set_state(HEARTBEAT_MONO, mono_ns())
        store.set_state(HEARTBEAT_BOOT, boot_id())
        store.set_state(PID, os.getpid())
        store.set_state(INTAKE_UP, int(intake_up))
        store.set_state(FORWARD_UP, int(forward_up))
        if clock is not None:
            store.set_state(CLOCK_OFFSET_MS, round(clock.offset_s * 1000))
            store.set_state(CLOCK_RTT_MS, round(clock.rtt_s * 1000))
            store.set_state(CLOCK_MEASURED_MONO, clock.at_mono_ns or mono_ns())
        else:  # none yet, or the wall clock stepped since: not known until the next ack
            store.set_state(CLOCK_MEASURED_MONO, 0)


def stopped(store: Store) -> None:
    """Called by the agent on a clean exit: nobody should wait for it."""
    with store.tx():
        store.set_state(HEARTBEAT, 0)
        store.set_state(INTAKE_UP, 0)
        store.set_state(FORWARD_UP, 0)


def heartbeat_age_s(store: Store, now_ns: int | None = None) -> float | None:
    """Seconds since the agent's last heartbeat; None if it stopped cleanly or never
    beat. On the monotonic clock when the beat is of this boot, so that a step of the
    wall clock (NTP at boot) does not make a live agent look dead, or a dead one
    alive; on the wall clock otherwise (``now_ns``, for tests)."""
    beat_ns = store.get_state(HEARTBEAT)
    if beat_ns <= 0:
        return None
    boot = boot_id()
    if now_ns is None and boot and store.get_state(HEARTBEAT_BOOT) == boot:
        return (mono_ns() - store.get_state(HEARTBEAT_MONO)) / 1e9
    return ((time.time_ns() if now_ns is None else now_ns) - beat_ns) / 1e9


def agent_running(store: Store, now_ns: int | None = None) -> bool:
    age = heartbeat_age_s(store, now_ns)
    return age is not None and age < STALE_AFTER_S


def clock_offset(store: Store) -> tuple[float, float, float] | None:
    """(offset s, round trip s, age s of the measurement) as the running agent last
    measured its clock against the cloud's (the cloud's minus the device's); None
    if never measured in this boot."""
    at = store.get_state(CLOCK_MEASURED_MONO)
    boot = boot_id()
    if not at or not boot or store.get_state(HEARTBEAT_BOOT) != boot:
        return None
    return (
        store.get_state(CLOCK_OFFSET_MS) / 1000,
        store.get_state(CLOCK_RTT_MS) / 1000,
        (mono_ns() - at) / 1e9,
    )


def request_flush(store: Store) -> int:
    """Ask the running agent to close every open window and send it; returns the request id."""
    req = time.time_ns()
    with store.tx():
        store.set_state(FLUSH_REQUESTED, req)
    return req


def pending_flush(store: Store) -> int | None:
    req = store.get_state(FLUSH_REQUESTED)
    return req if req > store.get_state(FLUSH_DONE) else None


def flush_done(store: Store, req: int) -> None:
    with store.tx():
        store.set_state(FLUSH_DONE, req)


def flush_here(store: Store, cfg: AgentConfig) -> list[int]:
    """With the agent stopped (the caller holds the buffer's lock): close every open
    window, and revise the closed ones that late readings changed, into the outbox.
    Returns the new batch seqs."""
    closed, revised = window.send_ready(store, cfg, flush=True)
    return closed + revised
