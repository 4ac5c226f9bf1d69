"""The whole path through real processes, checked reading by reading against the ground truth.

firmware-sim → Mosquitto (device) → edge-agent → Mosquitto (cloud) → two cloud-ingest
processes, one writing InfluxDB 1.x + S3 (moto), the other the v2 write API
(VictoriaMetrics) + a local archive directory.
"""

from __future__ import annotations

import json
import random
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import duckdb
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from cloud_ingest.lake import archived_seqs
from cloud_ingest.sinks.archive import LocalArchive, S3Archive
from cloud_ingest.sinks.base import ObjectStore
from devstack import influxq
from devstack.pipeline import BIN, IngestTarget, Pipeline, PipelineSpec, toml_dumps
from devstack.services import S3_ENV, Service, wait_until
from edge_agent import counters
from firmware_sim.truth import truth_by_sensor
from tests.conftest import SpecFactory

pytestmark = pytest.mark.integration

WIDTH_S = 10.0
WIDTH = int(WIDTH_S * 1e9)


def expected_windows(
    truth: Path,
    hop: int = WIDTH,
    width: int = WIDTH,
    starts: tuple[int, int] = (0, 2**63),
) -> dict[tuple[str, str, int], dict[str, float]]:
    """Per-window statistics computed straight from the truth file with numpy, for
    windows [s, s + width) starting at every multiple of ``hop`` in ``starts``
    ([from, to): a span of a width, when the width changed)."""
    out = {}
    for (node, sensor), (ts, vals) in truth_by_sensor(truth).items():
        first = (ts.min() // hop) * hop - width + hop
        for st in range(int(first), int(ts.max()) + 1, hop):
            if not starts[0] <= st < starts[1]:
                continue
            v = vals[(ts >= st) & (ts < st + width)]
            if len(v) == 0:
                continue
            q50, q90, q99 = np.quantile(v, [0.5, 0.9, 0.99])
            out[(node, sensor, int(st))] = {
                "sum": v.sum(),
                "p50": q50,
                "p90": q90,
                "p99": q99,
                "count": len(v),
                "min": v.min(),
                "max": v.max(),
                "mean": v.mean(),
                "stddev": v.std(),
                "first": v[0],
                "last": v[-1],
            }
    return out


def v1_target(
    url: str,
    db: str,
    archive: Path,
    *,
    name: str = "v1",
    mqtt: dict[str, Any] | None = None,
    **influx: Any,
) -> IngestTarget:
    """An ingestor writing InfluxDB 1.x and a local archive directory."""
    return IngestTarget(
        name,
        {"api": "v1", "url": url, "database": db, **influx},
        {"url": f"file://{archive}"},
        mqtt=mqtt or {},
    )


def compare(
    name: str,
    device: str,
    exp: dict[tuple[str, str, int], dict[str, float]],
    got: dict[tuple[str, str, str, int], dict[str, Any]],
    rel: float,
) -> None:
    assert set(got) == {(device, *k) for k in exp}, f"{name}: windows differ"
    for (node, sensor, start), e in exp.items():
        g = got[(device, node, sensor, start)]
        assert int(g["count"]) == e["count"], (name, node, sensor, start)
        assert int(g.get("invalid", 0)) == 0
        for f in ("min", "max", "mean", "stddev", "first", "last", "sum", "p50", "p90", "p99"):
            assert g[f] == pytest.approx(e[f], rel=rel, abs=1e-12), (name, f, node, sensor, start)


def test_end_to_end_exact_accounting(
    fresh: Callable[[str], Service],
    influxdb: Service,
    influx_db: str,
    victoria: Service,
    s3: Service,
    bucket: str,
    tmp_path: Path,
    unique: str,
) -> None:
    local = fresh("mosquitto")
    cloud = fresh("mosquitto")
    local_archive = tmp_path / "archive"
    device = f"dev-{unique}"
    spec = PipelineSpec(
        workdir=tmp_path / "run",
        local_port=local.port,
        cloud_port=cloud.port,
        device_id=device,
        duration_s=60.0,
        speed=15.0,
        seed=7,
        width_s=WIDTH_S,
        # event time runs 15x faster than the clock: start in the past so that no
        # reading is in the future (VictoriaMetrics hides future samples)
        start_ns=(time.time_ns() // WIDTH - 8) * WIDTH + 123_456_789,
        # wire format v2 (docs/wire-format.md §2.14), on its own topic: every other
        # pipeline test sends v1
        agent_tables={"forward": {"wire_version": 2}},
        targets=[
            IngestTarget(
                "v1-s3",
                {"api": "v1", "url": influxdb.url, "database": influx_db},
                {"url": f"s3://{bucket}/lake", "s3_endpoint_url": s3.url},
                env=S3_ENV,
            ),
            IngestTarget(
                "v2-local",
                {
                    "api": "v2",
                    "url": victoria.url,
                    "org": "o",
                    "bucket": "b",
                    "token": "t",
                    "measurement": f"w{unique}",
                },
                {"url": f"file://{local_archive}"},
            ),
        ],
    )
    pipe = Pipeline(spec)
    s3c = boto3.client(
        "s3",
        endpoint_url=s3.url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )

    def s3_keys() -> list[str]:
        resp = s3c.list_objects_v2(Bucket=bucket, Prefix="lake/aggregates/")
        return sorted(o["Key"] for o in resp.get("Contents", []))

    def local_keys() -> list[str]:
        return LocalArchive(local_archive).list("aggregates/")

    s3_lake = S3Archive(bucket, "lake", endpoint_url=s3.url, region="us-east-1")
    s3_lake.client = s3c  # with the test's credentials
    topics: list[str] = []  # what the agent publishes its batches on
    watcher = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    watcher.on_message = lambda _c, _u, msg: topics.append(msg.topic)
    watcher.connect("127.0.0.1", cloud.port)
    watcher.subscribe("telemetry/+/+/batch")
    watcher.loop_start()

    def archived(store: ObjectStore) -> int:
        return sum(len(seqs) for seqs in archived_seqs(store).values())

    def arrived(produced: int) -> bool:
        influxq.vm_flush(victoria.url)
        batches = int(pipe.agent_status()["counters"].get("batches_created", -1))
        return (
            influxq.total_count(influxq.v1_windows(influxdb.url, influx_db)) == produced
            and influxq.total_count(influxq.vm_windows(victoria.url, f"w{unique}")) == produced
            and archived(s3_lake) == batches
            and archived(LocalArchive(local_archive)) == batches
        )

    try:
        res = pipe.run(arrived, deliver_timeout_s=90)
    finally:
        pipe.stop_all()
        watcher.loop_stop()
        watcher.disconnect()
    assert res.arrived, "the sinks never held every reading"
    assert topics and set(topics) == {f"telemetry/v2/{device}/batch"}

    # the agent took every reading, dropped none, and the broker acknowledged every batch
    c = res.counters
    assert res.produced == 60 + 60 + 60 * 200
    assert c["readings_stored"] == res.produced and c.get("dropped_late", 0) == 0
    # ... and the cloud acknowledged every batch: the outbox is empty
    assert c["batches_acked"] == c["batches_created"] >= 1
    assert pipe.agent_status()["outbox"] == {}

    exp = expected_windows(pipe.truth)
    assert sum(e["count"] for e in exp.values()) == res.produced
    compare("influxdb-1.x", device, exp, influxq.v1_windows(influxdb.url, influx_db), 1e-9)
    # VictoriaMetrics keeps 12 significant digits, still well inside 1e-9 relative
    compare("victoria-metrics", device, exp, influxq.vm_windows(victoria.url, f"w{unique}"), 1e-9)

    # every health report the agent made is in InfluxDB once, from start to stop
    reports = influxq.rows(
        influxdb.url,
        f"SELECT seq, reason, state, readings_stored FROM agent_health "
        f"WHERE device_id = '{device}'",
        influx_db,
    )
    assert c["health_reports"] >= 2 and "dropped_health" not in c
    assert c["health_acked"] == c["health_reports"] == len(reports)
    assert len({r["seq"] for r in reports}) == len(reports)
    assert reports[0]["reason"] == "start" and reports[-1]["reason"] == "stop"
    assert reports[-1]["readings_stored"] == res.produced

    # every delivered batch in both lakes (health reports take seqs from the same counter)
    seqs = set(range(1, c["batches_created"] + len(reports) + 1)) - {r["seq"] for r in reports}
    assert archived_seqs(LocalArchive(local_archive)) == {device: seqs}
    assert archived_seqs(s3_lake) == {device: seqs}
    assert len(s3_keys()) <= c["batches_created"] and len(local_keys()) <= c["batches_created"]
    # DuckDB over a local copy of the S3 lake returns exactly the rows InfluxDB holds
    copy = tmp_path / "s3-copy"
    for key in s3_keys():
        (copy / key).parent.mkdir(parents=True, exist_ok=True)
        s3c.download_file(bucket, key, str(copy / key))
    assert influxq.lake_windows(copy / "lake") == influxq.v1_windows(influxdb.url, influx_db)
    assert influxq.lake_windows(local_archive) == influxq.lake_windows(copy / "lake")

    check_rollups(pipe.truth, device, local_archive, influxdb.url, influx_db, tmp_path)


def check_rollups(
    truth: Path, device: str, lake: Path, influx_url: str, db: str, tmp_path: Path
) -> None:
    """``cloud-ingest rollup`` from the lake: per hour and day, counts and moments exact,
    quantiles (from merged sketches) within the sketch's 1 % of the exact ones."""
    cfg = tmp_path / "rollup.toml"
    cfg.write_text(toml_dumps({"influx": {"url": influx_url, "database": db}}))
    by_sensor = truth_by_sensor(truth)
    lo = min(int(ts.min()) for ts, _ in by_sensor.values())
    hi = max(int(ts.max()) for ts, _ in by_sensor.values()) + 1
    res = subprocess.run(
        [str(BIN / "cloud-ingest"), "rollup", "-c", str(cfg), "--from", f"file://{lake}",
         "--since", str(lo), "--until", str(hi)],
        capture_output=True, timeout=120, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    for period, pns in (("1h", 3600 * 10**9), ("1d", 86_400 * 10**9)):
        got = influxq.influxql(influx_url, f'SELECT * FROM "window_{period}"', db)
        rows = {}
        for series in got["results"][0]["series"]:
            for row in series["values"]:
                rec = dict(zip(series["columns"], row, strict=True))
                if rec["device_id"] == device:
                    rows[(rec["node"], rec["sensor"], int(rec["time"]))] = rec
        want_keys = set()
        for (node, sensor), (ts, vals) in by_sensor.items():
            for t in np.unique(ts // pns * pns).tolist():
                v = vals[(ts >= t) & (ts < t + pns)]
                want_keys.add((node, sensor, t))
                r = rows[(node, sensor, t)]
                assert r["count"] == len(v)
                for name, exact in (("sum", v.sum()), ("mean", v.mean()), ("stddev", v.std()),
                                    ("min", v.min()), ("max", v.max())):  # fmt: skip
                    assert r[name] == pytest.approx(exact, rel=1e-9, abs=1e-9), (period, name)
                for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
                    exact = float(np.quantile(v, q, method="lower"))
                    assert abs(r[name] - exact) <= 0.01 * abs(exact) + 1e-9, (period, name)
        assert set(rows) == want_keys


def test_ingestor_killed_mid_batch_loses_nothing(
    pipeline_spec: SpecFactory, fresh: Callable[[str], Service], tmp_path: Path, unique: str
) -> None:
    """The ingestor takes a batch from the broker, cannot write it (InfluxDB is down) and
    is SIGKILLed holding it, twice. It had not acknowledged the batch to the broker
    (that happens only after both sinks hold it), so the broker redelivers it to the
    restarted ingestor's session; the agent's resends after the missing cloud ack are
    the second line. InfluxDB ends with every reading exactly once, the archive with
    every batch once."""
    broker = fresh("mosquitto")
    influx = fresh("influxdb")
    influxq.create_database(influx.url, "t")
    archive = tmp_path / "archive"
    device = f"dev-{unique}"
    spec = pipeline_spec(
        broker=broker,
        device_id=device,
        duration_s=120.0,
        speed=8.0,
        seed=11,
        width_s=WIDTH_S,
        start_ns=(time.time_ns() // WIDTH - 14) * WIDTH + 1_000_000,
        ack_timeout_s=1.0,
        targets=[v1_target(influx.url, "t", archive, timeout_s=1.0)],
    )
    pipe = Pipeline(spec)

    def counter(name: str) -> int:
        return int(pipe.agent_status()["counters"].get(name, 0))

    def archived() -> int:
        return len(archived_seqs(LocalArchive(archive)).get(device, ()))

    try:
        ingestors = pipe.start_ingestors()
        agent = pipe.start_agent()
        sim = pipe.start_sim()
        for target in (2, 6):
            wait_until(lambda t=target: counter("batches_acked") >= t, 60, f"{target} acks")
            influx.stop()
            # the archive write succeeds, the InfluxDB write retries: a batch in hand
            wait_until(lambda: archived() > counter("batches_acked"), 60, "a batch in hand")
            ingestors[0].popen.kill()
            ingestors[0].popen.wait()
            influx.start()
            ingestors = pipe.start_ingestors()
        produced = int(pipe.finish_sim(sim, timeout_s=120)["produced"])
        pipe.wait_agent_has(produced, timeout_s=60)
        assert agent.terminate(timeout_s=90) == 0  # drains until every batch is acked
        c = pipe.agent_status()["counters"]
        assert c["batches_acked"] == c["batches_created"] and pipe.agent_status()["outbox"] == {}
        # every counter a running agent kept is a name of its registry
        assert c and not [n for n in c if not counters.is_registered(n)], c
        windows = influxq.v1_windows(influx.url, "t")
        assert influxq.total_count(windows) == produced
        exp = expected_windows(pipe.truth)
        assert {k: int(v["count"]) for k, v in windows.items()} == {
            (device, *k): v["count"] for k, v in exp.items()
        }
        assert archived_seqs(LocalArchive(archive)) == {device: pipe.batch_seqs(influx.url, "t")}
    finally:
        pipe.stop_all()


def test_twenty_sigkills_of_the_agent_count_every_reading_once_in_influxdb(
    pipeline_spec: SpecFactory,
    fresh: Callable[[str], Service],
    influxdb: Service,
    influx_db: str,
    tmp_path: Path,
    unique: str,
) -> None:
    """SIGKILL the agent 20 times at random moments (chosen by how far intake has got,
    so they fall during intake, window closing and forwarding alike), restart it each
    time; InfluxDB must end with every reading of the ground truth exactly once."""
    broker = fresh("mosquitto")
    device = f"dev-{unique}"
    spec = pipeline_spec(
        broker=broker,
        device_id=device,
        duration_s=900.0,
        speed=20.0,
        seed=5,
        width_s=WIDTH_S,
        start_ns=(time.time_ns() // WIDTH - 92) * WIDTH + 3_000_000,
        ack_timeout_s=1.0,
        targets=[v1_target(influxdb.url, influx_db, tmp_path / "archive")],
    )
    pipe = Pipeline(spec)
    rng = random.Random(20)

    def stored() -> int:
        return int(pipe.agent_status()["counters"].get("readings_stored", 0))

    try:
        pipe.start_ingestors()
        agent = pipe.start_agent(flush_on_shutdown=False)
        sim = pipe.start_sim()
        for _ in range(20):
            target = stored() + rng.randint(300, 3000)
            wait_until(
                lambda t=target: stored() >= t or sim.poll() is not None,
                60,
                f"intake to reach {target}",
            )
            agent.popen.kill()
            agent.popen.wait()
            agent = pipe.start_agent(flush_on_shutdown=False)
        produced = int(pipe.finish_sim(sim, timeout_s=120)["produced"])
        pipe.wait_agent_has(produced, timeout_s=60)
        assert agent.terminate() == 0
        agent = pipe.start_agent(flush_on_shutdown=True)
        assert agent.terminate(timeout_s=90) == 0  # closes the last windows, drains all acks
        c = pipe.agent_status()["counters"]
        assert c["readings_stored"] == produced
        assert not {k: v for k, v in c.items() if k.startswith("dropped_") and v}
        assert c["batches_acked"] == c["batches_created"]
        windows = influxq.v1_windows(influxdb.url, influx_db)
        exp = expected_windows(pipe.truth)
        assert {k: int(v["count"]) for k, v in windows.items()} == {
            (device, *k): v["count"] for k, v in exp.items()
        }
        assert influxq.total_count(windows) == produced
    finally:
        pipe.stop_all()


LATE_NODES = """
[[nodes]]
id = "env-1"
  [[nodes.sensors]]
  name = "temperature"
  kind = "temperature"
  rate_hz = 1.0
  unit = "degC"
[[nodes]]
id = "slow-1"
  [[nodes.sensors]]
  name = "humidity"
  kind = "humidity"
  rate_hz = 2.0
  chunk = 2
  unit = "%RH"
  delay_s = 6.0
"""


def test_late_readings_revise_windows_in_influxdb(
    pipeline_spec: SpecFactory,
    fresh: Callable[[str], Service],
    influxdb: Service,
    influx_db: str,
    tmp_path: Path,
    unique: str,
) -> None:
    """A node whose messages arrive 6 s late (lateness is 2 s): its windows are first sent
    without its readings, then revised; InfluxDB ends with the exact counts of the truth."""
    broker = fresh("mosquitto")
    device = f"dev-{unique}"
    spec = pipeline_spec(
        broker=broker,
        device_id=device,
        duration_s=60.0,
        speed=6.0,
        seed=9,
        width_s=WIDTH_S,
        start_ns=(time.time_ns() // WIDTH - 8) * WIDTH + 400_000_000,
        sim_config=LATE_NODES,
        targets=[v1_target(influxdb.url, influx_db, tmp_path / "archive")],
    )
    pipe = Pipeline(spec)

    def arrived(produced: int) -> bool:
        return influxq.total_count(influxq.v1_windows(influxdb.url, influx_db)) == produced

    try:
        res = pipe.run(arrived, deliver_timeout_s=60)
    finally:
        pipe.stop_all()
    assert res.arrived
    c = res.counters
    assert c["windows_revised"] > 0 and c["readings_late_accepted"] > 0
    assert not {k: v for k, v in c.items() if k.startswith("dropped_") and v}
    windows = influxq.v1_windows(influxdb.url, influx_db)
    exp = expected_windows(pipe.truth)
    compare("influxdb-1.x", device, exp, windows, 1e-9)
    revised = [k for k, w in windows.items() if int(w["revision"]) > 0]
    assert revised and all(k[2] == "humidity" for k in revised)

    # the lake holds every version until compaction; its query gives InfluxDB's rows
    lake = tmp_path / "archive"
    assert influxq.lake_windows(lake) == windows
    days = sorted({time.strftime("%Y-%m-%d", time.gmtime(k[3] // 10**9)) for k in windows})
    res2 = subprocess.run(
        [str(BIN / "cloud-ingest"), "compact", "--from", f"file://{lake}",
         "--since-day", days[0], "--until-day", days[-1]],
        capture_output=True, timeout=120, check=False,
    )  # fmt: skip
    assert res2.returncode == 0, res2.stderr.decode()[-2000:]
    stats = json.loads(res2.stdout)
    assert stats["rows_in"] > stats["rows_out"] == len(windows)
    # after compaction the revised windows have replaced the earlier versions in the
    # lake itself: a plain read (no latest-revision query) returns InfluxDB's rows
    con = duckdb.connect()
    rows = con.execute(
        "SELECT device_id, node, sensor, epoch_ns(window_start), count, revision, mean"
        f" FROM read_parquet('{lake}/aggregates/*/*.parquet', hive_partitioning = true)"
    ).fetchall()
    assert len(rows) == len(windows)
    assert {(r[0], r[1], r[2], r[3]): (r[4], r[5], r[6]) for r in rows} == {
        k: (w["count"], w["revision"], w["mean"]) for k, w in windows.items()
    }


def test_hopping_windows_end_to_end(
    pipeline_spec: SpecFactory,
    fresh: Callable[[str], Service],
    influxdb: Service,
    influx_db: str,
    tmp_path: Path,
    unique: str,
) -> None:
    """10 s windows every 5 s: every overlapping window in InfluxDB matches numpy."""
    broker = fresh("mosquitto")
    device = f"dev-{unique}"
    hop = WIDTH // 2
    spec = pipeline_spec(
        broker=broker,
        device_id=device,
        duration_s=40.0,
        speed=8.0,
        seed=13,
        width_s=WIDTH_S,
        hop_s=5.0,
        start_ns=(time.time_ns() // WIDTH - 6) * WIDTH + 2_500_000_000,
        targets=[v1_target(influxdb.url, influx_db, tmp_path / "archive")],
    )
    pipe = Pipeline(spec)
    exp: dict[tuple[str, str, int], dict[str, float]] = {}

    def arrived(produced: int) -> bool:
        if not exp:
            exp.update(expected_windows(pipe.truth, hop))
        return len(influxq.v1_windows(influxdb.url, influx_db)) == len(exp)

    try:
        res = pipe.run(arrived, deliver_timeout_s=60)
    finally:
        pipe.stop_all()
    assert res.arrived
    windows = influxq.v1_windows(influxdb.url, influx_db)
    compare("hopping", device, exp, windows, 1e-9)
    # every reading is in width / hop = 2 windows
    assert influxq.total_count(windows) == 2 * res.produced


def test_three_ingestors_share_the_load_and_survive_losing_one(
    pipeline_spec: SpecFactory,
    fresh: Callable[[str], Service],
    influxdb: Service,
    influx_db: str,
    tmp_path: Path,
    unique: str,
) -> None:
    """Three cloud-ingest processes behind one MQTT v5 shared subscription: each gets part
    of the batches, every batch is written once, and when one is SIGKILLed the other two
    carry on (the agent resends what the dead one held) with nothing lost."""
    broker = fresh("mosquitto")
    device = f"dev-{unique}"
    # A short session expiry: the broker forgets a dead member (and what it queued for
    # it) after 2 s instead of routing a third of the batches to it for a week; the
    # agent's resends after the missing acks bring those back.
    shared = {
        "subscription": "$share/ingest/telemetry/v1/+/batch",
        "alert_subscription": "$share/ingest/telemetry/v1/+/alert",
        "session_expiry_s": 2,
    }
    archive = tmp_path / "archive"
    spec = pipeline_spec(
        broker=broker,
        device_id=device,
        duration_s=600.0,
        speed=30.0,
        seed=21,
        width_s=WIDTH_S,
        start_ns=(time.time_ns() // WIDTH - 62) * WIDTH + 7_000_000,
        ack_timeout_s=1.0,
        agent_tables={"forward": {"max_windows_per_batch": 1}},  # many small batches
        targets=[
            v1_target(influxdb.url, influx_db, archive, name=f"i{k}", mqtt=shared) for k in range(3)
        ],
    )
    pipe = Pipeline(spec)

    def counter(name: str) -> int:
        return int(pipe.agent_status()["counters"].get(name, 0))

    try:
        ingestors = pipe.start_ingestors()
        agent = pipe.start_agent()
        sim = pipe.start_sim()
        wait_until(lambda: counter("batches_acked") >= 30, 60, "30 batches acked")
        ingestors[0].popen.kill()  # one of three dies; the broker and the others go on
        ingestors[0].popen.wait()
        produced = int(pipe.finish_sim(sim, timeout_s=120)["produced"])
        pipe.wait_agent_has(produced, timeout_s=60)
        assert agent.terminate(timeout_s=120) == 0  # drains until every batch is acked
        for p in ingestors[1:]:
            assert p.terminate() == 0
        c = pipe.agent_status()["counters"]
        assert c["batches_acked"] == c["batches_created"] and pipe.agent_status()["outbox"] == {}
        windows = influxq.v1_windows(influxdb.url, influx_db)
        exp = expected_windows(pipe.truth)
        assert {k: int(v["count"]) for k, v in windows.items()} == {
            (device, *k): v["count"] for k, v in exp.items()
        }
        assert archived_seqs(LocalArchive(archive)) == {
            device: pipe.batch_seqs(influxdb.url, influx_db)
        }
        # the load was spread: every surviving ingestor wrote batches
        for k in (1, 2):
            log = (pipe.dir / f"cloud-ingest-i{k}.log").read_text()
            stats = json.loads(log.rsplit("stats ", 1)[1].splitlines()[0])
            assert stats.get("batches_written", 0) > 0, (k, stats)
    finally:
        pipe.stop_all()
