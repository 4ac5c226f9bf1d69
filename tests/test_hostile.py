"""The messages that once stopped a component for good, sent through a real Mosquitto to
a running `cloud-ingest run` and a running `edge-agent run`: each is quarantined with
its reason, the process stays up, and the valid messages behind them are stored."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cloud_ingest.lake import archived_seqs
from cloud_ingest.sinks.archive import LocalArchive
from devstack import hostile, influxq
from devstack.pipeline import IngestTarget, Pipeline, PipelineSpec
from devstack.publish import publish_all
from devstack.services import Service, wait_until
from shared.readings import encode_chunk

pytestmark = pytest.mark.integration
W = 10_000_000_000


def quarantined(archive: Path) -> dict[str, int]:
    q = archive / "quarantine"
    out: dict[str, int] = {}
    for p in q.rglob("*.json") if q.exists() else []:
        out[p.parent.name] = out.get(p.parent.name, 0) + 1
    return out


def test_poison_messages_do_not_stop_the_ingestor(
    fresh: Callable[[str], Service], influxdb: Service, influx_db: str, tmp_path: Path
) -> None:
    broker = fresh("mosquitto")
    archive = tmp_path / "archive"
    pipe = Pipeline(
        PipelineSpec(
            workdir=tmp_path / "run",
            local_port=broker.port,
            cloud_port=broker.port,
            targets=[
                IngestTarget(
                    "i",
                    {"api": "v1", "url": influxdb.url, "database": influx_db},
                    {"url": f"file://{archive}"},
                )
            ],
        )
    )
    try:
        (ingestor,) = pipe.start_ingestors()
        start = (time.time_ns() // W - 10) * W
        poison = hostile.poison_batches("dev-p", 1)
        sends = [("telemetry/v1/dev-p/batch", payload) for payload, _ in poison]
        sends += [("telemetry/v1/dev-p/alert", a) for a in hostile.poison_alerts(9)]
        sends.append(("telemetry/v1/dev-p/batch", hostile.valid_batch("dev-p", 2, 3, start)))
        publish_all(broker.port, sends)
        want = {f"reason={r}": 1 for _, r in poison} | {"reason=bad-alert": 4}
        wait_until(
            lambda: (
                quarantined(archive) == want
                and archived_seqs(LocalArchive(archive)).get("dev-p") == {2}
            ),
            30,
            "every poison message quarantined and the valid batch stored",
        )
        assert ingestor.popen.poll() is None  # still running
        assert influxq.total_count(influxq.v1_windows(influxdb.url, influx_db)) == 6
        assert ingestor.terminate() == 0
    finally:
        pipe.stop_all()


def test_poison_chunks_do_not_stop_the_agents_intake(
    fresh: Callable[[str], Service], tmp_path: Path
) -> None:
    broker = fresh("mosquitto")
    pipe = Pipeline(
        PipelineSpec(
            workdir=tmp_path,
            local_port=broker.port,
            cloud_port=broker.port,
            targets=[],
            drain_timeout_s=0.2,
        )
    )
    agent = pipe.start_agent()
    try:
        t0 = (time.time_ns() // W - 5) * W
        sends = [("sensors/n1/t", payload) for payload, _ in hostile.poison_chunks()]
        sends.append(("sensors/n1/t", encode_chunk("C", [t0, t0 + 1], [1.0, 2.0])))
        publish_all(broker.port, sends)

        def counters() -> dict[str, int]:
            c: dict[str, int] = pipe.agent_status()["counters"]
            return c

        wait_until(lambda: counters().get("readings_stored") == 2, 30, "the valid readings")
        c = counters()
        assert c["quarantined_bad-json"] == 2 and c["quarantined_bad-chunk"] == 1
        # intake is still alive: another valid message after the poison is stored too
        publish_all(broker.port, [("sensors/n1/t", encode_chunk("C", [t0 + 2], [3.0]))])
        wait_until(lambda: counters().get("readings_stored") == 3, 30, "intake after poison")
        assert agent.popen.poll() is None
        assert agent.terminate() == 0
    finally:
        pipe.stop_all()
