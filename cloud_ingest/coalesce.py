"""Coalesce the line protocol of concurrently handled batches into few InfluxDB writes.

One batch is ~10 points; InfluxDB takes thousands per request at nearly the
cost of one. The ingestor handles up to ``mqtt.receive_maximum`` messages at a
time; each hands its lines to :meth:`Coalescer.write` and waits. One write runs
at a time: while it is in flight, newly arriving lines wait, and the next write
takes all of them (up to ``max_lines``). So an idle ingestor writes a batch at
once (no added latency) and a busy one writes in large requests.

Failures come back to every waiting caller: a retryable one (InfluxDB down) to
all of them, to retry as they would alone. A permanent one (HTTP 400) may be
caused by one batch's lines only, so a combined write that fails permanently is
tried again batch by batch, and only the batch that fails on its own is
rejected. Writes are idempotent (same series, same time), so writing a line
twice is harmless.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from shared.errors import PermanentSinkError

T = TypeVar("T")


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
            except PermanentSinkError as exc:
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


class ThreadHops:
    """Run blocking calls in a worker thread, several per hand-off.

    Handing a call to a thread and its result back costs the event loop a wake-up
    and a few futures; under load that is a sizeable part of a message's cost.
    Calls submitted while a hand-off is in flight wait, and the next hand-off runs
    all of them, one after the other, in one thread. Each caller gets its own
    result or exception. ``parallel`` hand-offs may be in flight at once.
    """

    def __init__(self, parallel: int = 1, max_calls: int = 64) -> None:
        self.parallel = parallel
        self.max_calls = max_calls
        self._waiting: deque[tuple[Callable[[], Any], asyncio.Future[Any]]] = deque()
        self._running = 0
        self.handoffs = 0  # for metrics and tests

    async def run(self, fn: Callable[[], T]) -> T:
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._waiting.append((fn, fut))
        if self._running < self.parallel:
            self._running += 1
            asyncio.get_running_loop().create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        try:
            while self._waiting:
                group: list[tuple[Callable[[], Any], asyncio.Future[Any]]] = []
                while self._waiting and len(group) < self.max_calls:
                    group.append(self._waiting.popleft())
                self.handoffs += 1
                results = await asyncio.to_thread(_call_all, [fn for fn, _ in group])
                for (_, fut), (ok, value) in zip(group, results, strict=True):
                    if fut.done():
                        continue
                    if ok:
                        fut.set_result(value)
                    else:
                        fut.set_exception(value)
        finally:
            self._running -= 1


def _call_all(fns: list[Callable[[], Any]]) -> list[tuple[bool, Any]]:
    out: list[tuple[bool, Any]] = []
    for fn in fns:
        try:
            out.append((True, fn()))
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            out.append((False, exc))
    return out
