"""Alert rules: each kind on its own, config errors, priority in the outbox, and the
whole path to InfluxDB's alert measurement through a real broker."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from devstack import influxq
from devstack.pipeline import IngestTarget, Pipeline
from devstack.publish import publish_all
from devstack.services import Service, wait_until
from edge_agent.config import AgentConfig
from edge_agent.pipeline import alerts, buffer, outbox, window
from edge_agent.pipeline.alerts import AlertEngine, AlertRule
from edge_agent.store import Store
from shared.config import load_config
from shared.errors import ConfigError
from shared.readings import ReadingChunk, encode_chunk
from tests.conftest import SpecFactory

S = 10**9


def engine(tmp_path: Path, **rule: object) -> AlertEngine:
    r = AlertRule(name="r", sensor="n/s", **rule)  # type: ignore[arg-type]
    return AlertEngine((r,), Store(tmp_path / "a.sqlite"))


def states(eng: AlertEngine, ts: list[int], vals: list[float]) -> list[str]:
    return [e.state for e in eng.evaluate(STORE, "n", "s", ts, vals)]


#: Rules evaluated outside a transaction need a store only to register undos (none).
STORE = Store(":memory:")


def test_threshold_with_hysteresis(tmp_path: Path) -> None:
    e = engine(tmp_path, kind="threshold", above=10.0, hysteresis=1.0)
    assert states(e, [1, 2, 3, 4, 5], [9.0, 10.5, 11.0, 9.5, 8.9]) == ["raised", "cleared"]


def test_rate_of_change(tmp_path: Path) -> None:
    e = engine(tmp_path, kind="rate", max_rate=2.0)
    assert states(e, [0, S, 2 * S, 3 * S], [0.0, 1.0, 5.0, 6.0]) == ["raised", "cleared"]


def test_stuck(tmp_path: Path) -> None:
    e = engine(tmp_path, kind="stuck", seconds=3.0)
    assert states(e, [0, S, 2 * S, 3 * S, 4 * S], [1.0, 1.0, 1.0, 1.0, 2.0]) == [
        "raised",
        "cleared",
    ]


def test_zscore(tmp_path: Path) -> None:
    e = engine(tmp_path, kind="zscore", window=5, z=3.0)
    vals = [1.0, 2.0, 1.0, 2.0, 1.0, 50.0, 1.5]
    assert states(e, list(range(len(vals))), vals) == ["raised", "cleared"]


def test_silent(tmp_path: Path) -> None:
    e = engine(tmp_path, kind="silent", seconds=30.0)
    assert e.check_silent(STORE, 0) == []  # the clock starts now
    e.last_received["n/s"] = time.monotonic() - 31
    (ev,) = e.check_silent(STORE, 0)
    assert ev.state == "raised" and e.check_silent(STORE, 0) == []  # raised once
    assert states(e, [5], [1.0]) == ["cleared"]


def test_raised_state_survives_a_restart(tmp_path: Path) -> None:
    store = Store(tmp_path / "a.sqlite")
    rule = AlertRule(name="r", sensor="n/s", kind="threshold", above=1.0)
    e = AlertEngine((rule,), store)
    with store.tx():
        alerts.record(store, e.evaluate(store, "n", "s", [1], [5.0]))
    again = AlertEngine((rule,), store)  # after a restart: no second raise
    assert again.evaluate(store, "n", "s", [2], [6.0]) == []
    assert [ev.state for ev in again.evaluate(store, "n", "s", [3], [0.0])] == ["cleared"]


@pytest.mark.parametrize(
    ("rule", "key"),
    [
        ('kind = "threshold"', "alerts[0].above"),
        ('kind = "rate"', "alerts[0].max_rate"),
        ('kind = "stuck"', "alerts[0].seconds"),
        ('kind = "zscore"\nwindow = 1', "alerts[0].window"),
        ('kind = "sonar"', "alerts[0].kind"),
    ],
)
def test_bad_rules_name_the_key(tmp_path: Path, rule: str, key: str) -> None:
    p = tmp_path / "a.toml"
    p.write_text(f'[[alerts]]\nname = "x"\nsensor = "n/s"\n{rule}\n')
    with pytest.raises(ConfigError) as e:
        load_config(AgentConfig, p)
    assert e.value.key == key


def test_the_sample_rule_is_valid(tmp_path: Path) -> None:
    from shared.cli import sample_path

    text = sample_path("edge_agent").read_text()
    example = text[text.index("# [[alerts]]") :]
    p = tmp_path / "a.toml"
    p.write_text("\n".join(line[2:] for line in example.splitlines()))
    assert load_config(AgentConfig, p).alerts[0].name == "motor-hot"


def test_alerts_leave_before_batches(tmp_path: Path) -> None:
    s = Store(tmp_path / "a.sqlite")
    reg = buffer.SensorRegistry(s)
    for k in range(3):
        ts = np.array([10**18 + k * 10 * S])
        buffer.store_chunk(s, reg, ReadingChunk("n", "s", "u", ts, np.array([1.0])))
    window.close_until(s, device_id="d", width_ns=10 * S, upto_ns=10**18 + 30 * S, max_rows=1)
    rule = AlertRule(name="r", sensor="n/s", kind="threshold", above=0.0)
    with s.tx():
        alerts.record(s, AlertEngine((rule,), s).evaluate(s, "n", "s", [10**18], [5.0]))
    due = outbox.due(s, 10)
    assert [(o.seq, o.kind) for o in due] == [
        (4, "alert"),
        (1, "batch"),
        (2, "batch"),
        (3, "batch"),
    ]
    assert outbox.acknowledge(s, 4, stored=True) and s.counters()["alerts_acked"] == 1


@pytest.mark.integration
def test_alerts_reach_influxdb_through_the_broker(
    pipeline_spec: SpecFactory,
    fresh: Callable[[str], Service],
    influxdb: Service,
    influx_db: str,
    tmp_path: Path,
) -> None:
    broker = fresh("mosquitto")
    rule = (
        '[[alerts]]\nname = "hot"\nsensor = "env-1/temp"\nkind = "threshold"\n'
        "above = 30.0\nhysteresis = 1.0\n"
    )
    pipe = Pipeline(
        pipeline_spec(
            broker=broker,
            workdir=tmp_path,
            agent_extra=rule,
            targets=[
                IngestTarget(
                    "t",
                    {"api": "v1", "url": influxdb.url, "database": influx_db},
                    {"url": f"file://{tmp_path / 'archive'}"},
                )
            ],
        )
    )
    t0 = (time.time_ns() // (10 * S) - 3) * 10 * S
    values = [25.0, 31.0, 32.0, 29.5, 28.0]

    def points() -> list[dict[str, object]]:
        res = influxq.influxql(influxdb.url, 'SELECT * FROM "alert"', influx_db)
        series = res["results"][0].get("series", [])
        if not series:
            return []
        return [dict(zip(series[0]["columns"], row, strict=True)) for row in series[0]["values"]]

    try:
        pipe.start_ingestors()
        agent = pipe.start_agent()
        publish_all(
            broker.port,
            [
                ("sensors/env-1/temp", encode_chunk("C", [t0 + i * S], [v]))
                for i, v in enumerate(values)
            ],
        )
        wait_until(lambda: len(points()) == 2, 30, "both alert events in InfluxDB")
        assert agent.terminate() == 0
    finally:
        pipe.stop_all()
    got = points()
    assert [(p["state"], p["value"], p["time"]) for p in got] == [
        ("raised", 31.0, t0 + S),
        ("cleared", 28.0, t0 + 4 * S),
    ]
    assert all(p["rule"] == "hot" and p["sensor"] == "temp" for p in got)
    c = pipe.agent_status()["counters"]
    assert c["alerts_raised"] == c["alerts_cleared"] == 1 and c["alerts_acked"] == 2
    assert len(list((tmp_path / "archive" / "alerts").rglob("*.parquet"))) == 2
