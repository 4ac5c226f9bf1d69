"""Rebuild InfluxDB from the lake: ``cloud-ingest replay``.

Reads the ``aggregates`` and ``alerts`` objects of the lake (optionally of some
devices and a time range), rebuilds each batch from its rows and sends it down
the ingestor's own write path (:class:`~cloud_ingest.ingest.writer.Writer`: the same
line protocol, coalesced writes, retries, classification of failures), to
InfluxDB only: the replay reads the lake, it does not write it again. Points are
keyed by series and window start, so a replay overwrites what is there with the
same values: running it twice, or over a database that already has the data,
changes nothing.

The aggregates are replayed a day at a time: DuckDB (:mod:`cloud_ingest.jobs.engines`)
reads the day's objects and returns only the current version of each window
(its highest revision, once, as :func:`~cloud_ingest.lake.current_rows` keeps),
so a revised window never overwrites its later version, and a batch that is in
the lake twice is written once. The rows stream out of DuckDB a record batch at
a time, in batch order, and are written as they come: the replay holds a record
batch and the writes in flight, not the day (DuckDB spills past its memory
limit). A day's batches, and the devices' alerts, are written concurrently, and
their points share InfluxDB requests.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from cloud_ingest.config import IngestConfig
from cloud_ingest.ingest.writer import Stats, Write, Writer
from cloud_ingest.jobs.engines import DuckDBEngine, Staged, device_slices, stage
from cloud_ingest.lake import (
    AGGREGATES,
    ALERTS,
    WINDOW_KEY,
    LakeKey,
    day,
    list_objects,
    read_table,
    reading,
    table_to_alerts,
    table_to_batches,
)
from cloud_ingest.lake.schema import aggregates_schema
from cloud_ingest.sinks.base import ObjectStore, PointSink
from cloud_ingest.sinks.lineproto import alert_to_line, batch_to_lines
from shared.errors import LakeObjectError
from shared.wire import Batch

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Devices replayed at the same time.
CONCURRENT_DEVICES = 16
#: Rows DuckDB hands over at a time.
CHUNK_ROWS = 65_536


@dataclass(frozen=True)
class ReplayFilter:
    since_ns: int | None = None
    until_ns: int | None = None  # exclusive
    devices: frozenset[str] = frozenset()

    def days(self) -> tuple[str | None, str | None]:
        return (
            None if self.since_ns is None else day(self.since_ns),
            None if self.until_ns is None else day(self.until_ns - 1),
        )


@dataclass
class ReplayResult:
    objects: int = 0
    batches: int = 0
    points: int = 0
    alerts: int = 0
    rejected: int = 0
    #: lake objects that could not be read (logged with the reason), left as they are
    damaged: int = 0


@dataclass(frozen=True)
class ReplayPlan:
    """What a replay reads, in the order it writes it."""

    #: day (``YYYY-MM-DD``) → the keys of its aggregates objects
    days: dict[str, list[str]] = field(default_factory=dict)
    #: device → the keys of its alert objects, oldest first
    alerts: dict[str, list[str]] = field(default_factory=dict)

    @property
    def objects(self) -> int:
        return sum(map(len, self.days.values())) + sum(map(len, self.alerts.values()))


def plan(source: ObjectStore, flt: ReplayFilter) -> ReplayPlan:
    """The lake's objects that ``flt`` may need (by the days in their keys, and for
    alerts by device; the aggregates objects hold many devices, whose rows are
    narrowed when read)."""
    since_dt, until_dt = flt.days()
    days: dict[str, list[tuple[LakeKey, str]]] = {}
    alerts: dict[str, list[tuple[LakeKey, str]]] = {}
    for k, key in list_objects(source, AGGREGATES, since_dt=since_dt, until_dt=until_dt):
        days.setdefault(k.dt, []).append((k, key))
    for k, key in list_objects(source, ALERTS, since_dt=since_dt, until_dt=until_dt):
        if not flt.devices or k.device_id in flt.devices:
            alerts.setdefault(k.device_id, []).append((k, key))

    def ordered(objs: list[tuple[LakeKey, str]]) -> list[str]:
        return [key for _, key in sorted(objs, key=lambda o: (o[0].dt, o[0].seq, o[1]))]

    return ReplayPlan(
        {d: ordered(o) for d, o in sorted(days.items())},
        {dev: ordered(o) for dev, o in sorted(alerts.items())},
    )


def _in_range(table: Any, column: str, flt: ReplayFilter) -> Any:
    if flt.since_ns is None and flt.until_ns is None:
        return table
    import pyarrow as pa

    ts = table.column(column).cast(pa.int64()).to_numpy()
    keep = np.ones(len(ts), dtype=bool)
    if flt.since_ns is not None:
        keep &= ts >= flt.since_ns
    if flt.until_ns is not None:
        keep &= ts < flt.until_ns
    return table.filter(pa.array(keep))


class Replay:
    """One run of ``cloud-ingest replay``: :meth:`run` replays each day of the plan
    (:meth:`day`: read, narrow, keep the current version of each window, write its
    batches) and each device's alerts (:meth:`device_alerts`), at the same time, up
    to :data:`CONCURRENT_DEVICES` writes at once, and counts what it did in
    :attr:`result`."""

    def __init__(
        self,
        cfg: IngestConfig,
        source: ObjectStore,
        points: PointSink,
        flt: ReplayFilter,
        progress: Callable[[int], None] = lambda n: None,
        stop: asyncio.Event | None = None,
    ) -> None:
        self.cfg, self.source, self.flt, self.progress = cfg, source, flt, progress
        self.writer = Writer(cfg, points, None, Stats(), stop)
        self.result = ReplayResult()
        self._slots = asyncio.Semaphore(CONCURRENT_DEVICES)

    async def run(self, work: ReplayPlan) -> ReplayResult:
        """Raises :class:`~cloud_ingest.ingest.writer.ShuttingDown` if ``stop`` is set
        while InfluxDB keeps failing (after ``retry.shutdown_grace_s``)."""
        with tempfile.TemporaryDirectory(prefix="cloud-ingest-replay-") as tmp:
            engine = DuckDBEngine(Path(tmp))
            try:

                async def days() -> None:  # one after the other: one day in DuckDB
                    for dt, keys in work.days.items():
                        try:
                            await self.day(engine, Path(tmp) / dt, dt, keys)
                        finally:  # an S3 lake's copies: disk for one day at a time
                            shutil.rmtree(Path(tmp) / dt, ignore_errors=True)

                await asyncio.gather(
                    days(), *(self.device_alerts(dev, keys) for dev, keys in work.alerts.items())
                )
            finally:
                self.writer.close()
                engine.close()
        return self.result

    async def day(self, engine: DuckDBEngine, folder: Path, dt: str, keys: Iterable[str]) -> None:
        """A day's aggregates: the current version of each window, once, streamed."""
        folder.mkdir()
        staged: list[Staged] = []
        for key in keys:
            got = await self._stage(key, folder)
            if got is not None:
                staged.append(got)
        if not staged:
            return
        self.result.objects += len(staged)
        engine.view([s.path for s in staged])
        where = ["TRUE"]
        if self.flt.devices:
            devices = sorted(self.flt.devices)
            engine.register("replay_devices", {"device_id": devices})
            where.append("device_id IN (SELECT device_id FROM replay_devices)")
        if self.flt.since_ns is not None:
            where.append(f"start_ns >= {int(self.flt.since_ns)}")
        if self.flt.until_ns is not None:
            where.append(f"start_ns < {int(self.flt.until_ns)}")
        columns = ", ".join(f'"{c}"' for c in aggregates_schema().names)
        what = f"replay {AGGREGATES}/{dt}"
        try:
            for part in device_slices(engine, staged):
                sql = (
                    f"SELECT {columns} FROM aggregates WHERE {' AND '.join([*where, part])} "
                    f"QUALIFY row_number() OVER (PARTITION BY {', '.join(WINDOW_KEY)} "
                    "ORDER BY revision DESC, seq DESC) = 1 "
                    f"ORDER BY device_id, generation, seq, {', '.join(WINDOW_KEY[1:])}"
                )
                whole = _whole_batches(engine.batches(sql, CHUNK_ROWS))
                while (chunk := await asyncio.to_thread(next, whole, None)) is not None:
                    batches = table_to_batches(chunk)
                    await asyncio.gather(*(self._batch(b, what) for b in batches if b.rows))
        except LakeObjectError as exc:  # an object DuckDB could not read past its footer
            log.warning("replay: %s; the rest of day %s skipped", exc, dt)
            self.result.damaged += 1

    async def device_alerts(self, device: str, keys: Iterable[str]) -> None:
        async with self._slots:
            for key in keys:
                table = await self._read(key)
                if table is None:
                    continue
                for alert in table_to_alerts(_in_range(table, "ts", self.flt)):
                    line = alert_to_line(device, alert, self.cfg.influx.alert_measurement)
                    ok = await self._write(f"replay {key}", [line])
                    self.result.alerts += ok
                    self.result.rejected += not ok
                self.result.objects += 1

    async def _batch(self, batch: Batch, what: str) -> None:
        influx = self.cfg.influx
        async with self._slots:
            ok = await self._write(
                what, batch_to_lines(batch, influx.measurement, influx.allowed_tags)
            )
        self.result.batches += 1
        self.result.points += batch.rows if ok else 0
        self.result.rejected += not ok

    async def _stage(self, key: str, folder: Path) -> Staged | None:
        """An aggregates object as a local file DuckDB reads; None (counted, logged)
        if it cannot be read."""
        staged = await self._unless_damaged(lambda: stage(self.source, [key], folder))
        return None if staged is None else staged[0]

    async def _read(self, key: str) -> Any | None:
        """An object's rows; None (counted, logged) if it cannot be read."""

        def read() -> Any:
            data = self.source.get(key)  # the store's errors are not the object's
            with reading(key):
                return read_table(data)

        return await self._unless_damaged(read)

    async def _unless_damaged(self, work: Callable[[], T]) -> T | None:
        """``work`` (reading one object) in a thread; None, logged and counted as
        damaged, if the object cannot be read."""
        try:
            return await asyncio.to_thread(work)
        except LakeObjectError as exc:
            log.warning("replay: %s; skipped", exc)
            self.result.damaged += 1
            return None
        finally:
            self.progress(1)

    async def _write(self, what: str, lines: list[str]) -> bool:
        """True if written; False if InfluxDB refused it for good (logged)."""
        verdict = (await self.writer.write([Write(what, b"", lines)]))[0]
        if verdict is not None:
            log.warning("replay: %s refused: %s", what, verdict)
        return verdict is None


def _whole_batches(chunks: Iterator[Any]) -> Iterator[Any]:
    """Tables of whole batches out of record batches ordered by (device_id,
    generation, seq): a batch cut by a chunk's end waits for the next chunk."""
    import pyarrow as pa

    carry = None
    for chunk in chunks:
        table = pa.Table.from_batches([chunk])
        if carry is not None:
            table = pa.concat_tables([carry, table])
        n = table.num_rows
        if n == 0:
            continue
        key = [table.column(c)[n - 1].as_py() for c in ("device_id", "generation", "seq")]
        last = n - 1
        while last > 0 and [table.column(c)[last - 1].as_py() for c in
                            ("device_id", "generation", "seq")] == key:  # fmt: skip
            last -= 1
        if last:
            yield table.slice(0, last)
        carry = table.slice(last)
    if carry is not None and carry.num_rows:
        yield carry


async def replay(
    cfg: IngestConfig,
    source: ObjectStore,
    points: PointSink,
    flt: ReplayFilter,
    progress: Callable[[int], None] = lambda n: None,
    work: ReplayPlan | None = None,
    stop: asyncio.Event | None = None,
) -> ReplayResult:
    """Replay ``work`` (by default :func:`plan` of ``flt``): :meth:`Replay.run`."""
    job = Replay(cfg, source, points, flt, progress, stop)
    return await job.run(plan(source, flt) if work is None else work)
