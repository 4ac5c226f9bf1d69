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
from tests.conftest import SpecFactory

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


def metric_values(http_port: int, family: str) -> dict[str, float]:
    """The samples of one metric family on cloud-ingest's /metrics, by label value."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(family + "{"):
            label = line.split('"')[1]
            out[label] = float(line.rsplit(" ", 1)[1])
    return out


def test_one_hostile_device_costs_the_fleet_nothing(
    pipeline_spec: SpecFactory, fresh: Callable[[str], Service], tmp_path: Path
) -> None:
    """Issue 20, "Done means": while one authenticated device does each thing that cost
    the fleet before (thousands of new series, windows across years and one in 1678,
    an alert 400 days ahead, a message over the size limit, a flood of 1,500 bad
    messages a second), and another re-creates its buffer (its seqs start at 1 again),
    every batch of a fleet of 40 devices is acked and stored once, with exact counts,
    and their acks wait seconds, not minutes."""
    import threading

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from devstack import hostile
    from devstack.services import free_port

    broker, influx = fresh("mosquitto"), fresh("influxdb")
    influxq.create_database(influx.url, "fleet")
    lake = tmp_path / "lake"
    http = free_port()
    pipe = Pipeline(
        pipeline_spec(
            broker=broker,
            targets=[
                IngestTarget(
                    "i1",
                    {"api": "v1", "url": influx.url, "database": "fleet"},
                    {"url": f"file://{lake}"},
                    http={"listen": f"127.0.0.1:{http}"},
                    top={"quotas": {"state_file": str(tmp_path / "quotas.sqlite")}},
                )
            ],
        )
    )
    now = time.time_ns()
    width = 10 * 10**9
    evil, reflash = "evil", "reflash"
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    published = threading.Event()

    def attack() -> None:
        def send(device: str, payload: bytes, kind: str = "batch") -> None:
            client.publish(f"telemetry/v1/{device}/{kind}", payload, qos=1)

        # a buffer re-created (a new SD card): seqs 1 and 2 again, a new generation
        start = (now // width - 20) * width
        for gen, first in ((111, start), (222, start + 5 * width)):
            for seq in (1, 2):
                send(reflash, hostile.device_batch(reflash, seq, [first + seq * width],
                                                   ["t"], generation=gen))  # fmt: skip
        for payload in hostile.new_series_batches(evil, 1, 3, 1000, start):
            send(evil, payload)
        for payload, _reason in hostile.time_attack_batches(evil, 10, now):
            send(evil, payload)
        send(evil, hostile.future_alert(20, now), "alert")
        # over limits.max_payload_bytes (1 MiB), within the Maximum Packet Size the
        # ingestor announces (what is over that, the broker drops for it)
        send(evil, b"\0" * ((1 << 20) + 4096))
        hostile.flood(lambda junk: send(evil, junk), 1500, 6000)  # 1,500 a second for 4 s
        published.set()

    try:
        pipe.start_ingestors()
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        fleet = _fleet(pipe, speed=10.0)  # a round of 40 batches every second
        attacker = threading.Thread(target=attack)
        attacker.start()
        summary = pipe.finish_fleet(fleet, timeout_s=240)
        attacker.join(60)
        assert published.is_set()
        # the fleet: every batch acked and stored once, with exact counts
        assert summary["acked"] == summary["batches"] == DEVICES * BATCHES, summary
        assert summary["rejected"] == 0 and summary["unacked"] == 0, summary
        truth = fleet_window_counts(pipe.fleet_truth)
        innocent = {k: v for k, v in influx_counts(influx.url, "fleet").items()
                    if k[0].startswith("fleet-")}  # fmt: skip
        assert innocent == truth
        p99 = summary["ack_latency_p99_s"]
        print(f"[one device] fleet acks under the flood: p50 "
              f"{summary['ack_latency_p50_s']:.3f} s, p99 {p99:.3f} s")  # fmt: skip
        assert p99 < 10, summary  # seconds, not the 171 s of before

        def counted() -> bool:
            q = metric_values(http, "cloud_ingest_quarantined_total")
            return q.get("bad-magic", 0) >= 1 and q.get("too-large", 0) >= 1

        wait_until(counted, 60, "the ingestor to count the attack")
        q = metric_values(http, "cloud_ingest_quarantined_total")
        deferred = metric_values(http, "cloud_ingest_deferred_total")
        assert q["time-too-old"] >= 2 and q["time-span"] >= 1 and q["time-too-new"] >= 2, q
        assert q["quota-new-series"] >= 1, q
        assert deferred["rate"] >= 1, deferred  # most of the flood, before decoding
        # the series the hostile device has in InfluxDB: its day's allowance, no more
        evil_sensors = {k[2] for k in influx_counts(influx.url, "fleet") if k[0] == evil}
        assert 0 < len(evil_sensors) <= 500, len(evil_sensors)
        # windows across years made no lake partition of their own
        days = sorted(p.name for p in (lake / "aggregates").iterdir())
        assert len(days) <= 2, days
        # the re-created buffer's batches were written, not taken for resends
        re = {k[3] for k in influx_counts(influx.url, "fleet") if k[0] == reflash}
        assert len(re) == 4, re
        # the oversized message is in the quarantine as a 64 KiB prefix and its size
        big = list((lake / "quarantine" / "reason=too-large").glob("*.bin"))
        assert big and all(p.stat().st_size <= 65536 for p in big)
        meta = json.loads(big[0].with_suffix(".json").read_text())
        assert meta["bytes"] == (1 << 20) + 4096 and meta["kept_bytes"] == 65536
    finally:
        client.disconnect()
        client.loop_stop()
        pipe.stop_all()
