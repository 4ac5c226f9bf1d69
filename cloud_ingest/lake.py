"""The data lake: Parquet tables with Hive-style partitions, one object per
(table, day, device, seq).

Layout under the archive root (``s3://bucket/prefix`` or a directory)::

    aggregates/dt=YYYY-MM-DD/device_id=<id>/seq=<seq, 20 digits>.parquet
    alerts/dt=YYYY-MM-DD/device_id=<id>/seq=<seq, 20 digits>.parquet

``dt`` is the UTC day of the window start (of the alert's event time), so a batch
whose windows cross midnight becomes two objects. Every key is a function of the
batch alone: a resend or a replay writes the same keys with the same content and
overwrites, never duplicates. Objects appear whole or not at all (S3 PutObject;
the directory backend writes a temporary file and renames it).

``dt`` and ``device_id`` live in the path only, as Hive, Athena, Spark and DuckDB
expect (``read_parquet(..., hive_partitioning = true)``). A revised window (a
late reading changed it, see docs/wire-format.md) arrives in a later batch with
a higher ``revision``; the lake keeps both versions, and :data:`LATEST_AGGREGATES_SQL`
is the query that returns what InfluxDB holds: the highest revision of each
window. The raw batch is not kept beside the Parquet object: every field of it,
sketches included, is in the row, and :func:`table_to_batches` rebuilds it for a
replay.
"""

from __future__ import annotations

import contextlib
import functools
import io
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from cloud_ingest.sinks.base import ObjectStore
from shared.alerts import Alert
from shared.errors import LakeObjectError, PermanentSinkError
from shared.wire import COLUMNS, Batch, SensorRef, WindowSpec, make_batch

LAKE_VERSION: Final = "1"
AGGREGATES: Final = "aggregates"
ALERTS: Final = "alerts"
DAY_NS: Final = 86_400 * 10**9

#: DuckDB: the aggregates as InfluxDB holds them (latest revision of each window).
#: ``{root}`` is the archive directory (a local copy, or ``s3://…`` with httpfs).
LATEST_AGGREGATES_SQL: Final = """
SELECT * FROM read_parquet('{root}/aggregates/**/*.parquet', hive_partitioning = true,
                           union_by_name = true)
QUALIFY row_number() OVER (
    PARTITION BY device_id, node, sensor, window_kind, window_width_ns, window_hop_ns,
                 window_start
    ORDER BY revision DESC, seq DESC) = 1
"""


def _pa() -> Any:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - a platform without pyarrow wheels
        raise PermanentSinkError(
            "the Parquet archive needs pyarrow, which is not installed here"
        ) from None
    return pa, pq


def day(ts_ns: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts_ns // 10**9))


def object_key(table: str, dt: str, device_id: str, seq: int) -> str:
    return f"{table}/dt={dt}/device_id={device_id}/seq={seq:020d}.parquet"


@functools.cache
def _float_columns() -> list[str]:
    return [name for name, (dt, _) in COLUMNS.items() if dt == "float64"]


@functools.cache
def _schema() -> Any:
    pa, _ = _pa()
    fields = [
        ("seq", pa.int64()),
        ("batch_created_ns", pa.int64()),
        ("window_kind", pa.string()),
        ("window_width_ns", pa.int64()),
        ("window_hop_ns", pa.int64()),
        ("node", pa.string()),
        ("sensor", pa.string()),
        ("unit", pa.string()),
        ("window_start", pa.timestamp("ns", tz="UTC")),
        ("count", pa.uint32()),
        ("invalid", pa.uint32()),
        *[(name, pa.float64()) for name in _float_columns()],
        ("revision", pa.uint32()),
        ("sketch", pa.binary()),
        # the sensor's static tags from the agent's config (added within lake v1:
        # read_table gives older objects an empty column)
        ("tags", _tags_type()),
    ]
    return pa.schema(fields, metadata={"telemetry.lake_version": LAKE_VERSION})


def _tags_type() -> Any:
    pa, _ = _pa()
    return pa.map_(pa.string(), pa.string())


@functools.cache
def _alert_schema() -> Any:
    pa, _ = _pa()
    return pa.schema(
        [
            ("seq", pa.int64()),
            ("ts", pa.timestamp("ns", tz="UTC")),
            ("rule", pa.string()),
            ("kind", pa.string()),
            ("node", pa.string()),
            ("sensor", pa.string()),
            ("state", pa.string()),
            ("value", pa.float64()),
            ("message", pa.string()),
        ],
        metadata={"telemetry.lake_version": LAKE_VERSION},
    )


_DICT_COLUMNS: Final = ("window_kind", "node", "sensor", "unit", "rule", "kind", "state")
_STATS_COLUMNS: Final = ("seq", "window_start", "ts")


def to_parquet(table: Any) -> bytes:
    """A table (or record batch) as the bytes of a Parquet file."""
    pa, pq = _pa()
    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    # Arrow's own buffer, not io.BytesIO: the C++ writer then never calls back into
    # Python, so it runs without the GIL (two threads encode at once) and is 20 %
    # faster alone.
    sink = pa.BufferOutputStream()
    # Objects are small (one batch): snappy costs a third of zstd at nearly the same
    # size (0.49 against 1.47 ms per 10-row object), and every reader has it.
    # Dictionaries for the repeated strings, statistics for the columns a query
    # prunes on: both cut the cost further (0.40 ms) and the size by a third.
    names = set(table.column_names)
    pq.write_table(
        table,
        sink,
        compression="snappy",
        use_dictionary=[c for c in _DICT_COLUMNS if c in names],
        write_statistics=[c for c in _STATS_COLUMNS if c in names],
    )
    data: bytes = sink.getvalue().to_pybytes()
    return data


def batch_objects(batch: Batch) -> list[tuple[str, bytes]]:
    """The batch as Parquet objects, one per UTC day its windows start on."""
    return [(key, to_parquet(rows)) for key, rows in group_tables([batch])[0]]


def group_tables(batches: Sequence[Batch]) -> list[list[tuple[str, Any]]]:
    """For each batch, its objects' keys and rows (Arrow record batches, to be
    encoded with :func:`to_parquet`), one object per UTC day its windows start on.

    The rows of all the batches are converted to Arrow at once: per column, one
    conversion for the group instead of one per batch (which cost more than the
    Parquet encoding)."""
    pa, _ = _pa()
    if not batches:
        return []
    rows = np.array([b.rows for b in batches], dtype=np.int64)
    first = np.concatenate([[0], np.cumsum(rows)])
    which = np.repeat(np.arange(len(batches)), rows)  # the batch of each row

    def per_batch(values: list[Any], dtype: Any) -> Any:
        return pa.array(np.asarray(values, dtype=dtype)[which])

    def cat(name: str) -> Any:
        return pa.array(np.concatenate([getattr(b, name) for b in batches]))

    refs = [r for b in batches for r in b.sensors]
    ref_first = np.cumsum([0] + [len(b.sensors) for b in batches[:-1]])
    ref_idx = pa.array(
        np.concatenate(
            [b.sensor.astype(np.int64) + o for b, o in zip(batches, ref_first, strict=True)]
        )
    )
    kinds = sorted({b.window.kind for b in batches})
    starts = np.concatenate([b.start_ns for b in batches])
    table = pa.RecordBatch.from_arrays(
        [
            per_batch([b.seq for b in batches], np.int64),
            per_batch([b.created_ns for b in batches], np.int64),
            pa.array(kinds, pa.string()).take(
                per_batch([kinds.index(b.window.kind) for b in batches], np.int32)
            ),
            per_batch([b.window.width_ns for b in batches], np.int64),
            per_batch([b.window.hop_ns for b in batches], np.int64),
            pa.array([r.node for r in refs], pa.string()).take(ref_idx),
            pa.array([r.name for r in refs], pa.string()).take(ref_idx),
            pa.array([r.unit for r in refs], pa.string()).take(ref_idx),
            pa.array(starts).cast(pa.timestamp("ns", tz="UTC")),
            cat("count"),
            cat("invalid"),
            *[cat(name) for name in _float_columns()],
            cat("revision"),
            pa.array([s for b in batches for s in (b.sketch or (None,) * b.rows)], pa.binary()),
            pa.array([list(r.tags) if r.tags else None for r in refs], _tags_type()).take(ref_idx),
        ],
        schema=_schema(),
    )
    days = starts // DAY_NS
    out: list[list[tuple[str, Any]]] = []
    for i, b in enumerate(batches):
        lo, hi = int(first[i]), int(first[i + 1])
        own = days[lo:hi]
        objects = []
        for d in np.unique(own).tolist():
            key = object_key(AGGREGATES, day(d * DAY_NS), b.device_id, b.seq)
            if own[0] == own[-1]:  # one day: the batch's rows as they are
                objects.append((key, table.slice(lo, hi - lo)))
            else:
                objects.append((key, table.take(pa.array(lo + np.flatnonzero(own == d)))))
        out.append(objects)
    return out


def alert_object(device_id: str, alert: Alert) -> tuple[str, bytes]:
    pa, _ = _pa()
    table = pa.table(
        {
            "seq": [alert.seq],
            "ts": pa.array([alert.ts_ns], pa.int64()).cast(pa.timestamp("ns", tz="UTC")),
            "rule": [alert.rule],
            "kind": [alert.kind],
            "node": [alert.node],
            "sensor": [alert.sensor],
            "state": [alert.state],
            "value": [alert.value],
            "message": [alert.message],
        },
        schema=_alert_schema(),
    )
    return object_key(ALERTS, day(alert.ts_ns), device_id, alert.seq), to_parquet(table)


@dataclass(frozen=True)
class LakeKey:
    table: str
    dt: str
    device_id: str
    seq: int
    #: == seq for a batch's object; the last seq of a compacted one (``seq=<a>-<b>``)
    seq_last: int

    @property
    def compacted(self) -> bool:
        return self.seq_last != self.seq


def parse_key(key: str) -> LakeKey | None:
    """``aggregates/dt=…/device_id=…/seq=<n>.parquet`` (a batch) or ``seq=<a>-<b>.parquet``
    (compacted, cloud_ingest/compact.py) → its parts; None for other keys."""
    parts = key.split("/")
    if len(parts) != 4 or parts[0] not in (AGGREGATES, ALERTS):
        return None
    dt, dev, name = parts[1:]
    if not (
        dt.startswith("dt=")
        and dev.startswith("device_id=")
        and name.startswith("seq=")
        and name.endswith(".parquet")
    ):
        return None
    first, _, last = name[4 : -len(".parquet")].partition("-")
    if not first.isdigit() or not (last.isdigit() or not last):
        return None
    seq = int(first)
    return LakeKey(parts[0], dt[3:], dev[len("device_id=") :], seq, int(last) if last else seq)


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
    pa, pq = _pa()
    table = pq.read_table(io.BytesIO(data))
    names = table.column_names
    if "window_start" in names and "tags" not in names:
        table = table.append_column(
            pa.field("tags", _tags_type()), pa.nulls(table.num_rows, _tags_type())
        )
    return table


def table_to_batches(device_id: str, table: Any) -> Iterator[Batch]:
    """Rebuild the batches (one per seq) whose rows an aggregates object holds."""
    cols = pycolumns(table)
    n = table.num_rows
    by_seq: dict[int, list[int]] = {}
    for i, seq in enumerate(cols["seq"]):
        by_seq.setdefault(seq, []).append(i)
    for seq, rows in by_seq.items():
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
                for name in _float_columns()
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
        )


def list_objects(
    store: ObjectStore,
    table: str,
    *,
    device: str | None = None,
    since_dt: str | None = None,
    until_dt: str | None = None,
) -> list[tuple[LakeKey, str]]:
    """The lake's objects of ``table``, optionally of one device and of days in
    ``[since_dt, until_dt]`` (``YYYY-MM-DD``; the partition names order as dates)."""
    out = []
    for key in store.list(f"{table}/"):
        k = parse_key(key)
        if k is None or k.table != table or (device is not None and k.device_id != device):
            continue
        if (since_dt is not None and k.dt < since_dt) or (until_dt is not None and k.dt > until_dt):
            continue
        out.append((k, key))
    return out


def archived_seqs(store: ObjectStore, table: str = AGGREGATES) -> dict[str, set[int]]:
    """device_id → the seqs that have an object of their own in ``table`` (compacted
    objects are not counted: their seqs are in their rows)."""
    seqs: dict[str, set[int]] = {}
    for k, _ in list_objects(store, table):
        if not k.compacted:
            seqs.setdefault(k.device_id, set()).add(k.seq)
    return seqs
