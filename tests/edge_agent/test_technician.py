"""The technician's commands against a real agent, broker and InfluxDB: with the agent
running, and with it stopped (no network needed)."""

from __future__ import annotations

import csv
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from devstack import influxq
from devstack.pipeline import BIN, IngestTarget, Pipeline
from devstack.publish import publish_all
from devstack.services import Service, wait_until
from edge_agent.cli import EXIT_PARTIAL
from shared.readings import encode_chunk
from tests.conftest import SpecFactory
from tests.helpers import agent_cli as cli

pytestmark = pytest.mark.integration
W = 10_000_000_000


def test_commands_with_the_agent_running_then_stopped(
    pipeline_spec: SpecFactory,
    fresh: Callable[[str], Service],
    influxdb: Service,
    influx_db: str,
    tmp_path: Path,
) -> None:
    broker = fresh("mosquitto")
    pipe = Pipeline(
        pipeline_spec(
            broker=broker,
            workdir=tmp_path,
            width_s=10.0,
            targets=[
                IngestTarget(
                    "t",
                    {"api": "v1", "url": influxdb.url, "database": influx_db},
                    {"url": f"file://{tmp_path / 'archive'}"},
                )
            ],
        )
    )
    cfg = str(tmp_path / "edge-agent.toml")
    t0 = (time.time_ns() // W - 3) * W
    temps = [20.0 + i / 8 for i in range(8)]
    msgs = [
        ("sensors/env-1/temp", encode_chunk("degC", [t0 + i * 10**9], [v]))
        for i, v in enumerate(temps)
    ]
    msgs.append(("sensors/env-1/hum", encode_chunk("%", [t0 + 5, t0 + W + 5], [40.5, 41.5])))
    try:
        pipe.start_ingestors()
        agent = pipe.start_agent(flush_on_shutdown=False)

        # status: running, both brokers connected (after the first heartbeat)
        def running() -> bool:
            st = json.loads(cli("status", "-c", cfg, "--json").stdout)
            return bool(st["running"] and st["intake_connected"] and st["forward_connected"])

        wait_until(running, 30, "status to show the agent running and connected")

        # tail sees what the nodes publish, beside the agent
        tailer = subprocess.Popen(
            [str(BIN / "edge-agent"), "tail", "-c", cfg, "--count", "9", "--timeout", "30"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert tailer.stderr is not None
        assert "listening on" in tailer.stderr.readline()  # blocks until subscribed
        publish_all(broker.port, msgs)
        out, _ = tailer.communicate(timeout=40)
        lines = out.splitlines()
        assert tailer.returncode == 0 and len(lines) == 9
        assert "env-1/temp  20 degC" in lines[0]

        # flush: the open windows are closed, sent and acknowledged by the cloud
        wait_until(
            lambda: (
                json.loads(cli("status", "-c", cfg, "--json").stdout)["counters"].get(
                    "readings_stored", 0
                )
                == 10
            ),
            30,
            "intake",
        )
        res = cli("flush", "-c", cfg, "--timeout", "30")
        assert res.exit_code == 0, res.output
        st = json.loads(cli("status", "-c", cfg, "--json").stdout)
        assert st["backlog_batches"] == 0 and st["last_ack_age_s"] < 30
        assert influxq.total_count(influxq.v1_windows(influxdb.url, influx_db)) == 10

        # sensors: last values and a trend
        views = {v["sensor"]: v for v in json.loads(cli("sensors", "-c", cfg, "--json").stdout)}
        assert views["temp"]["last_value"] == temps[-1] and views["hum"]["last_value"] == 41.5
        assert views["temp"]["sparkline"]

        # doctor: both brokers answer
        checks = {c["name"]: c for c in json.loads(cli("doctor", "-c", cfg, "--json").stdout)}
        assert checks["intake.broker"]["level"] == checks["forward.broker"]["level"] == "ok"
        assert agent.terminate() == 0
    finally:
        pipe.stop_all()

    # --- the agent is stopped: the same commands work from the file alone
    st = json.loads(cli("status", "-c", cfg, "--json").stdout)
    assert st["running"] is False
    out = tmp_path / "raw.csv"
    res = cli(
        "export",
        "-c",
        cfg,
        "--since",
        str(t0),
        "--until",
        str(t0 + 3 * W),
        "--kind",
        "raw",
        "-o",
        str(out),
    )
    assert res.exit_code == 0, res.output
    with out.open() as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["value"]) for r in rows if r["sensor"] == "temp"] == temps
    assert len(rows) == 10
    wout = tmp_path / "windows.csv"
    res = cli("export", "-c", cfg, "--since", str(t0), "--until", str(t0 + 3 * W), "-o", str(wout))
    assert res.exit_code == 0, res.output
    with wout.open() as fh:
        wins = {(r["sensor"], int(r["start_ns"])): r for r in csv.DictReader(fh)}
    assert int(wins[("temp", t0)]["count"]) == 8
    assert float(wins[("temp", t0)]["p50"]) == float(np.median(temps))
    assert cli("buffer", "check", "-c", cfg).exit_code == 0
    publish_later = cli("flush", "-c", cfg)
    assert publish_later.exit_code == EXIT_PARTIAL


def test_tail_filters_by_node_and_sensor_and_prints_json_lines(
    mosquitto: Service, tmp_path: Path
) -> None:
    cfg = tmp_path / "a.toml"
    cfg.write_text(f"[intake.broker]\nport = {mosquitto.port}\n")
    t0 = 1_800_000_000 * 10**9
    msgs = [
        ("sensors/env-1/temp", encode_chunk("degC", [t0], [21.123456789])),
        ("sensors/env-1/hum", encode_chunk("%", [t0 + 1], [40.0])),
        ("sensors/pump-1/temp", encode_chunk("degC", [t0 + 2], [80.0])),
        ("sensors/env-1/temp", encode_chunk("degC", [t0 + 3], [22.5])),
    ]

    def tail(*args: str) -> list[str]:
        proc = subprocess.Popen(
            [str(BIN / "edge-agent"), "tail", "-c", str(cfg), "--timeout", "30", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stderr is not None
        assert "listening on" in proc.stderr.readline()  # blocks until subscribed
        publish_all(mosquitto.port, msgs)
        out, err = proc.communicate(timeout=40)
        assert proc.returncode == 0, err
        return out.splitlines()

    rows = [
        json.loads(line)
        for line in tail("--json", "--node", "env-*", "--sensor", "temp", "--count", "2")
    ]
    assert [(r["node"], r["sensor"], r["value"]) for r in rows] == [
        ("env-1", "temp", 21.123456789),  # as sent, in JSON
        ("env-1", "temp", 22.5),
    ]
    assert rows[0]["ts_ns"] == t0 and rows[0]["time"] == "2027-01-15T08:00:00.000Z"
    (line,) = tail("--sensor", "temp", "--node", "pump-*", "--count", "1")
    assert line.endswith("pump-1/temp  80 degC")
    (line,) = tail("--sensor", "temp", "--count", "1")
    assert line.endswith("env-1/temp  21.1235 degC")  # six significant digits
