"""The one write path to the sinks, shared by the service and ``cloud-ingest replay``.

A :class:`Write` is what one message (or one batch rebuilt from the lake) puts in
the sinks: InfluxDB lines and lake objects. :meth:`Writer.write` runs both sinks
to their end for a list of them and returns one verdict each: ``None`` when both
sinks hold it, the ``sink-rejected`` error when InfluxDB refused it for its own
fault, or a :class:`Deferral` when a sink's state refused it (the device keeps it
and sends it again; never its loss).

- InfluxDB: the lines of concurrent callers share requests (:class:`Coalescer`) of
  up to ``influx.max_lines_per_write`` lines; a request refused (HTTP 400, 413) is
  tried again write by write, so that only the writes at fault are refused, and
  each refusal is classified once (sinks/influx.py): the write's own fault
  (``PermanentSinkError``: quarantined) or the server's state (``SinkLimitError``:
  a series limit another device filled, a field type another writer set;
  deferred).
- The lake: objects are put concurrently (``archive.max_concurrent_puts``); only
  the ones that failed retryably are tried again. A :class:`SharedObject` holds
  the rows of several writes (a group's batches of one day): the store refusing
  it for good defers them all (the refusal is the object's, not a batch's).
- Retryable failures back off exponentially with ±20 % jitter (honouring
  Retry-After), for ever while the service runs; once ``stop`` is set, for at most
  ``retry.shutdown_grace_s``, then :class:`ShuttingDown` is raised.
- A write that a sink refused or deferred has its lake objects deleted, or
  rewritten without its rows where shared: the lake holds what InfluxDB holds,
  so that a replay never meets it. A refused one goes to the quarantine.
- The quarantine keeps the first :data:`QUARANTINE_KEEP_BYTES` of a payload,
  with its size and SHA-256: a huge message never sits in the lake whole.

The sinks raise only the shared errors (RetryableSinkError, PermanentSinkError);
each backend translates its library's exceptions in one place (sinks/).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from cloud_ingest.config import IngestConfig
from cloud_ingest.ingest import events
from cloud_ingest.ingest.coalesce import Coalescer
from cloud_ingest.sinks.base import ObjectStore, PointSink
from shared.errors import PermanentSinkError, RetryableSinkError, SinkLimitError, WireError

log = logging.getLogger(__name__)

#: of a quarantined payload, the bytes kept (its size and digest are in the .json)
QUARANTINE_KEEP_BYTES = 65536


@dataclass(frozen=True)
class Deferral:
    """A write a sink's state refused (CLOUD_DEFER_REASONS): not written, not
    quarantined, not answered; the device sends it again."""

    reason: str
    message: str


#: one write's verdict: written (None), refused for its own fault, or deferred
Verdict = WireError | Deferral | None


@dataclass
class Stats:
    """The ingestor's event counts; the names are ``events.py``'s."""

    counters: Counter[events.Event] = field(default_factory=Counter)

    def inc(self, name: events.Event, n: int = 1) -> None:
        self.counters[name] += n


@dataclass(frozen=True)
class Write:
    #: where it came from, for the logs and the quarantine (a topic, or "replay")
    topic: str
    #: what the quarantine keeps if a sink refuses it
    payload: bytes
    lines: Sequence[str]
    objects: Sequence[tuple[str, bytes]] = ()


@dataclass(frozen=True)
class SharedObject:
    """A lake object that holds the rows of several writes."""

    key: str
    data: bytes
    #: the indexes (in :meth:`Writer.write`'s ``writes``) of the writes it holds
    members: tuple[int, ...]
    #: its bytes without the rows of some members; None if no row is left
    rebuild: Callable[[frozenset[int]], bytes | None]


@dataclass(frozen=True)
class Quarantine:
    """A message that is not written: kept in the lake's quarantine with its reason."""

    topic: str
    payload: bytes
    error: WireError


class ShuttingDown(Exception):
    """Raised inside a retry loop when the service is asked to stop."""


class Writer:
    def __init__(
        self,
        cfg: IngestConfig,
        points: PointSink,
        archive: ObjectStore | None,
        stats: Stats,
        stop: asyncio.Event | None = None,
    ) -> None:
        """``archive`` None: lake objects and quarantine entries are not written
        (a replay reads the lake; it does not write it again)."""
        self.cfg = cfg
        self.stats = stats
        self.stop = stop or asyncio.Event()
        self.archive = archive
        # concurrent callers (a replay's devices, successive groups) share requests
        self.influx = Coalescer(points.write, cfg.influx.max_lines_per_write)
        self._puts = ThreadPoolExecutor(
            cfg.archive.max_concurrent_puts, thread_name_prefix="archive-put"
        )
        self._give_up_at: float | None = None
        #: called with (sink, seconds) after each successful write, retries included
        self.on_sink_time: Callable[[str, float], None] | None = None

    def close(self) -> None:
        self._puts.shutdown(wait=True)

    async def write(
        self,
        writes: Sequence[Write],
        quarantine: Sequence[Quarantine] = (),
        shared: Sequence[SharedObject] = (),
    ) -> list[Verdict]:
        """Write to both sinks, and put ``quarantine`` in the lake's quarantine at the
        same time. Both sinks run to their end (success or final failure) before the
        verdicts are given."""
        verdicts: list[Verdict] = [None] * len(writes)
        results = await asyncio.gather(
            self._write_influx(writes, verdicts),
            self._put_objects(
                [((i,), obj) for i, w in enumerate(writes) for obj in w.objects]
                + [(o.members, (o.key, o.data)) for o in shared]
                + [((), obj) for q in quarantine for obj in self._quarantine_objects(q)],
                verdicts,
            ),
            return_exceptions=True,
        )
        for res in results:
            if isinstance(res, BaseException):
                raise res  # ShuttingDown, or a bug
        refused_keys = results[1]
        assert isinstance(refused_keys, set)
        refused = {i: v for i, v in enumerate(verdicts) if v is not None}
        if refused and self.archive is not None:
            await self._put_objects(
                [
                    ((), obj)
                    for i, error in refused.items()
                    if isinstance(error, WireError)
                    for obj in self._quarantine_objects(
                        Quarantine(writes[i].topic, writes[i].payload, error)
                    )
                ],
                verdicts,
            )
            # The lake holds what InfluxDB holds: a write InfluxDB refused for good
            # leaves it (it is in the quarantine), so that a replay never meets it.
            await self._delete_objects([key for i in refused for key, _ in writes[i].objects])
            await self._rewrite_shared(
                [o for o in shared if o.key not in refused_keys], frozenset(refused)
            )
        return verdicts

    async def _rewrite_shared(
        self, shared: Sequence[SharedObject], refused: frozenset[int]
    ) -> None:
        """Put the shared objects that hold refused writes again without their rows
        (or delete them, if nothing is left)."""
        loop = asyncio.get_running_loop()
        puts: list[tuple[tuple[int, ...], tuple[str, bytes]]] = []
        deletes = []
        for o in shared:
            out = refused & frozenset(o.members)
            if not out:
                continue
            data = await loop.run_in_executor(self._puts, o.rebuild, out)
            if data is None:
                deletes.append(o.key)
            else:
                puts.append(((), (o.key, data)))
        await self._put_objects(puts, [])
        await self._delete_objects(deletes)

    async def _write_influx(self, writes: Sequence[Write], verdicts: list[Verdict]) -> None:
        """Requests of up to max_lines_per_write lines; a write whose lines InfluxDB
        refuses (for its own fault, or for the server's state) gets that as its
        verdict, the others are written."""
        chunks: list[list[int]] = [[]]
        n = 0
        for i, w in enumerate(writes):
            if not w.lines:
                continue
            if chunks[-1] and n + len(w.lines) > self.cfg.influx.max_lines_per_write:
                chunks.append([])
                n = 0
            chunks[-1].append(i)
            n += len(w.lines)

        async def one(chunk: list[int]) -> None:
            lines = [line for i in chunk for line in writes[i].lines]
            try:
                await self._with_retry("influx", lambda: self.influx.write(lines))
            except (PermanentSinkError, SinkLimitError) as exc:
                if len(chunk) == 1:
                    if isinstance(exc, SinkLimitError):
                        self.stats.inc(events.INFLUX_LIMITED)
                        log.error(
                            "influx: %s; the batch from %s is deferred (its device sends "
                            "it again); raise the server's limit or fix its state",
                            exc,
                            writes[chunk[0]].topic,
                            extra={"stage": "influx", "topic": writes[chunk[0]].topic},
                        )
                        verdicts[chunk[0]] = Deferral("sink-limit", str(exc))
                    else:
                        verdicts[chunk[0]] = WireError("sink-rejected", str(exc))
                    return
                for i in chunk:  # find the writes at fault
                    await one([i])

        await asyncio.gather(*(one(chunk) for chunk in chunks if chunk))

    async def _put_objects(
        self,
        objects: list[tuple[tuple[int, ...], tuple[str, bytes]]],
        verdicts: list[Verdict],
    ) -> set[str]:
        """Put objects concurrently, retrying the ones that fail retryably; the writes
        of an object the store refuses for good (its indexes in ``writes``; none for
        a quarantine entry, only counted and logged) are deferred: a store that will
        not take an object is not one batch's fault. Returns the keys refused."""
        archive = self.archive
        refused: set[str] = set()
        if archive is None:
            return refused
        pending = objects
        loop = asyncio.get_running_loop()

        async def attempt() -> None:
            nonlocal pending
            results = await asyncio.gather(
                *(
                    loop.run_in_executor(self._puts, archive.put, key, data)
                    for _, (key, data) in pending
                ),
                return_exceptions=True,
            )
            again: list[tuple[tuple[int, ...], tuple[str, bytes]]] = []
            first: RetryableSinkError | None = None
            for (members, obj), res in zip(pending, results, strict=True):
                if isinstance(res, RetryableSinkError):
                    again.append((members, obj))
                    first = first or res
                elif isinstance(res, PermanentSinkError | SinkLimitError):
                    self.stats.inc(events.ARCHIVE_REJECTED)
                    refused.add(obj[0])
                    log.error(
                        "archive: %s (%d writes deferred; their devices send them again)",
                        res,
                        len(members),
                        extra={"stage": "archive"},
                    )
                    for i in members:
                        if verdicts[i] is None:
                            verdicts[i] = Deferral("archive-refused", str(res))
                elif isinstance(res, BaseException):
                    raise res
            pending = again
            if first is not None:
                raise first

        if pending:
            await self._with_retry("archive", attempt)
        return refused

    async def _delete_objects(self, keys: list[str]) -> None:
        archive = self.archive
        if archive is None or not keys:
            return
        loop = asyncio.get_running_loop()

        async def attempt() -> None:
            await asyncio.gather(
                *(loop.run_in_executor(self._puts, archive.delete, key) for key in keys)
            )

        await self._with_retry("archive", attempt)

    def _quarantine_objects(self, q: Quarantine) -> list[tuple[str, bytes]]:
        reason, message = q.error.reason, str(q.error)
        log.warning(
            "quarantine: %s on %s: %s",
            reason,
            q.topic,
            message,
            extra={"reason": reason, "topic": q.topic, "bytes": len(q.payload)},
        )
        digest = hashlib.sha256(q.payload).hexdigest()
        kept = q.payload[:QUARANTINE_KEEP_BYTES]
        meta = json.dumps(
            {
                "topic": q.topic[:1024],
                "reason": reason,
                "message": message[:2000],
                "received_ns": time.time_ns(),
                "bytes": len(q.payload),
                "sha256": digest,
                "kept_bytes": len(kept),
            }
        ).encode()
        base = f"quarantine/reason={reason}/{digest}"
        return [(base + ".bin", kept), (base + ".json", meta)]

    async def _with_retry(self, stage: str, op: Callable[[], Awaitable[None]]) -> None:
        """Await ``op()`` until it succeeds or fails permanently (see the module doc)."""
        delay = self.cfg.retry.initial_s
        started = time.monotonic()
        while True:
            try:
                await op()
                if self.on_sink_time is not None:
                    self.on_sink_time(stage, time.monotonic() - started)
                return
            except RetryableSinkError as exc:
                self.stats.inc(events.retries(stage))
                wait = exc.retry_after if exc.retry_after is not None else delay
                wait = min(wait, self.cfg.retry.max_s) * random.uniform(0.8, 1.2)
                delay = min(delay * 2, self.cfg.retry.max_s)
                log.warning("%s: %s; retrying in %.1f s", stage, exc, wait, extra={"stage": stage})
                if not self.stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.stop.wait(), timeout=wait)
                    continue
                if self._give_up_at is None:
                    self._give_up_at = time.monotonic() + self.cfg.retry.shutdown_grace_s
                left = self._give_up_at - time.monotonic()
                if left <= 0:
                    raise ShuttingDown(f"{stage}: gave up retrying at shutdown") from exc
                await asyncio.sleep(min(wait, left))  # backoff between retries
            except PermanentSinkError:
                if stage == "influx":
                    self.stats.inc(events.INFLUX_REJECTED)
                raise
