"""Grafana dashboards as code, with Grafana's own grafana-foundation-sdk.

``cloud-ingest dashboards --out DIR`` writes four dashboards as JSON, which the
Ansible role ``monitoring`` provisions (ansible/roles/monitoring/files/grafana):

* ``iot-fleet``: which devices are silent, behind, dropping or near their disk
  budget, and how complete each device's data is (InfluxDB, and Prometheus for
  the last-heard times);
* ``iot-device``: one device's sensors, each window's mean in its min-max band
  with its p99, revisions, its health and its alerts (InfluxDB);
* ``iot-alerts``: alert events across the fleet (InfluxDB);
* ``iot-cloud-ingest``: the ingestors' own health (Prometheus).

The SDK has builders for Prometheus queries but none for InfluxQL, so
:class:`InfluxQL` is a small Dataquery of its own, the way the SDK's generated
query types are made. Every query is registered with what its result must hold
(:data:`EXPECTED`): tests/cloud_ingest/test_dashboards.py runs each one against a real InfluxDB
holding a pipeline run's data, or a real Prometheus scraping a real ingestor, and
checks the series.

The datasources are referred to by uid: ``influxdb-telemetry`` (InfluxQL, the
database cloud-ingest writes) and ``prometheus``; the provisioning file
(datasources.yml) creates both with those uids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import bargauge, stat, table, timeseries
from grafana_foundation_sdk.builders.dashboard import (
    Dashboard,
    QueryVariable,
    Row,
    ThresholdsConfig,
)
from grafana_foundation_sdk.builders.prometheus import Dataquery as PromQL
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as dm

INFLUX = dm.DataSourceRef(type_val="influxdb", uid="influxdb-telemetry")
PROMETHEUS = dm.DataSourceRef(type_val="prometheus", uid="prometheus")
#: The Grafana schema the SDK writes (Grafana migrates older schemas forward on load).
SCHEMA_VERSION = 36


@dataclass(frozen=True)
class Expect:
    """What a query's result must hold: at least one series, each with these tags
    (InfluxDB) or labels (Prometheus), and these columns (InfluxDB)."""

    tags: tuple[str, ...] = ()
    columns: tuple[str, ...] = ()


#: (dashboard uid, panel title, refId) → what the query returns
EXPECTED: dict[tuple[str, str, str], Expect] = {}


class InfluxQLQuery(cogvariants.Dataquery):
    """A raw InfluxQL query, as Grafana's InfluxDB datasource stores it."""

    def __init__(self, query: str, ref_id: str, result_format: str, alias: str) -> None:
        self.query = query
        self.ref_id = ref_id
        self.result_format = result_format
        self.alias = alias

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "refId": self.ref_id,
            "datasource": INFLUX.to_json(),
            "query": self.query,
            "rawQuery": True,
            "resultFormat": self.result_format,
        }
        if self.alias:
            out["alias"] = self.alias
        return out


class InfluxQL(cogbuilder.Builder[InfluxQLQuery]):
    def __init__(
        self,
        query: str,
        ref_id: str = "A",
        *,
        result_format: str = "time_series",
        alias: str = "",
    ) -> None:
        self._internal = InfluxQLQuery(" ".join(query.split()), ref_id, result_format, alias)

    def build(self) -> InfluxQLQuery:
        return self._internal


Panel = timeseries.Panel | table.Panel | stat.Panel | bargauge.Panel


class Board:
    """A dashboard being built: panels laid out two to a row, each query registered."""

    def __init__(self, uid: str, title: str, description: str) -> None:
        self.uid = uid
        self.dashboard = (
            Dashboard(title)
            .uid(uid)
            .description(description)
            .tags(["iot-telemetry"])
            .time("now-24h", "now")
            .refresh("1m")
            .timezone("browser")
        )
        self._x = self._y = 0

    def row(self, title: str) -> Board:
        if self._x:
            self._x, self._y = 0, self._y + 8
        self.dashboard.with_row(Row(title).grid_pos(dm.GridPos(h=1, w=24, x=0, y=self._y)))
        self._y += 1
        return self

    def panel(
        self,
        panel: Panel,
        title: str,
        queries: list[tuple[cogbuilder.Builder[Any], Expect]],
        *,
        width: int = 12,
    ) -> Board:
        if self._x + width > 24:
            self._x, self._y = 0, self._y + 8
        panel.title(title).grid_pos(dm.GridPos(h=8, w=width, x=self._x, y=self._y))
        prom = isinstance(queries[0][0], PromQL)
        panel.datasource(PROMETHEUS if prom else INFLUX)
        for builder, expect in queries:
            panel.with_target(builder)
            EXPECTED[(self.uid, title, builder.build().ref_id)] = expect
        self.dashboard.with_panel(panel)
        self._x += width
        return self


def _prom(expr: str, legend: str, ref_id: str = "A") -> PromQL:
    return (
        PromQL()
        .expr(" ".join(expr.split()))
        .legend_format(legend)
        .ref_id(ref_id)
        .datasource(PROMETHEUS)
    )


def _variable(name: str, query: str, label: str) -> QueryVariable:
    return (
        QueryVariable(name)
        .label(label)
        .datasource(INFLUX)
        .query(query)
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .include_all(True)
        .multi(True)
        .sort(dm.VariableSort.ALPHABETICAL_ASC)
    )


DEVICE = Expect(tags=("device_id",))


def fleet() -> Dashboard:
    b = Board(
        "iot-fleet",
        "IoT fleet",
        "Which devices are silent, behind, dropping or near their disk budget (the agents' "
        "health reports, docs/cloud-ingest.md 'Fleet health').",
    )
    b.row("Now")
    b.panel(
        table.Panel(),
        "Devices: latest health",
        [
            (
                InfluxQL(
                    """SELECT last("state") AS "state", last("backlog_batches") AS "backlog",
                    last("oldest_unsent_age_s") AS "oldest unsent (s)",
                    last("disk_used_ratio") AS "disk used", last("drops_total") AS "drops",
                    last("store_errors") AS "store errors",
                    last("clock_offset_s") AS "clock offset (s)", last("version") AS "version",
                    last("config_version") AS "config", last("config_state") AS "config state"
                    FROM "agent_health" WHERE $timeFilter GROUP BY "device_id" """,
                    result_format="table",
                ),
                Expect(("device_id",), ("state", "backlog", "disk used", "drops", "version")),
            )
        ],
        width=24,
    )
    b.panel(
        table.Panel().with_transformation(dm.DataTransformerConfig(id_val="merge", options={})),
        "Desired config: desired against reported (docs/commands.md)",
        [
            (
                InfluxQL(
                    """SELECT last("version") AS "desired" FROM "config_desired"
                    WHERE $timeFilter GROUP BY "device_id" """,
                    result_format="table",
                ),
                Expect(("device_id",), ("desired",)),
            ),
            (
                InfluxQL(
                    """SELECT last("config_version") AS "reported",
                    last("config_state") AS "state", last("config_rejected") AS "rolled back"
                    FROM "agent_health" WHERE $timeFilter GROUP BY "device_id" """,
                    "B",
                    result_format="table",
                ),
                Expect(("device_id",), ("reported", "state", "rolled back")),
            ),
        ],
        width=24,
    )
    b.panel(
        table.Panel().with_transformation(dm.DataTransformerConfig(id_val="merge", options={})),
        "Commands: sent and answered, per device (the difference waits or expired)",
        [
            (
                InfluxQL(
                    """SELECT count("id") AS "sent" FROM "command_sent" WHERE $timeFilter
                    GROUP BY "device_id" """,
                    result_format="table",
                ),
                Expect(("device_id",), ("sent",)),
            ),
            (
                InfluxQL(
                    """SELECT count("id") AS "answered", sum("ok") AS "done"
                    FROM "command_result" WHERE $timeFilter GROUP BY "device_id" """,
                    "B",
                    result_format="table",
                ),
                Expect(("device_id",), ("answered", "done")),
            ),
        ],
    )
    b.panel(
        table.Panel(),
        "Commands refused or failed",
        [
            (
                InfluxQL(
                    """SELECT "id", "status", "reason" FROM "command_result"
                    WHERE $timeFilter AND "ok" = 0 GROUP BY "device_id", "kind" """,
                    result_format="table",
                ),
                Expect(("device_id", "kind"), ("id", "status", "reason")),
            )
        ],
    )
    b.panel(
        table.Panel(),
        "Captures of raw readings around alerts (the lake's raw table)",
        [
            (
                InfluxQL(
                    """SELECT "rule", "capture" FROM "alert" WHERE $timeFilter
                    AND "capture" != '' GROUP BY "device_id" """,
                    result_format="table",
                ),
                Expect(("device_id",), ("rule", "capture")),
            )
        ],
        width=24,
    )
    b.panel(
        bargauge.Panel()
        .unit("s")
        .min(0)
        .thresholds(
            ThresholdsConfig()
            .mode(dm.ThresholdsMode.ABSOLUTE)
            .steps([dm.Threshold(None, "green"), dm.Threshold(900.0, "red")])
        ),
        "Since each device was last heard (red: silent, over 15 min)",
        [
            (
                _prom(
                    "time() - max by (device_id) "
                    "(cloud_ingest_device_last_heard_timestamp_seconds)",
                    "{{device_id}}",
                ),
                Expect(("device_id",)),
            )
        ],
    )
    b.panel(
        bargauge.Panel().unit("percentunit").min(0).max(1),
        "Disk used, of each device's budget",
        [
            (
                InfluxQL(
                    """SELECT last("disk_used_ratio") FROM "agent_health" WHERE $timeFilter
                    GROUP BY "device_id" """
                ),
                DEVICE,
            )
        ],
    )
    b.row("Over time")
    for title, field, unit in (
        ("Backlog (batches not acknowledged)", "backlog_batches", "short"),
        ("Oldest unsent data", "oldest_unsent_age_s", "s"),
    ):
        b.panel(
            timeseries.Panel().unit(unit),
            title,
            [
                (
                    InfluxQL(
                        f"""SELECT max("{field}") FROM "agent_health" WHERE $timeFilter
                        GROUP BY time($__interval), "device_id" fill(none)"""
                    ),
                    DEVICE,
                )
            ],
        )
    b.panel(
        timeseries.Panel().unit("short"),
        "Drops (any dropped_* counter)",
        [
            (
                InfluxQL(
                    """SELECT non_negative_difference(max("drops_total")) FROM "agent_health"
                    WHERE $timeFilter GROUP BY time($__interval), "device_id" fill(none)"""
                ),
                DEVICE,
            )
        ],
    )
    b.panel(
        timeseries.Panel().unit("short"),
        "Readings arrived, per device",
        [
            (
                InfluxQL(
                    """SELECT sum("count") FROM "window" WHERE $timeFilter
                    GROUP BY time($__interval), "device_id" fill(0)"""
                ),
                DEVICE,
            )
        ],
    )
    return b.dashboard


def device() -> Dashboard:
    b = Board(
        "iot-device",
        "IoT device",
        "One device: each sensor's windows (mean within min-max, and p99), revisions by late "
        "data, the agent's health and its alerts.",
    )
    b.dashboard.with_variable(
        _variable("device", 'SHOW TAG VALUES FROM "window" WITH KEY = "device_id"', "Device")
    ).with_variable(
        _variable(
            "sensor",
            'SHOW TAG VALUES FROM "window" WITH KEY = "sensor" WHERE "device_id" =~ /^$device$/',
            "Sensor",
        )
    )
    where = """"device_id" =~ /^$device$/ AND "sensor" =~ /^$sensor$/ AND $timeFilter"""
    band = [
        dm.DynamicConfigValue(id_val="custom.fillBelowTo", value="min"),
        dm.DynamicConfigValue(id_val="custom.fillOpacity", value=20),
    ]
    hidden = [dm.DynamicConfigValue(id_val="custom.lineWidth", value=0)]
    b.row("Sensors")
    b.panel(
        # one panel per sensor (repeat), so that the band is between this sensor's
        # min and max: its series are named "mean", "min", "max", "p99" (alias $col)
        timeseries.Panel()
        .repeat("sensor")
        .repeat_direction("h")
        .override_by_name("max", band)
        .override_by_name("min", hidden),
        "$sensor: mean in its min-max band, and p99",
        [
            (
                InfluxQL(
                    """SELECT mean("mean") AS "mean", min("min") AS "min", max("max") AS "max",
                    max("p99") AS "p99" FROM "window"
                    WHERE "device_id" =~ /^$device$/ AND "sensor" = '$sensor' AND $timeFilter
                    GROUP BY time($__interval) fill(none)""",
                    alias="$col",
                ),
                Expect((), ("mean", "min", "max", "p99")),
            )
        ],
        width=24,
    )
    b.panel(
        timeseries.Panel().unit("short"),
        "Readings per window",
        [
            (
                InfluxQL(
                    f"""SELECT sum("count") FROM "window" WHERE {where}
                    GROUP BY time($__interval), "sensor" fill(0)"""
                ),
                Expect(("sensor",)),
            )
        ],
    )
    b.panel(
        timeseries.Panel().unit("short"),
        "Revisions (windows rewritten by late readings)",
        [
            (
                InfluxQL(
                    f"""SELECT max("revision") FROM "window" WHERE {where}
                    GROUP BY time($__interval), "sensor" fill(none)"""
                ),
                Expect(("sensor",)),
            )
        ],
    )
    b.row("The agent")
    b.panel(
        timeseries.Panel().unit("short"),
        "Backlog and drops",
        [
            (
                InfluxQL(
                    """SELECT max("backlog_batches") AS "backlog", max("drops_total") AS "drops"
                    FROM "agent_health" WHERE "device_id" =~ /^$device$/ AND $timeFilter
                    GROUP BY time($__interval) fill(none)"""
                ),
                Expect((), ("backlog", "drops")),
            )
        ],
    )
    b.panel(
        table.Panel(),
        "Alerts",
        [
            (
                InfluxQL(
                    """SELECT "state", "value", "message" FROM "alert"
                    WHERE "device_id" =~ /^$device$/ AND $timeFilter GROUP BY "rule", "sensor" """,
                    result_format="table",
                ),
                Expect(("rule", "sensor"), ("state", "message")),
            )
        ],
    )
    return b.dashboard


def alerts() -> Dashboard:
    b = Board(
        "iot-alerts",
        "IoT alerts",
        "Alert events across the fleet, as the agents raised and cleared them.",
    )
    b.panel(
        timeseries.Panel().unit("short"),
        "Alerts raised",
        [
            (
                InfluxQL(
                    """SELECT sum("raised") FROM "alert" WHERE $timeFilter
                    GROUP BY time($__interval), "rule" fill(0)"""
                ),
                Expect(("rule",)),
            )
        ],
        width=24,
    )
    b.panel(
        table.Panel(),
        "Latest state of each rule",
        [
            (
                InfluxQL(
                    """SELECT last("state") AS "state", last("message") AS "message"
                    FROM "alert" WHERE $timeFilter GROUP BY "device_id", "rule" """,
                    result_format="table",
                ),
                Expect(("device_id", "rule"), ("state", "message")),
            )
        ],
        width=24,
    )
    return b.dashboard


def cloud_ingest() -> Dashboard:
    b = Board(
        "iot-cloud-ingest",
        "IoT cloud ingest",
        "The ingestors' own health (their /metrics in Prometheus; alert rules in "
        "ansible/roles/monitoring/files/prometheus).",
    )
    instance = Expect(("instance",))
    b.panel(stat.Panel(), "Subscribed", [(_prom("cloud_ingest_up", "{{instance}}"), instance)])
    b.panel(
        timeseries.Panel().unit("ops"),
        "Batches and health reports written",
        [
            (
                _prom(
                    'sum by (event) (rate(cloud_ingest_events_total{event=~"batches_written|'
                    'health_written|alerts_written"}[$__rate_interval]))',
                    "{{event}}",
                ),
                Expect(("event",)),
            )
        ],
    )
    b.panel(
        timeseries.Panel().unit("ops"),
        "Quarantined, by reason",
        [
            (
                _prom(
                    "sum by (reason) (rate(cloud_ingest_quarantined_total[$__rate_interval]))",
                    "{{reason}}",
                ),
                Expect(("reason",)),
            )
        ],
    )
    b.panel(
        timeseries.Panel().unit("ops"),
        "Sink retries",
        [
            (
                _prom(
                    'sum by (instance) (rate(cloud_ingest_events_total{event=~"influx_retries|'
                    'archive_retries|mqtt_reconnects"}[$__rate_interval]))',
                    "{{instance}}",
                ),
                instance,
            )
        ],
    )
    b.panel(
        timeseries.Panel().unit("short"),
        "Messages in hand, and the bound",
        [
            (_prom("cloud_ingest_in_hand", "in hand {{instance}}"), instance),
            (_prom("cloud_ingest_in_hand_limit", "bound {{instance}}", "B"), instance),
            (_prom("cloud_ingest_acks_pending", "acks pending {{instance}}", "C"), instance),
        ],
    )
    b.panel(
        timeseries.Panel().unit("s"),
        "Sink write time, p99",
        [
            (
                _prom(
                    "histogram_quantile(0.99, sum by (le, sink) "
                    "(rate(cloud_ingest_sink_seconds_bucket[$__rate_interval])))",
                    "{{sink}}",
                ),
                Expect(("sink",)),
            )
        ],
    )
    b.panel(
        stat.Panel(),
        "Devices remembered",
        [(_prom("cloud_ingest_fleet_devices", "{{instance}}"), instance)],
    )
    return b.dashboard


BOARDS = {
    "iot-fleet": fleet,
    "iot-device": device,
    "iot-alerts": alerts,
    "iot-cloud-ingest": cloud_ingest,
}


def render(uid: str) -> str:
    """One dashboard's JSON, stable (sorted keys) so that the shipped files can be
    compared with a fresh rendering."""
    return JSONEncoder(sort_keys=True, indent=2).encode(BOARDS[uid]().build()) + "\n"


def write_all(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for uid in BOARDS:
        path = out / f"{uid}.json"
        path.write_text(render(uid))
        paths.append(path)
    return paths


def targets(board: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(panel title, target) of every query of a dashboard's JSON."""
    return [(p["title"], t) for p in board.get("panels", []) for t in p.get("targets", [])]


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data
