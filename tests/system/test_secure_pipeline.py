"""The whole path against the cloud broker as shipped (TLS, certificates from
`cloud-ingest pki`, the per-device ACL, signed acks), with a hostile device on the
same broker trying every attack of issue 10 while device B runs. B's readings
all arrive once, against the ground truth; the attacker gets nothing through."""

from __future__ import annotations

import queue
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devstack import hostile, influxq
from devstack.pipeline import (
    BIN,
    IngestTarget,
    Pipeline,
    PipelineSpec,
    lost_readings,
    truth_window_counts,
)
from devstack.secure import SecureCloud, secure_cloud
from devstack.services import Service, wait_until
from shared.acks import Ack

pytestmark = pytest.mark.integration
P = "telemetry/v1"


def _evil(cloud: SecureCloud, client_id: str = "") -> tuple[mqtt.Client, queue.SimpleQueue[str]]:
    got: queue.SimpleQueue[str] = queue.SimpleQueue()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    issued = cloud.folder / "issued"
    c.tls_set(
        ca_certs=str(cloud.folder / "ca.pem"),
        certfile=str(issued / "dev-evil.pem"),
        keyfile=str(issued / "dev-evil.key"),
    )
    c.on_message = lambda _c, _u, m: got.put(m.topic)
    c.connect("127.0.0.1", cloud.broker.port)
    c.loop_start()
    wait_until(c.is_connected, 10, "the attacker's connection")
    return c, got


def test_a_hostile_device_on_the_shipped_broker_costs_device_b_nothing(
    fresh: Callable[[str], Service], unique: str, tmp_path: Path
) -> None:
    local, influx = fresh("mosquitto"), fresh("influxdb")
    influxq.create_database(influx.url, "t")
    device = f"dev-b-{unique}"
    cloud = secure_cloud(tmp_path / "cloud", [device, "dev-evil"], ["ingest-1"])
    cloud.broker.start()
    width = 10 * 10**9
    spec = PipelineSpec(
        workdir=tmp_path / "run",
        local_port=local.port,
        cloud_port=cloud.broker.port,
        device_id=device,
        duration_s=60.0,
        speed=6.0,
        start_ns=(time.time_ns() // width - 8) * width + 1_000_000,
        ack_timeout_s=1.0,
        agent_tables={"forward": cloud.agent_forward(device), "log_level": "DEBUG"},
        targets=[
            IngestTarget(
                "i",
                {"api": "v1", "url": influx.url, "database": "t"},
                {"url": f"file://{tmp_path / 'lake'}"},
                mqtt=cloud.ingestor_mqtt("ingest-1"),
                acks=cloud.ingestor_acks(),
                top={"log_level": "DEBUG"},
            )
        ],
    )
    pipe = Pipeline(spec)
    evil: list[mqtt.Client] = []
    try:
        (ingestor,) = pipe.start_ingestors()
        agent = pipe.start_agent()
        sim = pipe.start_sim()
        wait_until(
            lambda: int(pipe.agent_status()["counters"].get("batches_acked", 0)) >= 2,
            60,
            "B's first acks",
        )
        # the technician's doctor beside the running agent: it must not connect as the
        # device (the broker binds the client id to the identity: that would take over
        # the agent's session), and says what the agent's own connection sees
        doctor = subprocess.run(
            [str(BIN / "edge-agent"), "doctor", "-c", str(pipe.dir / "edge-agent.toml")],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        row = next(ln for ln in doctor.stdout.splitlines() if " forward.broker " in ln)
        assert "the running agent is connected" in row, doctor.stdout
        spy, seen = _evil(cloud)
        evil.append(spy)
        spy.subscribe(f"{P}/#", qos=1)  # attack 1 (and $SYS)
        spy.subscribe("$SYS/#", qos=1)
        for seq in (1, 2, 3, 10_000):  # attacks 2-4: B's topic, B's id, B's seqs
            batch = hostile.valid_batch(device, seq, 3)
            spy.publish(f"{P}/{device}/batch", batch, qos=1)
        for seq in range(0, 50):  # attack 5: fake acks; attack 6: retained
            spy.publish(f"{P}/{device}/ack", Ack(seq, "stored").encode(), qos=1)
        spy.publish(f"{P}/{device}/ack", Ack(99, "stored").encode(), qos=1, retain=True)
        thief, _ = _evil(cloud, client_id="ingest-1")  # attack 7: the ingestor's id
        evil.append(thief)

        produced = int(pipe.finish_sim(sim, timeout_s=180)["produced"])
        pipe.wait_agent_has(produced, timeout_s=60)
        assert agent.terminate(timeout_s=120) == 0  # drains until every batch is acked
        assert ingestor.popen.poll() is None, "the ingestor lost its session"
        c = pipe.agent_status()["counters"]
        assert c["batches_acked"] == c["batches_created"] and pipe.agent_status()["outbox"] == {}
        assert c.get("acks_unverified", 0) == 0  # the broker let no fake ack through
        windows = influxq.v1_windows(influx.url, "t")
        assert influxq.total_count(windows) == produced
        truth = truth_window_counts(pipe.truth, width)
        assert lost_readings(truth, device, windows) == 0
        assert {w[0] for w in windows} == {device}  # nothing stored under another id
        assert seen.empty(), "the attacker read something"
        assert ingestor.terminate() == 0
        logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "run").glob("*.log"))
        secrets = [cloud.master_key.read_text().strip(), cloud.device_keys[device].read_text()]
        secrets.append((cloud.folder / "issued" / f"{device}.key").read_text().splitlines()[1])
        assert "DEBUG" in logs  # both run at DEBUG (the agent has no DEBUG lines of its own)
        agent_log = (pipe.dir / "edge-agent.log").read_text()
        assert agent_log.count("forward: connected to") == 1  # no session taken from it
        assert not [s for s in secrets if s.strip() in logs]
    finally:
        for c in evil:
            c.loop_stop()
        pipe.stop_all()
        cloud.broker.stop()
