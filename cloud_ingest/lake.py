"""The data lake: Parquet tables with Hive-style day partitions.

Layout under the archive root (``s3://bucket/prefix`` or a directory)::

    aggregates/dt=YYYY-MM-DD/part-<ns, 20 digits>-<writer>-<n>.parquet   one per group and day
    aggregates/dt=YYYY-MM-DD/compacted.parquet                            cloud-ingest compact
    alerts/dt=YYYY-MM-DD/device_id=<id>/seq=<seq, 20 digits>.parquet     one per alert

``dt`` is the UTC day of the window start (of the alert's event time), so a group
whose windows cross midnight becomes two objects. The ingestor writes the rows of
all the batches of a group (up to ``mqtt.receive_maximum`` messages, from many
devices) as one ``aggregates`` object per day, with the device in a
``device_id`` column: one object per batch cost more than every other step of a
batch together (pyarrow's fixed cost per file, and one PUT request each: at
S3's prices, 8.6 million PUTs a day for a fleet of 1,000 devices). Objects appear
whole or not at all (S3 PutObject; the directory backend writes a temporary file
and renames it).

A batch is in the lake once, unless it was delivered again after it was written
(a lost ack, a reconnect): then it is in two objects, row for row the same.
:data:`LATEST_AGGREGATES_SQL`, the query that returns what InfluxDB holds (the
highest revision of each window, see docs/wire-format.md), shows it once, and so
do ``cloud-ingest compact`` (which rewrites a day as one object holding only that),
``replay`` and ``rollup``. The raw batch is not kept beside the Parquet object:
every field of it, sketches included, is in the rows, and :func:`table_to_batches`
rebuilds it for a replay. Alerts are rare: they keep one object per alert, whose
key is a function of the alert alone, so that a resend overwrites it.
"""

from __future__ import annotations

import contextlib
import functools
import io
import secrets
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from cloud_ingest.sinks.base import ObjectStore
from shared.alerts import Alert
from shared.errors import LakeObjectError, PermanentSinkError
from shared.wire import COLUMNS, Batch, SensorRef, WindowSpec, make_batch

LAKE_VERSION: Final = "2"
AGGREGATES: Final = "aggregates"
ALERTS: Final = "alerts"
DAY_NS: Final = 86_400 * 10**9

#: DuckDB: the aggregates as InfluxDB holds them (latest revision of each window).
#: ``{root}`` is the archive directory (a local copy, or ``s3://…`` with httpfs).
LATEST_AGGREGATES_SQL: Final = """
SELECT * FROM read_parquet('{root}/aggregates/*/*.parquet', hive_partitioning = true,
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
    """An alert's object."""
    return f"{table}/dt={dt}/device_id={device_id}/seq={seq:020d}.parquet"


def part_key(dt: str, name: str) -> str:
    """A group's ``aggregates`` object of day ``dt``; ``name`` is unique to the group
    (:class:`PartNames`), the same for every day's object of it and for its retries."""
    return f"{AGGREGATES}/dt={dt}/part-{name}.parquet"


#: a compacted day's object: ``compacted`` (or ``compacted-<b>-of-<n>`` when split)
COMPACTED_NAME: Final = "compacted"


class PartNames:
    """Names for a writer's group objects: the group's time, this writer's random id
    (two ingestors never collide) and a counter (nor do two groups of one)."""

    def __init__(self) -> None:
        self.writer = secrets.token_hex(4)
        self.n = 0

    def next(self) -> str:
        self.n += 1
        return f"{time.time_ns():020d}-{self.writer}-{self.n:06d}"


@functools.cache
def _float_columns() -> list[str]:
    return [name for name, (dt, _) in COLUMNS.items() if dt == "float64"]


@functools.cache
def _schema() -> Any:
    pa, _ = _pa()
    fields = [
        ("device_id", pa.string()),
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
        # the device's buffer generation (docs/wire-format.md §2.3; 0 = none): a batch
        # is (device_id, generation, seq). Older objects read as 0 (read_table).
        ("generation", pa.int64()),
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


_DICT_COLUMNS: Final = (
    "device_id", "window_kind", "node", "sensor", "unit", "rule", "kind", "state"
)  # fmt: skip
_STATS_COLUMNS: Final = ("device_id", "seq", "window_start", "ts")


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


def batch_objects(batch: Batch, name: str = "0") -> list[tuple[str, bytes]]:
    """The objects of a group of one batch (one per UTC day its windows start on),
    named ``name``."""
    return [(part_key(g.dt, name), to_parquet(g.rows)) for g in group_rows([batch])]


@dataclass(frozen=True)
class GroupRows:
    """A group's rows of one day (an Arrow record batch, to be encoded with
    :func:`to_parquet`) and, for each row, the index of its batch in the group."""

    dt: str
    rows: Any
    which: npt.NDArray[np.int64]

    def without(self, batches: Collection[int]) -> Any | None:
        """The rows less those of ``batches``; None if no row is left."""
        pa, _ = _pa()
        keep = ~np.isin(self.which, np.fromiter(batches, dtype=np.int64))
        if keep.all():
            return self.rows
        return self.rows.filter(pa.array(keep)) if keep.any() else None


def group_rows(batches: Sequence[Batch]) -> list[GroupRows]:
    """The rows of all the batches, one :class:`GroupRows` per UTC day their windows
    start on, in day order.

    Converted to Arrow at once: per column, one conversion for the group instead
    of one per batch (which cost more than the Parquet encoding)."""
    pa, _ = _pa()
    if not batches:
        return []
    rows = np.array([b.rows for b in batches], dtype=np.int64)
    which = np.repeat(np.arange(len(batches)), rows)  # the batch of each row

    def per_batch(values: list[Any], dtype: Any) -> Any:
        return pa.array(np.asarray(values, dtype=dtype)[which])

    def cat(name: str) -> Any:
        return pa.array(np.concatenate([getattr(b, name) for b in batches]))

    devices = sorted({b.device_id for b in batches})
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
            pa.array(devices, pa.string()).take(
                per_batch([devices.index(b.device_id) for b in batches], np.int32)
            ),
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
            per_batch([b.generation for b in batches], np.int64),
        ],
        schema=_schema(),
    )
    days = starts // DAY_NS
    if len(days) and days.min() == days.max():  # one day: the rows as they are
        return [GroupRows(day(int(days[0]) * DAY_NS), table, which)]
    out = []
    for d in np.unique(days).tolist():
        at = np.flatnonzero(days == d)
        out.append(GroupRows(day(d * DAY_NS), table.take(pa.array(at)), which[at]))
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
    #: an alert's device; "" for an aggregates object (its rows name their devices)
    device_id: str = ""
    #: an alert's seq (the first of a compacted alerts object); 0 for aggregates
    seq: int = 0
    #: == seq for one alert's object; the last seq of a compacted one (``seq=<a>-<b>``)
    seq_last: int = 0
    #: an aggregates object's name: ``part-…`` (a group's) or ``compacted``
    name: str = ""

    @property
    def compacted(self) -> bool:
        return self.seq_last != self.seq or _is_compacted(self.name)


def _is_compacted(name: str) -> bool:
    if name == COMPACTED_NAME:
        return True
    b, of, n = name[len(COMPACTED_NAME) + 1 :].partition("-of-")
    return name.startswith(COMPACTED_NAME + "-") and b.isdigit() and bool(of) and n.isdigit()


def parse_key(key: str) -> LakeKey | None:
    """``aggregates/dt=…/part-<name>.parquet`` (a group's) or ``…/compacted.parquet``,
    and ``alerts/dt=…/device_id=…/seq=<n>.parquet`` (an alert) or ``seq=<a>-<b>.parquet``
    (compacted, cloud_ingest/compact.py) → its parts; None for other keys."""
    parts = key.split("/")
    if len(parts) < 3 or not parts[1].startswith("dt=") or not parts[-1].endswith(".parquet"):
        return None
    dt, name = parts[1][3:], parts[-1][: -len(".parquet")]
    if parts[0] == AGGREGATES and len(parts) == 3:
        if _is_compacted(name) or (name.startswith("part-") and len(name) > len("part-")):
            return LakeKey(AGGREGATES, dt, name=name)
        return None
    if parts[0] != ALERTS or len(parts) != 4 or not parts[2].startswith("device_id="):
        return None
    if not name.startswith("seq="):
        return None
    first, _, last = name[4:].partition("-")
    if not first.isdigit() or not (last.isdigit() or not last):
        return None
    seq = int(first)
    return LakeKey(ALERTS, dt, parts[2][len("device_id=") :], seq, int(last) if last else seq)


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
    if "window_start" in names and "device_id" not in names:
        raise ValueError(
            "an aggregates object of lake version 1 (one per batch, no device_id column); "
            "this version reads lake version 2"
        )
    if "window_start" in names and "tags" not in names:
        table = table.append_column(
            pa.field("tags", _tags_type()), pa.nulls(table.num_rows, _tags_type())
        )
    if "window_start" in names and "generation" not in names:
        table = table.append_column(
            pa.field("generation", pa.int64()), pa.array(np.zeros(table.num_rows, np.int64))
        )
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
        )


def list_objects(
    store: ObjectStore,
    table: str,
    *,
    since_dt: str | None = None,
    until_dt: str | None = None,
) -> list[tuple[LakeKey, str]]:
    """The lake's objects of ``table``, of days in ``[since_dt, until_dt]``
    (``YYYY-MM-DD``; the partition names order as dates)."""
    out = []
    for key in store.list(f"{table}/"):
        k = parse_key(key)
        if k is None or k.table != table:
            continue
        if (since_dt is not None and k.dt < since_dt) or (until_dt is not None and k.dt > until_dt):
            continue
        out.append((k, key))
    return out


#: Columns that identify a window.
WINDOW_KEY: Final = (
    "device_id", "node", "sensor", "window_kind", "window_width_ns", "window_hop_ns",
    "window_start",
)  # fmt: skip


def current_rows(table: Any) -> Any:
    """The rows of an aggregates table that InfluxDB holds: per window its highest
    (revision, seq), once (a batch written twice is in two objects). Ordered by
    window key. Arrow all the way: no Python object per row."""
    pa, _ = _pa()
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
    _, pq = _pa()
    seqs: dict[str, set[int]] = {}
    for _, key in list_objects(store, AGGREGATES):
        with reading(key):
            cols = pq.read_table(io.BytesIO(store.get(key)), columns=["device_id", "seq"])
            for dev, seq in zip(*pycolumns(cols).values(), strict=True):
                seqs.setdefault(dev, set()).add(seq)
    return seqs
