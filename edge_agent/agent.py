"""The agent's main loop: intake in paho's thread; windowing and forwarding here.

Every ``tick_s`` the loop closes the windows that the watermark allows, prunes
raw chunks past their retention, and lets the forwarder publish. On SIGTERM or
SIGINT it stops intake, closes every open window if ``window.flush_on_shutdown``
(otherwise they stay open and are rebuilt from the buffer at the next start),
drains the outbox for up to ``forward.drain_timeout_s`` and exits. What is not
drained stays in the outbox for the next start.

The agent holds the buffer's lock (:mod:`edge_agent.lock`) from start to exit:
a second agent on the same file refuses to start. A tick that fails on the
file (a full disk, an I/O error) is logged and counted (``store_errors``), and
the next tick tries again: the agent stays up and catches up once the fault
clears.
"""

from __future__ import annotations

import logging
import signal
import sqlite3
import threading
import time
from types import FrameType

from edge_agent import control
from edge_agent.config import AgentConfig
from edge_agent.desired import Desired
from edge_agent.lock import BufferLock
from edge_agent.mqtt import network_thread_alive
from edge_agent.pipeline import (
    alerts,
    budget,
    buffer,
    captures,
    held,
    kernels,
    outbox,
    quarantine,
    window,
)
from edge_agent.pipeline.forward import Forwarder
from edge_agent.pipeline.health import Reporter
from edge_agent.pipeline.intake import Intake
from edge_agent.sources.can import CanReader
from edge_agent.sources.host import HostSampler
from edge_agent.sources.http import HttpIntake
from edge_agent.sources.modbus import ModbusPoller
from edge_agent.store import Store
from shared.cli import write_ready_file
from shared.errors import StorageError
from shared.sdnotify import Notifier

log = logging.getLogger(__name__)

PRUNE_EVERY_S = 60.0  # raw chunks and digests are pruned at most this often
TICK_ERROR_LOG_EVERY_S = 30.0  # a persistent fault is logged once per this, with a count


class Agent:
    def __init__(self, cfg: AgentConfig, desired: Desired | None = None) -> None:
        """``desired``: the desired config from the operators (edge_agent/desired.py),
        when the agent runs from a config file."""
        self.cfg = cfg
        self.desired = desired
        self.lock = BufferLock(cfg.storage.path).acquire()
        try:
            self.store = Store(cfg.storage.path, synchronous=cfg.storage.synchronous)
            # a changed width takes effect at a boundary of both (before the intake
            # marks late readings' windows with it)
            window.adopt_width(self.store, cfg)
            self.intake = Intake(cfg)
            http = cfg.intake.http
            self.http = HttpIntake(http, self.intake) if http.enabled else None
            self.pollers: list[ModbusPoller | HostSampler | CanReader] = [
                ModbusPoller(m, self.intake) for m in cfg.intake.modbus
            ]
            self.pollers += [CanReader(c, self.intake) for c in cfg.intake.can]
            if cfg.intake.host.enabled:
                self.pollers.append(HostSampler(cfg.intake.host, cfg.storage.path, self.intake))
            self.forwarder = Forwarder(cfg, self.store, desired=desired)
            # readings stamped ahead of a clock known to be behind are not held
            self.intake.offset_ns = self.forwarder.clock.offset_ns
            self.health = Reporter(
                cfg, self.store, self.forwarder.clock, desired.status if desired else None
            )
            self.captures = captures.Recorder(cfg, self.store)
        except BaseException:
            self.lock.release()
            raise
        self.stopping = threading.Event()
        self._next_prune = 0.0
        self._next_beat = 0.0
        self._next_close = 0.0  # forward.batch_every_s, on the monotonic clock
        self._tick_errors = 0
        self._next_error_log = 0.0
        self.exit_code = 0

    def raw_needed_from(self) -> int:
        """Raw readings (and window versions) from here on may still be needed: by a
        revision, or by a hopping window that is still open. A late reading is kept
        if it is at most ``max_age_s`` older than the newest one; the windows it
        revises may start up to a window width before it."""
        w = self.cfg.window
        closed = self.store.get_state(buffer.CLOSED_UNTIL)
        # the widest window, also of a width the buffer had before (window.adopt_width)
        width = max([w.width_ns, *(wd for _, wd in self.intake.late_policy.widths)])
        return min(
            self.store.get_state(buffer.MAX_TS) - w.max_age_ns - width,
            closed - width + w.hop_ns,
        )

    def safe_tick(self) -> None:
        """:meth:`tick`, surviving a failure of the file: counted, logged, tried again."""
        try:
            self.tick()
        except (sqlite3.Error, StorageError) as exc:
            self._tick_errors += 1
            now = time.monotonic()
            if now >= self._next_error_log:
                self._next_error_log = now + TICK_ERROR_LOG_EVERY_S
                log.error(
                    "agent: the buffer failed (%s); %d ticks failed so far, retrying every tick",
                    exc,
                    self._tick_errors,
                )

    def dead_threads(self) -> list[str]:
        """The agent's worker threads that have died (intake's and the forwarder's
        MQTT network threads; the main loop is this thread)."""
        dead = [
            name
            for name, client in (
                ("intake", self.intake.client),
                ("forwarder", self.forwarder.client),
            )
            if not network_thread_alive(client)
        ]
        if self.http is not None and not self.http.alive():
            dead.append("HTTP intake")
        dead += [f"{p.label} {p.cfg.name}" for p in self.pollers if not p.thread.is_alive()]
        return dead

    def stalled(self, limit_s: float) -> str | None:
        """Why the agent should not feed the watchdog now, or None. The main loop
        feeding it shows that the loop turns; this adds intake's commit (a commit
        stuck for ``limit_s``; while it is, the tick waits for it too) and the
        worker threads."""
        busy = self.intake.busy_s()
        if busy > limit_s:
            return f"intake's commit has taken {busy:.0f} s"
        dead = self.dead_threads()
        return f"the {' and '.join(dead)} thread died" if dead else None

    def store_adapter_counts(self) -> None:
        """The counters the HTTP intake, the Modbus pollers and the host sampler
        gathered since the last tick."""
        counts = [p.counts for p in self.pollers]
        if self.http is not None:
            counts.append(self.http.counts)
        taken = [c.take() for c in counts]
        if any(taken):
            with self.store.tx():
                for batch in taken:
                    for name, n in batch.items():
                        self.store.add_counter(name, n)

    def send_ready(self, *, flush: bool = False) -> None:
        """Close and revise what the watermark (or a flush) allows (window.send_ready)."""
        closed, revised = window.send_ready(self.store, self.cfg, flush=flush)
        if closed:
            log.info("window: closed windows into batches %s", closed)
        if revised:
            log.info("window: late readings revised closed windows into batches %s", revised)

    def tick(self) -> None:
        self.intake.flush()  # the last messages of a burst: do not wait for more
        self.intake.release_held()  # what the clock allows now (edge_agent/pipeline/held.py)
        self.store_adapter_counts()
        req = control.pending_flush(self.store)
        if req is not None or time.monotonic() >= self._next_close:
            self._next_close = time.monotonic() + self.cfg.forward.batch_every_s
            self.send_ready(flush=req is not None)
        if req is not None:
            log.info("agent: flush requested: closed every open window")
            control.flush_done(self.store, req)
        if self.intake.alerts.has_timers:  # a write transaction only when needed
            with self.store.tx():
                silent = self.intake.alerts.check_silent(self.store, time.time_ns())
                alerts.record(self.store, silent)
            for ev in silent:
                log.warning("alert %s %s: %s", ev.rule, ev.state, ev.message)
        self.captures.tick()  # the raw readings around alerts (pipeline/captures.py)
        if self.desired is not None:  # a new config on trial: applied or rolled back
            self.desired.tick(self.store, self.cfg.commands.config_grace_s)
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
                clock=self.forwarder.clock.estimate(),
            )
        if now >= self._next_prune:
            self._next_prune = now + PRUNE_EVERY_S
            retention_ns = int(self.cfg.storage.raw_retention_s * 1e9)
            max_ts = self.store.get_state(buffer.MAX_TS)
            buffer.prune(self.store, min(max_ts - retention_ns, self.raw_needed_from()))
            if self.cfg.storage.quarantine_max_age_s:
                age_ns = int(self.cfg.storage.quarantine_max_age_s * 1e9)
                with self.store.tx():
                    quarantine.free(self.store, older_than_ns=time.time_ns() - age_ns)
            held.expire(
                self.store,
                max_bytes=self.cfg.storage.held_max_bytes,
                max_age_s=self.cfg.storage.held_max_age_s,
            )
        self.health.tick(
            intake_up=self.intake.subscribed.is_set(),
            forward_up=self.forwarder.connected.is_set(),
        )
        self.forwarder.pump()

    def run(self, ready_file: str | None = None) -> int:
        def on_signal(signum: int, _frame: FrameType | None) -> None:
            log.info("agent: signal %d, stopping", signum)
            self.stopping.set()

        def on_thread_death(args: threading.ExceptHookArgs) -> None:
            name = args.thread.name if args.thread is not None else "?"
            log.critical(
                "agent: thread %s died: %s: %s",
                name,
                args.exc_type.__name__,
                args.exc_value,
                exc_info=(args.exc_type, args.exc_value, args.exc_traceback),  # type: ignore[arg-type]
            )

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        previous_hook, threading.excepthook = threading.excepthook, on_thread_death
        log.info("agent: device %s, buffer %s", self.cfg.device_id, self.cfg.storage.path)
        kernels.configure(self.cfg.window.kernel)
        log.info("agent: %s window kernels ready in %.2f s", kernels.backend(), kernels.warm_up())
        self.intake.start()
        if self.http is not None:
            self.http.start()
        for poller in self.pollers:
            poller.start()
        self.forwarder.start()
        ready_pending = True
        notifier = Notifier()  # systemd: READY=1 and the watchdog (shared/sdnotify.py)
        ping_every = notifier.ping_every_s()
        next_ping, starved = 0.0, False
        while not self.stopping.wait(self.cfg.tick_s):
            dead = self.dead_threads()
            if dead:
                # No silent death: a dead thread would leave a process that looks
                # alive and stores nothing. Exit non-zero, so that the service
                # manager restarts the agent (the broker keeps what was not acked).
                log.critical(
                    "agent: the %s thread died (see the error above); exiting with 1 so "
                    "that the service manager restarts the agent",
                    " and ".join(dead),
                )
                self.exit_code = 1
                break
            if ready_pending and self.intake.subscribed.is_set():
                write_ready_file(ready_file)
                notifier.ready(f"device {self.cfg.device_id}: subscribed to the local broker")
                ready_pending = False
            self.safe_tick()
            if self.desired is not None and self.desired.restart:
                log.warning("agent: restarting on the desired config (docs/commands.md)")
                break
            if ping_every is not None and time.monotonic() >= next_ping:
                why = self.stalled(ping_every)
                if why is None:
                    notifier.watchdog()
                    next_ping, starved = time.monotonic() + ping_every, False
                elif not starved:
                    log.error("agent: not feeding the watchdog: %s", why)
                    starved = True
        if self.desired is not None and self.desired.restart and not self.stopping.is_set():
            notifier.reloading()
        else:
            notifier.stopping()
        try:
            return self.shutdown() or self.exit_code
        finally:
            threading.excepthook = previous_hook

    def shutdown(self) -> int:
        try:  # the last report, with the connections as they were
            self.health.tick(
                intake_up=self.intake.subscribed.is_set(),
                forward_up=self.forwarder.connected.is_set(),
                stopping=True,
            )
        except (sqlite3.Error, StorageError) as exc:
            log.error("agent: could not store the last health report: %s", exc)
        if self.http is not None:
            self.http.stop()  # no write is answered 204 after this
        for poller in self.pollers:
            poller.stop()
        try:
            self.store_adapter_counts()
        except (sqlite3.Error, StorageError) as exc:
            log.error("agent: could not store the adapters' counters: %s", exc)
        self.intake.stop()
        restarting = self.desired is not None and self.desired.restart
        try:
            if self.cfg.window.flush_on_shutdown and not restarting:
                self.send_ready(flush=True)  # not for a restart: the windows go on
            # what arrived since the last tick, and the flush's batches: a stopped
            # agent's file is within its budget too
            budget.enforce(
                self.store, self.cfg.storage.max_bytes, keep_raw_after_ns=self.raw_needed_from()
            )
        except (sqlite3.Error, StorageError) as exc:
            log.error("agent: could not close the windows or keep the budget at shutdown: %s", exc)
        # A stop on a full disk (or a failing SD card) is a clean stop too: what could
        # not be written stays where it was (unacknowledged at the device broker, or
        # in the outbox), for the next start.
        try:  # a restart does not wait for the cloud: the outbox is there after it
            drained = self.forwarder.drain(0.0 if restarting else self.cfg.forward.drain_timeout_s)
        except (sqlite3.Error, StorageError) as exc:
            log.error("agent: could not drain the outbox (%s); kept for the next start", exc)
            drained = False
        self.forwarder.stop()
        try:
            control.stopped(self.store)
            unacked = outbox.count_unacked(self.store)
        except (sqlite3.Error, StorageError) as exc:
            log.error("agent: could not record the stop in the buffer: %s", exc)
            unacked = -1
        if drained:
            log.info("agent: stopped; outbox drained")
        elif unacked >= 0:
            log.warning(
                "agent: stopped with %d batches not yet acknowledged (kept for the next start)",
                unacked,
            )
        else:
            log.warning("agent: stopped; the buffer could not be read, nothing was dropped")
        self.store.close()
        self.lock.release()
        return 0


def run_agent(
    cfg: AgentConfig, ready_file: str | None = None, desired: Desired | None = None
) -> int:
    """Run until stopped. With ``desired`` (edge_agent/desired.py), ``cfg`` is its
    :meth:`~edge_agent.desired.Desired.load`, and the agent starts again on the new
    config each time a desired config is put in force or rolled back."""
    started = time.monotonic()
    previous: Agent | None = None
    while True:
        try:
            agent = Agent(cfg, desired)
        except Exception as exc:
            status = desired.status() if desired is not None else None
            if desired is None or status is None or status.state != "trial":
                raise
            desired.roll_back(f"the agent does not start: {type(exc).__name__}: {exc}"[:200])
            cfg = desired.load()
            continue
        # a stop asked for while the agent restarted (the signal went to the agent
        # before, whose handler was installed): this one starts and stops at once,
        # closing and sending every window
        if previous is not None and previous.stopping.is_set():
            agent.stopping.set()
        rc = agent.run(ready_file)
        previous = agent
        if desired is None or not desired.restart:
            break
        cfg = desired.load()
        log.info("agent: starting again, desired config version %d", desired.status().version)
    log.info("agent: ran %.1f s", time.monotonic() - started)
    return rc
