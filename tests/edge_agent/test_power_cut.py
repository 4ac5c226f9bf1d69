"""Power cuts on the device: the device broker SIGKILLed (no chance to save) and
started again on its persistence file, with the shipped persistence settings
(devstack.services.DEVICE_PERSISTENCE, the same lines as Ansible's
telemetry-edge.conf). firmware-sim outlives it (reconnects, resends what was not
acknowledged), the agent subscribes again, and the simulator's truth is checked
message by message against the agent's buffer and window by window against
InfluxDB.

What a cut may cost is what docs/edge-agent.md ("A power cut on the device")
says: the messages the broker acknowledged since its last save of the session,
at most ``DEVICE_AUTOSAVE_CHANGES - 1`` of them, all published just before the
cut (one unbroken run in the simulator's order). Nothing else is lost, and
nothing arrives twice.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from devstack import influxq
from devstack.pipeline import (
    BIN,
    IngestTarget,
    Pipeline,
    PipelineSpec,
    message_fates,
    write_truth_without,
)
from devstack.services import DEVICE_AUTOSAVE_CHANGES, Service, wait_until
from firmware_sim.truth import read_truth
from tests.edge_agent.test_redelivery import pipeline as esphome_pipeline
from tests.edge_agent.test_redelivery import pub
from tests.system.test_e2e import WIDTH, WIDTH_S, expected_windows

pytestmark = pytest.mark.integration

#: firmware-sim's default nodes publish 12 messages a second at speed 1
MESSAGES_PER_S = 12


def pipeline(device: Service, cloud: Service, influxdb: Service, db: str, tmp: Path,
             device_id: str, duration_s: float) -> Pipeline:  # fmt: skip
    return Pipeline(
        PipelineSpec(
            workdir=tmp / "run",
            local_port=device.port,
            cloud_port=cloud.port,
            device_id=device_id,
            duration_s=duration_s,
            speed=1.0,
            seed=22,
            width_s=WIDTH_S,
            start_ns=(time.time_ns() // WIDTH - 4) * WIDTH + 7_000_000,
            ack_timeout_s=1.0,
            targets=[
                IngestTarget(
                    "v1",
                    {"api": "v1", "url": influxdb.url, "database": db},
                    {"url": f"file://{tmp / 'archive'}"},
                )
            ],
        )
    )


def stored(pipe: Pipeline) -> int:
    return int(pipe.agent_status()["counters"].get("readings_stored", 0))


def messages(pipe: Pipeline) -> int:
    return int(pipe.agent_status()["counters"].get("source_sensors_messages", 0))


def published(pipe: Pipeline) -> int:
    """Messages the simulator has published so far (its truth is line-buffered)."""
    try:
        return pipe.truth.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def wait_agent_has_the_last(pipe: Pipeline) -> None:
    """The broker hands a session its messages in order, so once the agent holds
    the simulator's last message it holds everything that will ever arrive."""
    last = list(read_truth(pipe.truth))[-1]
    keys = [(last.node, last.sensor, t) for t in last.ts.tolist()]
    wait_until(
        lambda: all(k in pipe.agent_raw() for k in keys),
        60,
        "the agent to hold the simulator's last message",
        interval_s=0.5,
    )


def check(pipe: Pipeline, influxdb: Service, db: str, device_id: str, cuts: int) -> None:
    """The accounting of the module's docstring."""
    keys = [(c.node, c.sensor, t) for c in read_truth(pipe.truth) for t in c.ts.tolist()]
    assert len(keys) == len(set(keys))  # the truth has each reading once, resends or not
    fates = message_fates(pipe.truth, pipe.agent_raw())
    assert set(fates) <= {"A", "L"}, f"a message partly or twice in the buffer: {fates}"
    runs = re.findall("L+", fates)
    assert len(runs) <= cuts and all(len(r) < DEVICE_AUTOSAVE_CHANGES for r in runs), fates
    lost = {i for i, f in enumerate(fates) if f == "L"}
    arrived = write_truth_without(pipe.truth, pipe.dir / "arrived.jsonl", lost)
    want = {(device_id, *k): v["count"] for k, v in expected_windows(arrived).items()}

    def got() -> dict[tuple[str, str, str, int], int]:
        return {
            k: int(v["count"])
            for k, v in influxq.v1_windows(influxdb.url, db).items()
            if k[0] == device_id
        }

    total = sum(want.values())
    wait_until(lambda: sum(got().values()) >= total, 60, f"InfluxDB to hold {total} readings")
    assert got() == want
    assert stored(pipe) == total
    print(f"messages lost per cut: {[len(r) for r in runs]} of {len(fates)} published")


def drain(pipe: Pipeline, agent_stop: Callable[[], int]) -> None:
    """Stop the agent, then run it once more to close its last windows and send them."""
    assert agent_stop() == 0
    agent = pipe.start_agent(flush_on_shutdown=True)
    assert agent.terminate(timeout_s=90) == 0


def test_device_broker_killed_twice_while_the_agent_runs(
    fresh: Callable[[str], Service],
    influxdb: Service,
    influx_db: str,
    tmp_path: Path,
    unique: str,
) -> None:
    device, cloud = fresh("mosquitto"), fresh("mosquitto")
    device_id = f"dev-{unique}"
    pipe = pipeline(device, cloud, influxdb, influx_db, tmp_path, device_id, 40.0)
    try:
        pipe.start_ingestors()
        agent = pipe.start_agent(flush_on_shutdown=False)
        sim = pipe.start_sim()
        for at in (200, 400):
            # after more changes than DEVICE_AUTOSAVE_CHANGES since the broker
            # started: its file has the agent's session (a cut before that loses
            # the session; docs/edge-agent.md and bench/session_window.py)
            wait_until(lambda n=at: messages(pipe) >= n, 60, f"{at} messages stored")  # type: ignore[misc]
            device.kill()  # the power cut, as the broker sees it
            device.start()
        pipe.finish_sim(sim, timeout_s=120)
        wait_agent_has_the_last(pipe)
        drain(pipe, agent.terminate)
        c = pipe.agent_status()["counters"]
        sim_log = (pipe.dir / "firmware-sim.log").read_text()
        check(pipe, influxdb, influx_db, device_id, cuts=2)
    finally:
        pipe.stop_all()
    assert "lost the broker" in sim_log  # it did outlive it
    assert c.get("intake_sessions_lost", 0) == 0  # the broker kept the agent's session


def test_device_broker_killed_while_the_agent_is_stopped(
    fresh: Callable[[str], Service],
    influxdb: Service,
    influx_db: str,
    tmp_path: Path,
    unique: str,
) -> None:
    """The agent stopped (an upgrade, a technician's restart) with 20 s of readings
    queued for its session when the power goes: the broker saved them but for the
    last changes since its last save, and the agent gets them when it starts."""
    device, cloud = fresh("mosquitto"), fresh("mosquitto")
    device_id = f"dev-{unique}"
    pipe = pipeline(device, cloud, influxdb, influx_db, tmp_path, device_id, 40.0)
    try:
        pipe.start_ingestors()
        agent = pipe.start_agent(flush_on_shutdown=False)
        sim = pipe.start_sim()
        wait_until(lambda: stored(pipe) >= 300, 60, "the first readings")
        assert agent.terminate() == 0
        queued = published(pipe) + 20 * MESSAGES_PER_S
        wait_until(lambda: published(pipe) >= queued, 60, "20 s of messages queued for it")
        device.kill()
        device.start()
        agent = pipe.start_agent(flush_on_shutdown=False)
        pipe.finish_sim(sim, timeout_s=120)
        wait_agent_has_the_last(pipe)
        drain(pipe, agent.terminate)
        c = pipe.agent_status()["counters"]
        check(pipe, influxdb, influx_db, device_id, cuts=1)
    finally:
        pipe.stop_all()
    assert c.get("intake_sessions_lost", 0) == 0  # the broker kept the agent's session


def test_a_broker_back_without_the_session_is_subscribed_again_and_counted(
    fresh: Callable[[str], Service], tmp_path: Path
) -> None:
    """A cut before the broker's first save (or with Debian's 30-minute autosave)
    brings it back without the agent's session: the agent subscribes again at
    once, counts it, and `edge-agent status` says so. bench/session_window.py
    measures how long the nodes' messages go nowhere meanwhile."""
    broker = fresh("mosquitto")
    pipe = esphome_pipeline(broker, tmp_path)
    topic = "esphome/esp-hall/sensor/temperature/state"
    try:
        agent = pipe.start_agent(flush_on_shutdown=False)
        for cut in (1, 2):
            broker.kill()
            (broker.workdir / "mosquitto.db").unlink(missing_ok=True)  # it forgot
            broker.start()
            wait_until(
                lambda n=cut: pipe.agent_status()["counters"].get("intake_sessions_lost") == n,  # type: ignore[misc]
                30,
                f"cut {cut} counted",
            )
            # subscribed again: a state published now is stored
            pub(broker, topic, f"{20 + cut}")
            wait_until(lambda n=cut: stored(pipe) == n, 30, f"reading {cut} stored")  # type: ignore[misc]
        shown = subprocess.run(
            [str(BIN / "edge-agent"), "status", "-c", str(pipe.dir / "edge-agent.toml")],
            capture_output=True, text=True, check=True, timeout=30,
        ).stdout  # fmt: skip
        assert agent.terminate() == 0
    finally:
        pipe.stop_all()
    assert "the broker came back without it 2 times" in shown, shown


def test_firmware_sim_gives_up_with_one_line_naming_why(
    fresh: Callable[[str], Service], tmp_path: Path
) -> None:
    """A broker gone for good: the simulator waits broker.give_up_s, then ends
    with one line that names the broker, the key and what it still held; its
    truth has each reading it published once."""
    broker = fresh("mosquitto")
    cfg = tmp_path / "sim.toml"
    cfg.write_text("[broker]\ngive_up_s = 2.0\n")
    truth = tmp_path / "truth.jsonl"
    sim = subprocess.Popen(
        [str(BIN / "firmware-sim"), "run", "-c", str(cfg), "--port", str(broker.port),
         "--duration", "60", "--speed", "1", "--truth", str(truth)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_until(lambda: truth.exists() and truth.read_bytes().count(b"\n") >= 20, 30, "20")
        broker.kill()
        out, err = sim.communicate(timeout=30)
    finally:
        if sim.poll() is None:
            sim.kill()
            sim.wait()
    assert sim.returncode == 1, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert lines[-1].startswith("error: the broker at 127.0.0.1:") and (
        "unreachable for 2 s (broker.give_up_s)" in lines[-1]
    ), err
    keys = [(c.node, c.sensor, t) for c in read_truth(truth) for t in c.ts.tolist()]
    assert len(keys) == len(set(keys)) > 0
