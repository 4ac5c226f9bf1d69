"""docs/devices.md, run: every recipe's config in one agent, every recipe's payloads
sent with the client the recipe names (mosquitto_pub, curl, influxdb-client, a
pymodbus server), and InfluxDB ends with exactly the readings sent, sensor by sensor.

The recipes are read from the page itself, so the page cannot drift from what
works: its ``toml`` blocks (not ``toml telegraf.conf``) become the agent's config,
its ``sh`` and ``python`` blocks run, and its ``<!-- expect: node/sensor=count -->``
comments (``=count/invalid`` where some readings are invalid) are the ground
truth. Commands are pointed at the test's ports.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from devstack import influxq
from devstack.pipeline import BIN, IngestTarget, Pipeline
from devstack.services import Service, free_port, wait_until
from tests.conftest import SpecFactory

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "devices.md"
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.M | re.S)


@dataclass
class Recipe:
    title: str
    toml: list[str] = field(default_factory=list)
    sh: list[str] = field(default_factory=list)
    python: list[str] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    #: (node, sensor) -> (readings in the windows' count, invalid readings)
    expect: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    modbus: dict[str, float] = field(default_factory=dict)
    modbus_node: str = ""
    #: [intake.host]: its node and the sensors every machine has
    host_node: str = ""
    host_sensors: tuple[str, ...] = ()


def recipes() -> list[Recipe]:
    out = []
    for section in DOC.read_text().split("\n## ")[1:]:
        r = Recipe(section.splitlines()[0])
        for info, body in FENCE.findall(section):
            kind = info.strip()
            if kind in ("toml", "sh", "python", "text"):
                getattr(r, kind).append(body)
        for m in re.finditer(r"<!-- expect: (.*?) -->", section):
            for item in m.group(1).split():
                name, count = item.rsplit("=", 1)
                node, sensor = name.split("/", 1)
                valid, _, invalid = count.partition("/")
                r.expect[(node, sensor)] = (int(valid), int(invalid or 0))
        for m in re.finditer(r"<!-- expect-host: (\S+) (.*?) -->", section):
            r.host_node, r.host_sensors = m.group(1), tuple(m.group(2).split())
        for m in re.finditer(r"<!-- expect-modbus: (\S+) (.*?) -->", section):
            r.modbus_node = m.group(1)
            r.modbus = {k: float(v) for k, v in (i.split("=") for i in m.group(2).split())}
        out.append(r)
    return out


def text_sensors(block: str) -> set[str]:
    return {
        line.split()[0]
        for line in block.splitlines()
        if line.strip() and not line.startswith(("sensor ", "---"))
    }


def tag_counts(url: str, db: str, device: str) -> set[tuple[str, str, str]]:
    """(site, room, node) of every series of the device's windows in InfluxDB."""
    res = influxq.influxql(
        url,
        f'SELECT count("count") FROM "window" WHERE device_id = \'{device}\' '
        "GROUP BY site, room, node",
        db,
    )
    return {
        (s["tags"]["site"], s["tags"]["room"], s["tags"]["node"])
        for s in res["results"][0].get("series", [])
    }


def archived_batches(root: Path) -> list[Any]:
    from cloud_ingest.lake import read_table, table_to_batches

    return [
        b
        for p in sorted(root.glob("aggregates/*/*.parquet"))
        for b in table_to_batches(read_table(p.read_bytes()))
    ]


def test_the_page_has_a_recipe_for_every_family_and_every_source_type() -> None:
    rs = recipes()
    titles = " ".join(r.title for r in rs)
    for family in (
        "ESPHome",
        "Tasmota",
        "Zigbee2MQTT",
        "Shelly",
        "Home Assistant",
        "Telegraf",
        "Node-RED",
        "Modbus",
    ):
        assert family in titles
    config = "\n".join(b for r in rs for b in r.toml)
    for fmt in ("value", "json", "influx", "csv"):
        assert f'format = "{fmt}"' in config
    assert "[intake.http]" in config and "[[intake.modbus]]" in config
    assert "[intake.host]" in config
    assert sum(len(r.expect) for r in rs) >= 80


def agent_toml(rs: list[Recipe], http_port: int, meter_port: int) -> str:
    text = "\n".join(b for r in rs for b in r.toml)
    text = text.replace("[intake.http]\n", f"[intake.http]\nport = {http_port}\n")
    text = text.replace(
        'host = "192.168.1.50"\nport = 502', f'host = "127.0.0.1"\nport = {meter_port}'
    )
    text = text.replace("interval_s = 10.0", "interval_s = 0.5").replace(
        "timeout_s = 1.0", "timeout_s = 0.4"
    )
    return text.replace(
        '"/etc/iot-telemetry/modbus-sdm120.toml"',
        json.dumps(str(ROOT / "docs/examples/modbus-sdm120.toml")),
    )


def pointed(code: str, broker: int, http: int) -> str:
    return (
        code.replace("-p 1883", f"-p {broker}")
        .replace("http://localhost:8086", f"http://127.0.0.1:{http}")
        .replace("-h localhost", "-h 127.0.0.1")
    )


def test_every_recipe_reaches_influxdb_exactly(
    pipeline_spec: SpecFactory,
    fresh: Callable[[str], Service],
    influxdb: Service,
    influx_db: str,
    tmp_path: Path,
    unique: str,
) -> None:
    rs = recipes()
    broker = fresh("mosquitto")
    http_port, meter_port = free_port(), free_port()
    ready = tmp_path / "meter.ready"
    meter_log = open(tmp_path / "meter.log", "wb")  # noqa: SIM115 (closed in finally)
    meter = subprocess.Popen(
        [sys.executable, "-m", "devstack.modbus_meter", "--port", str(meter_port),
         "--ready-file", str(ready)],
        stdout=meter_log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    device = f"dev-{unique}"
    pipe = Pipeline(
        pipeline_spec(
            broker=broker,
            device_id=device,
            targets=[
                IngestTarget(
                    "v1",
                    {"api": "v1", "url": influxdb.url, "database": influx_db},
                    {"url": f"file://{tmp_path / 'archive'}"},
                )
            ],
            agent_extra="\n" + agent_toml(rs, http_port, meter_port),
            agent_tables={"tags": ["site=test-lab"]},  # docs/devices.md, "Tags"
        )
    )
    try:
        wait_until(ready.exists, 30, "the Modbus meter to listen")
        pipe.start_ingestors()
        agent = pipe.start_agent()
        for r in rs:
            for block in r.sh:
                res = subprocess.run(
                    ["bash", "-euo", "pipefail", "-c", pointed(block, broker.port, http_port)],
                    capture_output=True, timeout=60, check=False,
                )  # fmt: skip
                assert res.returncode == 0, (r.title, res.stdout, res.stderr)
                assert not res.stdout, (r.title, res.stdout)  # curl: a 204 has no body
            for block in r.python:
                exec(compile(pointed(block, broker.port, http_port), r.title, "exec"), {})
        expected: dict[tuple[str, str], tuple[int, int]] = {}
        for r in rs:
            for key, (valid, invalid) in r.expect.items():
                old = expected.get(key, (0, 0))
                expected[key] = (old[0] + valid, old[1] + invalid)
        total = sum(v + i for v, i in expected.values())
        modbus = next(r for r in rs if r.modbus)
        host = next(r for r in rs if r.host_node)

        def counters() -> dict[str, int]:
            return {k: int(v) for k, v in pipe.agent_status()["counters"].items()}

        def taken() -> bool:
            c = counters()
            pushed = c.get("readings_stored", 0) - c.get("source_meter_readings", 0)
            return pushed >= total and c.get("source_meter_messages", 0) >= 3

        wait_until(taken, 30, "the agent to store every recipe's readings")

        # what the technician sees: every sensor of every recipe's `edge-agent sensors`
        cfg = pipe.dir / "edge-agent.toml"
        out = subprocess.run(
            [str(BIN / "edge-agent"), "sensors", "-c", str(cfg), "--json"],
            capture_output=True, check=True, timeout=60,
        ).stdout  # fmt: skip
        views = {f"{v['node']}/{v['sensor']}": v for v in json.loads(out)}
        table = subprocess.run(
            [str(BIN / "edge-agent"), "sensors", "-c", str(cfg), "--windows", "1"],
            capture_output=True, check=True, timeout=60,
        ).stdout  # fmt: skip
        (pipe.dir / "sensors.txt").write_bytes(table)  # what the page shows, kept with the logs
        for r in rs:
            for block in r.text:
                assert text_sensors(block) <= set(views), (
                    r.title,
                    text_sensors(block) - set(views),
                )
        for sensor, value in modbus.modbus.items():
            assert views[f"{modbus.modbus_node}/{sensor}"]["last_value"] == value

        # the meter goes away: polls fail, are counted, and the agent goes on
        meter.terminate()
        meter.wait(10)
        wait_until(lambda: counters().get("source_meter_errors", 0) >= 1, 30, "a failed poll")
        assert agent.popen.poll() is None
        assert agent.terminate() == 0  # flushes the open windows, drains the outbox

        c = counters()
        polls = c["source_meter_messages"]
        assert c["source_meter_readings"] == polls * 10
        samples, sampled = c["source_host_messages"], c["source_host_readings"]
        assert samples >= 2 and c.get("source_host_errors", 0) == 0
        for name in (k[len("source_") : -len("_rejected")] for k in c if k.endswith("_rejected")):
            assert c[f"source_{name}_rejected"] == 0, name
        assert c["readings_stored"] == total + polls * 10 + sampled
        assert not {k: v for k, v in c.items() if k.startswith("dropped_") and v}
        assert c["readings_filtered"] == 1  # Home Assistant's "unavailable", ignored
        for sensor in modbus.modbus:
            expected[(modbus.modbus_node, sensor)] = (polls, 0)

        def in_influx() -> dict[tuple[str, str], tuple[int, int]]:
            got: Counter[tuple[str, str, str]] = Counter()
            for (dev, node, sensor, _), w in influxq.v1_windows(influxdb.url, influx_db).items():
                if dev == device:
                    got[(node, sensor, "count")] += int(w["count"])
                    got[(node, sensor, "invalid")] += int(w["invalid"] or 0)
            return {(n, s): (got[(n, s, "count")], got[(n, s, "invalid")]) for n, s, _ in got}

        want = {
            k: v for k, v in expected.items() if k[0] != modbus.modbus_node or k[1] in modbus.modbus
        }

        def all_in(got: dict[tuple[str, str], tuple[int, int]]) -> bool:
            host_sum = sum(v for (n, _), (v, _) in got.items() if n == host.host_node)
            return {k: v for k, v in got.items() if k in want} == want and host_sum == sampled

        try:
            wait_until(
                lambda: all_in(in_influx()),
                60,
                "InfluxDB to hold every recipe's readings",
                interval_s=0.3,
            )
        finally:
            got = in_influx()
        # the static tags: every point has the device's, the kitchen nodes' the room too
        tagged = tag_counts(influxdb.url, influx_db, device)
        assert {site for site, _, _ in tagged} == {"test-lab"}
        assert {node for _, room, node in tagged if room == "kitchen"} == {
            n for n, _ in want if n.startswith("kitchen")
        }
        lake = {
            (r.node, tuple(r.tags))
            for b in archived_batches(tmp_path / "archive")
            for r in b.sensors
        }
        assert ("kitchen_th", (("room", "kitchen"), ("site", "test-lab"))) in lake
        assert all(("site", "test-lab") in t for _, t in lake)
        # exactly: no reading of a recipe missing, none twice, no sensor that was not sent
        assert {k: v for k, v in got.items() if k in want} == want
        meter_sensors = {k for k in got if k[0] == modbus.modbus_node}
        assert all(got[k] == (polls, 0) for k in meter_sensors) and len(meter_sensors) == 10
        # the gateway's own metrics: each sensor the page names, every reading the agent
        # stored of them once, none invalid
        host_sensors = {k for k in got if k[0] == host.host_node}
        assert {(host.host_node, s) for s in host.host_sensors} <= host_sensors
        assert sum(got[k][0] for k in host_sensors) == sampled
        assert all(got[k][1] == 0 and got[k][0] >= samples - 1 for k in host_sensors)
        assert set(got) - set(want) == (meter_sensors | host_sensors) - set(want)
    finally:
        if meter.poll() is None:
            meter.kill()
        meter.wait()
        meter_log.close()
        pipe.stop_all()
