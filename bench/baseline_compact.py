"""The Python compaction that cloud_ingest/jobs/compact.py had before the SQL engines
(copied from it, unchanged but for this line): the baseline of bench/lake_jobs.py.

Lake compaction: a day's objects become one, holding only the current version of
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
cannot be read is left as it is and named in ``damaged``. A day's objects are
read into memory together: about 200 bytes per window (docs/cloud-ingest.md).
"""

from __future__ import annotations

import logging
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from cloud_ingest.lake import (
    AGGREGATES,
    ALERTS,
    COMPACTED_NAME,
    current_rows,
    list_objects,
    read_table,
    reading,
    to_parquet,
)
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


#: Parquet bytes of one bucket of a compacted day: about 500,000 windows. Compacting
#: a bucket takes about 8 times its Parquet size in memory (measured: 200 MB for
#: 25 MB), so about 0.5 GB.
BUCKET_BYTES = 64 * 2**20


def compacted_key(table: str, dt: str, device: str, first: int, last: int) -> str:
    return f"{table}/dt={dt}/device_id={device}/seq={first:020d}-{last:020d}.parquet"


def compacted_day_key(dt: str, bucket: int, buckets: int) -> str:
    name = COMPACTED_NAME if buckets == 1 else f"{COMPACTED_NAME}-{bucket:04d}-of-{buckets:04d}"
    return f"{AGGREGATES}/dt={dt}/{name}.parquet"


def _current_rows(table: str, data: Any) -> Any:
    """The rows to keep: per window its highest (revision, seq); per alert seq one."""
    import pyarrow as pa

    if table == AGGREGATES:
        return current_rows(data)
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
    store: ObjectStore, since_dt: str, until_dt: str, bucket_bytes: int = BUCKET_BYTES
) -> CompactResult:
    res = CompactResult()
    for table, dt, dev, keys in partitions(store, since_dt, until_dt):
        try:
            if table == AGGREGATES:
                _compact_day(store, dt, keys, res, bucket_bytes)
            else:
                _compact_alerts(store, dt, dev, keys, res)
        except LakeObjectError as exc:
            log.warning("compact: %s; partition %s %s left as it is", exc, dt, dev)
            res.damaged.append(exc.key)
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
        kept = _current_rows(ALERTS, data)
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
    store: ObjectStore, dt: str, keys: list[str], res: CompactResult, bucket_bytes: int
) -> None:
    """One day of aggregates: copy its objects to local disk, split them into buckets
    by device, compact each bucket; only then put the new objects and delete the old."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory(prefix="cloud-ingest-compact-") as tmp:
        folder = Path(tmp)
        local: list[tuple[str, Path]] = []
        total = 0
        for i, k in enumerate(keys):
            blob = store.get(k)
            total += len(blob)
            path = folder / f"in-{i}.parquet"
            path.write_bytes(blob)
            local.append((k, path))
            del blob
        buckets = 1 + total // bucket_bytes
        new_keys = [compacted_day_key(dt, b, buckets) for b in range(buckets)]
        if keys == new_keys and buckets == 1:
            res.partitions += 1
            res.objects_in += 1
            n = pq.ParquetFile(local[0][1]).metadata.num_rows
            res.rows_in += n
            res.rows_out += n
            return  # already compacted
        schema = None
        rows_in = 0
        writers: dict[int, Any] = {}
        try:
            for k, path in local:
                with reading(k):
                    table = read_table(path.read_bytes())
                    if schema is None:
                        schema = table.schema
                    table = table.select(schema.names).cast(schema)
                rows_in += table.num_rows
                which = _buckets_of(table, buckets)
                for b in np.unique(which).tolist():
                    if b not in writers:
                        writers[b] = pq.ParquetWriter(folder / f"bucket-{b}.parquet", schema)
                    writers[b].write_table(table.filter(pa.array(which == b)))
        finally:
            for w in writers.values():
                w.close()
        assert schema is not None
        # every object read: now write, then delete (a reader never misses a row)
        for b in sorted(writers):
            kept = current_rows(pq.read_table(folder / f"bucket-{b}.parquet"))
            res.rows_out += kept.num_rows
            store.put(new_keys[b], to_parquet(kept.replace_schema_metadata(schema.metadata)))
        res.partitions += 1
        res.objects_in += len(keys)
        res.rows_in += rows_in
        written = {new_keys[b] for b in writers}
        for k in keys:
            if k not in written:
                store.delete(k)


def _buckets_of(table: Any, buckets: int) -> npt.NDArray[np.int64]:
    """The bucket of each row: a stable hash of its device (the same in every run)."""
    import pyarrow.compute as pc

    if buckets == 1:
        return np.zeros(table.num_rows, dtype=np.int64)
    enc = pc.dictionary_encode(table.column("device_id")).combine_chunks()
    per_device = np.array(
        [zlib.crc32(d.encode()) % buckets for d in enc.dictionary.to_pylist()], dtype=np.int64
    )
    out: npt.NDArray[np.int64] = per_device[enc.indices.to_numpy()]
    return out
