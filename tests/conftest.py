"""Fixtures that start real services (Mosquitto, InfluxDB 1.x, VictoriaMetrics, moto S3).

Session-scoped instances are shared by the tests that only read and write; a
test that stops or restarts a service asks for its own (``fresh_*`` factories).
Each test gets unique names (database, bucket, topic prefix) so tests never
see each other's data.
"""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import boto3
import pytest

from devstack import influxq, services
from devstack.pipeline import BIN, IngestTarget, Pipeline, PipelineSpec, toml_dumps
from devstack.publish import publish_all
from devstack.services import S3_ENV, Service, free_port, wait_until
from shared.readings import encode_chunk


def _started(svc: Service) -> Iterator[Service]:
    svc.start()
    try:
        yield svc
    finally:
        svc.stop()


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    yield from _started(services.mosquitto(tmp_path_factory.mktemp("mosquitto")))


@pytest.fixture(scope="session")
def influxdb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    yield from _started(services.influxdb(tmp_path_factory.mktemp("influxdb")))


@pytest.fixture(scope="session")
def victoria(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    yield from _started(services.victoria_metrics(tmp_path_factory.mktemp("vm")))


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    yield from _started(services.moto_s3(tmp_path_factory.mktemp("moto")))


@pytest.fixture(scope="session")
def spark_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A Spark (``local[2]``, a JVM of its own: its start takes about 6 s) for the
    worker's tests that ask for it (tests/cloud_ingest/test_spark.py)."""
    from cloud_ingest.jobs.engines import SparkEngine

    eng = SparkEngine(tmp_path_factory.mktemp("spark"), "local[2]")
    yield eng
    eng.close()


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    return dict(S3_ENV)


@pytest.fixture
def bucket(s3: Service, s3_env: dict[str, str]) -> str:
    name = f"lake-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3.url, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture
def influx_db(influxdb: Service) -> str:
    name = f"t_{uuid.uuid4().hex[:12]}"
    influxq.create_database(influxdb.url, name)
    return name


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Callable[[str], Service]]:
    """Factory for a private instance of a service, for tests that stop or restart it."""
    made: list[Service] = []
    factories = {
        "mosquitto": services.mosquitto,
        "influxdb": services.influxdb,
        "victoria": services.victoria_metrics,
        "s3": services.moto_s3,
    }

    def make(kind: str) -> Service:
        svc = factories[kind](tmp_path / f"{kind}-{len(made)}")
        made.append(svc)
        return svc.start()

    yield make
    for svc in made:
        svc.stop()


class SpecFactory(Protocol):
    def __call__(self, *, broker: Service | None = None, **overrides: Any) -> PipelineSpec: ...


@pytest.fixture
def pipeline_spec(tmp_path: Path) -> SpecFactory:
    """``pipeline_spec(broker=…, **overrides)``: a :class:`PipelineSpec` with this
    test's defaults: its work directory ``tmp_path / "run"``, ``broker`` (a
    Mosquitto) as both the device's and the cloud's broker, no ingestor (nothing
    acks), and the defaults of PipelineSpec for the rest; any field can be given."""

    def make(*, broker: Service | None = None, **overrides: Any) -> PipelineSpec:
        base: dict[str, Any] = {"workdir": tmp_path / "run", "targets": []}
        if broker is not None:
            base |= {"local_port": broker.port, "cloud_port": broker.port}
        return PipelineSpec(**(base | overrides))

    return make


S = 10**9


@dataclass(frozen=True)
class FleetRun:
    influx: Service
    prom_port: int
    db: str
    #: the lake (file://), and a cloud-ingest config that reads InfluxDB and the lake
    lake: Path
    ingest_config: Path


FLEET_RUN_DEVICE = "dev-dash"


@pytest.fixture
def fleet_run(fresh: Callable[[str], Service], tmp_path: Path) -> Iterator[FleetRun]:
    """A pipeline run: an agent with an alert rule, two sensors, a late reading that
    revises a window, a desired config version set by `cloud-ingest command config`,
    and five simulated devices (firmware-sim fleet, ten sensors each); cloud-ingest
    with /metrics, scraped by a real Prometheus."""
    broker, influx = fresh("mosquitto"), fresh("influxdb")
    db = "dash"
    influxq.create_database(influx.url, db)
    metrics = free_port()
    keys = tmp_path / "keys"
    subprocess.run(
        [str(BIN / "cloud-ingest"), "command", "keygen", "--id", "ops", "--dir", str(keys)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    pipe = Pipeline(
        PipelineSpec(
            workdir=tmp_path / "run",
            local_port=broker.port,
            cloud_port=broker.port,
            device_id=FLEET_RUN_DEVICE,
            agent_extra=(
                '[[alerts]]\nname = "hot"\nsensor = "env-1/temp"\nkind = "threshold"\n'
                "above = 30.0\nhysteresis = 1.0\ncapture = { before_s = 5, after_s = 5 }\n"
                "[commands]\nconfig_grace_s = 1\n"
                f'keys = [{{ id = "ops", file = "{keys}/ops.pub" }}]\n'
            ),
            agent_tables={"health": {"interval_s": 1}},
            targets=[
                IngestTarget(
                    "i1",
                    {"url": influx.url, "database": db},
                    {"url": f"file://{tmp_path / 'lake'}"},
                    http={"listen": f"127.0.0.1:{metrics}"},
                )
            ],
        )
    )
    prom = services.prometheus(tmp_path / "prometheus", [f"127.0.0.1:{metrics}"], [])
    try:
        pipe.start_ingestors()
        pipe.start_agent()
        prom.start()
        t0 = (time.time_ns() // (10 * S) - 30) * 10 * S
        temps = [25.0 + (k % 9) for k in range(200)]  # crosses 30 and back: alerts
        msgs = [
            ("sensors/env-1/temp", encode_chunk("C", [t0 + k * S for k in range(200)], temps)),
            (
                "sensors/env-1/hum",
                encode_chunk("%", [t0 + k * S for k in range(200)], [40.0] * 200),
            ),
        ]
        publish_all(broker.port, msgs)
        cfg = str(pipe.dir / "edge-agent.toml")

        def flushed(n: int) -> bool:
            subprocess.run(
                [str(BIN / "edge-agent"), "flush", "--timeout", "5", "-c", cfg],
                capture_output=True,
                timeout=60,
                check=False,
            )
            return influxq.total_count(influxq.v1_windows(influx.url, db)) == n

        wait_until(lambda: flushed(400), 60, "the windows in InfluxDB")
        late = encode_chunk("C", [t0 + 5 * S], [99.0])  # revises the first window
        publish_all(broker.port, [("sensors/env-1/temp", late)])
        wait_until(lambda: flushed(401), 60, "the revised window in InfluxDB")

        # and a fleet of five simulated devices beside it (windows only, no agent)
        fleet = pipe.start_fleet(
            "--devices", "5", "--batches", "3", "--speed", "0",
            "--ack-timeout", "20", "--timeout", "120", "--device-prefix", "sim",
        )  # fmt: skip
        summary = pipe.finish_fleet(fleet, 150)
        assert summary["acked"] == 15, summary

        def reports() -> int:
            q = f"SELECT count(\"seq\") FROM agent_health WHERE device_id = '{FLEET_RUN_DEVICE}'"
            rows = influxq.rows(influx.url, q, db)
            return int(rows[0]["count"]) if rows else 0

        wait_until(lambda: reports() >= 4, 60, "health reports a second apart")
        # a desired config version, as an operator sets it (docs/commands.md)
        operator = tmp_path / "operator.toml"
        operator.write_text(
            toml_dumps(
                {"mqtt": {"port": broker.port}, "influx": {"url": influx.url, "database": db}}
            )
        )
        fragment = tmp_path / "v1.toml"
        fragment.write_text("[health]\nbehind_after_s = 900\n")
        subprocess.run(
            [str(BIN / "cloud-ingest"), "command", "config", "-c", str(operator),
             FLEET_RUN_DEVICE, "--file", str(fragment), "--version", "1",
             "--key-file", str(keys / "ops.key"), "--wait", "30",
             "--journal", str(tmp_path / "journal.jsonl")],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip

        def applied() -> bool:
            q = (
                'SELECT last("config_state") FROM agent_health '
                f"WHERE device_id = '{FLEET_RUN_DEVICE}' AND config_version = 1"
            )
            rows = influxq.rows(influx.url, q, db)
            return bool(rows) and rows[0]["last"] == "applied"

        wait_until(applied, 60, "the desired config applied and reported")
        # and a command the device refuses (a kind it does not know): answered, exit 1
        refused = subprocess.run(
            [str(BIN / "cloud-ingest"), "command", "send", "-c", str(operator),
             FLEET_RUN_DEVICE, "reboot", "--key-file", str(keys / "ops.key"), "--wait", "30",
             "--journal", str(tmp_path / "journal.jsonl")],
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        assert refused.returncode == 1 and b"unknown-command" in refused.stdout, refused
        cfg = tmp_path / "read.toml"
        cfg.write_text(
            toml_dumps(
                {
                    "influx": {"url": influx.url, "database": db},
                    "archive": {"url": f"file://{tmp_path / 'lake'}"},
                }
            )
        )
        yield FleetRun(influx, prom.port, db, tmp_path / "lake", cfg)
    finally:
        prom.stop()
        pipe.stop_all()
