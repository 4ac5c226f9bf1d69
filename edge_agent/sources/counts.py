"""Counters an adapter gathers outside a transaction (a refused HTTP request, a
failed Modbus poll), for the agent's tick to store."""

from __future__ import annotations

import threading
from collections import Counter


class PendingCounts:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def take(self) -> dict[str, int]:
        with self._lock:
            out, self._counts = dict(self._counts), Counter()
        return out
