"""The write coalescer, with a fake blocking sink (the callable it is given)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from cloud_ingest.ingest.coalesce import Coalescer
from shared.errors import PermanentSinkError, RetryableSinkError


class FakeSink:
    def __init__(self) -> None:
        self.requests: list[list[str]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail: Exception | None = None
        self.bad = "bad"

    def write(self, lines: list[str]) -> None:
        self.gate.wait(10)
        self.requests.append(list(lines))
        if self.fail is not None:
            raise self.fail
        if self.bad in lines:
            raise PermanentSinkError("unable to parse")


def test_concurrent_writes_share_requests() -> None:
    sink = FakeSink()

    async def main() -> None:
        c = Coalescer(sink.write, max_lines=25)
        sink.gate.clear()  # hold the first request so the others queue up
        first = asyncio.create_task(c.write(["a0"]))
        await asyncio.sleep(0)  # let it start
        rest = [asyncio.create_task(c.write([f"b{i}"] * 10)) for i in range(5)]
        await asyncio.sleep(0)
        sink.gate.set()
        await asyncio.gather(first, *rest)
        assert c.lines == 51

    asyncio.run(main())
    # a0 alone, then the 50 waiting lines in requests of at most 25 lines
    assert [len(r) for r in sink.requests] == [1, 20, 20, 10]


def test_a_permanent_failure_is_pinned_on_its_batch() -> None:
    sink = FakeSink()

    async def main() -> list[object]:
        c = Coalescer(sink.write)
        sink.gate.clear()
        first = asyncio.create_task(c.write(["x"]))
        await asyncio.sleep(0)
        group = [asyncio.create_task(c.write(lines)) for lines in (["a"], ["bad"], ["c"])]
        await asyncio.sleep(0)
        sink.gate.set()
        return await asyncio.gather(first, *group, return_exceptions=True)

    res = asyncio.run(main())
    assert res[0] is None and res[1] is None and res[3] is None
    assert isinstance(res[2], PermanentSinkError)
    assert sink.requests == [["x"], ["a", "bad", "c"], ["a"], ["bad"], ["c"]]


def test_a_retryable_failure_reaches_every_caller() -> None:
    sink = FakeSink()
    sink.fail = RetryableSinkError("InfluxDB unreachable")

    async def main() -> None:
        c = Coalescer(sink.write)
        results = await asyncio.gather(c.write(["a"]), c.write(["b"]), return_exceptions=True)
        assert all(isinstance(r, RetryableSinkError) for r in results)

    asyncio.run(main())
    with pytest.raises(RetryableSinkError):
        asyncio.run(Coalescer(sink.write).write(["z"]))
