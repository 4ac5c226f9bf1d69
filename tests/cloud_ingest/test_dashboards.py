"""The Grafana dashboards (cloud_ingest/ops/dashboards.py, shipped in
ansible/roles/monitoring/files/grafana/dashboards).

Grafana itself is not installed here, so each panel's query is run the way
Grafana's datasource would send it, its macros ($timeFilter, $__interval,
$__rate_interval, the template variables) expanded as Grafana expands them, against
a real InfluxDB holding a real pipeline run's data (an edge agent, an alert rule,
a late reading) and a real Prometheus scraping the real ingestor. Each must return
the series its panel expects."""

from __future__ import annotations

import json
import re
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import jinja2
import pytest
import yaml

from cloud_ingest.ops import dashboards
from devstack import influxq
from devstack.services import wait_until
from tests.conftest import FLEET_RUN_DEVICE, FleetRun

ROLE = Path(__file__).resolve().parents[2] / "ansible" / "roles" / "monitoring"
SHIPPED = ROLE / "files" / "grafana" / "dashboards"
S = 10**9
DEVICE = "dev-dash"


def shipped() -> dict[str, dict[str, Any]]:
    return {p.stem: dashboards.load(p) for p in sorted(SHIPPED.glob("*.json"))}


def test_the_shipped_dashboards_are_a_fresh_rendering() -> None:
    """The JSON in the role is what the code builds (regenerate with
    `cloud-ingest dashboards --out ansible/roles/monitoring/files/grafana/dashboards`)."""
    assert sorted(shipped()) == sorted(dashboards.BOARDS)
    for uid in dashboards.BOARDS:
        assert (SHIPPED / f"{uid}.json").read_text() == dashboards.render(uid), uid


def test_every_query_has_its_expectation_and_a_provisioned_datasource() -> None:
    for uid in dashboards.BOARDS:
        dashboards.render(uid)  # registers the expectations
    provisioned = yaml.safe_load(
        jinja2.Template((ROLE / "templates" / "grafana-datasources.yml.j2").read_text()).render(
            ansible_managed="",
            monitoring_grafana_influx_url="http://i",
            monitoring_grafana_influx_database="telemetry",
            monitoring_grafana_prometheus_url="http://p",
            monitoring_scrape_interval="15s",
        )
    )
    uids = {d["uid"]: d["type"] for d in provisioned["datasources"]}
    seen = set()
    for uid, board in shipped().items():
        assert board["schemaVersion"] == dashboards.SCHEMA_VERSION
        for title, target in dashboards.targets(board):
            key = (uid, title, target["refId"])
            assert key in dashboards.EXPECTED, key
            assert uids[target["datasource"]["uid"]] == target["datasource"]["type"]
            seen.add(key)
    assert seen == set(dashboards.EXPECTED)  # and no expectation without its query
    assert len(seen) >= 20


# ---- every query against real data ----

VARIABLES = {"device": FLEET_RUN_DEVICE, "sensor": "temp"}


def influxql_as_grafana_sends_it(query: str) -> str:
    """Grafana's InfluxDB datasource expands $timeFilter, $__interval and template
    variables (a regex-escaped value inside /…/, the raw value elsewhere)."""
    # a short range, as for this short run: Grafana makes $__interval range / width
    q = query.replace("$timeFilter", "time >= now() - 1h").replace("$__interval", "1s")
    for name, value in VARIABLES.items():
        q = q.replace(f"/^${name}$/", f"/^{re.escape(value)}$/").replace(f"${name}", value)
    assert not re.search(r"\$[A-Za-z_]", q), q  # every macro expanded
    return q


def promql_as_grafana_sends_it(expr: str) -> str:
    q = expr.replace("$__rate_interval", "15s")  # four scrapes at Prometheus's 1 s here
    assert not re.search(r"\$[A-Za-z_]", q), q
    return q


def check_influx(url: str, db: str, query: str, expect: dashboards.Expect) -> None:
    res = influxq.influxql(url, query, db)["results"][0]
    assert "error" not in res, (query, res)
    series = res.get("series", [])
    assert series, f"no series: {query}"
    for s in series:
        assert set(expect.tags) <= set(s.get("tags", {})), (query, s.get("tags"))
        assert set(expect.columns) <= set(s["columns"]), (query, s["columns"])
        assert s["values"], query


def check_prom(port: int, expr: str, expect: dashboards.Expect) -> bool:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    result = body["data"]["result"]
    return bool(result) and all(set(expect.tags) <= set(r["metric"]) for r in result)


@pytest.mark.integration
def test_every_panel_query_returns_its_series(fleet_run: FleetRun) -> None:
    influx, prom_port, db = fleet_run.influx, fleet_run.prom_port, fleet_run.db
    for uid in dashboards.BOARDS:  # building a board registers its queries' expectations
        dashboards.render(uid)
    prom_queries = []
    for uid, board in shipped().items():
        for title, target in dashboards.targets(board):
            expect = dashboards.EXPECTED[(uid, title, target["refId"])]
            if target["datasource"]["type"] == "influxdb":
                check_influx(influx.url, db, influxql_as_grafana_sends_it(target["query"]), expect)
            else:
                prom_queries.append((promql_as_grafana_sends_it(target["expr"]), expect))
        for variable in board.get("templating", {}).get("list", []):
            values = influxq.influxql(
                influx.url, influxql_as_grafana_sends_it(variable["query"]), db
            )
            got = [v[1] for s in values["results"][0]["series"] for v in s["values"]]
            assert VARIABLES[variable["name"]] in got, (variable["name"], got)
    assert len(prom_queries) >= 8
    # a fleet panel shows the whole fleet: the agent's device and the five simulated
    (arrived,) = [
        t for title, t in dashboards.targets(shipped()["iot-fleet"]) if title.startswith("Readings")
    ]
    res = influxq.influxql(influx.url, influxql_as_grafana_sends_it(arrived["query"]), db)
    devices = {s["tags"]["device_id"] for s in res["results"][0]["series"]}
    assert devices == {FLEET_RUN_DEVICE, *(f"sim-{k:05d}" for k in range(5))}
    # Prometheus needs a few scrapes (1 s apart) before rate() has two samples
    for expr, expect in prom_queries:
        wait_until(lambda e=expr, x=expect: check_prom(prom_port, e, x), 30, expr)
