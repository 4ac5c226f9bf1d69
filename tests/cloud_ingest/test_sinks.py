"""Sinks against real servers: InfluxDB 1.x, VictoriaMetrics (v2 write API), moto S3."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from cloud_ingest.config import ArchiveConfig, InfluxConfig
from cloud_ingest.sinks.archive import LocalArchive, S3Archive, open_archive
from cloud_ingest.sinks.influx import InfluxV1Sink, InfluxV2Sink, classify_status
from cloud_ingest.sinks.lineproto import absent_bit
from devstack import influxq
from devstack.services import Service, free_port, wait_until
from shared.errors import PermanentSinkError, RetryableSinkError, SinkLimitError

pytestmark = pytest.mark.integration

LINE = "window,device_id=d1,node=n,sensor=s,window=10s count=3i,invalid=0i,mean={v} {t}"


def test_v1_write_read_back_and_overwrite(influxdb: Service, influx_db: str) -> None:
    sink = InfluxV1Sink(InfluxConfig(api="v1", url=influxdb.url, database=influx_db))
    sink.write([LINE.format(v=0.1, t=10**19 // 10**1)])
    sink.write([LINE.format(v=0.30000000000000004, t=10**19 // 10**1)])  # a resend: same point
    w = influxq.v1_windows(influxdb.url, influx_db)
    assert len(w) == 1
    (point,) = w.values()
    assert point["mean"] == 0.30000000000000004 and point["count"] == 3
    sink.close()


def _revisions() -> tuple[list[str], list[str]]:
    """A window's first revision with every statistic, and a later one whose
    statistics are NaN but for min and max (what a hostile or broken device can send)."""
    import numpy as np

    from cloud_ingest.sinks.lineproto import FLOAT_FIELDS, batch_to_lines
    from shared.wire import SensorRef, WindowSpec, make_batch

    def batch(revision: int, value: float) -> list[str]:
        stats = {f: [value] for f in FLOAT_FIELDS}
        stats["min"], stats["max"] = [1.0], [1.0]
        return batch_to_lines(
            make_batch(
                device_id="d1", seq=1 + revision, created_ns=0,
                window=WindowSpec("tumbling", 10**10), sensors=(SensorRef("n", "s", ""),),
                columns={"sensor": [0], "start_ns": [10**18], "count": [4], "invalid": [0],
                         "revision": [revision], **stats},
            )
        )  # fmt: skip

    return batch(0, 1.0), batch(1, np.nan)


def test_a_later_revision_leaves_no_field_of_an_earlier_one(
    influxdb: Service, influx_db: str
) -> None:
    """InfluxDB keeps a field the later point leaves out; the later point's `absent`
    names it, and a reader that follows §5 sees exactly the later revision."""
    first, later = _revisions()
    assert first[0].endswith(" absent=0i 1000000000000000000".replace(" absent", ",absent"))
    sink = InfluxV1Sink(InfluxConfig(api="v1", url=influxdb.url, database=influx_db))
    sink.write(first)
    sink.write(later)
    sink.close()
    raw = influxq.influxql(influxdb.url, 'SELECT p50, absent FROM "window"', influx_db)
    ((_, p50, absent),) = raw["results"][0]["series"][0]["values"]
    assert p50 == 1.0  # the first revision's p50 is still there…
    assert absent & absent_bit("p50")  # …and the latest point says it is not its own
    # InfluxQL can leave such points out, as docs/wire-format.md §5 shows
    q = 'SELECT p50 FROM "window" WHERE absent & 128 = 0'
    assert "series" not in influxq.influxql(influxdb.url, q, influx_db)["results"][0]
    (point,) = influxq.v1_windows(influxdb.url, influx_db).values()
    assert point["revision"] == 1 and point["min"] == 1.0
    assert point["p50"] is None and point["mean"] is None


def test_v1_bad_line_protocol_is_permanent(influxdb: Service, influx_db: str) -> None:
    sink = InfluxV1Sink(InfluxConfig(api="v1", url=influxdb.url, database=influx_db))
    with pytest.raises(PermanentSinkError, match="HTTP 400"):
        sink.write(["window,device_id=d1 count=notanumber 1"])


def test_v1_missing_database_is_retryable(influxdb: Service) -> None:
    """An operator fixes a missing database; the batches must wait, not be quarantined."""
    sink = InfluxV1Sink(InfluxConfig(api="v1", url=influxdb.url, database="no_such_db"))
    with pytest.raises(RetryableSinkError, match="HTTP 404"):
        sink.write([LINE.format(v=1.0, t=1)])


def test_unreachable_influx_is_retryable() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for sink in (
        InfluxV1Sink(InfluxConfig(api="v1", url=url, timeout_s=2)),
        InfluxV2Sink(InfluxConfig(api="v2", url=url, timeout_s=2)),
    ):
        with pytest.raises(RetryableSinkError, match=r"unreachable|failed"):
            sink.write([LINE.format(v=1.0, t=1)])
        sink.close()


def test_status_classification() -> None:
    assert isinstance(classify_status(503, "", None), RetryableSinkError)
    e = classify_status(429, "", "7")
    assert isinstance(e, RetryableSinkError) and e.retry_after == 7.0
    assert isinstance(classify_status(400, "bad", None), PermanentSinkError)
    assert isinstance(classify_status(401, "auth", None), RetryableSinkError)
    # over the server's request size (max-body-size): its setting, not the batch's fault
    assert isinstance(classify_status(413, "big", None), SinkLimitError)


# InfluxDB 1.x's own answers (the messages of tsdb/shard.go and tsdb/index.go, as
# its shard tests expect them; tests/cloud_ingest/test_sinks.py checks one against a real server)
SERVER_STATE = [
    '{"error":"partial write: max-values-per-tag limit exceeded (100000/100000): '
    'measurement=\\"window\\" tag=\\"sensor\\" value=\\"s-100001\\" dropped=1"}',
    '{"error":"partial write: max-series-per-database limit exceeded: (1000000) dropped=1"}',
    '{"error":"partial write: field type conflict: input field \\"count\\" on measurement '
    '\\"window\\" is type float, already exists as type integer dropped=1"}',
]
BATCH_FAULT = [
    '{"error":"unable to parse \'window,device_id=a count=1i 1x\': bad timestamp"}',
    '{"error":"partial write: points beyond retention policy dropped=1"}',
]


@pytest.mark.parametrize("body", SERVER_STATE)
def test_a_refusal_for_the_servers_state_is_not_the_batchs_fault(body: str) -> None:
    assert isinstance(classify_status(400, body, None), SinkLimitError)


@pytest.mark.parametrize("body", BATCH_FAULT)
def test_a_refusal_for_the_batch_itself_is_permanent(body: str) -> None:
    assert type(classify_status(400, body, None)) is PermanentSinkError


def test_v2_write_through_influxdb_client(victoria: Service, unique: str) -> None:
    sink = InfluxV2Sink(
        InfluxConfig(api="v2", url=victoria.url, bucket="b", org="o", token="t", measurement="w")
    )
    t = 1_790_000_000 * 10**9
    # `absent` (docs/wire-format.md §5) is a number so that VictoriaMetrics keeps it
    sink.write(
        [f"w{unique},device_id=d1,node=n,sensor=s,window=10s count=5i,mean=2.5,absent=128i {t}"]
    )
    sink.close()

    def visible() -> bool:
        influxq.vm_flush(victoria.url)
        return bool(influxq.vm_windows(victoria.url, f"w{unique}"))

    wait_until(visible, 30, "VictoriaMetrics to show the point")
    (point,) = influxq.vm_windows(victoria.url, f"w{unique}").values()
    assert point == {"count": 5, "mean": 2.5, "absent": 128}


def test_s3_archive_put_get_list_overwrite(s3: Service, bucket: str) -> None:
    arc = open_archive(ArchiveConfig(url=f"s3://{bucket}/lake/v", s3_endpoint_url=s3.url))
    assert isinstance(arc, S3Archive)
    arc.put("batches/v1/device_id=d/seq=1.tlmb", b"one")
    arc.put("batches/v1/device_id=d/seq=1.tlmb", b"one")  # resend overwrites
    arc.put("batches/v1/device_id=d/seq=2.tlmb", b"two")
    assert arc.list("batches/") == [
        "batches/v1/device_id=d/seq=1.tlmb",
        "batches/v1/device_id=d/seq=2.tlmb",
    ]
    assert arc.get("batches/v1/device_id=d/seq=2.tlmb") == b"two"
    arc.close()


def test_s3_missing_bucket_is_retryable_not_a_crash(s3: Service, s3_env: dict[str, str]) -> None:
    arc = S3Archive("no-such-bucket", "", endpoint_url=s3.url, region="us-east-1")
    with pytest.raises(RetryableSinkError, match="NoSuchBucket"):
        arc.put("k", b"x")


def test_s3_unreachable_is_retryable(s3_env: dict[str, str]) -> None:
    arc = S3Archive("b", "", endpoint_url=f"http://127.0.0.1:{free_port()}", region="us-east-1")
    with pytest.raises(RetryableSinkError):
        arc.put("k", b"x")


def test_local_archive_is_atomic_and_contained(tmp_path: Path) -> None:
    arc = LocalArchive(tmp_path / "arc")
    arc.put("a/b.bin", b"1")
    arc.put("a/b.bin", b"22")
    assert arc.get("a/b.bin") == b"22" and arc.list("a") == ["a/b.bin"]
    assert not [p for p in (tmp_path / "arc").rglob("*") if p.name.startswith(".tmp-")]
    with pytest.raises(PermanentSinkError, match="escapes"):
        arc.put("../outside", b"x")


def test_influx_outage_then_recovery(fresh: Callable[[str], Service]) -> None:
    """A stopped InfluxDB gives retryable errors; the same write succeeds after restart."""
    svc = fresh("influxdb")
    influxq.create_database(svc.url, "t")
    sink = InfluxV1Sink(InfluxConfig(api="v1", url=svc.url, database="t", timeout_s=2))
    svc.stop()
    with pytest.raises(RetryableSinkError):
        sink.write([LINE.format(v=1.0, t=5)])
    svc.start()
    sink.write([LINE.format(v=1.0, t=5)])
    assert len(influxq.v1_windows(svc.url, "t")) == 1


def test_every_backend_method_raises_only_the_shared_errors(tmp_path: Path) -> None:
    """Errors are translated at one place per backend: whatever fails underneath (a
    directory that is a file, an S3 endpoint or an InfluxDB that refuses the
    connection), every method raises a SinkError (retryable or permanent), never
    an OSError, a botocore or a urllib3 exception."""
    from shared.errors import SinkError

    (tmp_path / "not-a-dir").write_text("a file where the lake should be\n")
    closed = f"http://127.0.0.1:{free_port()}"
    archives = [
        LocalArchive(tmp_path / "not-a-dir"),
        S3Archive("bucket", "lake", endpoint_url=closed, region="us-east-1"),
    ]
    key = "aggregates/dt=2026-01-01/part-1-ab-000001.parquet"
    calls: list[tuple[str, Callable[[], object]]] = []
    for a in archives:
        calls += [
            (f"{type(a).__name__}.put", lambda a=a: a.put(key, b"x")),
            (f"{type(a).__name__}.get", lambda a=a: a.get(key)),
            (f"{type(a).__name__}.list", lambda a=a: a.list("aggregates/dt=2026-01-01/")),
            (f"{type(a).__name__}.delete", lambda a=a: a.delete(key)),
        ]
    v1 = InfluxV1Sink(InfluxConfig(url=closed, timeout_s=2))
    v2 = InfluxV2Sink(InfluxConfig(api="v2", url=closed, org="o", token="t", timeout_s=2))
    calls += [("InfluxV1Sink.write", lambda: v1.write(["m v=1 1"]))]
    calls += [("InfluxV2Sink.write", lambda: v2.write(["m v=1 1"]))]
    try:
        for name, call in calls:
            try:
                call()
            except SinkError:
                continue
            except Exception as exc:  # noqa: BLE001 (what the test looks for)
                pytest.fail(f"{name} raised {type(exc).__name__}: {exc}")
            pytest.fail(f"{name} did not fail")
    finally:
        for a in archives:
            a.close()
        v1.close()
        v2.close()
