"""The Prometheus alert rules (ansible/roles/monitoring/files/prometheus): promtool
checks them and runs their unit tests, and a real Prometheus scrapes a running
cloud-ingest fed by a real edge agent, sees each device's health, and fires an
alert on a real quarantine."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from devstack import influxq, services
from devstack.pipeline import IngestTarget, Pipeline
from devstack.services import Service, free_port, wait_until
from tests.conftest import SpecFactory

RULES = Path(__file__).resolve().parents[2] / "ansible/roles/monitoring/files/prometheus"
RULE_FILES = sorted(RULES.glob("*.rules.yml"))
PROMTOOL = shutil.which("promtool")


def promtool(*args: str, cwd: Path = RULES) -> subprocess.CompletedProcess[str]:
    if PROMTOOL is None:
        pytest.fail("promtool is not installed (scripts/setup.sh installs Debian's prometheus)")
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, cwd=cwd, timeout=120, check=False
    )


def test_the_rules_check() -> None:
    assert [p.name for p in RULE_FILES] == ["cloud-ingest.rules.yml", "fleet.rules.yml"]
    res = promtool("check", "rules", *map(str, RULE_FILES))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS: 9 rules found" in res.stdout and "SUCCESS: 5 rules found" in res.stdout


def test_the_rules_unit_tests_pass() -> None:
    tests = sorted((RULES / "tests").glob("*.test.yml"))
    res = promtool("test", "rules", *(t.name for t in tests), cwd=RULES / "tests")
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("SUCCESS") == len(tests) == 2


def test_a_wrong_expectation_fails(tmp_path: Path) -> None:
    """The unit tests can fail: the same test, expecting the wrong device."""
    text = (RULES / "tests" / "fleet.test.yml").read_text()
    broken = tmp_path / "broken.test.yml"
    broken.write_text(
        text.replace("../fleet.rules.yml", str(RULES / "fleet.rules.yml")).replace(
            "{severity: warning, device_id: d2}", "{severity: warning, device_id: d1}"
        )
    )
    res = promtool("test", "rules", str(broken), cwd=tmp_path)
    assert res.returncode != 0 and "DeviceSilent" in res.stdout + res.stderr


def test_every_quarantine_reason_is_shown_from_zero() -> None:
    """Each reason a cloud decoder can raise is in CLOUD_QUARANTINE_REASONS, which
    /metrics shows at 0 before its first increase: a counter that first appears
    at 1 would show no increase, and CloudIngestQuarantining would not fire."""
    import re

    from shared.errors import CLOUD_QUARANTINE_REASONS

    root = Path(__file__).resolve().parents[2]
    sources = [root / "shared" / f for f in ("wire.py", "alerts.py", "health.py", "sketch.py")]
    sources += sorted((root / "cloud_ingest").glob("**/*.py"))
    raised = set()
    for path in sources:
        raised |= set(re.findall(r'WireError\(\s*"([a-z-]+)"', path.read_text()))
    # a command's result (the rest of shared/commands.py is the device's)
    commands = (root / "shared" / "commands.py").read_text()
    raised |= set(re.findall(r'WireError\(\s*"(bad-result)"', commands))
    assert "bad-result" in raised
    assert raised and raised <= set(CLOUD_QUARANTINE_REASONS), raised - set(
        CLOUD_QUARANTINE_REASONS
    )


def test_every_event_is_registered_and_shown_from_zero() -> None:
    """Every name the ingestor counts comes from its registry (events.py), and
    /metrics shows every registered name from 0, so that the rules' rate() sees the
    first increase."""
    import re

    from prometheus_client import CollectorRegistry, generate_latest

    from cloud_ingest.ingest import events
    from cloud_ingest.ingest.metrics import Liveness, _StatsCollector
    from cloud_ingest.ingest.writer import Stats

    root = Path(__file__).resolve().parents[2] / "cloud_ingest"
    calls = [
        (path.name, arg)
        for path in sorted(root.rglob("*.py"))
        for arg in re.findall(r"\.inc\(\s*([^,)]+)", path.read_text())
    ]
    assert len(calls) >= 15, calls  # the scan sees the calls
    assert all(arg.startswith("events.") for _, arg in calls), calls

    registry = CollectorRegistry()
    registry.register(_StatsCollector(Stats(), Liveness()))
    text = generate_latest(registry).decode()
    shown = set(re.findall(r'cloud_ingest_events_total\{event="([a-z_]+)"\} 0\.0', text))
    shown |= {
        f"{family}_{reason}"
        for family, reason in re.findall(
            r'cloud_ingest_(quarantined|deferred)_total\{reason="([a-z-]+)"\} 0\.0', text
        )
    }
    assert shown == set(events.ALL)


def test_the_rules_and_dashboards_name_only_registered_events() -> None:
    """An alert rule or a panel on an event that does not exist never fires or shows
    nothing: every name they use is in the registry."""
    import re

    from cloud_ingest.ingest import events

    root = Path(__file__).resolve().parents[2] / "ansible" / "roles" / "monitoring" / "files"
    used: dict[str, set[str]] = {}
    for path in sorted([*root.rglob("*.yml"), *root.rglob("*.json")]):
        text = path.read_text().replace('\\"', '"')
        for family, expr in re.findall(
            r'cloud_ingest_(events|quarantined|deferred)_total\{[^}]*?(?:event|reason)=~?"([^"]+)"',
            text,
        ):
            for name in expr.split("|"):
                key = name if family == "events" else f"{family}_{name}"
                used.setdefault(key, set()).add(path.name)
    assert len(used) >= 5, used  # the scan sees the rules
    unknown = {k: v for k, v in used.items() if k not in events.ALL}
    assert not unknown, unknown


def api(prom: Service, path: str, **params: str) -> Any:
    url = f"{prom.url}/api/v1/{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return body["data"]


def query(prom: Service, expr: str) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = api(prom, "query", query=expr)["result"]
    return result


@pytest.mark.integration
def test_prometheus_scrapes_cloud_ingest_and_alerts_on_a_quarantine(
    pipeline_spec: SpecFactory, fresh: Callable[[str], Service], tmp_path: Path
) -> None:
    broker, influx = fresh("mosquitto"), fresh("influxdb")
    influxq.create_database(influx.url, "prom")
    metrics_port = free_port()
    pipe = Pipeline(
        pipeline_spec(
            broker=broker,
            device_id="dev-prom",
            targets=[
                IngestTarget(
                    "i1",
                    {"url": influx.url, "database": "prom"},
                    {"url": f"file://{tmp_path / 'lake'}"},
                    http={"listen": f"127.0.0.1:{metrics_port}"},
                )
            ],
        )
    )
    prom = services.prometheus(tmp_path / "prometheus", [f"127.0.0.1:{metrics_port}"], RULE_FILES)
    try:
        pipe.start_ingestors()
        pipe.start_agent()
        prom.start()
        # the agent's first health report, as Prometheus sees it
        wait_until(
            lambda: (
                [s["value"][1] for s in query(prom, 'edge_agent_ok{device_id="dev-prom"}')]
                in (["1"], ["0"])
            ),
            60,
            "the agent's health in Prometheus",
        )
        assert query(prom, "cloud_ingest_up")[0]["value"][1] == "1"
        heard = query(prom, "time() - cloud_ingest_device_last_heard_timestamp_seconds")
        assert [s["metric"]["device_id"] for s in heard] == ["dev-prom"]
        assert float(heard[0]["value"][1]) < 120
        groups = {g["name"]: g for g in api(prom, "rules")["groups"]}
        assert set(groups) == {"cloud-ingest", "fleet"}
        for g in groups.values():
            for rule in g["rules"]:
                assert rule["health"] == "ok", rule
        assert not [a for a in api(prom, "alerts")["alerts"] if a["state"] == "firing"]

        # a device sends what cannot be stored: quarantined, and the alert fires
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        try:
            client.publish("telemetry/v1/dev-prom/batch", b"not a batch", qos=1).wait_for_publish(
                10
            )
        finally:
            client.loop_stop()
            client.disconnect()

        def firing() -> list[dict[str, Any]]:
            alerts: list[dict[str, Any]] = api(prom, "alerts")["alerts"]
            return [a for a in alerts if a["state"] == "firing"]

        wait_until(lambda: bool(firing()), 60, "CloudIngestQuarantining to fire")
        (alert,) = firing()
        assert alert["labels"]["alertname"] == "CloudIngestQuarantining"
        assert alert["labels"]["reason"] == "bad-magic"
    finally:
        prom.stop()
        pipe.stop_all()
