"""Rebuild InfluxDB from the lake: ``cloud-ingest replay``.

Reads the ``aggregates`` and ``alerts`` objects of the lake (optionally of some
devices and a time range), rebuilds each batch from its rows and sends it down
the ingestor's own write path (:meth:`Processor.write_batch`: the same line
protocol, coalesced writes, retries, classification of failures). Points are
keyed by series and window start, so a replay overwrites what is there with the
same values: running it twice, or over a database that already has the data,
changes nothing.

A device's objects are replayed in key order (day, then seq), so a revised
window (higher seq) is written after the version it replaces. Devices are
replayed concurrently, and their points share InfluxDB requests.
"""

from __future__ import annotations

import asyncio
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
    table_to_alerts,
    table_to_batches,
)
from cloud_ingest.process import Processor
from cloud_ingest.sinks.base import ObjectStore, PointSink

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


class _NoArchive:
    """The replay reads the lake; it does not write it again."""

    def put(self, key: str, data: bytes) -> None:
        pass

    def get(self, key: str) -> bytes:
        raise KeyError(key)

    def list(self, prefix: str) -> list[str]:
        return []

    def delete(self, key: str) -> None:
        pass

    def close(self) -> None:
        pass


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
) -> ReplayResult:
    proc = Processor(cfg, points, _NoArchive())
    res = ReplayResult()
    per_device = plan(source, flt)
    slots = asyncio.Semaphore(CONCURRENT_DEVICES)

    async def one_device(device: str, objs: Iterable[tuple[LakeKey, str]]) -> None:
        async with slots:
            for k, key in objs:
                data = await asyncio.to_thread(source.get, key)
                if k.table == AGGREGATES:
                    table = _in_range(read_table(data), "window_start", flt)
                    for batch in table_to_batches(device, table):
                        if batch.rows == 0:
                            continue
                        out = await proc.write_batch(batch)
                        res.batches += 1
                        res.points += batch.rows if out.result == "written" else 0
                        res.rejected += out.result == "quarantined"
                else:
                    for alert in table_to_alerts(_in_range(read_table(data), "ts", flt)):
                        out = await proc.write_alert(device, alert)
                        res.alerts += out.result == "written"
                        res.rejected += out.result == "quarantined"
                res.objects += 1
                progress(1)

    try:
        await asyncio.gather(*(one_device(d, objs) for d, objs in sorted(per_device.items())))
    finally:
        proc.close()
    return res
