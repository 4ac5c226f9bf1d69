"""Per-device quotas (cloud_ingest/ingest/quotas.py) on their own, with injected clocks;
through a real broker and InfluxDB in tests/system/test_one_device.py."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from cloud_ingest.config import IngestConfig, QuotasConfig
from cloud_ingest.ingest.process import Processor
from cloud_ingest.ingest.quotas import Quotas
from shared.config import from_dict
from shared.wire import STAT_FIELDS, Batch, SensorRef, WindowSpec, encode_batch, make_batch
from tests.cloud_ingest.test_process import FakePoints, FakeStore

W = 10 * 10**9
DAY = 86_400
NOW_S = 1_800_000_000.0  # the ingestor's clock in these tests
NOW = int(NOW_S) * 10**9


class Clocks:
    def __init__(self) -> None:
        self.mono = 1000.0
        self.wall = NOW_S


def quotas(clocks: Clocks, tmp_path: Path | None = None, **cfg: Any) -> Quotas:
    if tmp_path is not None:
        cfg["state_file"] = str(tmp_path / "series.sqlite")
    return Quotas(
        QuotasConfig(**cfg),
        frozenset({"site"}),
        monotonic=lambda: clocks.mono,
        wall=lambda: clocks.wall,
    )


def batch(
    sensors: list[str],
    *,
    device: str = "d1",
    starts: list[int] | None = None,
    unit: str = "C",
    tags: tuple[tuple[str, str], ...] = (),
    seq: int = 1,
) -> Batch:
    starts = starts or [NOW - 60 * 10**9]
    rows = [(i, st) for st in starts for i in range(len(sensors))]
    return make_batch(
        device_id=device,
        seq=seq,
        created_ns=NOW,
        window=WindowSpec("tumbling", W),
        sensors=tuple(SensorRef("n1", s, unit, tags) for s in sensors),
        columns={
            "sensor": [i for i, _ in rows],
            "start_ns": [st // W * W for _, st in rows],
            "count": [3] * len(rows),
            "invalid": [0] * len(rows),
            **{f: [1.0] * len(rows) for f in STAT_FIELDS},
        },
    )


def test_a_device_over_its_rate_is_deferred_and_others_are_not() -> None:
    c = Clocks()
    q = quotas(c, max_messages_per_s=10.0, burst_messages=20)
    assert all(q.admit("noisy") for _ in range(20))  # the burst
    assert not q.admit("noisy")
    assert q.admit("quiet")  # another device's bucket is its own
    c.mono += 0.5  # half a second refills five
    assert sum(q.admit("noisy") for _ in range(10)) == 5


@pytest.mark.parametrize(
    ("start_s", "reason"),
    [
        (NOW_S - 91 * DAY, "time-too-old"),
        (-9_000_000_000.0, "time-too-old"),  # the year 1684: before the epoch
        (NOW_S + 2 * DAY, "time-too-new"),
    ],
)
def test_windows_too_far_from_the_clock_are_quarantined(start_s: float, reason: str) -> None:
    q = quotas(Clocks())
    got = q.check_batch(batch(["t"], starts=[int(start_s) * 10**9]), NOW)
    assert got.batch is None and got.error is not None and got.error.reason == reason


def test_a_batch_spanning_years_is_quarantined_whole() -> None:
    # one window a day going back a year: the batch that made 4,540 lake objects
    starts = [NOW - k * DAY * 10**9 for k in range(0, 80)]
    got = quotas(Clocks()).check_batch(batch(["t"], starts=starts), NOW)
    assert got.batch is None and got.error is not None and got.error.reason == "time-span"
    ok = quotas(Clocks()).check_batch(batch(["t"], starts=starts[:1]), NOW)
    assert ok.batch is not None and ok.error is None


def test_too_many_sensors_in_one_batch() -> None:
    q = quotas(Clocks(), max_sensors_per_batch=10)
    got = q.check_batch(batch([f"s{i}" for i in range(11)]), NOW)
    assert got.error is not None and got.error.reason == "quota-sensors"


def test_new_series_over_the_quota_are_left_out_and_the_rest_is_written() -> None:
    """A firmware that puts a counter in a sensor name: its real sensors keep
    arriving, its invented ones stop at the quota."""
    q = quotas(Clocks(), max_series_per_device=5, max_new_series_per_day=100)
    first = q.check_batch(batch(["temp", "hum"]), NOW)
    assert first.batch is not None and first.error is None
    got = q.check_batch(batch(["temp", "hum", *[f"x{i}" for i in range(6)]]), NOW)
    assert got.error is not None and got.error.reason == "quota-series"
    assert got.batch is not None and got.refused_rows == 3  # x3, x4, x5 left out
    kept = {got.batch.sensors[i].name for i in got.batch.sensor.tolist()}
    assert kept == {"temp", "hum", "x0", "x1", "x2"}
    again = q.check_batch(batch(["temp", "hum", "x0"]), NOW)  # known series: no quota
    assert again.error is None
    only_new = q.check_batch(batch(["y1"]), NOW)
    assert only_new.batch is None and only_new.error is not None  # nothing of it to write
    assert q.check_batch(batch(["z"], device="d2"), NOW).error is None  # d2 is not d1


def test_new_series_per_day_and_tag_values_are_bounded() -> None:
    c = Clocks()
    q = quotas(c, max_new_series_per_day=3, max_tag_values=2)
    assert q.check_batch(batch(["a", "b", "c", "d"]), NOW).refused_rows == 1
    c.wall += DAY  # the next UTC day: three more
    got = q.check_batch(batch(["d", "e", "f", "g"]), NOW + DAY * 10**9)
    assert got.refused_rows == 1 and got.error is not None
    assert got.error.reason == "quota-new-series"
    t = quotas(c, max_tag_values=2)  # the unit, and each static tag written as a tag
    units = [t.check_batch(batch([f"u{u}"], unit=u), NOW).error for u in ("C", "V", "W")]
    assert [e.reason if e else None for e in units] == [None, None, "quota-tag-values"]
    sites = [t.check_batch(batch([f"s{s}"], tags=(("site", s),)), NOW).error for s in "xyz"]
    assert [e.reason if e else None for e in sites] == [None, None, "quota-tag-values"]


def test_series_not_seen_for_the_expiry_are_forgotten() -> None:
    c = Clocks()
    q = quotas(c, max_series_per_device=2, series_expiry_s=2 * DAY)
    assert q.check_batch(batch(["a", "b"]), NOW).error is None
    assert q.check_batch(batch(["c"]), NOW).error is not None
    c.wall += 3 * DAY  # a and b were not seen for three days
    assert q.check_batch(batch(["c"]), NOW).error is None and q.tracked == 1


def test_the_record_survives_a_restart(tmp_path: Path) -> None:
    """Known series stay known (not new again on the day of a restart), and the
    allowance already used stays used."""
    c = Clocks()
    q = quotas(c, tmp_path, max_series_per_device=4, max_new_series_per_day=3)
    assert q.check_batch(batch(["a", "b", "c"]), NOW).error is None
    q.close()
    again = quotas(c, tmp_path, max_series_per_device=4, max_new_series_per_day=3)
    assert again.tracked == 3
    assert again.check_batch(batch(["a", "b", "c"]), NOW).error is None  # known, not new
    got = again.check_batch(batch(["d"]), NOW)
    assert got.error is not None and got.error.reason == "quota-new-series"
    again.close()


def test_a_full_series_table_defers_new_series_and_keeps_known_ones() -> None:
    q = quotas(Clocks(), max_tracked_series=2)
    assert q.check_batch(batch(["a", "b"]), NOW).error is None
    assert q.check_batch(batch(["c"], device="d2"), NOW).defer == "series-table-full"
    assert q.check_batch(batch(["a", "b"]), NOW).defer is None


def test_a_devices_quarantine_entries_are_kept_at_a_bounded_rate() -> None:
    c = Clocks()
    q = quotas(c, max_quarantined_per_min=60)
    assert sum(q.keep_quarantined("d1") for _ in range(100)) == 60
    assert q.keep_quarantined("d2") and q.keep_quarantined(None)
    c.mono += 10
    assert sum(q.keep_quarantined("d1") for _ in range(100)) == 10


def test_the_processor_writes_the_kept_part_and_tells_the_device_why() -> None:
    points, store = FakePoints(), FakeStore()
    cfg = from_dict(IngestConfig, {"quotas": {"max_series_per_device": 2}})
    proc = Processor(cfg, points, store)
    b = batch(["a", "b", "c"], starts=[time.time_ns() - 60 * 10**9])
    (out,) = asyncio.run(proc.handle_group([("telemetry/v1/d1/batch", encode_batch(b))]))
    proc.close()
    assert out.result == "written" and out.ack is not None
    assert (out.ack.status, out.ack.reason) == ("stored", "quota-series")
    assert len(points.requests[0]) == 2  # a and b
    assert [k for k in store.objects if k.startswith("quarantine/reason=quota-series/")]
    c = proc.stats.counters
    assert c["quarantined_quota-series"] == 1 and c["quota_windows_refused"] == 1
