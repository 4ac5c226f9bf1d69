"""Counters an adapter gathers outside a transaction (a refused HTTP request, a
failed Modbus poll), for the agent's tick to store; and the pollers' loop."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable

from edge_agent.counters import CounterName


class PendingCounts:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[CounterName] = Counter()

    def add(self, name: CounterName, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def take(self) -> dict[CounterName, int]:
        with self._lock:
            out, self._counts = dict(self._counts), Counter()
        return out


def run_every(
    interval_s: float,
    stopping: threading.Event,
    once: Callable[[], object],
    on_error: Callable[[], None],
) -> None:
    """Call ``once`` every ``interval_s`` on the monotonic clock until ``stopping``;
    a call that overran skips the calls it missed (no burst). An exception out of
    ``once`` goes to ``on_error`` (called inside the handler: it may log it) and the
    loop goes on: the pollers' threads must not die on what a device answers."""
    next_at = time.monotonic()
    while not stopping.wait(max(0.0, next_at - time.monotonic())):
        next_at += interval_s
        if next_at < time.monotonic():
            next_at = time.monotonic() + interval_s
        try:
            once()
        except Exception:  # noqa: BLE001 (on_error logs it with its traceback)
            on_error()
