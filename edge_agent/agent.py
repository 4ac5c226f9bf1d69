"""The agent's main loop: intake in paho's thread; windowing and forwarding here.

Every ``tick_s`` the loop closes the windows that the watermark allows, prunes
raw chunks past their retention, and lets the forwarder publish. On SIGTERM or
SIGINT it stops intake, closes every open window if ``window.flush_on_shutdown``
(otherwise they stay open and are rebuilt from the buffer at the next start),
drains the outbox for up to ``forward.drain_timeout_s`` and exits. What is not
drained stays in the outbox for the next start.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType

from edge_agent import alerts, budget, buffer, control, kernels, outbox, window
from edge_agent.config import AgentConfig
from edge_agent.forward import Forwarder
from edge_agent.intake import Intake
from edge_agent.store import Store
from shared.cli import write_ready_file

log = logging.getLogger("edge_agent.agent")

PRUNE_EVERY_S = 60.0  # raw chunks and digests are pruned at most this often


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.store = Store(cfg.storage.path, synchronous=cfg.storage.synchronous)
        self.intake = Intake(cfg)
        self.forwarder = Forwarder(cfg, self.store)
        self.stopping = threading.Event()
        self._next_prune = 0.0
        self._next_beat = 0.0

    def close_ready_windows(self, *, flush: bool = False) -> list[int]:
        max_ts = self.store.get_state(buffer.MAX_TS)
        if max_ts == 0:
            return []
        w = self.cfg.window
        upto = (
            window.flush_boundary(max_ts, w.width_ns, w.hop_ns)
            if flush
            else window.close_boundary(max_ts, w.lateness_ns, w.hop_ns)
        )
        seqs = window.close_until(
            self.store,
            device_id=self.cfg.device_id,
            width_ns=w.width_ns,
            upto_ns=upto,
            max_rows=self.cfg.forward.max_windows_per_batch,
            sketches=w.sketches,
            hop_ns=w.hop_ns,
        )
        if seqs:
            log.info("window: closed windows up to %d into batches %s", upto, seqs)
        return seqs

    def raw_needed_from(self) -> int:
        """Raw readings from here on may still be needed: by a revision (max_age_s),
        or by a hopping window that is still open."""
        w = self.cfg.window
        closed = self.store.get_state(buffer.CLOSED_UNTIL)
        return min(
            self.store.get_state(buffer.MAX_TS) - w.max_age_ns, closed - w.width_ns + w.hop_ns
        )

    def tick(self) -> None:
        self.intake.flush()  # the last messages of a burst: do not wait for more
        req = control.pending_flush(self.store)
        self.close_ready_windows(flush=req is not None)
        seqs = window.revise(
            self.store,
            device_id=self.cfg.device_id,
            width_ns=self.cfg.window.width_ns,
            max_rows=self.cfg.forward.max_windows_per_batch,
            sketches=self.cfg.window.sketches,
            hop_ns=self.cfg.window.hop_ns,
        )
        if seqs:
            log.info("window: late readings revised closed windows into batches %s", seqs)
        if req is not None:
            log.info("agent: flush requested: closed every open window")
            control.flush_done(self.store, req)
        silent = self.intake.alerts.check_silent(time.time_ns())
        if silent:
            with self.store.tx():
                alerts.record(self.store, silent)
            for ev in silent:
                log.warning("alert %s %s: %s", ev.rule, ev.state, ev.message)
        budget.enforce(
            self.store,
            self.cfg.storage.max_bytes,
            keep_raw_after_ns=self.raw_needed_from(),
        )
        now = time.monotonic()
        if now >= self._next_beat:
            self._next_beat = now + control.HEARTBEAT_EVERY_S
            control.beat(
                self.store,
                intake_up=self.intake.subscribed.is_set(),
                forward_up=self.forwarder.connected.is_set(),
            )
        if now >= self._next_prune:
            self._next_prune = now + PRUNE_EVERY_S
            retention_ns = int(self.cfg.storage.raw_retention_s * 1e9)
            max_ts = self.store.get_state(buffer.MAX_TS)
            buffer.prune(self.store, min(max_ts - retention_ns, self.raw_needed_from()))
        self.forwarder.pump()

    def run(self, ready_file: str | None = None) -> int:
        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("agent: signal %d, stopping", signum)
            self.stopping.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        log.info("agent: device %s, buffer %s", self.cfg.device_id, self.cfg.storage.path)
        log.info("agent: %s window kernels ready in %.2f s", kernels.BACKEND, kernels.warm_up())
        self.intake.start()
        self.forwarder.start()
        ready_pending = ready_file is not None
        while not self.stopping.wait(self.cfg.tick_s):
            if ready_pending and self.intake.subscribed.is_set():
                write_ready_file(ready_file)
                ready_pending = False
            self.tick()
        return self.shutdown()

    def shutdown(self) -> int:
        self.intake.stop()
        if self.cfg.window.flush_on_shutdown:
            self.close_ready_windows(flush=True)
        drained = self.forwarder.drain(self.cfg.forward.drain_timeout_s)
        self.forwarder.stop()
        control.stopped(self.store)
        if drained:
            log.info("agent: stopped; outbox drained")
        else:
            log.warning(
                "agent: stopped with %d batches not yet acknowledged (kept for the next start)",
                outbox.count_unacked(self.store),
            )
        self.store.close()
        return 0


def run_agent(cfg: AgentConfig, ready_file: str | None = None) -> int:
    started = time.monotonic()
    rc = Agent(cfg).run(ready_file)
    log.info("agent: ran %.1f s", time.monotonic() - started)
    return rc
