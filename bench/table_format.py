"""Should the compacted lake be a Delta or an Iceberg table? What the writer pays.

One generated day of windows (bench/lake_jobs.py's generator, ``--rows``) is
written three ways, side by side in one run:

* today's lake: ``cloud-ingest compact`` on DuckDB makes the day one Parquet
  object; a revision of ``--revised`` of the windows (late data) arrives as a new
  object and the next compaction rewrites the day;
* Delta (deltalake, delta-rs): the day appended to a table partitioned by day,
  then the revisions merged in (``MERGE`` on the window key);
* Iceberg (pyiceberg, SQL catalog in SQLite): the day appended, then the
  revisions upserted on the window key.

For each: seconds and bytes of the day's write, seconds of the revisions' merge,
and seconds of one query over the result in DuckDB (the latest revision of each
window: for today's lake the documented query, for the tables a plain scan of
the rows they hold). Neither format takes the lake's nanosecond timestamps (Delta
truncates them to microseconds without a word, Iceberg v2 refuses them) nor its
unsigned integers: the tables get ``window_start`` as int64 nanoseconds and the
counts as int64.

    .venv/bin/python bench/table_format.py --rows 2000000
    (pip install deltalake 'pyiceberg[sql-sqlite]' first: the bench extra)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from lake_jobs import generate  # noqa: E402

from cloud_ingest.lake import WINDOW_KEY  # noqa: E402


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def table_types(table: Any) -> Any:
    """The lake's rows in types both formats take (see the docstring)."""
    import pyarrow as pa

    cols, fields = [], []
    for field, col in zip(table.schema, table.columns, strict=True):
        if pa.types.is_timestamp(field.type) or pa.types.is_unsigned_integer(field.type):
            col, field = col.cast(pa.int64()), pa.field(field.name, pa.int64())
        cols.append(col)
        fields.append(field)
    return pa.Table.from_arrays(cols, schema=pa.schema(fields)).append_column(
        "dt", pa.array(["2026-09-22"] * table.num_rows)
    )


def timed(f: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = f()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--revised", type=float, default=0.01, help="share of windows revised")
    ap.add_argument(
        "--no-iceberg",
        action="store_true",
        help="leave Iceberg out: pyiceberg's upsert on a multi-column key takes minutes for "
        "thousands of rows, and crashes the process (SIGSEGV) for tens of thousands "
        "(apache/iceberg-python#3508)",
    )
    args = ap.parse_args()

    import duckdb
    import pyarrow as pa
    import pyarrow.compute as pc

    from cloud_ingest.jobs.compact import compact
    from cloud_ingest.lake import current_rows, part_key, read_table, to_parquet
    from cloud_ingest.sinks.archive import LocalArchive

    with tempfile.TemporaryDirectory(prefix="bench-tables-") as tmp:
        base = Path(tmp)
        lake = base / "lake"
        rows = generate(lake, args.rows, 250_000)
        store = LocalArchive(lake)
        day = current_rows(
            pa.concat_tables([read_table(p.read_bytes()) for p in lake.rglob("*.parquet")])
        )
        rng = np.random.default_rng(2)
        pick = pa.array(rng.random(day.num_rows) < args.revised)
        revised = day.filter(pick)
        revised = revised.set_column(
            revised.schema.get_field_index("revision"),
            "revision",
            pc.add(revised.column("revision"), pa.scalar(1, pa.uint32())),
        ).set_column(
            revised.schema.get_field_index("mean"), "mean", pc.add(revised.column("mean"), 1.0)
        )
        results: list[tuple[str, float, int, float, float]] = []

        # today's lake: compaction, then the revisions as an object and compaction again
        t_day, _ = timed(lambda: compact(store, "2026-09-22", "2026-09-22"))
        day_bytes = size(lake)
        store.put(part_key("2026-09-22", "99999999999999999999-late-000001"), to_parquet(revised))
        t_merge, _ = timed(lambda: compact(store, "2026-09-22", "2026-09-22"))
        query = (
            f"SELECT count(*), avg(mean) FROM (SELECT mean FROM read_parquet("
            f"'{lake}/aggregates/*/*.parquet') QUALIFY row_number() OVER ("
            f"PARTITION BY {', '.join(WINDOW_KEY)} ORDER BY revision DESC, seq DESC) = 1)"
        )
        t_query, parquet_answer = timed(lambda: duckdb.sql(query).fetchall())
        results.append(("Parquet, compacted (today)", t_day, day_bytes, t_merge, t_query))

        data, late = table_types(day), table_types(revised)
        key = list(WINDOW_KEY)

        # Delta
        from deltalake import DeltaTable, write_deltalake

        dpath = base / "delta"
        t_day, _ = timed(lambda: write_deltalake(str(dpath), data, partition_by=["dt"]))
        day_bytes = size(dpath)
        on = " AND ".join(f"t.{k} = s.{k}" for k in key)
        t_merge, _ = timed(
            lambda: (
                DeltaTable(str(dpath))
                .merge(late, predicate=on, source_alias="s", target_alias="t")
                .when_matched_update_all()
                .when_not_matched_insert_all()
                .execute()
            )
        )
        con = duckdb.connect()
        con.register("ds", DeltaTable(str(dpath)).to_pyarrow_dataset())
        t_query, delta_answer = timed(
            lambda: con.sql("SELECT count(*), avg(mean) FROM ds").fetchall()
        )
        results.append(("Delta (deltalake)", t_day, day_bytes, t_merge, t_query))

        # Iceberg
        if args.no_iceberg:
            return report(rows, day.num_rows, revised.num_rows, results)
        from pyiceberg.catalog.sql import SqlCatalog

        ipath = base / "iceberg"
        ipath.mkdir()
        catalog = SqlCatalog(
            "bench", uri=f"sqlite:///{ipath}/catalog.db", warehouse=f"file://{ipath}"
        )
        catalog.create_namespace("lake")
        table = catalog.create_table("lake.aggregates", schema=data.schema)
        t_day, _ = timed(lambda: table.append(data))
        day_bytes = size(ipath) - (ipath / "catalog.db").stat().st_size
        t_merge, _ = timed(lambda: table.upsert(late, join_cols=key))
        t_query, iceberg_answer = timed(lambda: _iceberg_query(table))
        results.append(("Iceberg (pyiceberg, SQL catalog)", t_day, day_bytes, t_merge, t_query))
        print(f"# answers (windows, mean of means): Parquet {parquet_answer}, "
              f"Delta {delta_answer}, Iceberg {iceberg_answer}")  # fmt: skip
        report(rows, day.num_rows, revised.num_rows, results)


def report(
    rows: int, windows: int, revised: int, results: list[tuple[str, float, int, float, float]]
) -> None:
    print(f"# {rows:,} rows generated, {windows:,} windows in the day, {revised:,} revised")
    print("| layout | write the day (s) | bytes | merge the revisions (s) | query (s) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, a, b, c, d in results:
        print(f"| {name} | {a:.2f} | {b:,} | {c:.2f} | {d:.2f} |")


def _iceberg_query(table: Any) -> Any:
    import duckdb

    con = duckdb.connect()
    con.register("scanned", table.scan().to_arrow())
    return con.sql("SELECT count(*), avg(mean) FROM scanned").fetchall()


if __name__ == "__main__":
    main()
