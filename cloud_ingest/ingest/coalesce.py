"""Coalesce the line protocol of concurrent writers into few InfluxDB writes.

One batch is ~10 points; InfluxDB takes thousands per request at nearly the
cost of one. The ingestor's groups of messages and a replay's devices hand their
lines to :meth:`Coalescer.write` and wait. One write runs at a time: while it is
in flight, newly arriving lines wait, and the next write takes all of them (up
to ``max_lines``). So an idle ingestor writes at once (no added latency) and a
busy one writes in large requests.

Failures come back to every waiting caller: a retryable one (InfluxDB down) to
all of them, to retry as they would alone. A permanent one (HTTP 400), or one
for the server's state (a series limit: sinks/influx.py), may be caused by one
batch's lines only, so such a combined write is tried again batch by batch, and
only the batch that fails on its own gets the error. Writes are idempotent
(same series, same time), so writing a line twice is harmless.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from shared.errors import PermanentSinkError, SinkLimitError


class Coalescer:
    def __init__(self, write: Callable[[list[str]], None], max_lines: int = 5000) -> None:
        self._write = write  # blocking; run in a thread
        self.max_lines = max_lines
        self._waiting: deque[tuple[list[str], asyncio.Future[None]]] = deque()
        self._flusher: asyncio.Task[None] | None = None
        #: writes done, and lines in them (for metrics and tests)
        self.requests = 0
        self.lines = 0

    async def write(self, lines: list[str]) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((lines, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        await fut

    def _take(self) -> list[tuple[list[str], asyncio.Future[None]]]:
        taken: list[tuple[list[str], asyncio.Future[None]]] = []
        n = 0
        while self._waiting and (not taken or n + len(self._waiting[0][0]) <= self.max_lines):
            item = self._waiting.popleft()
            taken.append(item)
            n += len(item[0])
        return taken

    async def _flush(self) -> None:
        while self._waiting:
            group = self._take()
            group = [(lines, fut) for lines, fut in group if not fut.done()]  # cancelled
            if not group:
                continue
            combined = [line for lines, _ in group for line in lines]
            try:
                await asyncio.to_thread(self._write, combined)
                self.requests += 1
                self.lines += len(combined)
                for _, fut in group:
                    _resolve(fut, None)
            except (PermanentSinkError, SinkLimitError) as exc:
                if len(group) == 1:
                    _resolve(group[0][1], exc)
                    continue
                for lines, fut in group:  # find the batch that is at fault
                    try:
                        await asyncio.to_thread(self._write, lines)
                        self.requests += 1
                        self.lines += len(lines)
                        _resolve(fut, None)
                    except Exception as one:  # noqa: BLE001 - handed to the caller
                        _resolve(fut, one)
            except Exception as exc:  # noqa: BLE001 - handed to every caller
                for _, fut in group:
                    _resolve(fut, exc)


def _resolve(fut: asyncio.Future[None], exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)
