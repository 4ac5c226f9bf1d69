"""Lake compaction: a day's objects become one, holding only the current version of
each window.

The ingestor writes one ``aggregates`` object per group and day (and one alerts
object per alert), so a day is many objects, a revised window exists twice until
compaction, and a batch delivered again after it was written is there twice (the
latest-revision query hides both). ``cloud-ingest compact`` rewrites the day
``aggregates/dt=<day>/`` as one object ``compacted.parquet``, with only the
highest revision of each window (what InfluxDB holds), sorted by device and
window, and each alert partition ``alerts/dt=<day>/device_id=<id>/`` as one object
``seq=<first>-<last>.parquet`` with each alert once; then it deletes the objects
it read. It writes before it deletes, so a reader sees the rows at least once at
every moment, and a compaction that dies halfway is finished by the next run.
Objects that arrive meanwhile (a late resend) are not touched, and fold into the
next compaction. Run it for closed days. A day or partition with an object that
cannot be read is left as it is and named in ``damaged``.

A day is SQL on an engine (:mod:`cloud_ingest.jobs.engines`, DuckDB by default,
Spark with ``--engine spark``): the latest revision of each window is kept in the
engine (DuckDB: a table in its on-disk database, spilled past its memory limit;
Spark: a checkpoint), then written bucket by bucket, each bucket's rows in window
order. A day larger than :data:`BUCKET_BYTES` of objects is split into buckets by
a hash of the device (crc32, so that a device's windows stay in one object and a
run again finds the same keys). Alerts (one small object per alert) are
compacted here in Arrow, a device and day at a time.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cloud_ingest.jobs.engines import Engine, open_engine, slice_count, stage
from cloud_ingest.lake import (
    AGGREGATES,
    ALERTS,
    COMPACTED_NAME,
    WINDOW_KEY,
    list_objects,
    read_table,
    reading,
    to_parquet,
)
from cloud_ingest.lake.schema import aggregates_schema, arrow
from cloud_ingest.sinks.base import ObjectStore
from shared.errors import LakeObjectError

log = logging.getLogger(__name__)


@dataclass
class CompactResult:
    partitions: int = 0
    objects_in: int = 0
    rows_in: int = 0
    rows_out: int = 0
    #: keys of objects that could not be read; their partitions are left as they are
    damaged: list[str] = field(default_factory=list)


#: Parquet bytes of the objects of one bucket of a compacted day: about 500,000
#: windows. It bounds the size of a compacted object, not the memory (the engine's).
BUCKET_BYTES = 64 * 2**20


def compacted_key(table: str, dt: str, device: str, first: int, last: int) -> str:
    return f"{table}/dt={dt}/device_id={device}/seq={first:020d}-{last:020d}.parquet"


def compacted_day_key(dt: str, bucket: int, buckets: int) -> str:
    name = COMPACTED_NAME if buckets == 1 else f"{COMPACTED_NAME}-{bucket:04d}-of-{buckets:04d}"
    return f"{AGGREGATES}/dt={dt}/{name}.parquet"


def _first_of_each_seq(data: Any) -> Any:
    """An alert partition's rows, each alert seq once (a resend is the same alert)."""
    import pyarrow as pa

    order = data.sort_by([("seq", "ascending")])
    seqs = order.column("seq").to_numpy()
    first = np.ones(len(seqs), dtype=bool)
    first[1:] = seqs[1:] != seqs[:-1]
    return order.filter(pa.array(first))


def partitions(
    store: ObjectStore, since_dt: str, until_dt: str
) -> Iterator[tuple[str, str, str, list[str]]]:
    """(table, day, device, keys) of every partition in the day range: for aggregates
    a day (device ""), for alerts a day and device."""
    for table in (AGGREGATES, ALERTS):
        groups: dict[tuple[str, str], list[str]] = {}
        for k, key in list_objects(store, table, since_dt=since_dt, until_dt=until_dt):
            groups.setdefault((k.dt, k.device_id), []).append(key)
        for (dt, dev), keys in sorted(groups.items()):
            yield table, dt, dev, sorted(keys)


def compact(
    store: ObjectStore,
    since_dt: str,
    until_dt: str,
    bucket_bytes: int = BUCKET_BYTES,
    engine: Engine | None = None,
    workdir: Path | None = None,
) -> CompactResult:
    """Compact the days [since_dt, until_dt] on ``engine`` (DuckDB in a temporary
    folder without one), its staged objects and outputs in ``workdir``."""
    res = CompactResult()
    with tempfile.TemporaryDirectory(prefix="cloud-ingest-compact-", dir=workdir) as tmp:
        folder = Path(tmp)
        eng = engine if engine is not None else open_engine("duckdb", folder)
        try:
            for table, dt, dev, keys in partitions(store, since_dt, until_dt):
                day_folder = folder / f"day-{dt}"
                try:
                    if table == AGGREGATES:
                        _compact_day(store, eng, day_folder, dt, keys, res, bucket_bytes)
                    else:
                        _compact_alerts(store, dt, dev, keys, res)
                except LakeObjectError as exc:
                    log.warning("compact: %s; partition %s %s left as it is", exc, dt, dev)
                    res.damaged.append(exc.key)
                finally:  # the day's staged copies and outputs: disk for one day at a time
                    shutil.rmtree(day_folder, ignore_errors=True)
        finally:
            if engine is None:
                eng.close()
    return res


def _compact_alerts(
    store: ObjectStore, dt: str, dev: str, keys: list[str], res: CompactResult
) -> None:
    import pyarrow as pa

    tables = []
    for k in keys:
        blob = store.get(k)
        with reading(k):
            tables.append(read_table(blob))
    with reading(keys[0]):  # columns added since (capture) are null in older objects
        data = pa.concat_tables(tables, promote_options="default")
        kept = _first_of_each_seq(data)
    seqs = data.column("seq").to_numpy()
    new_key = compacted_key(ALERTS, dt, dev, int(seqs.min()), int(seqs.max()))
    res.partitions += 1
    res.objects_in += len(keys)
    res.rows_in += data.num_rows
    res.rows_out += kept.num_rows
    if keys == [new_key]:
        return  # already one compacted object
    store.put(new_key, to_parquet(kept.replace_schema_metadata(tables[0].schema.metadata)))
    for k in keys:
        if k != new_key:
            store.delete(k)


def _compact_day(
    store: ObjectStore,
    eng: Engine,
    folder: Path,
    dt: str,
    keys: list[str],
    res: CompactResult,
    bucket_bytes: int,
) -> None:
    """One day of aggregates: the engine keeps the latest revision of each window and
    writes it bucket by bucket; only then are the new objects put and the old deleted."""
    _, pq = arrow()
    (folder / "in").mkdir(parents=True)
    staged = stage(store, keys, folder / "in")
    buckets = 1 + sum(s.size for s in staged) // bucket_bytes
    new_keys = [compacted_day_key(dt, b, buckets) for b in range(buckets)]
    res.partitions += 1
    res.objects_in += len(keys)
    if keys == new_keys and buckets == 1:  # already compacted
        n = pq.ParquetFile(staged[0].path).metadata.num_rows
        res.rows_in += n
        res.rows_out += n
        return
    eng.view([s.path for s in staged])
    rows_in = int(eng.scalar("SELECT count(*) FROM aggregates"))
    devices = [r["device_id"] for r in eng.rows("SELECT DISTINCT device_id FROM aggregates")]
    which = {d: zlib.crc32(d.encode()) % buckets for d in devices}
    eng.register("device_buckets", {"device_id": list(which), "bucket": list(which.values())})
    key = ", ".join(f"a.{k}" for k in WINDOW_KEY)
    # a slice is whole buckets (bucket mod slices), kept in bucket order: each
    # bucket's rows are then a few of the table's row groups, not a scan of all.
    # (A bucket is 64 MB of objects, a slice 4 million rows: at the 60 bytes or
    # more a window takes, there are more buckets than slices.)
    slices = slice_count(eng, staged)
    for i in range(slices):
        eng.table(
            "kept",
            "SELECT a.*, b.bucket FROM aggregates a JOIN device_buckets b"
            f" ON a.device_id = b.device_id WHERE b.bucket % {slices} = {i}"
            f" QUALIFY row_number() OVER (PARTITION BY {key}"
            " ORDER BY a.revision DESC, a.seq DESC) = 1"
            + (" ORDER BY b.bucket" if slices > 1 else ""),
            append=i > 0,
        )
    columns = ", ".join(f'"{name}"' for name in aggregates_schema().names)
    written = []
    for b in sorted(set(which.values())):
        out = folder / f"bucket-{b}.parquet"
        eng.write(f"SELECT {columns} FROM kept WHERE bucket = {b}", WINDOW_KEY, out)
        res.rows_out += pq.ParquetFile(out).metadata.num_rows
        written.append((new_keys[b], out))
    res.rows_in += rows_in
    # every object read: now write, then delete (a reader never misses a row)
    for new_key, out in written:
        store.put(new_key, out.read_bytes())
    for k in keys:
        if k not in {n for n, _ in written}:
            store.delete(k)
