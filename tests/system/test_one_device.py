"""What one device can cost the others (issue 20), each against real processes: a
series limit that another device filled in a real InfluxDB, huge messages at a
broker as shipped and at one that has no limit, and a device whose buffer is made
again. The fleet-wide test is
tests/system/test_fleet.py::test_one_hostile_device_costs_the_fleet_nothing; the clocks
are in tests/edge_agent/test_clocks.py; the quotas alone in
tests/cloud_ingest/test_quotas.py."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devstack import hostile, influxq, services
from devstack.pipeline import (
    BIN,
    Pipeline,
    fleet_window_counts,
)
from devstack.publish import publish_all
from devstack.services import Service, free_port, wait_until
from shared.readings import encode_chunk
from tests.cloud_ingest.test_hostile import one_ingestor
from tests.conftest import SpecFactory
from tests.system.test_fleet import influx_counts, metric_values

pytestmark = pytest.mark.integration

W = 10 * 10**9
MIB = 1 << 20


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for {pid}")


def ingestor(tmp_path: Path, broker: Service, influx: Service, db: str, **target: Any) -> Pipeline:
    """One ingestor (tests/cloud_ingest/test_hostile.py's) writing to a new database ``db``."""
    influxq.create_database(influx.url, db)
    return one_ingestor(tmp_path, broker, influx, db, **target)


def test_a_series_limit_another_device_filled_costs_an_innocent_nothing(
    fresh: Callable[[str], Service], tmp_path: Path
) -> None:
    """One device's sensor names fill InfluxDB's max-values-per-tag (here 20, 100,000
    by default). Another device's batch with a sensor new to InfluxDB is then refused
    by the server's state, not for anything in it: it is deferred, never answered
    "rejected" (which made the device drop it for good), and stored once the operator
    raises the limit, with nothing dropped meanwhile."""
    broker = fresh("mosquitto")
    workdir = tmp_path / "influx"
    influx = services.influxdb(workdir, max_values_per_tag=20).start()
    http = free_port()
    pipe = ingestor(tmp_path, broker, influx, "fleet", http={"listen": f"127.0.0.1:{http}"})
    try:
        pipe.start_ingestors()
        start = (time.time_ns() // W - 30) * W
        filler = hostile.device_batch("dev-a", 1, [start], [f"a{i:02d}" for i in range(20)])
        publish_all(broker.port, [("telemetry/v1/dev-a/batch", filler)])
        wait_until(lambda: len(influx_counts(influx.url, "fleet")) == 20, 30, "dev-a's 20 sensors")
        fleet = pipe.start_fleet(
            "--devices", "1", "--batches", "3", "--sensors", "2", "--speed", "0",
            "--ack-timeout", "2", "--timeout", "180", "--device-prefix", "innocent",
        )  # fmt: skip
        wait_until(
            lambda: metric_values(http, "cloud_ingest_deferred_total").get("sink-limit", 0) >= 2,
            60,
            "the innocent device's batches deferred",
        )
        assert metric_values(http, "cloud_ingest_quarantined_total")["sink-rejected"] == 0
        # the operator raises the limit: the same server and data, max-values-per-tag off
        influx.stop()
        influx = services.influxdb(workdir, port=influx.port, max_values_per_tag=0).start()
        summary = pipe.finish_fleet(fleet, 180)
        assert (summary["acked"], summary["rejected"], summary["unacked"]) == (3, 0, 0), summary
        assert summary["resent"] >= 1  # it kept them, and sent them again
        truth = fleet_window_counts(pipe.fleet_truth)
        got = {k: v for k, v in influx_counts(influx.url, "fleet").items() if k[0] != "dev-a"}
        assert got == truth
        assert influxq.lake_windows(tmp_path / "archive") == influxq.v1_windows(influx.url, "fleet")
    finally:
        pipe.stop_all()
        influx.stop()


class Publisher:
    """An MQTT client that publishes one message and says whether the broker took it."""

    def __init__(self, port: int, username: str = "", password: str = "") -> None:
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5
        )
        if username:
            self.client.username_pw_set(username, password)
        self.gone = threading.Event()
        self.client.on_disconnect = lambda *_a: self.gone.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes, timeout_s: float = 60) -> bool:
        """True once the broker acknowledged it; False if it closed the connection."""
        info = self.client.publish(topic, payload, qos=1)
        deadline = time.monotonic() + timeout_s
        while not info.is_published():
            if self.gone.wait(0.02):  # paho's wait_for_publish does not see a close
                return False
            assert time.monotonic() < deadline, "no PUBACK and no disconnect"
        return True

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def big(tmp_path: Path) -> Iterator[Callable[[int, str, int], None]]:
    """Publish a payload of ``size`` bytes on ``topic`` at the broker on ``port`` with
    mosquitto_pub (the real client, from a file: paho copies a large payload over and
    over as it sends it), and fail if the broker does not take it."""
    folder = tmp_path / "big"
    folder.mkdir()

    def publish(port: int, topic: str, size: int) -> None:
        path = folder / str(size)
        if not path.exists():
            with open(path, "wb") as fh:
                fh.truncate(size)  # zeros, without writing them
        res = subprocess.run(
            ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-V", "mqttv5", "-q", "1",
             "-t", topic, "-f", str(path)],
            capture_output=True, timeout=120, check=False,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr

    yield publish


#: what the processes may reach under the huge messages, well below their units'
#: MemoryMax (cloud-ingest 2G, the agent 400M; docs/deploy.md)
INGESTOR_PEAK_MB = 400
AGENT_PEAK_MB = 200


def test_huge_messages_cost_the_ingestor_no_memory(
    fresh: Callable[[str], Service],
    influxdb: Service,
    tmp_path: Path,
    big: Callable[[int, str, int], None],
) -> None:
    """A device's 64 MiB message took the ingestor from 106 to 626 MB, and ten of
    200 MB queued while it was down took it past its unit's MemoryMax at every
    start. The cloud broker as shipped refuses them at its door (max_packet_size);
    a broker without a limit must not hand them to the ingestor, which announced
    its Maximum Packet Size; and the ingestor reads no packet over it anyway."""
    # the cloud broker as shipped: passwords, the per-device ACL, max_packet_size
    shipped = services.mosquitto(
        tmp_path / "shipped",
        passwords={"dev-a": "pw-a-123", "ingest-1": "pw-i-123"},
        ingestors=["ingest-1"],
    ).start()
    secret = tmp_path / "ingest.pw"
    secret.write_text("pw-i-123\n")
    secret.chmod(0o600)
    pipe = ingestor(
        tmp_path,
        shipped,
        influxdb,
        "huge",
        mqtt={
            "client_id": "ingest-1",
            "auth": {"username": "ingest-1", "password_file": str(secret)},
        },
    )
    try:
        (proc,) = pipe.start_ingestors()
        # a device that ignores the broker's limit (paho does not check it): the broker
        # disconnects it once the packet's length is read, before buffering it
        device = Publisher(shipped.port, "dev-a", "pw-a-123")
        assert not device.publish("telemetry/v1/dev-a/batch", b"\0" * (64 * MIB))
        device.close()
        device = Publisher(shipped.port, "dev-a", "pw-a-123")
        start = (time.time_ns() // W - 30) * W
        assert device.publish(
            "telemetry/v1/dev-a/batch", hostile.device_batch("dev-a", 1, [start], ["t"])
        )
        device.close()
        wait_until(lambda: len(influx_counts(influxdb.url, "huge")) == 1, 30, "dev-a's batch")
        shipped_peak = peak_rss_mb(proc.popen.pid)
    finally:
        pipe.stop_all()
        shipped.stop()

    # a broker with no limit: the ingestor's Maximum Packet Size keeps them away
    open_broker = services.mosquitto(tmp_path / "open", max_packet_size=0).start()
    pipe = ingestor(tmp_path / "2", open_broker, influxdb, "huge2")
    try:
        (proc,) = pipe.start_ingestors()
        for size in (64 * MIB, 64 * MIB, 200 * 10**6):  # taken by the broker, for nobody
            big(open_broker.port, "telemetry/v1/dev-b/batch", size)
        live_peak = peak_rss_mb(proc.popen.pid)
        assert proc.terminate() == 0
        for size in (200 * 10**6, 64 * MIB):  # queued for its session while it is down
            big(open_broker.port, "telemetry/v1/dev-b/batch", size)
        start = (time.time_ns() // W - 30) * W
        publish_all(
            open_broker.port,
            [("telemetry/v1/dev-b/batch", hostile.device_batch("dev-b", 1, [start], ["t"]))],
        )
        (proc,) = pipe.start_ingestors()
        wait_until(lambda: len(influx_counts(influxdb.url, "huge2")) == 1, 60, "dev-b's batch")
        restart_peak = peak_rss_mb(proc.popen.pid)
    finally:
        pipe.stop_all()
        open_broker.stop()
    print(
        f"[huge messages] ingestor peak RSS: {shipped_peak:.0f} MB (shipped broker), "
        f"{live_peak:.0f} MB (no broker limit), {restart_peak:.0f} MB (restart with "
        "264 MB queued)"
    )
    assert max(shipped_peak, live_peak, restart_peak) < INGESTOR_PEAK_MB


def test_huge_messages_cost_the_agent_no_memory(
    pipeline_spec: SpecFactory,
    fresh: Callable[[str], Service],
    tmp_path: Path,
    big: Callable[[int, str, int], None],
) -> None:
    """One 250 MB message on the device's broker took the agent past its unit's
    MemoryMax (400M), and again at every restart. The device broker as shipped
    refuses it (max_packet_size); one without a limit does not hand it to the agent,
    which announced its Maximum Packet Size; readings go on."""
    shipped = fresh("mosquitto")  # devstack's device broker: max_packet_size as shipped
    device = Publisher(shipped.port)  # a node that ignores the limit: disconnected
    assert not device.publish("sensors/n1/big", b"\0" * (250 * 10**6))
    device.close()

    broker = services.mosquitto(tmp_path / "open", max_packet_size=0).start()
    pipe = Pipeline(
        pipeline_spec(
            broker=broker,
            drain_timeout_s=0.2,  # no cloud here: nothing to wait for at a stop
        )
    )
    t0 = (time.time_ns() // W - 30) * W

    def stored() -> int:
        return int(pipe.agent_status()["counters"].get("readings_stored", 0))

    try:
        agent = pipe.start_agent(flush_on_shutdown=False)
        big(broker.port, "sensors/n1/big", 250 * 10**6)
        publish_all(broker.port, [("sensors/n1/t", encode_chunk("C", [t0], [1.0]))])
        wait_until(lambda: stored() == 1, 30, "the reading after the huge message")
        live_peak = peak_rss_mb(agent.popen.pid)
        assert agent.terminate() == 0
        big(broker.port, "sensors/n1/big", 250 * 10**6)  # queued while it is down
        publish_all(broker.port, [("sensors/n1/t", encode_chunk("C", [t0 + 1], [2.0]))])
        agent = pipe.start_agent(flush_on_shutdown=False)
        wait_until(lambda: stored() == 2, 30, "the reading queued behind the huge one")
        restart_peak = peak_rss_mb(agent.popen.pid)
    finally:
        pipe.stop_all()
        broker.stop()
    print(f"[huge messages] agent peak RSS: {live_peak:.0f} MB, {restart_peak:.0f} MB at restart")
    assert max(live_peak, restart_peak) < AGENT_PEAK_MB


def test_a_buffer_made_again_is_a_new_generation_and_nothing_is_lost(
    fresh: Callable[[str], Service], influxdb: Service, tmp_path: Path
) -> None:
    """A device whose buffer is made again (a new SD card, a re-flash) numbers its
    batches from 1 again. The ingestor once took them for resends of the old ones
    (it remembers the last 100,000 (device, seq)), answered "stored" and wrote
    nothing, so the device deleted them. A new buffer has a new generation, which
    travels in every batch and ack."""
    broker = fresh("mosquitto")
    pipe = ingestor(tmp_path, broker, influxdb, "gen")
    pipe.spec.device_id = "dev-g"
    cfg = pipe.dir / "edge-agent.toml"
    t0 = (time.time_ns() // W - 40) * W

    def flush() -> None:
        res = subprocess.run(
            [str(BIN / "edge-agent"), "flush", "--timeout", "20", "-c", str(cfg)],
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        assert res.returncode == 0, res.stderr

    def windows() -> dict[int, int]:
        return {k[3]: v for k, v in influx_counts(influxdb.url, "gen").items() if k[0] == "dev-g"}

    try:
        pipe.start_ingestors()
        pipe.start_agent(flush_on_shutdown=False)
        first = [t0 + k * 10**9 for k in range(20)]  # two windows
        publish_all(broker.port, [("sensors/n1/t", encode_chunk("C", first, [1.0] * 20))])
        wait_until(lambda: pipe.agent_status()["counters"].get("readings_stored") == 20, 30, "")
        flush()
        before = dict(pipe.agent_status())
        assert pipe.procs[-1].terminate() == 0
        for suffix in ("", "-wal", "-shm"):  # a new SD card
            Path(f"{pipe.agent_db}{suffix}").unlink(missing_ok=True)
        pipe.start_agent(flush_on_shutdown=False)
        after = dict(pipe.agent_status())
        assert after["generation"] != before["generation"]
        second = [t0 + 20 * 10**9 + k * 10**9 for k in range(20)]  # two more windows
        publish_all(broker.port, [("sensors/n1/t", encode_chunk("C", second, [2.0] * 20))])
        wait_until(lambda: pipe.agent_status()["counters"].get("readings_stored") == 20, 30, "")
        flush()  # acked only once InfluxDB and the lake hold them
        assert windows() == {t0: 10, t0 + W: 10, t0 + 2 * W: 10, t0 + 3 * W: 10}
    finally:
        pipe.stop_all()


def test_the_agents_intake_session_cannot_be_taken_by_another_local_client(
    pipeline_spec: SpecFactory, fresh: Callable[[str], Service], tmp_path: Path
) -> None:
    """A local client that connected with the agent's documented intake client id and
    a persistent session took the readings queued for the agent (1,292 in one run).
    The id now carries a random part drawn with the buffer; the documented one is
    nobody's, and the agent stores every reading once."""
    broker = fresh("mosquitto")
    pipe = Pipeline(
        pipeline_spec(
            broker=broker,
            workdir=tmp_path,
            drain_timeout_s=0.2,
        )
    )
    t0 = (time.time_ns() // W - 30) * W
    thief = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"edge-agent-{pipe.spec.device_id}-intake",
        protocol=mqtt.MQTTv5,
    )
    stolen: list[bytes] = []
    thief.on_message = lambda _c, _u, m: stolen.append(bytes(m.payload))
    try:
        agent = pipe.start_agent(flush_on_shutdown=False)
        assert agent.terminate() == 0  # its session waits at the broker
        publish_all(broker.port, [("sensors/n1/t", encode_chunk("C", [t0 + k], [1.0]))
                                  for k in range(50)])  # fmt: skip
        thief.connect("127.0.0.1", broker.port, clean_start=False)
        thief.loop_start()
        thief.subscribe("sensors/#", qos=1)
        pipe.start_agent(flush_on_shutdown=False)
        wait_until(
            lambda: pipe.agent_status()["counters"].get("readings_stored") == 50,
            30,
            "every reading queued for the agent",
        )
        assert stolen == []
    finally:
        thief.disconnect()
        thief.loop_stop()
        pipe.stop_all()
