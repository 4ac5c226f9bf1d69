"""The Parquet lake's keys and round trip (batch → objects → batch), read back with DuckDB."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import duckdb
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud_ingest.jobs.compact import compact
from cloud_ingest.lake import (
    DAY_NS,
    LATEST_AGGREGATES_SQL,
    LakeKey,
    alert_object,
    group_rows,
    parse_key,
    part_key,
    read_table,
    reading,
    table_to_alerts,
    table_to_batches,
    to_parquet,
)
from cloud_ingest.sinks.archive import LocalArchive
from devstack import hostile
from shared.alerts import Alert
from shared.errors import LakeObjectError
from shared.sketch import DDSketch
from shared.wire import COLUMNS, Batch, SensorRef, WindowSpec, make_batch
from tests.helpers import batch_objects

W = 10 * 10**9
MIDNIGHT = 20_000 * DAY_NS  # 2024-10-04T00:00Z


def _batch(seq: int, starts: list[int], revision: int = 0, mean: float = 1.5):
    n = len(starts)
    return make_batch(
        device_id="dev-1",
        seq=seq,
        created_ns=MIDNIGHT + 5,
        window=WindowSpec("tumbling", W),
        sensors=(SensorRef("n1", "temp", "degC"), SensorRef("n2", "hum", "")),
        columns={
            "sensor": [i % 2 for i in range(n)],
            "start_ns": starts,
            "count": [2] * n,
            "invalid": [0] * n,
            "min": [1.0] * n,
            "max": [2.0] * n,
            "mean": [mean] * n,
            "stddev": [0.5] * n,
            "first": [1.0] * n,
            "last": [2.0] * n,
            "sum": [3.0] * n,
            "p50": [1.5] * n,
            "p90": [np.nan] * n,
            "p99": [2.0] * n,
            "revision": [revision] * n,
        },
        sketch=tuple(DDSketch.from_values(np.array([1.0, 2.0 + i])).encode() for i in range(n)),
    )


def put(arc: LocalArchive, name: str, *batches: Batch) -> list[str]:
    """Put the objects of a group of ``batches``, as the ingestor does; their keys."""
    keys = []
    for g in group_rows(batches):
        keys.append(part_key(g.dt, name))
        arc.put(keys[-1], to_parquet(g.rows))
    return keys


def test_a_batch_across_midnight_is_two_objects_and_round_trips() -> None:
    b = _batch(7, [MIDNIGHT - W, MIDNIGHT - W, MIDNIGHT, MIDNIGHT + W])
    objs = batch_objects(b, "g1")
    assert [k for k, _ in objs] == [
        "aggregates/dt=2024-10-03/part-g1.parquet",
        "aggregates/dt=2024-10-04/part-g1.parquet",
    ]
    rows = []
    for key, data in objs:
        k = parse_key(key)
        assert k is not None and (k.table, k.name, k.compacted) == ("aggregates", "part-g1", False)
        (back,) = table_to_batches(read_table(data))
        assert (back.device_id, back.seq) == ("dev-1", 7)
        rows.append(back)
    assert [r.rows for r in rows] == [2, 2]
    for name in COLUMNS:
        got = np.concatenate([getattr(r, name) for r in rows])
        if name == "sensor":  # indexes into each object's own sensor list
            got = np.array([r.sensors[i].name for r in rows for i in r.sensor])
            want = np.array([b.sensors[i].name for i in b.sensor])
        else:
            want = getattr(b, name)
        np.testing.assert_array_equal(got, want, err_msg=name)
    assert sum((r.sketch for r in rows), ()) == b.sketch


def test_a_group_is_one_object_per_day_holding_every_batch_row_for_row() -> None:
    import pyarrow as pa

    a = _batch(1, [MIDNIGHT - W, MIDNIGHT, MIDNIGHT + W], mean=2.0)
    b = dataclasses.replace(_batch(2, [MIDNIGHT, MIDNIGHT + W]), device_id="dev-2", sketch=())
    c = _batch(3, [MIDNIGHT + 2 * W])
    days = group_rows([a, b, c])
    assert [(g.dt, g.which.tolist()) for g in days] == [
        ("2024-10-03", [0]),
        ("2024-10-04", [0, 0, 1, 1, 2]),
    ]
    both = pa.concat_tables([read_table(to_parquet(g.rows)) for g in days]).sort_by(
        [("device_id", "ascending"), ("seq", "ascending"), ("window_start", "ascending")]
    )
    back = list(table_to_batches(both))
    assert [(x.device_id, x.seq, x.rows) for x in back] == [("dev-1", 1, 3), ("dev-1", 3, 1),
                                                              ("dev-2", 2, 2)]  # fmt: skip
    for got, want in zip(back, (a, c, b), strict=True):
        for name in COLUMNS:
            if name != "sensor":
                np.testing.assert_array_equal(getattr(got, name), getattr(want, name), name)
        assert got.sketch == want.sketch
    # a group's object without some of its batches (a resend, a refused write)
    kept = days[1].without({0, 2})
    assert kept is not None and kept.num_rows == 2
    assert days[0].without({0}) is None and days[0].without(set()) is days[0].rows


def test_alert_round_trip() -> None:
    a = Alert(9, "hot", "threshold", "n1", "temp", "raised", MIDNIGHT + 1, 61.5, "above 60")
    key, data = alert_object("dev-1", a)
    assert key == f"alerts/dt=2024-10-04/device_id=dev-1/seq={9:020d}.parquet"
    assert list(table_to_alerts(read_table(data))) == [a]
    silent = Alert(10, "quiet", "silent", "n1", "temp", "raised", MIDNIGHT + 2, None, "silent")
    assert list(table_to_alerts(read_table(alert_object("dev-1", silent)[1]))) == [silent]


def test_alerts_compact_across_the_capture_column_added_since(tmp_path: Path) -> None:
    """An alert object written before ``capture`` existed (no column) and one with a
    capture compact into one object, each alert as it was."""
    arc = LocalArchive(tmp_path)
    old = Alert(1, "hot", "threshold", "n1", "temp", "raised", MIDNIGHT, 61.0, "above 60")
    new = Alert(
        2, "hot", "threshold", "n1", "temp", "raised", MIDNIGHT + 5, 62.0, "x", 0, "alert-2"
    )
    key, data = alert_object("dev-1", old)
    arc.put(key, to_parquet(read_table(data).drop_columns(["capture"])))
    arc.put(*alert_object("dev-1", new))
    res = compact(arc, "2024-10-04", "2024-10-04")
    assert (res.objects_in, res.rows_out) == (2, 2)
    (only,) = arc.list("alerts/")
    assert list(table_to_alerts(read_table(arc.get(only)))) == [old, new]


def test_parse_key_ignores_other_objects() -> None:
    assert parse_key("quarantine/reason=x/abc.bin") is None
    assert parse_key("aggregates/dt=2024-01-01/device_id=d/seq=1.parquet") is None  # lake v1
    assert parse_key("aggregates/dt=2024-01-01/part-.parquet") is None
    assert parse_key("aggregates/dt=2024-01-01/.tmp-1.part") is None
    assert parse_key("alerts/dt=2024-01-01/device_id=d/seq=x.parquet") is None
    assert parse_key("aggregates/dt=2024-01-01/compacted.parquet") == LakeKey(
        "aggregates", "2024-01-01", name="compacted"
    )
    k = parse_key(f"alerts/dt=2024-01-01/device_id=d/seq={3:020d}-{5:020d}.parquet")
    assert k is not None and (k.device_id, k.seq, k.seq_last, k.compacted) == ("d", 3, 5, True)


def test_duckdb_reads_the_latest_revision_of_each_window(tmp_path: Path) -> None:
    arc = LocalArchive(tmp_path)
    put(arc, "g1", _batch(1, [MIDNIGHT, MIDNIGHT, MIDNIGHT + W]))
    # seq 2 revises the first window (a late reading); seq 1 is delivered again after
    # it was written (a lost ack), into another group's object
    put(
        arc,
        "g2",
        _batch(2, [MIDNIGHT], revision=1, mean=9.0),
        _batch(1, [MIDNIGHT] * 2 + [MIDNIGHT + W]),
    )
    con = duckdb.connect()
    total = con.execute(
        f"SELECT count(*) FROM read_parquet('{tmp_path}/aggregates/*/*.parquet',"
        " hive_partitioning = true)"
    ).fetchone()
    assert total == (7,), "3 rows of seq 1, twice, + 1 of seq 2"
    rows = con.execute(
        "SELECT device_id, dt, sensor, epoch_ns(window_start), revision, mean FROM ("
        + LATEST_AGGREGATES_SQL.format(root=tmp_path)
        + ") ORDER BY 3, 4"
    ).fetchall()
    assert [(r[0], str(r[1]), *r[2:]) for r in rows] == [
        ("dev-1", "2024-10-04", "hum", MIDNIGHT, 0, 1.5),
        ("dev-1", "2024-10-04", "temp", MIDNIGHT, 1, 9.0),
        ("dev-1", "2024-10-04", "temp", MIDNIGHT + W, 0, 1.5),
    ]


def test_compaction_keeps_the_current_version_of_each_window_once(tmp_path: Path) -> None:
    arc = LocalArchive(tmp_path)
    put(arc, "g1", _batch(1, [MIDNIGHT, MIDNIGHT, MIDNIGHT + W]))
    put(arc, "g2", _batch(2, [MIDNIGHT], revision=1, mean=9.0))  # revises seq 1's first window
    put(arc, "g3", _batch(3, [MIDNIGHT - W]))  # the day before
    for a in (7, 7, 8):  # alert 7 twice (a resend), 8 once
        arc.put(
            *alert_object(
                "dev-1", Alert(a, "r", "stuck", "n1", "temp", "raised", MIDNIGHT, None, "m")
            )
        )
    before = influxq_lake(tmp_path)

    res = compact(arc, "2024-10-03", "2024-10-04")
    assert (res.partitions, res.objects_in, res.rows_in, res.rows_out) == (3, 5, 7, 6)
    assert arc.list("") == [
        "aggregates/dt=2024-10-03/compacted.parquet",
        "aggregates/dt=2024-10-04/compacted.parquet",
        f"alerts/dt=2024-10-04/device_id=dev-1/seq={7:020d}-{8:020d}.parquet",
    ]
    con = duckdb.connect()
    rows = con.execute(
        f"SELECT sensor, epoch_ns(window_start), revision, mean FROM read_parquet("
        f"'{tmp_path}/aggregates/*/*.parquet', hive_partitioning = true) ORDER BY 2, 1"
    ).fetchall()
    assert rows == [
        ("temp", MIDNIGHT - W, 0, 1.5),
        ("hum", MIDNIGHT, 0, 1.5),
        ("temp", MIDNIGHT, 1, 9.0),  # the revision replaced the first version
        ("temp", MIDNIGHT + W, 0, 1.5),
    ]
    assert influxq_lake(tmp_path) == before, "the current versions did not change"
    assert [a.seq for a in table_to_alerts(read_table(arc.get(arc.list("alerts/")[0])))] == [7, 8]
    again = compact(arc, "2024-10-03", "2024-10-04")
    assert (again.objects_in, again.rows_in) == (3, 6) and len(arc.list("")) == 3


def influxq_lake(root: Path) -> dict[object, object]:
    from devstack.influxq import lake_windows

    return dict(lake_windows(root))


def test_nanosecond_window_starts_survive_the_lake(tmp_path: Path) -> None:
    """pyarrow turns timestamps into datetime (microseconds) unless told otherwise."""
    b = make_batch(
        device_id="dev-1",
        seq=4,
        created_ns=0,
        window=WindowSpec("tumbling", 3),
        sensors=(SensorRef("n1", "fast"),),
        columns={"sensor": [0, 0], "start_ns": [MIDNIGHT + 3, MIDNIGHT + 6], "count": [1, 1],
                 "invalid": [0, 0], **{f: [1.0, 1.0] for f in ("min", "max", "mean", "first",
                 "last", "sum", "p50", "p90", "p99")}, "stddev": [0.0, 0.0]},
    )  # fmt: skip
    arc = LocalArchive(tmp_path)
    for key, data in batch_objects(b):
        arc.put(key, data)
        (back,) = table_to_batches(read_table(data))
        assert back.start_ns.tolist() == [MIDNIGHT + 3, MIDNIGHT + 6]
    res = compact(arc, "2024-10-04", "2024-10-04")
    assert res.rows_out == 2


# ---- a damaged lake ---------------------------------------------------------------

GOOD_OBJECT = batch_objects(_batch(1, [MIDNIGHT, MIDNIGHT, MIDNIGHT + W]))[0][1]
ALERT_OBJECT = alert_object(
    "dev-1", Alert(7, "r", "stuck", "n1", "temp", "raised", MIDNIGHT, 1.0, "m")
)[1]


def _read_all(key: str, data: bytes) -> int:
    """Read an object as replay does: rows, or LakeObjectError; nothing else."""
    with reading(key):
        table = read_table(data)
        if key.startswith("alerts/"):
            return len(list(table_to_alerts(table)))
        return sum(b.rows for b in table_to_batches(table))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), alert=st.booleans())
def test_reading_a_damaged_lake_object_raises_only_lake_object_error(
    seed: int, alert: bool
) -> None:
    data = hostile.mutate(ALERT_OBJECT if alert else GOOD_OBJECT, random.Random(seed))
    key = "alerts/x.parquet" if alert else "aggregates/x.parquet"
    try:
        _read_all(key, data)
    except LakeObjectError as exc:
        assert exc.key == key and key in str(exc)


def test_a_parquet_file_of_another_schema_is_a_damaged_object() -> None:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"seq": [1], "other": ["x"]}), buf)
    with pytest.raises(LakeObjectError, match="KeyError"):
        _read_all("aggregates/x.parquet", buf.getvalue())


def test_an_object_of_lake_version_1_is_named_as_such() -> None:
    """Lake version 1 had one object per batch, the device in its path only."""
    table = read_table(GOOD_OBJECT).drop_columns(["device_id"])
    with pytest.raises(LakeObjectError, match="lake version 1"):
        _read_all("aggregates/x.parquet", to_parquet(table))


class _Points:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, lines: list[str]) -> None:
        self.lines.extend(lines)

    def close(self) -> None:
        pass


def test_replay_compact_and_rollup_meet_a_damaged_object(tmp_path: Path) -> None:
    """The lake is input too: an object cut short (a full disk) is skipped and counted
    by replay, left in place by compact, and stops a roll-up with its key (a roll-up
    without it would be wrong); the good objects are replayed and compacted."""
    import asyncio

    from cloud_ingest.config import IngestConfig
    from cloud_ingest.jobs.replay import ReplayFilter, replay
    from cloud_ingest.jobs.rollup import rollup_lines
    from shared.config import from_dict

    arc = LocalArchive(tmp_path)
    put(arc, "g1", _batch(1, [MIDNIGHT, MIDNIGHT]))
    put(arc, "g2", _batch(2, [MIDNIGHT + W]))
    damaged_key, data = batch_objects(_batch(3, [MIDNIGHT - W]), "g3")[0]  # the day before
    arc.put(damaged_key, data[: len(data) // 2])

    points = _Points()
    res = asyncio.run(replay(from_dict(IngestConfig, {}), arc, points, ReplayFilter()))
    assert (res.objects, res.batches, res.points, res.damaged, res.rejected) == (2, 2, 3, 1, 0)
    assert len(points.lines) == 3

    with pytest.raises(LakeObjectError) as info:
        list(rollup_lines(arc, MIDNIGHT - DAY_NS, MIDNIGHT + DAY_NS, "1h", "telemetry"))
    assert info.value.key == damaged_key

    out = compact(arc, "2024-10-03", "2024-10-04")
    assert out.damaged == [damaged_key] and out.partitions == 1 and out.objects_in == 2
    assert damaged_key in arc.list("aggregates/dt=2024-10-03/")


def test_the_local_lake_is_not_world_readable(tmp_path: Path) -> None:
    """Folders 0750 (their names alone are the fleet's device ids), objects 0640."""
    import stat

    root = tmp_path / "lake"
    arc = LocalArchive(root)
    key, data = batch_objects(_batch(1, [MIDNIGHT]))[0]
    arc.put(key, data)
    made = [root / key]
    p = (root / key).parent
    while p != tmp_path:
        made.append(p)
        p = p.parent
    for path in made:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o007 == 0, (path, oct(mode))


def test_a_large_day_is_compacted_in_buckets_by_device(tmp_path: Path) -> None:
    """A day too large for one bucket is split by a hash of the device: each device's
    windows in one bucket, each bucket compacted alone; the result is the same rows."""
    arc = LocalArchive(tmp_path)
    devices = [f"dev-{i}" for i in range(12)]
    for g, dev in enumerate(devices):
        first = dataclasses.replace(_batch(1, [MIDNIGHT, MIDNIGHT, MIDNIGHT + W]), device_id=dev)
        revised = dataclasses.replace(_batch(2, [MIDNIGHT], 1, mean=9.0), device_id=dev)
        put(arc, f"g{g}", first, revised, first)  # a resend of seq 1 in the same object
    before = influxq_lake(tmp_path)
    assert len(before) == 12 * 3

    res = compact(arc, "2024-10-04", "2024-10-04", bucket_bytes=20_000)
    keys = arc.list("aggregates/")
    assert len(keys) > 1 and all(
        k.startswith("aggregates/dt=2024-10-04/compacted-")
        and k.endswith(f"-of-{len(keys):04d}.parquet")
        for k in keys
    ), keys
    assert (res.partitions, res.objects_in, res.rows_in, res.rows_out) == (1, 12, 12 * 7, 12 * 3)
    assert influxq_lake(tmp_path) == before
    per_key = [{b.device_id for b in table_to_batches(read_table(arc.get(k)))} for k in keys]
    assert sorted(d for ds in per_key for d in ds) == sorted(devices), "each device in one bucket"
    again = compact(arc, "2024-10-04", "2024-10-04", bucket_bytes=20_000)
    assert again.rows_out == 12 * 3 and influxq_lake(tmp_path) == before


def test_replay_of_some_devices_takes_their_rows_of_shared_objects(tmp_path: Path) -> None:
    import asyncio

    from cloud_ingest.config import IngestConfig
    from cloud_ingest.jobs.replay import ReplayFilter, replay
    from shared.config import from_dict

    arc = LocalArchive(tmp_path)
    other = dataclasses.replace(_batch(2, [MIDNIGHT, MIDNIGHT + W]), device_id="dev-2")
    put(arc, "g1", _batch(1, [MIDNIGHT]), other)
    points = _Points()
    flt = ReplayFilter(devices=frozenset({"dev-2"}))
    res = asyncio.run(replay(from_dict(IngestConfig, {}), arc, points, flt))
    assert (res.objects, res.batches, res.points) == (1, 1, 2)
    assert len(points.lines) == 2 and all("device_id=dev-2," in ln for ln in points.lines)


def test_rollups_carry_the_windows_tags_and_take_the_latest_revision(tmp_path: Path) -> None:
    """A roll-up point is in the windows' series (cloud_ingest.sinks.lineproto.window_series):
    the static tags that tag_keys allows are tags of window_1h too (they were
    left out); a window's later revision replaces the earlier one in the sums."""
    from cloud_ingest.jobs.rollup import rollup_lines
    from cloud_ingest.sinks.lineproto import batch_to_lines
    from tests.cloud_ingest.test_jobs_engines import canonical

    tags = (("site", "lab"), ("room", "r1"), ("serial", "x1"))
    tagged = dataclasses.replace(
        _batch(1, [MIDNIGHT, MIDNIGHT + W]),
        sensors=(SensorRef("n1", "temp", "degC", tags), SensorRef("n2", "hum", "", tags)),
    )
    revised = dataclasses.replace(
        _batch(2, [MIDNIGHT], revision=1, mean=1.75), sensors=tagged.sensors
    )
    arc = LocalArchive(tmp_path)
    put(arc, "g1", tagged)
    put(arc, "g2", revised)
    keys = frozenset({"site", "room"})
    lines = list(rollup_lines(arc, MIDNIGHT, MIDNIGHT + 3600 * 10**9, "1h", "window", None, keys))
    window_series = {canonical(ln.split(" ")[0]) for ln in batch_to_lines(tagged, "window", keys)}
    assert {
        canonical(ln.split(" ")[0].replace("window_1h,", "window,", 1)) for ln in lines
    } == window_series
    assert all(",room=r1," in ln and ",site=lab" in ln and "serial" not in ln for ln in lines)
    temp = next(ln for ln in lines if "sensor=temp" in ln)
    # temp: its window at MIDNIGHT once, at revision 1 (its mean 1.75 shows in the
    # stddev, which merges the windows' means: 0.5 with revision 0's 1.5)
    fields = dict(f.split("=") for f in temp.split(" ")[1].split(","))
    assert fields["count"] == "2i" and fields["windows"] == "1i"
    assert float(fields["stddev"]) == pytest.approx((0.25 + 0.25**2) ** 0.5)


def test_replay_streams_a_day_in_chunks_and_writes_each_batch_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DuckDB hands the day over in record batches; a lake batch cut by a chunk's
    end is written whole with the next chunk: the same lines as in one chunk."""
    import asyncio

    from cloud_ingest.config import IngestConfig
    from cloud_ingest.jobs import replay as replay_module
    from cloud_ingest.jobs.engines import DuckDBEngine
    from cloud_ingest.jobs.replay import ReplayFilter, replay
    from shared.config import from_dict

    arc = LocalArchive(tmp_path)
    devices = [
        dataclasses.replace(_batch(s, [MIDNIGHT, MIDNIGHT, MIDNIGHT + W]), device_id=f"dev-{d}")
        for d in range(3)
        for s in (1, 2)
    ]
    for s, b in enumerate(devices):
        b = dataclasses.replace(b, start_ns=b.start_ns + (s % 2) * 2 * W)
        put(arc, f"g{s}", b)
    cfg = from_dict(IngestConfig, {})

    def lines(chunk_rows: int, slice_rows: int = 4_000_000) -> tuple[list[str], int]:
        monkeypatch.setattr(replay_module, "CHUNK_ROWS", chunk_rows)
        monkeypatch.setattr(DuckDBEngine, "slice_rows", slice_rows)
        points = _Points()
        res = asyncio.run(replay(cfg, arc, points, ReplayFilter()))
        return sorted(points.lines), res.batches

    whole, batches = lines(65_536)
    assert len(whole) == 6 * 3 and batches == 6
    for n in (1, 2, 4):
        assert lines(n) == (whole, 6), n
    # and a day in slices of devices (as DuckDB takes a large one)
    assert lines(2, slice_rows=5) == (whole, 6)
