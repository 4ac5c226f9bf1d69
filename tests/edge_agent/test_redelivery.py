"""Readings stamped on arrival (ESPHome, Home Assistant, Shelly: most devices send
no time) exactly once, with a real broker and real restarts:

* a retained message is state the broker replays at every subscription, not a
  new reading (``retained = "skip"``), or is stored once per value (``"once"``);
* a message the broker redelivers after the agent was SIGKILLed between its
  commit and its PUBACK (DUP set, the same packet identifier) is recognised and
  not stored twice, while two equal values a device sends are two readings.
"""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from devstack.pipeline import Pipeline, PipelineSpec
from devstack.services import Service, wait_until
from edge_agent.store import Store
from edge_agent.technician.status import read_status
from tests.conftest import SpecFactory

pytestmark = pytest.mark.integration

SOURCES = """
[[intake.sources]]
name = "esphome"
topic = "esphome/{node}/+/{sensor}/state"
format = "value"

[[intake.sources]]
name = "statestream"
topic = "homeassistant/statestream/{sensor}/{sensor}/state"
format = "value"
node = "home-assistant"
states = ["on=1", "off=0"]
retained = "once"
"""


def pipeline(broker: Service, tmp_path: Path) -> Pipeline:
    return Pipeline(
        PipelineSpec(
            workdir=tmp_path / "run",
            local_port=broker.port,
            cloud_port=broker.port,
            targets=[],
            agent_extra=SOURCES,
            agent_tables={"health": {"interval_s": 0}},
        )
    )


def stored(pipe: Pipeline) -> dict[str, int]:
    """Readings in the buffer per node/sensor."""
    store = Store(pipe.agent_db, readonly=True)
    try:
        rows = store.conn.execute(
            "SELECT s.node || '/' || s.name, sum(c.n) FROM chunks c "
            "JOIN sensors s ON s.id = c.sensor_id GROUP BY 1"
        ).fetchall()
    finally:
        store.close()
    return {k: int(v) for k, v in rows}


def counters(pipe: Pipeline) -> dict[str, int]:
    return {k: int(v) for k, v in read_status(pipe.agent_db)["counters"].items()}


def pub(broker: Service, topic: str, message: str, *extra: str) -> None:
    subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1",
         "-t", topic, "-m", message, *extra],
        check=True, timeout=30,
    )  # fmt: skip


def test_retained_state_is_not_a_new_reading_at_each_start(
    fresh: Callable[[str], Service], tmp_path: Path
) -> None:
    broker = fresh("mosquitto")
    # ESPHome publishes state retained (esphome.io, MQTT Client: retain defaults
    # to true); Home Assistant's mqtt_statestream with publish_retain: true
    pub(broker, "esphome/esp-kitchen/sensor/temperature/state", "21.5", "-r")
    pub(broker, "homeassistant/statestream/binary_sensor/front_door/state", "off", "-r")
    pipe = pipeline(broker, tmp_path)
    try:
        for start in range(3):
            agent = pipe.start_agent(flush_on_shutdown=False)
            want = {
                "esphome_retained": start + 1,
                "statestream_retained": start,
                "statestream_messages": start + 1,
            }

            def arrived(w: dict[str, int] = want) -> bool:
                c = counters(pipe)
                return all(c.get(f"source_{k}", 0) >= n for k, n in w.items())

            wait_until(arrived, 30, f"start {start + 1}: the retained messages")
            if start == 1:
                # a state published while the agent runs is a reading, retained or not
                pub(broker, "esphome/esp-kitchen/sensor/temperature/state", "21.75", "-r")
                pub(broker, "homeassistant/statestream/binary_sensor/front_door/state", "on", "-r")
                wait_until(lambda: len(stored(pipe)) == 2, 30, "the live states")
            assert agent.terminate() == 0
        got = stored(pipe)
        c = counters(pipe)
    finally:
        pipe.stop_all()
    # ESPHome ("skip"): only the value published live; three replays skipped, counted
    assert got["esp-kitchen/temperature"] == 1
    assert c["source_esphome_retained"] == 3  # one replay at each start
    # statestream ("once"): the first value once, the live one once, no replay again
    assert got["home-assistant/binary_sensor.front_door"] == 2
    assert c["source_statestream_retained"] == 2  # start 2 (off) and start 3 (on)


def test_qos0_states_published_while_the_agent_is_stopped_wait_for_it(
    fresh: Callable[[str], Service], tmp_path: Path
) -> None:
    """ESPHome publishes its states with QoS 0 (esphome.io, MQTT Client
    Component: ``qos`` defaults to 0; so do Zigbee2MQTT's devices and Shelly's
    ``mqtt_qos``). Mosquitto queues QoS 0 for an absent session only with
    ``queue_qos0_messages true``, which the shipped device broker sets: a restart
    of the agent (an upgrade) costs none of them."""
    broker = fresh("mosquitto")
    pipe = pipeline(broker, tmp_path)
    try:
        assert pipe.start_agent(flush_on_shutdown=False).terminate() == 0  # its session
        lines = "\n".join(f"{20 + i / 10:g}" for i in range(40))
        subprocess.run(
            ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "0",
             "-t", "esphome/esp-hall/sensor/temperature/state", "-l"],
            input=lines.encode(), check=True, timeout=30,
        )  # fmt: skip
        agent = pipe.start_agent(flush_on_shutdown=False)
        wait_until(lambda: stored(pipe).get("esp-hall/temperature") == 40, 30, "40 readings")
        assert agent.terminate() == 0
        c = counters(pipe)
    finally:
        pipe.stop_all()
    assert c["source_esphome_messages"] == c["readings_stored"] == 40


N = 50_000


def test_arrival_stamped_readings_exactly_once_across_crashes(
    fresh: Callable[[str], Service], tmp_path: Path
) -> None:
    """50,000 one-reading ESPHome messages at full speed, `mosquitto_pub -l`; the
    agent SIGKILLed four times while they flow and started again: every message
    is one reading, none twice. The values repeat (each three times in a row), so
    equal consecutive values must stay distinct readings."""
    broker = fresh("mosquitto")
    pipe = pipeline(broker, tmp_path)
    lines = "".join(f"{20 + (i // 3) % 50 / 10}\n" for i in range(N)).encode()
    redelivered = 0
    try:
        agent = pipe.start_agent(flush_on_shutdown=False)
        publisher = subprocess.Popen(
            ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1",
             "-t", "esphome/node-1/sensor/temperature/state", "-l"],
            stdin=subprocess.PIPE,
        )  # fmt: skip
        feeder = threading.Thread(target=publisher.communicate, args=(lines,), daemon=True)
        feeder.start()
        for at in (5_000, 15_000, 27_000, 40_000):

            def reached(n: int = at) -> bool:
                return counters(pipe).get("source_esphome_messages", 0) >= n

            wait_until(reached, 120, f"{at} messages", interval_s=0.02)
            agent.popen.kill()  # SIGKILL: between a commit and its PUBACK, sometimes
            agent.popen.wait()
            agent = pipe.start_agent(flush_on_shutdown=False)
        feeder.join(120)
        assert publisher.wait(60) == 0
        wait_until(
            lambda: (
                stored(pipe).get("node-1/temperature", 0) >= N
                and counters(pipe).get("source_esphome_messages", 0)
                - counters(pipe).get("source_esphome_redelivered", 0)
                >= N
            ),
            120,
            "every message",
            interval_s=0.2,
        )
        assert agent.terminate() == 0
        got = stored(pipe)
        c = counters(pipe)
        redelivered = c.get("source_esphome_redelivered", 0)
    finally:
        pipe.stop_all()
    assert got == {"node-1/temperature": N}, (
        got,
        {k: v for k, v in c.items() if "source" in k or "dup" in k},
    )
    assert c["source_esphome_readings"] == N
    print(f"redelivered after the kills: {redelivered}")


def test_array_windows_equal_numpy_and_retained_replays_change_nothing(
    pipeline_spec: SpecFactory,
    fresh: Callable[[str], Service],
    influxdb: Service,
    influx_db: str,
    tmp_path: Path,
    unique: str,
) -> None:
    """The oracle check (windows in InfluxDB equal to numpy on the ground truth,
    tests/system/test_e2e.py) for readings that arrive as JSON arrays, one element per
    channel, as a two-channel Tasmota meter sends them; the last message is also
    published retained and the agent started twice more: its replays are
    recognised (the message carries its time) and every window stays exact."""
    import time

    import numpy as np

    from devstack import influxq
    from devstack.pipeline import IngestTarget
    from firmware_sim.truth import TruthWriter
    from tests.system.test_e2e import WIDTH, WIDTH_S, compare, expected_windows

    broker = fresh("mosquitto")
    device = f"dev-{unique}"
    pipe = Pipeline(
        pipeline_spec(
            broker=broker,
            device_id=device,
            width_s=WIDTH_S,
            targets=[
                IngestTarget(
                    "v1",
                    {"api": "v1", "url": influxdb.url, "database": influx_db},
                    {"url": f"file://{tmp_path / 'archive'}"},
                )
            ],
            agent_extra='[[intake.sources]]\nname = "meters"\ntopic = "meters/{node}"\n'
            'format = "json"\ntime_field = "t"\ntime_format = "ms"\n',
        )
    )
    rng = np.random.default_rng(21)
    start_ms = (time.time_ns() // WIDTH - 6) * WIDTH // 10**6 + 123
    n = 400  # 10 Hz for 40 s of event time, in the past
    t_ms = start_ms + np.arange(n) * 100
    power = np.round(rng.normal(50, 20, size=(n, 2)), 2)  # W, two channels
    lines = [
        json.dumps({"t": int(t), "ENERGY": {"Power": [float(a), float(b)]}})
        for t, (a, b) in zip(t_ms, power, strict=True)
    ]
    truth = tmp_path / "truth.jsonl"
    tw = TruthWriter(truth)
    for ch in (0, 1):
        tw.write("meter-2ch", f"ENERGY.Power.{ch}", "", (t_ms * 10**6).tolist(),
                 power[:, ch].tolist())  # fmt: skip
    tw.close()
    try:
        pipe.start_ingestors()
        agent = pipe.start_agent(flush_on_shutdown=False)
        subprocess.run(
            ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-q", "1",
             "-t", "meters/meter-2ch", "-l"],
            input="\n".join(lines).encode(), check=True, timeout=60,
        )  # fmt: skip
        pub(broker, "meters/meter-2ch", lines[-1], "-r")  # the last state, retained
        wait_until(lambda: counters(pipe).get("source_meters_messages", 0) >= n + 1, 30, "all")
        for _ in range(2):  # two more starts: the broker replays the retained message
            assert agent.terminate() == 0
            agent = pipe.start_agent(flush_on_shutdown=False)
        wait_until(lambda: counters(pipe).get("source_meters_messages", 0) >= n + 3, 30, "replay")
        agent.terminate()
        agent = pipe.start_agent()  # flush on its stop: every window closes
        assert agent.terminate() == 0
        c = counters(pipe)
        exp = expected_windows(truth)

        def windows() -> dict[tuple[str, str, str, int], dict[str, Any]]:
            return {
                k: v
                for k, v in influxq.v1_windows(influxdb.url, influx_db).items()
                if k[0] == device
            }

        wait_until(lambda: len(windows()) >= len(exp), 60, "the windows in InfluxDB")
        compare("arrays", device, exp, windows(), rel=1e-12)
    finally:
        pipe.stop_all()
    assert c["source_meters_readings"] == 2 * n
    # the retained copy, live, then replayed at each of three starts
    assert c["duplicates_ignored"] == 2 * 4
