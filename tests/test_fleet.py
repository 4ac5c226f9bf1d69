"""Cloud ingest under a fleet (``firmware-sim fleet``) and under faults, against real
Mosquitto, InfluxDB 1.x and moto S3. Each test ends with exact counts: every window
of the fleet's ground truth is in InfluxDB once with its count, and the lake holds
exactly what InfluxDB holds."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from cloud_ingest.lake import archived_seqs
from cloud_ingest.sinks.archive import LocalArchive
from devstack import influxq
from devstack.faultproxy import FaultProxy
from devstack.pipeline import (
    BIN,
    IngestTarget,
    Pipeline,
    PipelineSpec,
    fleet_window_counts,
    toml_dumps,
)
from devstack.services import S3_ENV, Service, wait_until

pytestmark = pytest.mark.integration

DEVICES = 40
BATCHES = 6


def influx_counts(url: str, db: str) -> dict[tuple[str, str, str, int], int]:
    """Each window's count. A query while the ingestor writes can see a point's other
    fields before its count (InfluxDB 1.x reads each field on its own): such a row
    is left out here, and the final accounting, after the writes, sees it whole."""
    windows = influxq.v1_windows(url, db).items()
    return {k: int(v["count"]) for k, v in windows if v["count"] is not None}


def s3_copy(s3_url: str, bucket: str, dest: Path) -> Path:
    """Download the lake from S3 to ``dest``: what an analyst does before DuckDB."""
    c = boto3.client(
        "s3",
        endpoint_url=s3_url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            (dest / obj["Key"]).parent.mkdir(parents=True, exist_ok=True)
            c.download_file(bucket, obj["Key"], str(dest / obj["Key"]))
    return dest


@pytest.fixture
def moto_proxy(s3: Service) -> Iterator[FaultProxy]:
    proxy = FaultProxy(s3.port)
    yield proxy
    proxy.close()


def _pipe(tmp_path: Path, broker: Service, influx: Service, archive: dict[str, Any]) -> Pipeline:
    influxq.create_database(influx.url, "fleet")
    return Pipeline(
        PipelineSpec(
            workdir=tmp_path / "run",
            local_port=broker.port,
            cloud_port=broker.port,
            targets=[
                IngestTarget(
                    "i1",
                    {"api": "v1", "url": influx.url, "database": "fleet", "timeout_s": 2.0},
                    archive,
                    env=S3_ENV,
                    mqtt={"session_expiry_s": 600},
                )
            ],
        )
    )


def _check_exact(pipe: Pipeline, influx: Service, lake_root: Path, summary: dict[str, Any]) -> None:
    assert summary["acked"] == summary["batches"] == DEVICES * BATCHES, summary
    assert summary["rejected"] == 0 and summary["unacked"] == 0, summary
    truth = fleet_window_counts(pipe.fleet_truth)
    assert sum(truth.values()) == summary["readings"]
    assert influx_counts(influx.url, "fleet") == truth  # every window once, exact counts
    assert influxq.lake_windows(lake_root) == influxq.v1_windows(influx.url, "fleet")
    assert archived_seqs(LocalArchive(lake_root)) == {
        f"fleet-{d:05d}": set(range(1, BATCHES + 1)) for d in range(DEVICES)
    }


def _fleet(pipe: Pipeline, speed: float) -> Any:
    return pipe.start_fleet(
        "--devices", str(DEVICES),
        "--batches", str(BATCHES),
        "--speed", str(speed),
        "--ack-timeout", "20",
        "--timeout", "240",
    )  # fmt: skip


def _hold_outage(log: Path, what: str, seconds: float = 20.0) -> None:
    """Keep a service down for ``seconds`` and see the ingestor retry meanwhile."""
    down_at = time.monotonic()
    wait_until(lambda: f"{what}:" in log.read_text(), 30, f"the ingestor retrying {what}")
    wait_until(lambda: time.monotonic() - down_at >= seconds, seconds + 5, f"{seconds:g} s down")


def stop_and_wait_for_log(service: Service, log: Path, needle: bytes, what: str) -> None:
    """Stop ``service`` and wait for the ingestor to log ``needle`` after that."""
    offset = log.stat().st_size
    service.stop()

    def logged() -> bool:
        with log.open("rb") as fh:
            fh.seek(offset)
            return needle in fh.read()

    wait_until(logged, 60, what)


def stop_influx_until_a_batch_is_held(influx: Service, log: Path) -> None:
    """Stop InfluxDB and wait for the ingestor to log a failed write after it: from
    then on it holds a batch it has not written and not acknowledged."""
    stop_and_wait_for_log(influx, log, b"influx:", "the ingestor holding a batch it cannot write")


def test_fleet_through_one_ingestor_counts_exactly(
    fresh: Callable[[str], Service], s3: Service, bucket: str, tmp_path: Path
) -> None:
    broker, influx = fresh("mosquitto"), fresh("influxdb")
    pipe = _pipe(
        tmp_path, broker, influx, {"url": f"s3://{bucket}/lake", "s3_endpoint_url": s3.url}
    )
    try:
        pipe.start_ingestors()
        summary = pipe.finish_fleet(_fleet(pipe, speed=0), timeout_s=240)
    finally:
        pipe.stop_all()
    _check_exact(pipe, influx, s3_copy(s3.url, bucket, tmp_path / "copy") / "lake", summary)
    assert summary["ack_latency_p99_s"] > 0

    # replay rebuilds the same rows in an empty database, and again changes nothing
    influxq.create_database(influx.url, "replayed")
    cfg = tmp_path / "replay.toml"
    cfg.write_text(
        toml_dumps(
            {
                "influx": {"url": influx.url, "database": "replayed"},
                "archive": {"url": f"s3://{bucket}/lake", "s3_endpoint_url": s3.url},
            }
        )
    )

    def replay(*args: str) -> dict[str, Any]:
        res = subprocess.run(
            [str(BIN / "cloud-ingest"), "replay", "-c", str(cfg), *args],
            capture_output=True,
            env={**os.environ, **S3_ENV},
            timeout=120,
            check=False,
        )
        assert res.returncode == 0, res.stderr.decode()[-2000:]
        out: dict[str, Any] = json.loads(res.stdout)
        return out

    original = influxq.v1_windows(influx.url, "fleet")
    for _ in range(2):
        out = replay()
        assert out["points"] == len(original) and out["rejected"] == 0, out
        assert influxq.v1_windows(influx.url, "replayed") == original

    # one device, one window start: exactly its points
    influxq.influxql(influx.url, 'DROP DATABASE "replayed"', method="POST")
    influxq.create_database(influx.url, "replayed")
    second = sorted({k[3] for k in original})[1]
    out = replay("--device", "fleet-00003", "--since", str(second), "--until", str(second + 1))
    assert influxq.v1_windows(influx.url, "replayed") == {
        k: v for k, v in original.items() if k[0] == "fleet-00003" and k[3] == second
    }
    assert out["points"] == 10


def test_influxdb_down_for_20_s_loses_nothing(
    fresh: Callable[[str], Service], tmp_path: Path
) -> None:
    broker, influx = fresh("mosquitto"), fresh("influxdb")
    lake = tmp_path / "lake"
    pipe = _pipe(tmp_path, broker, influx, {"url": f"file://{lake}"})
    try:
        (ingestor,) = pipe.start_ingestors()
        fleet = _fleet(pipe, speed=2)  # 60 event-seconds in about 30 s
        wait_until(lambda: bool(influx_counts(influx.url, "fleet")), 60, "the first points")
        influx.stop()
        _hold_outage(ingestor.log, "influx")
        influx.start()
        summary = pipe.finish_fleet(fleet, timeout_s=240)
    finally:
        pipe.stop_all()
    _check_exact(pipe, influx, lake, summary)


def test_s3_down_for_20_s_loses_nothing(
    fresh: Callable[[str], Service],
    s3: Service,
    bucket: str,
    moto_proxy: FaultProxy,
    tmp_path: Path,
) -> None:
    broker, influx = fresh("mosquitto"), fresh("influxdb")
    archive = {"url": f"s3://{bucket}/lake", "s3_endpoint_url": moto_proxy.url}
    pipe = _pipe(tmp_path, broker, influx, archive)
    try:
        (ingestor,) = pipe.start_ingestors()
        fleet = _fleet(pipe, speed=2)
        wait_until(lambda: bool(influx_counts(influx.url, "fleet")), 60, "the first points")
        moto_proxy.down()
        _hold_outage(ingestor.log, "archive")
        moto_proxy.up()
        summary = pipe.finish_fleet(fleet, timeout_s=240)
    finally:
        pipe.stop_all()
    _check_exact(pipe, influx, s3_copy(s3.url, bucket, tmp_path / "copy") / "lake", summary)


def test_ingestor_killed_mid_batch_under_a_fleet_loses_nothing(
    fresh: Callable[[str], Service], tmp_path: Path
) -> None:
    """InfluxDB stops so that the ingestor holds batches it has archived but not
    written; it is SIGKILLed holding them. The broker redelivers them to the
    restarted ingestor (it never acknowledged them), and the counts come out exact."""
    broker, influx = fresh("mosquitto"), fresh("influxdb")
    lake = tmp_path / "lake"
    pipe = _pipe(tmp_path, broker, influx, {"url": f"file://{lake}"})
    try:
        (ingestor,) = pipe.start_ingestors()
        fleet = _fleet(pipe, speed=2)
        wait_until(lambda: bool(influx_counts(influx.url, "fleet")), 60, "the first points")
        stop_influx_until_a_batch_is_held(influx, ingestor.log)
        ingestor.popen.kill()
        ingestor.popen.wait()
        influx.start()
        pipe.start_ingestors()
        summary = pipe.finish_fleet(fleet, timeout_s=240)
    finally:
        pipe.stop_all()
    _check_exact(pipe, influx, lake, summary)


def test_sigterm_drains_what_it_holds_and_exits_within_the_bound(
    fresh: Callable[[str], Service], tmp_path: Path
) -> None:
    """SIGTERM twice under load: with InfluxDB up the ingestor finishes the batches in
    hand and exits at once; with InfluxDB down it retries them for at most
    retry.shutdown_grace_s (10 s), exits 0 without acknowledging them, and the next
    ingestor gets them from the broker. The counts come out exact."""
    broker, influx = fresh("mosquitto"), fresh("influxdb")
    lake = tmp_path / "lake"
    pipe = _pipe(tmp_path, broker, influx, {"url": f"file://{lake}"})
    try:
        (ingestor,) = pipe.start_ingestors()
        fleet = _fleet(pipe, speed=2)
        wait_until(lambda: bool(influx_counts(influx.url, "fleet")), 60, "the first points")
        t0 = time.monotonic()
        assert ingestor.terminate(timeout_s=30) == 0
        drained_in = time.monotonic() - t0
        assert drained_in < 5, f"a healthy drain took {drained_in:.1f} s"
        (ingestor,) = pipe.start_ingestors()
        stop_influx_until_a_batch_is_held(influx, ingestor.log)
        t0 = time.monotonic()
        assert ingestor.terminate(timeout_s=60) == 0
        bounded_in = time.monotonic() - t0
        assert bounded_in < 10 + 5, f"shutdown with InfluxDB down took {bounded_in:.1f} s"
        assert b"gave up retrying at shutdown" in ingestor.log.read_bytes()
        influx.start()
        pipe.start_ingestors()
        summary = pipe.finish_fleet(fleet, timeout_s=240)
    finally:
        pipe.stop_all()
    _check_exact(pipe, influx, lake, summary)


def test_cloud_broker_restart_loses_nothing(
    fresh: Callable[[str], Service], tmp_path: Path
) -> None:
    """The cloud broker stops mid-run and comes back with its persisted sessions: the
    ingestor reconnects, gets again what it had not acknowledged, and the fleet's
    unacknowledged batches are resent. Nothing is lost or counted twice."""
    broker, influx = fresh("mosquitto"), fresh("influxdb")
    lake = tmp_path / "lake"
    pipe = _pipe(tmp_path, broker, influx, {"url": f"file://{lake}"})
    try:
        (ingestor,) = pipe.start_ingestors()
        fleet = _fleet(pipe, speed=2)
        wait_until(lambda: bool(influx_counts(influx.url, "fleet")), 60, "the first points")
        stop_and_wait_for_log(
            broker, ingestor.log, b"reconnecting", "the ingestor to notice the broker is gone"
        )
        broker.start()
        summary = pipe.finish_fleet(fleet, timeout_s=240)
    finally:
        pipe.stop_all()
    _check_exact(pipe, influx, lake, summary)
    assert b"subscribed to" in ingestor.log.read_bytes().split(b"reconnecting", 1)[1]


def test_fleet_batches_carry_the_mqtt_v5_properties(mosquitto: Service, tmp_path: Path) -> None:
    """docs/wire-format.md §2.1: content type, binary payload, user properties seq and
    schema, as the agent's forwarder sends them."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from shared.wire import CONTENT_TYPE

    got: list[mqtt.MQTTMessage] = []
    sub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sub.on_message = lambda _c, _u, m: got.append(m)
    sub.connect("127.0.0.1", mosquitto.port)
    prefix = f"p{os.getpid()}/v1"
    sub.subscribe(f"{prefix}/+/batch", qos=1)
    sub.loop_start()
    try:
        res = subprocess.run(
            [str(BIN / "firmware-sim"), "fleet", "--port", str(mosquitto.port),
             "--prefix", prefix, "--devices", "1", "--batches", "2", "--speed", "0",
             "--timeout", "2"],
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        assert res.returncode == 1  # no ingestor acks them: that is not the point here
        wait_until(lambda: len(got) >= 2, 10, "the fleet's batches")
    finally:
        sub.loop_stop()
        sub.disconnect()
    for m in got[:2]:
        props = m.properties
        assert props is not None
        assert props.ContentType == CONTENT_TYPE and props.PayloadFormatIndicator == 0
        user = dict(props.UserProperty)
        assert user["schema"] == "1" and int(user["seq"]) >= 1
