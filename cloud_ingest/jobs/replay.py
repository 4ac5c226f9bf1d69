"""Rebuild InfluxDB from the lake: ``cloud-ingest replay``.

Reads the ``aggregates`` and ``alerts`` objects of the lake (optionally of some
devices and a time range), rebuilds each batch from its rows and sends it down
the ingestor's own write path (:class:`~cloud_ingest.ingest.writer.Writer`: the same
line protocol, coalesced writes, retries, classification of failures), to
InfluxDB only: the replay reads the lake, it does not write it again. Points are
keyed by series and window start, so a replay overwrites what is there with the
same values: running it twice, or over a database that already has the data,
changes nothing.

The aggregates are replayed a day at a time: the day's objects are read
together and only the current version of each window (its highest revision,
once, as in :func:`~cloud_ingest.lake.current_rows`) is written, so a revised
window never overwrites its later version, and a batch that is in the lake twice
is written once. A day's batches, and the devices' alerts, are written
concurrently, and their points share InfluxDB requests.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from cloud_ingest.config import IngestConfig
from cloud_ingest.ingest.writer import Stats, Write, Writer
from cloud_ingest.lake import (
    AGGREGATES,
    ALERTS,
    LakeKey,
    current_rows,
    day,
    list_objects,
    read_table,
    reading,
    table_to_alerts,
    table_to_batches,
)
from cloud_ingest.sinks.base import ObjectStore, PointSink
from cloud_ingest.sinks.lineproto import alert_to_line, batch_to_lines
from shared.errors import LakeObjectError
from shared.wire import Batch

log = logging.getLogger(__name__)

#: Devices replayed at the same time.
CONCURRENT_DEVICES = 16


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


def plan(source: ObjectStore, flt: ReplayFilter) -> dict[str, list[tuple[LakeKey, str]]]:
    """What to replay, in order: day → its aggregates objects (key ``aggregates/<day>``),
    and device → its alert objects."""
    since_dt, until_dt = flt.days()
    out: dict[str, list[tuple[LakeKey, str]]] = {}
    for k, key in list_objects(source, AGGREGATES, since_dt=since_dt, until_dt=until_dt):
        out.setdefault(f"{AGGREGATES}/{k.dt}", []).append((k, key))
    for k, key in list_objects(source, ALERTS, since_dt=since_dt, until_dt=until_dt):
        if not flt.devices or k.device_id in flt.devices:
            out.setdefault(f"{ALERTS}/{k.device_id}", []).append((k, key))
    for objs in out.values():
        objs.sort(key=lambda o: (o[0].dt, o[0].seq, o[1]))
    return out


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


async def replay(
    cfg: IngestConfig,
    source: ObjectStore,
    points: PointSink,
    flt: ReplayFilter,
    progress: Callable[[int], None] = lambda n: None,
    stop: asyncio.Event | None = None,
) -> ReplayResult:
    """Raises :class:`~cloud_ingest.ingest.writer.ShuttingDown` if ``stop`` is set while
    InfluxDB keeps failing (after ``retry.shutdown_grace_s``)."""
    writer = Writer(cfg, points, None, Stats(), stop)
    res = ReplayResult()

    async def write(what: str, lines: list[str]) -> bool:
        """True if written; False if InfluxDB refused it for good (logged)."""
        verdict = (await writer.write([Write(what, b"", lines)]))[0]
        if verdict is not None:
            log.warning("replay: %s refused: %s", what, verdict)
        return verdict is None

    work = plan(source, flt)
    slots = asyncio.Semaphore(CONCURRENT_DEVICES)

    async def read(key: str) -> Any | None:
        """An object's rows; None (counted, logged) if it cannot be read."""
        data = await asyncio.to_thread(source.get, key)
        try:
            with reading(key):
                return read_table(data)
        except LakeObjectError as exc:
            log.warning("replay: %s; skipped", exc)
            res.damaged += 1
            return None
        finally:
            progress(1)

    async def one_batch(batch: Batch, what: str) -> None:
        async with slots:
            lines = batch_to_lines(batch, cfg.influx.measurement, cfg.influx.allowed_tags)
            ok = await write(what, lines)
        res.batches += 1
        res.points += batch.rows if ok else 0
        res.rejected += not ok

    async def one_day(what: str, objs: Iterable[tuple[LakeKey, str]]) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc

        wanted = pa.array(sorted(flt.devices), pa.string())
        tables = []
        for _, key in objs:
            table = await read(key)
            if table is None:
                continue
            res.objects += 1
            # narrowed at once: a day of a large fleet is held in memory together
            if flt.devices:
                table = table.filter(pc.is_in(table.column("device_id"), value_set=wanted))
            tables.append(_in_range(table, "window_start", flt))
        if not tables:
            return
        try:
            with reading(what):  # objects with other schemas do not concatenate
                data = pa.concat_tables(tables, promote_options="default")
        except LakeObjectError as exc:
            log.warning("replay: %s; day skipped", exc)
            res.damaged += len(tables)
            return
        data = current_rows(data)
        await asyncio.gather(
            *(one_batch(b, f"replay {what}") for b in table_to_batches(data) if b.rows)
        )

    async def one_device(device: str, objs: Iterable[tuple[LakeKey, str]]) -> None:
        async with slots:
            for _, key in objs:
                table = await read(key)
                if table is None:
                    continue
                for alert in table_to_alerts(_in_range(table, "ts", flt)):
                    line = alert_to_line(device, alert, cfg.influx.alert_measurement)
                    ok = await write(f"replay {key}", [line])
                    res.alerts += ok
                    res.rejected += not ok
                res.objects += 1

    async def one(what: str, objs: list[tuple[LakeKey, str]]) -> None:
        if what.startswith(f"{AGGREGATES}/"):
            await one_day(what, objs)
        else:
            await one_device(what[len(ALERTS) + 1 :], objs)

    try:
        await asyncio.gather(*(one(what, objs) for what, objs in sorted(work.items())))
    finally:
        writer.close()
    return res
