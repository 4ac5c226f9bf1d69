"""Counters an adapter gathers outside a transaction (a refused HTTP request, a
failed Modbus poll), for the agent's tick to store."""

from __future__ import annotations

import threading
from collections import Counter

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
