"""``cloud-ingest rollup`` and ``compact`` on DuckDB (and on Spark, ``local[2]``:
tests/cloud_ingest/test_spark.py runs the checks here), on a
lake of the simulator's readings that holds what real lakes hold: revisions, a
batch delivered twice, static tags, a window without readings, a window whose
sketch bytes are not a sketch, hopping windows and a width that does not divide
an hour, across midnight. The roll-ups equal the Python oracle the engines
replaced (tests/cloud_ingest/rollup_oracle.py) field for field; compaction keeps
exactly the rows :func:`cloud_ingest.lake.current_rows` keeps."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloud_ingest.jobs.compact import BUCKET_BYTES, compact
from cloud_ingest.jobs.engines import Engine, open_engine
from cloud_ingest.jobs.rollup import rollup_lines
from cloud_ingest.lake import WINDOW_KEY, current_rows, group_rows, part_key, read_table, to_parquet
from cloud_ingest.lake.schema import aggregates_schema
from cloud_ingest.sinks.archive import LocalArchive
from shared.wire import Batch, WindowSpec
from tests.cloud_ingest import test_lake_sql as page
from tests.cloud_ingest.rollup_oracle import oracle_lines

DAY = 86_400 * 10**9
MIDNIGHT = 1_790_035_200 * 10**9  # a UTC midnight
T0 = MIDNIGHT - 240 * 10**9
SECONDS = 480
TAGS = (("site", "lab"), ("room", "r1"), ("serial", "x1"))


def windows(device: str, seq: int, width_s: int, seed: int, tags: tuple = ()) -> Batch:
    """A device's tumbling windows of the simulator's readings around midnight."""
    return page.batch(
        seq, page.readings(seed, T0, SECONDS), device=device, width=width_s * 10**9, t0=T0,
        tags=tags, units={"vibration": "g"},
    )  # fmt: skip


def put(arc: LocalArchive, name: str, *batches: Batch) -> None:
    for g in group_rows(list(batches)):
        arc.put(part_key(g.dt, name), to_parquet(g.rows))


def build_lake(root: Path) -> LocalArchive:
    arc = LocalArchive(root)
    a = windows("pi-0001", 1, 10, 7, TAGS)
    # revision 1 of every window of a, with other values (as late readings would)
    b = windows("pi-0001", 2, 10, 8, TAGS)
    b = dataclasses.replace(b, revision=np.ones(b.rows, np.uint32))
    c = windows("pi-0002", 1, 20, 9)
    # c's first window has no finite reading; its second's sketch bytes are not a sketch;
    # its third has no sketch bytes at all (sketches are all or none per batch, so
    # that one is a batch of its own)
    stats = ("min", "max", "mean", "first", "last", "sum", "stddev", "p50", "p90", "p99")
    cols = {f: getattr(c, f).copy() for f in ("count", "invalid", *stats)}
    cols["count"][0], cols["invalid"][0] = 0, 20  # all its readings NaN
    for f in stats:
        cols[f][0] = np.nan
    sketches = list(c.sketch)
    sketches[1] = b"\x01not a sketch"
    c = dataclasses.replace(c, **cols, sketch=tuple(sketches))
    lone = windows("pi-0003", 1, 30, 10)
    lone = dataclasses.replace(lone, sketch=())
    hopping = dataclasses.replace(
        windows("pi-0004", 1, 10, 11), window=WindowSpec("hopping", 10 * 10**9, 5 * 10**9)
    )
    odd = windows("pi-0005", 1, 7, 12)  # 3600 s is not a multiple of 7 s
    put(arc, "00000000000000000001-test-000001", a, c)
    put(arc, "00000000000000000002-test-000001", b, lone, hopping, odd)
    put(arc, "00000000000000000003-test-000001", a)  # a delivered again
    return arc


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> LocalArchive:
    return build_lake(tmp_path_factory.mktemp("lake"))


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    eng = open_engine("duckdb", tmp_path_factory.mktemp("duckdb"))
    yield eng
    eng.close()


def canonical(series: str) -> str:
    """A series key as InfluxDB takes it: the tags in key order."""
    measurement, *tags = series.split(",")
    return ",".join([measurement, *sorted(tags)])


def parsed(lines: list[str]) -> dict[str, dict[str, float]]:
    out = {}
    for ln in lines:
        series, fields, t = ln.split(" ")
        out[f"{canonical(series)} {t}"] = {
            k: (int(v[:-1]) if v.endswith("i") else float(v))
            for k, v in (f.split("=") for f in fields.split(","))
        }
    return out


@pytest.mark.parametrize("period", ["1h", "1d"])
def test_rollups_equal_the_python_oracle(lake: LocalArchive, engine: Engine, period: str) -> None:
    check_rollups(lake, engine, period)


def assert_same_points(got: dict[str, dict[str, float]], want: dict[str, dict[str, float]]) -> None:
    """The same points and fields; integers equal, floats within rounding (an
    engine adds in its own order)."""
    assert set(got) == set(want)
    for key, fields in want.items():
        assert set(got[key]) == set(fields), key
        for name, v in fields.items():
            if isinstance(v, int):
                assert got[key][name] == v, (key, name)
            else:
                assert got[key][name] == pytest.approx(v, rel=1e-12, abs=1e-12), (key, name)


def check_rollups(lake: LocalArchive, engine: Engine, period: str) -> None:
    keys = frozenset({"site", "room"})
    since, until = T0, T0 + SECONDS * 10**9
    want = parsed(oracle_lines(lake, since, until, period, "window", None, keys))
    got = parsed(list(rollup_lines(lake, since, until, period, "window", None, keys, engine)))
    assert_same_points(got, want)
    # the lake's cases are in it: both days, the tags that tag_keys allows, groups
    # without quantiles (a window without a sketch, or with bytes that are not one)
    period_ns = 3600 * 10**9 if period == "1h" else DAY
    assert {int(k.split(" ")[1]) for k in got} == {MIDNIGHT - period_ns, MIDNIGHT}
    assert all(",room=r1," in k and ",site=lab" in k for k in got if "pi-0001" in k)
    assert not any("serial" in k for k in got)
    assert not any("pi-0004" in k or "pi-0005" in k for k in got), "hopping, 7 s: not rolled up"
    no_q = {k for k, f in got.items() if f["count"] and "p50" not in f}
    assert {k.split(",")[1] for k in no_q} == {"device_id=pi-0002", "device_id=pi-0003"}
    assert len(got) == 2 * 3 * 3  # 2 periods, 3 sensors, 3 devices


def lake_rows(root: Path) -> Any:
    """Every window the lake's objects hold, in the lake's schema."""
    import pyarrow as pa

    tables = [read_table(p.read_bytes()) for p in sorted(root.rglob("*.parquet"))]
    return pa.concat_tables(
        [t.select(aggregates_schema().names).cast(aggregates_schema()) for t in tables]
    )


def same_rows(a: Any, b: Any) -> bool:
    """Column for column equal, NaN equal to NaN (Arrow's equals says it is not)."""
    import pyarrow as pa

    if a.schema.names != b.schema.names or a.num_rows != b.num_rows:
        return False
    for x, y in zip(a.columns, b.columns, strict=True):
        if pa.types.is_floating(x.type):
            if not np.array_equal(x.to_numpy(), y.to_numpy(), equal_nan=True):
                return False
        elif not x.equals(y):
            return False
    return True


@pytest.mark.parametrize("bucket_bytes", [BUCKET_BYTES, 40_000])
def test_compaction_keeps_what_current_rows_keeps(
    tmp_path: Path, engine: Engine, bucket_bytes: int
) -> None:
    check_compaction(tmp_path, engine, bucket_bytes)


def check_compaction(tmp_path: Path, engine: Engine, bucket_bytes: int) -> None:
    arc = build_lake(tmp_path / "lake")
    want = current_rows(lake_rows(tmp_path / "lake"))
    days = {k.split("/")[1] for k in arc.list("aggregates/")}
    res = compact(arc, "2026-09-01", "2026-09-30", bucket_bytes, engine, tmp_path)
    assert res.damaged == [] and res.partitions == len(days) == 2
    assert res.rows_out == want.num_rows < res.rows_in
    keys = arc.list("aggregates/")
    if bucket_bytes == BUCKET_BYTES:
        assert [k.split("/")[-1] for k in keys] == ["compacted.parquet"] * 2
    else:
        assert len(keys) > 2 and all("compacted-" in k for k in keys)
    got = lake_rows(tmp_path / "lake")
    assert got.num_rows == want.num_rows
    # row for row what current_rows keeps, every column (sketch bytes and bins included)
    assert same_rows(current_rows(got), want)
    for key in keys:  # each object: the lake's schema and metadata, in window order
        table = read_table(arc.get(key))
        assert table.schema.equals(aggregates_schema(), check_metadata=True) or (
            [f.type for f in table.schema] == [f.type for f in aggregates_schema()]
            and table.schema.metadata == aggregates_schema().metadata
        )
        order = [(k, "ascending") for k in WINDOW_KEY]
        assert same_rows(table, table.sort_by(order)), key
        if bucket_bytes != BUCKET_BYTES:  # a device's windows of a day in one object
            devices = set(table.column("device_id").to_pylist())
            assert all(
                not devices & set(read_table(arc.get(k)).column("device_id").to_pylist())
                for k in keys
                if k != key and k.split("/")[1] == key.split("/")[1]
            )
    # a second run: the same rows (a day in buckets may be split anew: the bucket
    # count follows the objects' sizes); a day of one object is left as it is
    again = compact(arc, "2026-09-01", "2026-09-30", bucket_bytes, engine, tmp_path)
    assert again.rows_out == want.num_rows
    assert same_rows(current_rows(lake_rows(tmp_path / "lake")), want)
    if bucket_bytes == BUCKET_BYTES:
        assert again.rows_in == want.num_rows and arc.list("aggregates/") == keys


@pytest.mark.integration
def test_the_jobs_on_an_s3_lake(tmp_path: Path, engine: Engine, s3: Any, bucket: str) -> None:
    """An S3 lake (moto): its objects are copied to the work folder, rolled up and
    compacted there, and the compacted objects put back in the bucket, the old ones
    deleted: the same roll-ups and rows as the directory lake."""
    from cloud_ingest.sinks.archive import S3Archive

    local = build_lake(tmp_path / "local")
    arc = S3Archive(bucket, "lake", endpoint_url=s3.url, region="us-east-1")
    for key in local.list(""):
        arc.put(key, local.get(key))
    since, until = T0, T0 + SECONDS * 10**9
    keys = frozenset({"site", "room"})
    want = parsed(list(rollup_lines(local, since, until, "1h", "window", None, keys, engine)))
    got = parsed(list(rollup_lines(arc, since, until, "1h", "window", None, keys, engine)))
    assert_same_points(got, want)
    rows = current_rows(lake_rows(tmp_path / "local"))
    res = compact(arc, "2026-09-01", "2026-09-30", BUCKET_BYTES, engine, tmp_path)
    assert (res.damaged, res.rows_out) == ([], rows.num_rows)
    assert [k.split("/")[-1] for k in arc.list("aggregates/")] == ["compacted.parquet"] * 2
    import pyarrow as pa

    back = pa.concat_tables([read_table(arc.get(k)) for k in arc.list("aggregates/")])
    assert same_rows(current_rows(back), rows)


def test_a_day_in_slices_of_devices_gives_the_same_results(
    tmp_path: Path, lake: LocalArchive
) -> None:
    """DuckDB takes a large day a slice of devices at a time (its memory limit is
    not enough for the roll-up's six blocking operators over 100 million rows):
    here slices of 500 rows, the same roll-ups and compaction as in one piece."""
    eng = open_engine("duckdb", tmp_path)
    eng.slice_rows = 500
    try:
        for period in ("1h", "1d"):
            check_rollups(lake, eng, period)
        check_compaction(tmp_path / "buckets", eng, 40_000)
        check_compaction(tmp_path / "one", eng, BUCKET_BYTES)
    finally:
        eng.close()


@pytest.mark.integration
def test_objects_staged_one_at_a_time_keep_their_own_files(
    tmp_path: Path, s3: Any, bucket: str
) -> None:
    """Replay stages a day's objects one by one into one folder: each is its own
    file there (a CI run replayed one object of an S3 day twice and the other
    not at all, when the staged files were named by their place in the call)."""
    from cloud_ingest.jobs.engines import stage
    from cloud_ingest.sinks.archive import S3Archive

    local = build_lake(tmp_path / "local")
    arc = S3Archive(bucket, "lake", endpoint_url=s3.url, region="us-east-1")
    keys = local.list("aggregates/")
    for key in keys:
        arc.put(key, local.get(key))
    folder = tmp_path / "stage"
    folder.mkdir()
    staged = [s for key in keys for s in stage(arc, [key], folder)]
    assert len({s.path for s in staged}) == len(keys)
    assert [s.path.read_bytes() for s in staged] == [local.get(k) for k in keys]


def test_a_store_that_fails_is_not_a_damaged_object(tmp_path: Path, lake: LocalArchive) -> None:
    """The store's own error (S3 down) stops the job as the store's error, to be run
    again; it does not mark the day's objects damaged."""
    from shared.errors import RetryableSinkError

    class Down:
        def list(self, prefix: str) -> list[str]:
            return lake.list(prefix)

        def get(self, key: str) -> bytes:
            raise RetryableSinkError("the endpoint is down")

        def put(self, key: str, data: bytes) -> None:
            raise AssertionError("nothing to put")

        def delete(self, key: str) -> None:
            raise AssertionError("nothing to delete")

        def close(self) -> None:
            pass

    with pytest.raises(RetryableSinkError):
        compact(Down(), "2026-09-01", "2026-09-30", BUCKET_BYTES, None, tmp_path)
    with pytest.raises(RetryableSinkError):
        list(rollup_lines(Down(), T0, T0 + SECONDS * 10**9, "1h", "window"))
