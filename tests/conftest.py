"""Fixtures that start real services (Mosquitto, InfluxDB 1.x, VictoriaMetrics, moto S3).

Session-scoped instances are shared by the tests that only read and write; a
test that stops or restarts a service asks for its own (``fresh_*`` factories).
Each test gets unique names (database, bucket, topic prefix) so tests never
see each other's data.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import pytest

from devstack import influxq, services
from devstack.services import S3_ENV, Service


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
