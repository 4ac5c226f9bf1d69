"""Rebuild InfluxDB from the lake: ``cloud-ingest replay``.

Reads the ``aggregates`` and ``alerts`` objects of the lake (optionally of some
devices and a time range), rebuilds each batch from its rows and sends it down
the ingestor's own write path (:class:`~cloud_ingest.writer.Writer`: the same
line protocol, coalesced writes, retries, classification of failures), to
InfluxDB only: the replay reads the lake, it does not write it again. Points are
keyed by series and window start, so a replay overwrites what is there with the
same values: running it twice, or over a database that already has the data,
changes nothing.

A device's objects are replayed in key order (day, then seq), so a revised
window (higher seq) is written after the version it replaces. Devices are
replayed concurrently, and their points share InfluxDB requests.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from cloud_ingest.config import IngestConfig
from cloud_ingest.lake import (
    AGGREGATES,
    ALERTS,
    LakeKey,
    day,
    list_objects,
    read_table,
    reading,
    table_to_alerts,
    table_to_batches,
)
from cloud_ingest.lineproto import alert_to_line, batch_to_lines
from cloud_ingest.sinks.base import ObjectStore, PointSink
from cloud_ingest.writer import Stats, Write, Writer
from shared.errors import LakeObjectError

log = logging.getLogger("cloud_ingest.replay")

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
    """device → its objects to replay, in order."""
    since_dt, until_dt = flt.days()
    per_device: dict[str, list[tuple[LakeKey, str]]] = {}
    for table in (ALERTS, AGGREGATES):
        for k, key in list_objects(source, table, since_dt=since_dt, until_dt=until_dt):
            if flt.devices and k.device_id not in flt.devices:
                continue
            per_device.setdefault(k.device_id, []).append((k, key))
    for objs in per_device.values():
        objs.sort(key=lambda o: (o[0].dt, o[0].seq, o[0].table))
    return per_device


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
    """Raises :class:`~cloud_ingest.writer.ShuttingDown` if ``stop`` is set while
    InfluxDB keeps failing (after ``retry.shutdown_grace_s``)."""
    writer = Writer(cfg, points, None, Stats(), stop)
    res = ReplayResult()

    async def write(what: str, lines: list[str]) -> bool:
        """True if written; False if InfluxDB refused it for good (logged)."""
        verdict = (await writer.write([Write(what, b"", lines)]))[0]
        if verdict is not None:
            log.warning("replay: %s refused: %s", what, verdict)
        return verdict is None

    per_device = plan(source, flt)
    slots = asyncio.Semaphore(CONCURRENT_DEVICES)

    async def one_device(device: str, objs: Iterable[tuple[LakeKey, str]]) -> None:
        async with slots:
            for k, key in objs:
                data = await asyncio.to_thread(source.get, key)
                try:
                    with reading(key):
                        if k.table == AGGREGATES:
                            table = _in_range(read_table(data), "window_start", flt)
                            batches = [b for b in table_to_batches(device, table) if b.rows]
                            alerts = []
                        else:
                            batches = []
                            alerts = list(table_to_alerts(_in_range(read_table(data), "ts", flt)))
                except LakeObjectError as exc:
                    log.warning("replay: %s; skipped", exc)
                    res.damaged += 1
                    progress(1)
                    continue
                for batch in batches:
                    lines = batch_to_lines(batch, cfg.influx.measurement, cfg.influx.allowed_tags)
                    ok = await write(f"replay {key}", lines)
                    res.batches += 1
                    res.points += batch.rows if ok else 0
                    res.rejected += not ok
                for alert in alerts:
                    line = alert_to_line(device, alert, cfg.influx.alert_measurement)
                    ok = await write(f"replay {key}", [line])
                    res.alerts += ok
                    res.rejected += not ok
                res.objects += 1
                progress(1)

    try:
        await asyncio.gather(*(one_device(d, objs) for d, objs in sorted(per_device.items())))
    finally:
        writer.close()
    return res
