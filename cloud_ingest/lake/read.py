"""Parquet objects back into rows, batches and alerts; the rows InfluxDB holds.

Every error reading an object becomes :class:`LakeObjectError` here (:func:`reading`)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from typing import Any

import numpy as np

from cloud_ingest.lake.layout import AGGREGATES, WINDOW_KEY, list_objects
from cloud_ingest.lake.schema import (
    arrow,
    float_columns,
    sketch_bins_array,
    sketch_bins_type,
    tags_type,
)
from cloud_ingest.sinks.base import ObjectStore
from shared.alerts import Alert
from shared.errors import LakeObjectError
from shared.wire import Batch, SensorRef, WindowSpec, make_batch


def pycolumns(table: Any) -> dict[str, list[Any]]:
    """``table.to_pydict()`` with timestamps as integer ns: pyarrow turns them into
    datetime objects, which cannot hold nanoseconds (it needs pandas for those)."""
    import pyarrow as pa

    return {
        name: (col.cast(pa.int64()) if pa.types.is_timestamp(col.type) else col).to_pylist()
        for name, col in zip(table.column_names, table.columns, strict=True)
    }


@contextlib.contextmanager
def reading(key: str) -> Iterator[None]:
    """Whatever reading the lake object ``key`` raises, as :class:`LakeObjectError`.

    The lake is input like any other: an object may be cut short by a full disk,
    damaged in storage, or put there by hand, and pyarrow and the conversions then
    raise a dozen kinds of exception. They are translated here, in one place."""
    try:
        yield
    except LakeObjectError:
        raise
    except Exception as exc:  # noqa: BLE001 (the boundary: see above)
        raise LakeObjectError(key, f"{type(exc).__name__}: {exc}"[:300]) from None


def read_table(data: bytes) -> Any:
    """A lake object's rows; an aggregates object from before the ``tags`` column
    gets an empty one, so that old and new objects concatenate (compaction)."""
    pa, pq = arrow()
    table = pq.read_table(io.BytesIO(data))
    names = table.column_names
    if "window_start" in names and "device_id" not in names:
        raise ValueError(
            "an aggregates object of lake version 1 (one per batch, no device_id column); "
            "this version reads lake version 2"
        )
    if "window_start" in names and "tags" not in names:
        table = table.append_column(
            pa.field("tags", tags_type()), pa.nulls(table.num_rows, tags_type())
        )
    if "window_start" in names and "generation" not in names:
        table = table.append_column(
            pa.field("generation", pa.int64()), pa.array(np.zeros(table.num_rows, np.int64))
        )
    if "window_start" in names and "sketch_bins" not in names:  # from the sketches' bytes
        column = sketch_bins_array(table.column("sketch").to_pylist())
        table = table.append_column(pa.field("sketch_bins", sketch_bins_type()), column)
    return table


def table_to_batches(table: Any) -> Iterator[Batch]:
    """Rebuild the batches (one per device, generation and seq, in the order of their
    first rows) whose rows an aggregates table holds."""
    cols = pycolumns(table)
    n = table.num_rows
    gens = cols.get("generation") or [0] * n
    by_seq: dict[tuple[str, int, int], list[int]] = {}
    for i, key in enumerate(zip(cols["device_id"], gens, cols["seq"], strict=True)):
        by_seq.setdefault(key, []).append(i)
    for (device_id, generation, seq), rows in by_seq.items():
        first = rows[0]
        window = WindowSpec(
            cols["window_kind"][first], cols["window_width_ns"][first], cols["window_hop_ns"][first]
        )
        sensors: dict[SensorRef, int] = {}
        sidx = []
        for i in rows:
            ref = SensorRef(
                cols["node"][i], cols["sensor"][i], cols["unit"][i], tuple(cols["tags"][i] or ())
            )
            sidx.append(sensors.setdefault(ref, len(sensors)))
        starts = table.column("window_start").cast("int64").to_numpy()
        sketches = [cols["sketch"][i] for i in rows]
        columns: dict[str, Any] = {
            "sensor": sidx,
            "start_ns": starts[rows] if n else [],
            "count": [cols["count"][i] for i in rows],
            "invalid": [cols["invalid"][i] for i in rows],
            "revision": [cols["revision"][i] for i in rows],
            **{
                name: [np.nan if cols[name][i] is None else cols[name][i] for i in rows]
                for name in float_columns()
            },
        }
        yield make_batch(
            device_id=device_id,
            seq=seq,
            created_ns=cols["batch_created_ns"][first],
            window=window,
            sensors=tuple(sensors),
            columns=columns,
            sketch=tuple(sketches) if all(s is not None for s in sketches) else (),
            generation=generation or 0,
        )


def table_to_alerts(table: Any) -> Iterator[Alert]:
    cols = pycolumns(table)
    ts = cols["ts"]
    for i in range(table.num_rows):
        yield Alert(
            cols["seq"][i],
            cols["rule"][i],
            cols["kind"][i],
            cols["node"][i],
            cols["sensor"][i],
            cols["state"][i],
            ts[i],
            cols["value"][i],
            cols["message"][i],
            capture=(cols["capture"][i] or "") if "capture" in cols else "",
        )


def current_rows(table: Any) -> Any:
    """The rows of an aggregates table that InfluxDB holds: per window its highest
    (revision, seq), once (a batch written twice is in two objects). Ordered by
    window key. Arrow all the way: no Python object per row."""
    pa, _ = arrow()
    import pyarrow.compute as pc

    keys = list(WINDOW_KEY)
    order = table.sort_by([*[(k, "ascending") for k in keys], ("revision", "descending"),
                           ("seq", "descending")])  # fmt: skip
    n = order.num_rows
    first = np.ones(n, dtype=bool)
    if n > 1:
        changed = np.zeros(n - 1, dtype=bool)
        for k in keys:
            col = order.column(k)
            changed |= pc.not_equal(col.slice(1), col.slice(0, n - 1)).to_numpy()
        first[1:] = changed
    return order.filter(pa.array(first))


def archived_seqs(store: ObjectStore) -> dict[str, set[int]]:
    """device_id → the seqs of its batches that the lake's aggregates hold."""
    _, pq = arrow()
    seqs: dict[str, set[int]] = {}
    for _, key in list_objects(store, AGGREGATES):
        with reading(key):
            cols = pq.read_table(io.BytesIO(store.get(key)), columns=["device_id", "seq"])
            for dev, seq in zip(*pycolumns(cols).values(), strict=True):
                seqs.setdefault(dev, set()).add(seq)
    return seqs
