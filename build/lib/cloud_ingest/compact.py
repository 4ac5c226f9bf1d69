"""Lake compaction: a day's per-batch objects of a device become one object holding
only the current version of each window.

The ingestor writes one immutable object per batch, so a revised window exists
twice until compaction (the latest-revision query hides that). ``cloud-ingest
compact`` rewrites a partition ``<table>/dt=<day>/device_id=<id>/`` as one object
``seq=<first>-<last>.parquet``, with, for aggregates, only the highest revision
of each window (what InfluxDB holds) and, for alerts, each event once; then it
deletes the objects it read. It writes before it deletes, so a reader sees the
rows at least once at every moment, and a compaction that dies halfway is
finished by the next run. Objects that arrive meanwhile (a late resend) are not
touched, and fold into the next compaction. Run it for closed days. A partition
with an object that cannot be read is left as it is and named in ``damaged``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cloud_ingest.lake import (
    AGGREGATES,
    ALERTS,
    list_objects,
    pycolumns,
    read_table,
    reading,
    to_parquet,
)
from cloud_ingest.sinks.base import ObjectStore
from shared.errors import LakeObjectError

log = logging.getLogger("cloud_ingest.compact")

#: Columns that identify a window (with the partition's device_id).
WINDOW_KEY = ("node", "sensor", "window_kind", "window_width_ns", "window_hop_ns", "window_start")


@dataclass
class CompactResult:
    partitions: int = 0
    objects_in: int = 0
    rows_in: int = 0
    rows_out: int = 0
    #: keys of objects that could not be read; their partitions are left as they are
    damaged: list[str] = field(default_factory=list)


def compacted_key(table: str, dt: str, device: str, first: int, last: int) -> str:
    return f"{table}/dt={dt}/device_id={device}/seq={first:020d}-{last:020d}.parquet"


def _current_rows(table: str, data: Any) -> Any:
    """The rows to keep: per window its highest (revision, seq); per alert seq one."""
    import pyarrow as pa

    if table == AGGREGATES:
        keys = list(WINDOW_KEY)
        order = data.sort_by([*[(k, "ascending") for k in keys], ("revision", "descending"),
                              ("seq", "descending")])  # fmt: skip
        named = pycolumns(order.select(keys))
        cols = [named[k] for k in keys]
        keep, last = [], None
        for i, key in enumerate(zip(*cols, strict=True)):
            if key != last:
                keep.append(i)
                last = key
        return order.take(pa.array(keep, pa.int64()))
    order = data.sort_by([("seq", "ascending")])
    seqs = order.column("seq").to_numpy()
    first = np.ones(len(seqs), dtype=bool)
    first[1:] = seqs[1:] != seqs[:-1]
    return order.filter(pa.array(first))


def partitions(
    store: ObjectStore, since_dt: str, until_dt: str, device: str | None = None
) -> Iterator[tuple[str, str, str, list[str]]]:
    """(table, day, device, keys) of every partition in the day range."""
    for table in (AGGREGATES, ALERTS):
        groups: dict[tuple[str, str], list[str]] = {}
        for k, key in list_objects(
            store, table, device=device, since_dt=since_dt, until_dt=until_dt
        ):
            groups.setdefault((k.dt, k.device_id), []).append(key)
        for (dt, dev), keys in sorted(groups.items()):
            yield table, dt, dev, sorted(keys)


def compact(
    store: ObjectStore, since_dt: str, until_dt: str, device: str | None = None
) -> CompactResult:
    import pyarrow as pa

    res = CompactResult()
    for table, dt, dev, keys in partitions(store, since_dt, until_dt, device):
        try:
            tables = []
            for k in keys:
                blob = store.get(k)
                with reading(k):
                    tables.append(read_table(blob))
            with reading(keys[0]):  # objects with other schemas do not concatenate
                data = pa.concat_tables(tables)
                kept = _current_rows(table, data)
        except LakeObjectError as exc:
            log.warning("compact: %s; partition %s %s left as it is", exc, dt, dev)
            res.damaged.append(exc.key)
            continue
        seqs = data.column("seq").to_numpy()
        new_key = compacted_key(table, dt, dev, int(seqs.min()), int(seqs.max()))
        res.partitions += 1
        res.objects_in += len(keys)
        res.rows_in += data.num_rows
        res.rows_out += kept.num_rows
        if keys == [new_key]:
            continue  # already one compacted object
        store.put(new_key, to_parquet(kept.replace_schema_metadata(tables[0].schema.metadata)))
        for k in keys:
            if k != new_key:
                store.delete(k)
    return res
