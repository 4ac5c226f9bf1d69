"""Window versions reach InfluxDB in order under faults, with real processes.

A slow node's readings arrive 15 s (of event time) late, so its windows are sent
again and again as revisions while the faults happen. Each test ends with the exact
count of every window in InfluxDB (against the simulator's ground truth) and with the
lake's documented latest-revision query equal to InfluxDB. Without the ordering rule
(a later version leaves the device only after the earlier one is acknowledged) these
runs left an older revision in InfluxDB: issue 8's table.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from devstack import influxq
from devstack.faultproxy import FaultProxy
from devstack.pipeline import IngestTarget, Pipeline, PipelineSpec, truth_window_counts
from devstack.services import Service, wait_until

pytestmark = pytest.mark.integration

W = 10 * 10**9
SLOW_NODE = """
[[nodes]]
id = "env-1"
  [[nodes.sensors]]
  name = "temperature"
  kind = "temperature"
  rate_hz = 2.0
  unit = "degC"
[[nodes]]
id = "slow-1"
  [[nodes.sensors]]
  name = "humidity"
  kind = "humidity"
  rate_hz = 2.0
  unit = "%RH"
  delay_s = 15.0
"""


def late_pipeline(
    tmp_path: Path,
    local: Service,
    cloud: Service,
    influx: Service,
    db: str,
    *,
    duration_s: float,
    speed: float,
    ingestors: int = 1,
    influx_urls: list[str] | None = None,
    mqtt: dict[str, object] | None = None,
    forward: dict[str, object] | None = None,
    ack_timeout_s: float = 5.0,
) -> Pipeline:
    archive = tmp_path / "archive"
    return Pipeline(
        PipelineSpec(
            workdir=tmp_path / "run",
            local_port=local.port,
            cloud_port=cloud.port,
            device_id="dev-late",
            duration_s=duration_s,
            speed=speed,
            seed=31,
            width_s=10.0,
            # event time runs faster than the clock: start in the past, so that no
            # reading is from the future
            start_ns=(time.time_ns() // W - int(duration_s / 10) - 3) * W + 250_000_000,
            ack_timeout_s=ack_timeout_s,
            drain_timeout_s=90.0,
            sim_config=SLOW_NODE,
            agent_tables={"forward": forward or {}},
            targets=[
                IngestTarget(
                    f"i{k}",
                    {
                        "api": "v1",
                        "url": influx_urls[k] if influx_urls else influx.url,
                        "database": db,
                    },
                    {"url": f"file://{archive}"},
                    mqtt=dict(mqtt or {}),
                )
                for k in range(ingestors)
            ],
        )
    )


def counter(pipe: Pipeline, name: str) -> int:
    return int(pipe.agent_status()["counters"].get(name, 0))


def finish_and_check(pipe: Pipeline, sim: object, influx: Service, db: str) -> None:
    """Let the simulator finish, drain the agent, and compare window by window."""
    produced = int(pipe.finish_sim(sim, timeout_s=240)["produced"])  # type: ignore[arg-type]
    pipe.wait_agent_has(produced, timeout_s=120)
    agent = next(p for p in reversed(pipe.procs) if p.name == "edge-agent")
    assert agent.terminate(timeout_s=150) == 0  # flushes, drains until every batch is acked
    st = pipe.agent_status()
    c = st["counters"]
    assert st["outbox"] == {} and c["batches_acked"] == c["batches_created"]
    assert c["readings_stored"] == produced
    assert not {k: v for k, v in c.items() if k.startswith("dropped_") and v}
    assert c["windows_revised"] > 10  # the slow node's windows were revised throughout
    windows = influxq.v1_windows(influx.url, db)
    truth = truth_window_counts(pipe.truth, W)
    got = {(n, s, t): int(w["count"]) for (_d, n, s, t), w in windows.items()}
    wrong = {k: (got.get(k), v) for k, v in truth.items() if got.get(k) != v}
    assert not wrong, f"windows in InfluxDB (got, truth) that differ: {wrong}"
    assert set(got) == set(truth)
    assert influxq.lake_windows(pipe.dir.parent / "archive") == windows


def test_a_revision_lost_with_a_killed_broker_is_not_written_over_a_later_one(
    fresh: Callable[[str], Service], influxdb: Service, influx_db: str, tmp_path: Path
) -> None:
    """Issue 8, path 1. The ingestor is killed, so the cloud broker queues the agent's
    batches (PUBACKed to the agent, not yet acknowledged by the cloud); then the broker
    is SIGKILLed and loses them. The agent resends them only after the ack timeout;
    before the fix, the later revisions made meanwhile went out at once, were written,
    and the resent older revision was written over them."""
    local, cloud = fresh("mosquitto"), fresh("mosquitto")
    pipe = late_pipeline(
        tmp_path, local, cloud, influxdb, influx_db, duration_s=100.0, speed=2.0, ack_timeout_s=8.0
    )
    try:
        (ingestor,) = pipe.start_ingestors()
        pipe.start_agent()
        sim = pipe.start_sim()
        wait_until(lambda: counter(pipe, "windows_revised") >= 6, 90, "revisions to flow")
        ingestor.popen.kill()
        ingestor.popen.wait()
        wait_until(
            lambda: pipe.agent_status()["outbox"].get("sent", 0) >= 3,
            60,
            "batches the broker accepted but nobody acknowledged",
        )
        cloud.kill()  # loses what it had queued for the dead ingestor
        cloud.start()
        pipe.start_ingestors()
        finish_and_check(pipe, sim, influxdb, influx_db)
    finally:
        pipe.stop_all()


def test_an_outage_longer_than_the_live_window_keeps_revisions_in_order(
    fresh: Callable[[str], Service],
    influxdb: Service,
    influx_db: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Issue 8, path 2. The cloud broker is down for 45 s, longer than the agent's
    live_window_s (15 s here): after it returns, the batches of the last 15 s go first
    and the older backlog after them. Before the fix a window's older revision from the
    backlog was written after its newer one from the live batches. Also measured: how
    soon after the broker's return the agent has its first ack again (the reconnect
    backoff is capped at 5 s by default)."""
    local, cloud = fresh("mosquitto"), fresh("mosquitto")
    live_window_s = 15.0
    pipe = late_pipeline(
        tmp_path,
        local,
        cloud,
        influxdb,
        influx_db,
        duration_s=150.0,
        speed=2.0,
        forward={"live_window_s": live_window_s},
    )
    try:
        pipe.start_ingestors()
        pipe.start_agent()
        sim = pipe.start_sim()
        wait_until(lambda: counter(pipe, "windows_revised") >= 4, 90, "revisions to flow")
        cloud.stop()
        down_at = time.monotonic()
        # 45 s of outage, and a backlog older than the live window
        wait_until(
            lambda: (
                time.monotonic() - down_at >= 45.0
                and (pipe.agent_status()["oldest_unsent_age_s"] or 0) > live_window_s + 5
            ),
            90,
            "a 45 s outage with a backlog older than the live window",
            interval_s=0.5,
        )
        cloud.start()
        back_at, back_ns = time.monotonic(), time.time_ns()
        wait_until(
            lambda: (pipe.agent_status()["last_ack_ns"] or 0) > back_ns,
            60,
            "the first ack after the broker's return",
        )
        recovery_s = time.monotonic() - back_at
        with capsys.disabled():
            print(
                f"\n[recovery] cloud broker down {back_at - down_at:.1f} s: the agent had "
                f"its first ack {recovery_s:.2f} s after the broker was back"
            )
        assert recovery_s < 10.0, f"recovery took {recovery_s:.1f} s"
        finish_and_check(pipe, sim, influxdb, influx_db)
    finally:
        pipe.stop_all()


def test_two_ingestors_in_a_shared_group_write_revisions_in_order(
    fresh: Callable[[str], Service], influxdb: Service, influx_db: str, tmp_path: Path
) -> None:
    """Two ingestors behind one shared subscription, handed a device's batches round
    robin; one writes InfluxDB through a slow link (0.3 s per request), the other is
    SIGKILLed and restarted midway. A window's consecutive versions go to either, and
    before the fix the slow one's older version often landed after the fast one's
    newer one; InfluxDB must end with the latest of each."""
    local, cloud = fresh("mosquitto"), fresh("mosquitto")
    slow = FaultProxy(influxdb.port, delay_s=0.3)
    shared = {
        "subscription": "$share/ingest/telemetry/v1/+/batch",
        "alert_subscription": "$share/ingest/telemetry/v1/+/alert",
        "session_expiry_s": 2,
    }
    pipe = late_pipeline(
        tmp_path,
        local,
        cloud,
        influxdb,
        influx_db,
        duration_s=100.0,
        speed=3.0,
        ingestors=2,
        influx_urls=[influxdb.url, slow.url],
        mqtt=shared,
        forward={"max_windows_per_batch": 1},  # one window per batch: many batches
        ack_timeout_s=2.0,
    )
    try:
        first = pipe.start_ingestors()
        pipe.start_agent()
        sim = pipe.start_sim()
        wait_until(lambda: counter(pipe, "windows_revised") >= 6, 90, "revisions to flow")
        first[0].popen.kill()
        first[0].popen.wait()
        wait_until(lambda: counter(pipe, "windows_revised") >= 12, 90, "more revisions")
        pipe.start_ingestors(only={"i0"})
        finish_and_check(pipe, sim, influxdb, influx_db)
        for p in pipe.procs:
            if p.name.startswith("cloud-ingest") and p.popen.poll() is None:
                assert p.terminate() == 0
        for k in (0, 1):
            log = (pipe.dir / f"cloud-ingest-i{k}.log").read_text()
            assert "batches_written" in log.rsplit("stats ", 1)[-1], k  # both took a share
    finally:
        pipe.stop_all()
        slow.close()
