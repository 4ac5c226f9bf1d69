"""Commands end to end, with real processes (docs/commands.md): the operator's
`cloud-ingest command`, Mosquitto, the agent and the ingestor. A command sent while
the device is offline runs once when it is back, and not again after a SIGKILL; a
forged, a replayed and an expired one do nothing and are counted; the results
reach InfluxDB, and leave the device's buffer when the cloud acks them; a ``raw``
command brings the buffer's readings of a past range to the lake, value for value
equal to the simulator's truth; and every ordinary reading arrives once."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pytest

from cloud_ingest.lake import CAPTURED_READINGS_SQL, read_table
from devstack import influxq
from devstack.pipeline import IngestTarget, Pipeline, toml_dumps
from devstack.publish import publish_all
from devstack.services import Service, wait_until
from edge_agent import counters
from firmware_sim.truth import truth_by_sensor
from shared import commands
from shared.commands import Command, sign
from shared.readings import encode_chunk
from tests.conftest import SpecFactory
from tests.helpers import run_cli
from tests.system.test_e2e import WIDTH, compare, expected_windows

pytestmark = pytest.mark.integration

DEVICE = "dev-cmd"
HOUR = 3600 * 10**9


def lake_raw(
    lake: Path, request: str
) -> tuple[int, dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]]:
    """The readings of ``request`` in the lake's raw table: (count, per sensor)."""
    parts: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray]]] = {}
    for path in sorted((lake / "raw").glob("dt=*/device_id=*/*.parquet")):
        table = read_table(path.read_bytes())
        t = table.to_pydict()
        stamps = table.column("ts").cast("int64").to_pylist()  # ns (datetime has µs)
        for r, node, sensor, ts, v in zip(
            t["request"], t["node"], t["sensor"], stamps, t["value"], strict=True
        ):
            if r == request:
                parts.setdefault((node, sensor), []).append((ts, v))
    got = {
        k: (np.array([a for a, _ in v], dtype=np.int64), np.array([b for _, b in v]))
        for k, v in parts.items()
    }
    return sum(len(a) for a, _ in got.values()), got


def test_a_command_to_an_offline_device_runs_once_and_bad_ones_are_counted(
    pipeline_spec: SpecFactory,
    fresh: Any,
    influxdb: Service,
    influx_db: str,
    tmp_path: Path,
) -> None:
    broker = fresh("mosquitto")
    keys = tmp_path / "keys"
    res = run_cli("cloud-ingest", "command", "keygen", "--id", "ops-1", "--dir", str(keys))
    assert res.returncode == 0, res.stderr
    assert (keys / "ops-1.key").stat().st_mode & 0o077 == 0  # the private half: 0600
    operator = tmp_path / "operator.toml"
    operator.write_text(
        toml_dumps(
            {"mqtt": {"port": broker.port}, "influx": {"url": influxdb.url, "database": influx_db}}
        )
    )
    journal = tmp_path / "journal.jsonl"
    spec = pipeline_spec(
        broker=broker,
        device_id=DEVICE,
        targets=[
            IngestTarget(
                "i", {"api": "v1", "url": influxdb.url, "database": influx_db},
                {"url": f"file://{tmp_path / 'lake'}"},
            )
        ],
        agent_extra=f'\n[[commands.keys]]\nid = "ops-1"\nfile = "{keys / "ops-1.pub"}"\n',
        # readings throughout, across the stop and the SIGKILL (test_e2e.py's ground truth)
        duration_s=90.0, speed=10.0, seed=5,
        start_ns=(time.time_ns() // WIDTH - 12) * WIDTH + 5_000_000,
    )  # fmt: skip
    pipe = Pipeline(spec)

    def send(*args: str) -> dict[str, Any]:
        out = run_cli(
            "cloud-ingest", "command", "send", "-c", str(operator), DEVICE, *args,
            "--key-file", str(keys / "ops-1.key"), "--json", "--journal", str(journal),
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        return dict(json.loads(out.stdout.splitlines()[-1]))

    def pending(*args: str) -> dict[str, str]:
        out = run_cli(
            "cloud-ingest", "command", "pending", "-c", str(operator), "--journal", str(journal),
            "--json", *args,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        return {(o := json.loads(line))["id"]: o["state"] for line in out.stdout.splitlines()}

    def count(name: str) -> int:
        return int(pipe.agent_status()["counters"].get(name, 0))

    try:
        pipe.start_ingestors()
        agent = pipe.start_agent(flush_on_shutdown=False)
        sim = pipe.start_sim()
        # online: the result comes back (and the agent's session now holds the subscription)
        assert send("ping", "--wait", "30")["status"] == "done"
        assert agent.terminate() == 0

        # offline: a command, a forged one, one already expired, and one twice
        offline = send("status", "--id", "c-offline")
        assert offline == {"id": "c-offline", "device_id": DEVICE, "sent": True}
        assert pending() == {"c-offline": "pending"}  # the ping was answered
        now = time.time_ns()
        forged = sign(
            Command("c-forged", DEVICE, "ping", now, now + HOUR), "ops-1",
            commands.new_private_key(),
        )  # fmt: skip
        private = commands.load_private(keys / "ops-1.key")
        expired = sign(
            Command("c-old", DEVICE, "ping", now - 2 * HOUR, now - HOUR), "ops-1", private
        )
        twice = sign(Command("c-twice", DEVICE, "ping", now, now + HOUR), "ops-1", private)
        topic = f"telemetry/v1/{DEVICE}/cmd"
        publish_all(
            broker.port, [(topic, forged), (topic, expired), (topic, twice), (topic, twice)]
        )

        agent = pipe.start_agent(flush_on_shutdown=False)
        wait_until(
            lambda: count(counters.COMMANDS_DONE) == 3  # ping, c-offline, c-twice
            and count(counters.command_refused("replayed")) == 1
            and count(counters.command_refused("expired")) == 1
            and count(counters.command_refused("bad-signature")) == 1,
            60, "the offline commands to run",
        )  # fmt: skip
        # SIGKILLed and back: nothing runs again, even when sent again
        agent.popen.kill()
        agent.popen.wait()
        agent = pipe.start_agent(flush_on_shutdown=False)
        publish_all(broker.port, [(topic, twice)])
        wait_until(lambda: count(counters.command_refused("replayed")) == 2, 60, "the replay")
        assert count(counters.COMMANDS_DONE) == 3

        # every result in InfluxDB once, and acked: none left in the buffer
        def results() -> dict[str, tuple[str, str]]:
            q = influxq.influxql(influxdb.url, 'SELECT * FROM "command_result"', influx_db)
            series = q["results"][0].get("series", [])
            rows = [dict(zip(s["columns"], v, strict=True)) for s in series for v in s["values"]]
            return {r["id"]: (r["status"], r["reason"]) for r in rows}

        wait_until(lambda: len(results()) == 4, 60, "the results in InfluxDB")
        got = results()
        assert got.pop("c-offline") == ("done", "") and got.pop("c-twice") == ("done", "")
        assert got.pop("c-old") == ("refused", "expired") and len(got) == 1  # and the ping
        wait_until(lambda: count(counters.outgoing("results", "acked")) == 4, 60, "the acks")
        assert pending() == {}
        assert set(pending("--all").values()) == {"done"} and len(pending("--all")) == 2
        # one sent that never came back, and has expired: it never will
        gone = {"id": "c-gone", "device_id": DEVICE, "kind": "ping"}
        with journal.open("a") as fh:
            fh.write(json.dumps(gone | {"issued_ns": now - 2 * HOUR, "expires_ns": now - HOUR}))
            fh.write("\nnot a journal line\n")
        assert pending() == {"c-gone": "expired"}

        # and every ordinary reading arrived once, in the windows numpy computes
        produced = int(pipe.finish_sim(sim, timeout_s=120)["produced"])
        pipe.wait_agent_has(produced, timeout_s=60)

        # raw data on demand: the buffer's readings of a past range, value for value
        truth = truth_by_sensor(pipe.truth)
        lo = min(int(ts.min()) for ts, _ in truth.values())
        hi = max(int(ts.max()) for ts, _ in truth.values()) + 1
        asked = time.monotonic()
        answer = send(
            "raw", "--arg", "sensors=*", "--arg", f"from={lo}", "--arg", f"to={hi}",
            "--wait", "30",
        )  # fmt: skip
        assert answer["status"] == "done", answer
        raw = answer["result"]
        assert raw["readings"] == produced and "gone_before_ns" not in raw
        wait_until(lambda: lake_raw(tmp_path / "lake", answer["id"])[0] == produced, 60, "raw")
        took = time.monotonic() - asked
        _, got = lake_raw(tmp_path / "lake", answer["id"])
        assert set(got) == set(truth)
        for key, (ts, values) in truth.items():
            order = np.lexsort((values, ts))
            got_ts, got_values = got[key]
            again = np.lexsort((got_values, got_ts))
            assert got_ts[again].tolist() == ts[order].tolist(), key
            assert got_values[again].tobytes() == values[order].tobytes(), key
        wait_until(lambda: count(counters.outgoing("raw", "acked")) == raw["messages"], 60, "acks")
        print(f"raw: {produced} readings, {raw['bytes']} bytes, {raw['messages']} messages, "
              f"{took:.2f} s from send to the lake")  # fmt: skip
        assert agent.terminate() == 0
        agent = pipe.start_agent()  # its stop closes and sends every window
        assert agent.terminate() == 0
        exp = expected_windows(pipe.truth)
        wait_until(
            lambda: influxq.total_count(influxq.v1_windows(influxdb.url, influx_db)) == produced,
            60, "every reading in InfluxDB",
        )  # fmt: skip
        compare("influx", DEVICE, exp, influxq.v1_windows(influxdb.url, influx_db), 1e-9)
    finally:
        pipe.stop_all()


def test_an_alerts_capture_brings_the_readings_on_both_sides_of_it_to_the_lake(
    pipeline_spec: SpecFactory,
    fresh: Any,
    influxdb: Service,
    influx_db: str,
    tmp_path: Path,
) -> None:
    """The flight recorder (docs/commands.md, "Captures around alerts"): a raise names
    its capture in InfluxDB and the lake, and the capture's readings, before and after
    the alert, arrive in the lake value for value; every reading is in its window once."""
    broker = fresh("mosquitto")
    rule = (
        '\n[[alerts]]\nname = "probe-hot"\nsensor = "probe/temp"\nkind = "threshold"\n'
        "above = 50.0\ncapture = { before_s = 10, after_s = 5 }\n"
    )
    spec = pipeline_spec(
        broker=broker,
        device_id="dev-cap",
        targets=[
            IngestTarget(
                "i", {"api": "v1", "url": influxdb.url, "database": influx_db},
                {"url": f"file://{tmp_path / 'lake'}"},
            )
        ],
        agent_extra=rule,
    )  # fmt: skip
    pipe = Pipeline(spec)
    t0 = (time.time_ns() // WIDTH - 12) * WIDTH
    ts = [t0 + k * 10**9 for k in range(60)]
    temps = [20.0 + (k % 7) / 16 for k in range(60)]  # a DS18B20's 1/16 °C steps
    temps[30] = 80.0  # the raise at t0 + 30 s; cleared at the next reading
    try:
        pipe.start_ingestors()
        agent = pipe.start_agent()
        # one reading per message, as ESPHome and Tasmota send them
        publish_all(
            broker.port,
            [
                ("sensors/probe/temp", encode_chunk("C", [t], [v]))
                for t, v in zip(ts, temps, strict=True)
            ],
        )
        pipe.wait_agent_has(60, timeout_s=60)

        def alerts() -> list[dict[str, Any]]:
            q = influxq.influxql(influxdb.url, 'SELECT * FROM "alert"', influx_db)
            series = q["results"][0].get("series", [])
            return [dict(zip(s["columns"], v, strict=True)) for s in series for v in s["values"]]

        wait_until(lambda: len(alerts()) == 2, 60, "the alerts in InfluxDB")
        raised = next(a for a in alerts() if a["state"] == "raised")
        capture = raised["capture"]
        assert capture.startswith("alert-")
        lake = tmp_path / "lake"
        wait_until(lambda: lake_raw(lake, capture)[0] == 15, 60, "the capture in the lake")
        _, got = lake_raw(lake, capture)
        want = [
            (t, v) for t, v in zip(ts, temps, strict=True) if t0 + 20 * 10**9 <= t < t0 + 35 * 10**9
        ]
        got_ts, got_values = got[("probe", "temp")]
        assert list(zip(got_ts.tolist(), got_values.tolist(), strict=True)) == want
        (alert_obj,) = [
            read_table(p.read_bytes()).to_pydict()
            for p in (lake / "alerts").glob("dt=*/device_id=dev-cap/*.parquet")
            if read_table(p.read_bytes()).to_pydict()["state"] == ["raised"]
        ]
        assert alert_obj["capture"] == [capture]
        # what an analyst runs (docs/commands.md): the capture beside its alert
        rows = duckdb.sql(CAPTURED_READINGS_SQL.format(root=lake)).fetchall()
        assert [(r[1], r[3], r[4], r[6]) for r in rows] == [
            ("probe-hot", "probe", "temp", v) for _, v in want
        ]
        assert pipe.agent_status()["counters"][counters.CAPTURES_SENT] == 1
        # every reading in its window, once
        assert agent.terminate() == 0  # its stop closes and sends every window
        wait_until(
            lambda: influxq.total_count(influxq.v1_windows(influxdb.url, influx_db)) == 60,
            60, "the windows",
        )  # fmt: skip
    finally:
        pipe.stop_all()
