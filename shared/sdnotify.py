"""systemd's service notification protocol (``sd_notify(3)``): readiness and watchdog.

Under a unit with ``Type=notify``, systemd sets ``NOTIFY_SOCKET``; a service says
``READY=1`` once it does its job, ``WATCHDOG=1`` at least every ``WATCHDOG_USEC``
(with ``WatchdogSec=``), ``STOPPING=1`` when it begins to stop, and ``STATUS=…``
for ``systemctl status``. Each is one datagram on that socket. Without
``NOTIFY_SOCKET`` (not under systemd) every call does nothing.

Written here rather than taken from PyPI: the protocol is one ``sendto`` per
message, and the ``sdnotify`` package has had no release since 2017. The
services feed the watchdog only while their own health checks pass (the
callers say which), so that systemd restarts a process that is alive but stuck.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        # an abstract socket is written "@name"; its address starts with NUL
        self._addr = "\0" + path[1:] if path.startswith("@") else path
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        ours = not pid or pid == str(os.getpid())
        #: seconds between watchdog pings systemd expects at most; None without a watchdog
        self.watchdog_s: float | None = (
            int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 and ours else None
        )
        self._failed = False

    @property
    def enabled(self) -> bool:
        return bool(self._addr)

    def notify(self, *fields: str) -> bool:
        """Send ``fields`` (``"READY=1"``, ``"STATUS=…"``) as one message; True if sent."""
        if not self._addr:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto("\n".join(fields).encode(), self._addr)
        except OSError as exc:
            if not self._failed:  # once: a missing socket does not change by itself
                log.warning("sd_notify: cannot reach %s: %s", self._addr.lstrip("\0"), exc)
                self._failed = True
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def reloading(self) -> bool:
        """Starting again in the same process (a new config): READY=1 follows."""
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def ping_every_s(self) -> float | None:
        """How often to feed the watchdog: half its timeout, as sd_watchdog_enabled(3)
        advises; None without a watchdog."""
        return self.watchdog_s / 2 if self.watchdog_s else None
