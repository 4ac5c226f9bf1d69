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

from edge_agent.config import AgentConfig
from edge_agent.pipeline import window
from edge_agent.store import Store

HEARTBEAT = "heartbeat_ns"
PID = "agent_pid"
INTAKE_UP = "intake_connected"
FORWARD_UP = "forward_connected"
FLUSH_REQUESTED = "flush_requested_ns"
FLUSH_DONE = "flush_done_ns"

HEARTBEAT_EVERY_S = 2.0
#: A heartbeat older than this means the agent is not running (or hung).
STALE_AFTER_S = 10.0


def beat(store: Store, *, intake_up: bool, forward_up: bool) -> None:
    with store.tx():
        store.set_state(HEARTBEAT, time.time_ns())
        store.set_state(PID, os.getpid())
        store.set_state(INTAKE_UP, int(intake_up))
        store.set_state(FORWARD_UP, int(forward_up))


def stopped(store: Store) -> None:
    """Called by the agent on a clean exit: nobody should wait for it."""
    with store.tx():
        store.set_state(HEARTBEAT, 0)
        store.set_state(INTAKE_UP, 0)
        store.set_state(FORWARD_UP, 0)


def agent_running(store: Store, now_ns: int | None = None) -> bool:
    now_ns = time.time_ns() if now_ns is None else now_ns
    beat_ns = store.get_state(HEARTBEAT)
    return beat_ns > 0 and now_ns - beat_ns < STALE_AFTER_S * 1e9


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
