"""The SQL engines the lake's jobs run on: DuckDB in this process, or Spark.

``cloud-ingest rollup`` and ``compact`` are SQL over a view ``aggregates`` of the
lake's objects, the same text on both engines but for one word (DuckDB's
``UNNEST`` is Spark's ``explode``, :attr:`Engine.unnest`). The view adds
``start_ns``, the window start as integer nanoseconds: DuckDB reads
``window_start`` as a timestamp, Spark (which has no nanosecond timestamp) as a
``bigint`` (``spark.sql.legacy.parquet.nanosAsLong``).

Both engines read Parquet files on this machine's disk (:func:`stage`): a
directory lake's objects where they are, an S3 lake's copied to a work folder
first. Objects from before a column existed are rewritten there with it
(:func:`cloud_ingest.lake.read_table` computes ``sketch_bins``, ``tags``,
``generation``), so that every engine sees one schema.

Memory: DuckDB works in an on-disk database in the work folder and spills its
sorts and hash tables there past ``memory_limit`` (its default: 80 % of RAM).
A query with several blocking operators (the roll-up has six) still runs out of
it on a large day (seen: 100 million windows in 1 GB), so the jobs cut a day
into slices of devices of about :data:`SLICE_ROWS` rows for DuckDB
(:func:`device_slices`): a device's windows are all in one slice, so every
result is exact. Spark's limits are its own (``spark.driver.memory``,
``spark.executor.memory``) and it is given the day whole.

Errors: whatever an engine raises while reading the objects becomes
:class:`shared.errors.LakeObjectError` here; running out of memory becomes
:class:`EngineMemoryError`, which names the limit.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from cloud_ingest.lake import read_table, reading
from cloud_ingest.lake.schema import aggregates_schema, arrow
from cloud_ingest.sinks.archive import LocalArchive
from cloud_ingest.sinks.base import ObjectStore
from shared.errors import LakeObjectError

log = logging.getLogger(__name__)

ENGINES: Final = ("duckdb", "spark")
#: Rows of a day DuckDB takes in one query: a 10-million-row day ran within 1 GB.
SLICE_ROWS: Final = 4_000_000


class EngineMemoryError(Exception):
    """The engine ran out of the memory it was given."""


@dataclass(frozen=True)
class Staged:
    """A lake object as a local Parquet file of the current schema."""

    key: str
    path: Path
    size: int


def stage(store: ObjectStore, keys: Sequence[str], folder: Path) -> list[Staged]:
    """The objects ``keys`` as local files an engine can read: a directory lake's in
    place, others copied into ``folder``; an object of an older schema (a column
    added since) rewritten there with the current one. An object that is not a
    Parquet file of the lake's schema raises :class:`LakeObjectError`."""
    _, pq = arrow()
    want = aggregates_schema()
    out = []
    for key in keys:
        local = store.local_path(key) if isinstance(store, LocalArchive) else None
        # outside `reading`: the store's own errors (S3 down) are not a damaged object
        data = None if local is not None else store.get(key)
        with reading(key):
            if data is None:
                assert local is not None
                schema = pq.read_schema(local)
                size = local.stat().st_size
            else:
                schema = pq.read_schema(io.BytesIO(data))
                size = len(data)
            current = all(
                f.name in schema.names and schema.field(f.name).type == f.type for f in want
            )
            # named after the key: one folder takes a day's objects, staged one by
            # one or together (replay stages them one at a time)
            path = folder / key.replace("/", "__")
            if current and local is not None:
                path = local
            elif current:
                assert data is not None
                path.write_bytes(data)
            else:  # an older object: with the columns added since, in their types
                if data is None:
                    assert local is not None
                    data = local.read_bytes()
                table = read_table(data)
                table = table.select(want.names).cast(want)
                pq.write_table(table, path)
        out.append(Staged(key, path, size))
    return out


class Engine(Protocol):
    name: str
    #: the word for a list's elements as rows: ``UNNEST(list) AS x`` / ``explode``
    unnest: str
    #: rows of a day per query (:func:`device_slices`); None: the day whole
    slice_rows: int | None

    def view(self, files: Sequence[Path]) -> None:
        """Make ``aggregates`` the rows of these files, with ``start_ns``."""
        ...

    def rows(self, sql: str) -> Iterator[dict[str, Any]]:
        """The result of a query, row by row, without holding all of it."""
        ...

    def scalar(self, sql: str) -> Any: ...

    def run(self, sql: str) -> None:
        """A statement without a result (``CREATE VIEW …``)."""
        ...

    def table(self, name: str, sql: str, append: bool = False) -> None:
        """Keep a query's result as table ``name`` (spilled to disk where it must),
        or add it to the rows the table has."""
        ...

    def register(self, name: str, columns: dict[str, list[Any]]) -> None:
        """A small table of this process's values (strings and integers)."""
        ...

    def write(self, sql: str, order: Sequence[str], path: Path) -> None:
        """A query's rows, ordered by ``order``, as one Parquet file of the lake's schema."""
        ...

    def close(self) -> None: ...


def _quote(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _engine_errors(engine: str) -> tuple[type[BaseException], ...]:
    """What an engine raises for a query it cannot run over the files."""
    if engine == "duckdb":
        import duckdb

        return (duckdb.Error,)
    from py4j.protocol import Py4JError
    from pyspark.errors import PySparkException

    return (PySparkException, Py4JError)


@contextlib.contextmanager
def _translated(engine: str) -> Iterator[None]:
    """An engine's error reading the lake, as LakeObjectError (one boundary)."""
    try:
        yield
    except _engine_errors(engine) as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "OutOfMemory" in type(exc).__name__ or "Out of Memory" in text:
            raise EngineMemoryError(f"{engine} ran out of memory: {text}"[:300]) from None
        raise LakeObjectError(
            f"the lake (via {engine})", f"{type(exc).__name__}: {text}"[:300]
        ) from None


class DuckDBEngine:
    name = "duckdb"
    unnest = "UNNEST"
    slice_rows: int | None = SLICE_ROWS

    def __init__(self, workdir: Path, memory_limit: str | None = None) -> None:
        import duckdb

        self.con = duckdb.connect(str(workdir / "jobs.duckdb"))
        self.con.execute(f"SET temp_directory = {_quote(str(workdir / 'spill'))}")
        # results without an ORDER BY need not keep the files' order: less memory
        self.con.execute("SET preserve_insertion_order = false")
        if memory_limit:
            self.con.execute(f"SET memory_limit = {_quote(memory_limit)}")

    def view(self, files: Sequence[Path]) -> None:
        listed = "[" + ", ".join(_quote(str(p)) for p in files) + "]"
        self.con.execute(
            "CREATE OR REPLACE VIEW aggregates AS SELECT *, epoch_ns(window_start) AS start_ns "
            f"FROM read_parquet({listed}, union_by_name = true)"
        )

    def rows(self, sql: str) -> Iterator[dict[str, Any]]:
        for batch in self.batches(sql, 10_000):
            yield from batch.to_pylist()

    def batches(self, sql: str, rows: int) -> Iterator[Any]:
        """The result as Arrow record batches of up to ``rows`` rows, as DuckDB
        produces them."""
        with _translated(self.name):
            yield from self.con.sql(sql).to_arrow_reader(rows)

    def scalar(self, sql: str) -> Any:
        with _translated(self.name):
            rows = self.con.sql(sql).fetchall()
        return rows[0][0] if rows else None

    def run(self, sql: str) -> None:
        with _translated(self.name):
            self.con.execute(sql)

    def table(self, name: str, sql: str, append: bool = False) -> None:
        self.run(
            f"INSERT INTO {name} {sql}" if append else f"CREATE OR REPLACE TABLE {name} AS {sql}"
        )

    def register(self, name: str, columns: dict[str, list[Any]]) -> None:
        pa, _ = arrow()
        self.con.register(name, pa.table(columns))

    def write(self, sql: str, order: Sequence[str], path: Path) -> None:
        meta = aggregates_schema().metadata
        kv = ", ".join(f"{_quote(k.decode())}: {_quote(v.decode())}" for k, v in meta.items())
        with _translated(self.name):
            self.con.execute(
                f"COPY ({sql} ORDER BY {', '.join(order)}) TO {_quote(str(path))} "
                f"(FORMAT parquet, COMPRESSION zstd, KV_METADATA {{{kv}}})"
            )

    def close(self) -> None:
        self.con.close()


class SparkEngine:
    """Spark SQL through pyspark. ``master`` is any Spark master URL: ``local[2]``
    runs it in this machine's JVM (the tests), ``yarn`` or ``spark://…`` on a
    cluster, whose executors must then reach the files (docs/cloud-ingest.md)."""

    name = "spark"
    unnest = "explode"
    slice_rows: int | None = None

    def __init__(self, workdir: Path, master: str = "local[*]") -> None:
        from pyspark.sql import SparkSession

        self.workdir = workdir
        builder = (
            SparkSession.builder.master(master)
            .appName("cloud-ingest")
            .config("spark.ui.enabled", "false")
            .config("spark.ui.showConsoleProgress", "false")
            .config("spark.sql.session.timeZone", "UTC")
            # the lake's window starts are nanosecond timestamps: Spark has none
            .config("spark.sql.legacy.parquet.nanosAsLong", "true")
            # "count", "sum", "min" are column names here, as in DuckDB
            .config("spark.sql.ansi.doubleQuotedIdentifiers", "true")
            # objects from before a column was added (docs/lake-sql.md)
            .config("spark.sql.parquet.mergeSchema", "true")
            .config("spark.local.dir", str(workdir / "spark"))
        )
        if master.startswith("local"):
            # on this machine only: bound to and reached at loopback (a large result
            # comes back through the block manager, at the host Spark advertises)
            builder = (
                builder.config("spark.driver.bindAddress", "127.0.0.1")
                .config("spark.driver.host", "127.0.0.1")
                .config("spark.sql.shuffle.partitions", str(2 * (os.cpu_count() or 1)))
            )
        self.spark = builder.getOrCreate()
        self.spark.sparkContext.setLogLevel("ERROR")

    def view(self, files: Sequence[Path]) -> None:
        with _translated(self.name):
            frame = self.spark.read.option("mergeSchema", "true").parquet(*map(str, files))
            frame.createOrReplaceTempView("aggregates_files")
            self.spark.sql(
                "CREATE OR REPLACE TEMPORARY VIEW aggregates AS "
                "SELECT *, window_start AS start_ns FROM aggregates_files"
            )

    def rows(self, sql: str) -> Iterator[dict[str, Any]]:
        with _translated(self.name):
            for row in self.spark.sql(sql).toLocalIterator():
                yield row.asDict()

    def scalar(self, sql: str) -> Any:
        with _translated(self.name):
            row = self.spark.sql(sql).first()
        return row[0] if row else None

    def run(self, sql: str) -> None:
        with _translated(self.name):
            self.spark.sql(sql)

    def table(self, name: str, sql: str, append: bool = False) -> None:
        with _translated(self.name):
            frame = self.spark.sql(sql)
            if append:
                frame = self.spark.table(name).unionByName(frame)
            # checkpointed to the work folder: later queries do not compute it again
            self.spark.sparkContext.setCheckpointDir(str(self.workdir / "checkpoints"))
            frame.checkpoint().createOrReplaceTempView(name)

    def register(self, name: str, columns: dict[str, list[Any]]) -> None:
        types = {str: "string", int: "bigint"}
        schema = ", ".join(f"`{c}` {types[type(v[0]) if v else str]}" for c, v in columns.items())
        rows = list(zip(*columns.values(), strict=True))
        with _translated(self.name):
            self.spark.createDataFrame(rows, schema).createOrReplaceTempView(name)

    def write(self, sql: str, order: Sequence[str], path: Path) -> None:
        """Spark writes one part file, sorted; this process rewrites it in the lake's
        types (window_start back to a nanosecond timestamp), a record batch at a time."""
        _, pq = arrow()
        want = aggregates_schema()
        out = self.workdir / f"spark-{path.name}"
        with _translated(self.name):
            frame = self.spark.sql(sql).repartition(1).sortWithinPartitions(*order)
            frame.write.mode("overwrite").parquet(str(out))
            (part,) = sorted(out.glob("part-*.parquet"))
            with pq.ParquetWriter(path, want, compression="zstd") as writer:
                for batch in pq.ParquetFile(part).iter_batches(65_536, columns=want.names):
                    writer.write_batch(_lake_types(batch, want))

    def close(self) -> None:
        self.spark.stop()


def _lake_types(batch: Any, schema: Any) -> Any:
    """A batch Spark wrote, in the lake's types (bigint → timestamp[ns], long →
    uint32, …)."""
    pa, _ = arrow()
    cols = [batch.column(field.name).cast(field.type) for field in schema]
    return pa.RecordBatch.from_arrays(cols, schema=schema)


def slice_count(engine: Engine, staged: Sequence[Staged]) -> int:
    """How many slices the engine takes the day in (from the objects' row counts)."""
    _, pq = arrow()
    if engine.slice_rows is None:
        return 1
    rows = sum(int(pq.read_metadata(s.path).num_rows) for s in staged)
    return max(1, -(-rows // engine.slice_rows))


def device_slices(engine: Engine, staged: Sequence[Staged], column: str = "device_id") -> list[str]:
    """Conditions (SQL, on ``device_id``) that cut the day in ``aggregates`` into
    slices the engine takes in one query each: ``["TRUE"]`` for a day in one. A
    device is in one slice (crc32 of its id), so per-device results are exact."""
    n = slice_count(engine, staged)
    if n == 1:
        return ["TRUE"]
    devices = [r["device_id"] for r in engine.rows("SELECT DISTINCT device_id FROM aggregates")]
    which = [zlib.crc32(d.encode()) % n for d in devices]
    engine.register("device_slices", {"device_id": devices, "slice": which})
    return [
        f"{column} IN (SELECT device_id FROM device_slices WHERE slice = {i})" for i in range(n)
    ]


class EngineUnavailable(Exception):
    """The engine asked for is not installed here."""


def open_engine(
    name: str, workdir: Path, *, memory_limit: str | None = None, master: str | None = None
) -> Engine:
    if name == "duckdb":
        return DuckDBEngine(workdir, memory_limit)
    if name == "spark":
        try:
            import pyspark  # noqa: F401
        except ImportError:
            raise EngineUnavailable(
                "--engine spark needs pyspark and Java 17 (pip install 'iot-telemetry[spark]')"
            ) from None
        return SparkEngine(workdir, master or "local[*]")
    raise ValueError(f"unknown engine {name!r} (one of {', '.join(ENGINES)})")
