"""Desired configuration end to end, with real processes (docs/commands.md, "Desired
configuration"): `cloud-ingest command config` sets a version, the agent applies it
without losing a reading and reports it; a version after which the cloud's acks
stop is rolled back by the device itself and reported; the simulator runs
throughout, and every reading arrives once, window for window."""

from __future__ import annotations

import json
import re
import sqlite3
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from devstack import influxq
from devstack.pipeline import IngestTarget, Pipeline, toml_dumps
from devstack.services import Service, free_port, wait_until
from edge_agent import counters
from tests.conftest import SpecFactory
from tests.helpers import run_cli
from tests.system.test_e2e import WIDTH, compare, expected_windows

pytestmark = pytest.mark.integration

DEVICE = "dev-desired"


def test_a_desired_config_is_applied_and_a_bad_one_rolled_back_by_the_device(
    pipeline_spec: SpecFactory,
    fresh: Any,
    influxdb: Service,
    influx_db: str,
    tmp_path: Path,
) -> None:
    broker = fresh("mosquitto")
    keys = tmp_path / "keys"
    assert (
        run_cli("cloud-ingest", "command", "keygen", "--id", "ops-1", "--dir", str(keys)).returncode
        == 0
    )
    operator = tmp_path / "operator.toml"
    operator.write_text(
        toml_dumps(
            {"mqtt": {"port": broker.port}, "influx": {"url": influxdb.url, "database": influx_db}}
        )
    )
    metrics = free_port()
    spec = pipeline_spec(
        broker=broker,
        device_id=DEVICE,
        targets=[
            IngestTarget(
                "i", {"api": "v1", "url": influxdb.url, "database": influx_db},
                {"url": f"file://{tmp_path / 'lake'}"}, http={"listen": f"127.0.0.1:{metrics}"},
            )
        ],
        agent_extra=(
            f'\n[commands]\nconfig_grace_s = 3\n'
            f'keys = [{{ id = "ops-1", file = "{keys / "ops-1.pub"}" }}]\n'
        ),
        agent_tables={"health": {"interval_s": 1}},
        # live readings for 50 s: before and after the change of width
        duration_s=50.0, speed=1.0, seed=11,
        start_ns=(time.time_ns() // WIDTH) * WIDTH + 5_000_000,
    )  # fmt: skip
    pipe = Pipeline(spec)

    def config(version: int, settings: str) -> dict[str, Any]:
        fragment = tmp_path / f"v{version}.toml"
        fragment.write_text(settings)
        out = run_cli(
            "cloud-ingest", "command", "config", "-c", str(operator), DEVICE,
            "--file", str(fragment), "--version", str(version),
            "--key-file", str(keys / "ops-1.key"), "--wait", "30", "--json",
            "--journal", str(tmp_path / "journal.jsonl"),
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        return dict(json.loads(out.stdout.splitlines()[-1]))

    def reported() -> tuple[int, str, int]:
        q = influxq.influxql(
            influxdb.url,
            'SELECT last("config_version"), last("config_state"), last("config_rejected") '
            'FROM "agent_health"',
            influx_db,
        )
        series = q["results"][0].get("series", [])
        if not series:
            return (0, "", 0)
        _, version, state, rejected = series[0]["values"][0]
        return (int(version), str(state), int(rejected))

    def count(name: str) -> int:
        return int(pipe.agent_status()["counters"].get(name, 0))

    try:
        (ingestor,) = pipe.start_ingestors()
        agent = pipe.start_agent()
        sim = pipe.start_sim()
        wait_until(lambda: count(counters.outgoing("health", "acked")) >= 2, 60, "acks")
        # windows of 10 s closed (of the three sensors) before the change of width
        wait_until(lambda: count(counters.WINDOWS_CLOSED) >= 3, 60, "the first windows")

        # version 1: applied without losing a reading, and reported
        # (and windows of 20 s from a boundary of both widths on: window.adopt_width)
        answer = config(1, "[health]\ninterval_s = 2\n[window]\nwidth_s = 20\n")
        assert answer["status"] == "done" and answer["result"]["version"] == 1
        wait_until(lambda: reported() == (1, "applied", 0), 60, "version 1 reported")
        assert count(counters.CONFIG_APPLIED) == 1

        # version 2 while the cloud's side is down: no ack within the grace period,
        # so the device goes back to version 1 by itself
        assert ingestor.terminate() == 0
        # (a version is the whole fragment: it keeps the 20 s windows)
        answer = config(
            2, "[health]\ninterval_s = 3\n[forward]\nmax_in_flight = 4\n[window]\nwidth_s = 20\n"
        )
        assert answer["status"] == "done"
        wait_until(lambda: count(counters.CONFIG_ROLLED_BACK) == 1, 60, "the rollback")
        out = run_cli("edge-agent", "status", "--json", "-c", str(pipe.dir / "edge-agent.toml"))
        desired = json.loads(out.stdout)["desired_config"]  # what a technician sees
        line = run_cli("edge-agent", "status", "-c", str(pipe.dir / "edge-agent.toml")).stdout
        assert "version 1; version 2 rolled back: no ack from the cloud" in line
        assert (desired["version"], desired["state"], desired["rejected"]) == (1, "rolled-back", 2)
        assert "no ack from the cloud" in desired["reason"]
        (ingestor,) = pipe.start_ingestors()
        wait_until(lambda: reported() == (1, "rolled-back", 2), 60, "the rollback reported")

        # desired against reported, as the fleet dashboard shows them
        q = influxq.influxql(
            influxdb.url, 'SELECT last("version") FROM "config_desired" GROUP BY "device_id"',
            influx_db,
        )  # fmt: skip
        assert q["results"][0]["series"][0]["values"][0][1] == 2

        # and on the ingestor's /metrics: accepted 2, on 1, rolled back
        def gauges() -> dict[str, float]:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as r:
                text = r.read().decode()
            return {
                name: float(value)
                for name, value in re.findall(
                    rf'^(edge_agent_config_\w+){{device_id="{DEVICE}"}} (\S+)$', text, re.M
                )
            }

        wait_until(
            lambda: gauges() == {
                "edge_agent_config_version": 1.0, "edge_agent_config_rolled_back": 1.0,
                "edge_agent_config_desired_version": 2.0,
            },
            60, "desired against reported on /metrics",
        )  # fmt: skip

        # and every ordinary reading arrived once, in the windows numpy computes
        produced = int(pipe.finish_sim(sim, timeout_s=120)["produced"])
        pipe.wait_agent_has(produced, timeout_s=60)
        assert agent.terminate() == 0  # its stop closes and sends every window
        wait_until(
            lambda: influxq.total_count(influxq.v1_windows(influxdb.url, influx_db)) == produced,
            60, "every reading in InfluxDB",
        )  # fmt: skip
        # windows of each width from the time the buffer took it on (window.adopt_width)
        with sqlite3.connect(pipe.agent_db) as db:
            widths = db.execute(
                "SELECT from_ns, width_ns FROM window_widths ORDER BY from_ns"
            ).fetchall()
        assert {w for _, w in widths} == {WIDTH, 2 * WIDTH}, widths
        ends = [f for f, _ in widths[1:]] + [2**63]
        exp = {}
        for (start, width), end in zip(widths, ends, strict=True):
            exp |= expected_windows(pipe.truth, width, width, starts=(start, end))
        # readings on both sides of the switch
        wide = min(f for f, w in widths if w == 2 * WIDTH)
        assert any(k[2] < wide for k in exp) and any(k[2] >= wide for k in exp), widths
        compare("influx", DEVICE, exp, influxq.v1_windows(influxdb.url, influx_db), 1e-9)
    finally:
        pipe.stop_all()
