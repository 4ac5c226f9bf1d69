"""Captures around alerts (edge_agent/pipeline/captures.py) on a real buffer: a raise
names its capture; once the readings after it are stored, the span's readings
are queued exactly; a rule raising again extends its capture; retention and the
disk budget keep what a pending capture needs, and the budget's last resort is
counted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edge_agent import counters
from edge_agent.config import AgentConfig, StorageConfig
from edge_agent.pipeline import alerts, budget, buffer, captures
from edge_agent.pipeline.alerts import AlertEngine, AlertRule
from edge_agent.pipeline.captures import Capture, Recorder
from edge_agent.store import Store
from shared.config import ConfigError, from_dict
from shared.rawdata import RawReadings, decode_raw
from shared.readings import ReadingChunk

S = 10**9
T0 = 1_790_000_000 * S
RULE = AlertRule(
    "hot", "n1/temp", "threshold", above=50.0, hysteresis=1.0, capture=Capture(10.0, 5.0)
)


class Device:
    """A buffer, the alert engine and the recorder, fed as the intake feeds them."""

    def __init__(self, path: Path, rules: tuple[AlertRule, ...] = (RULE,)) -> None:
        self.store = Store(path)
        self.cfg = AgentConfig(device_id="dev-1", alerts=rules)
        self.engine = AlertEngine(rules, self.store)
        self.reg = buffer.SensorRegistry(self.store)
        self.recorder = Recorder(self.cfg, self.store)
        self.n = 0

    def feed(self, node: str, sensor: str, ts: np.ndarray, values: np.ndarray) -> None:
        for t, v in zip(ts.tolist(), values.tolist(), strict=True):  # one per message
            self.n += 1
            chunk = ReadingChunk(node, sensor, "C", np.array([t]), np.array([v]))
            with self.store.tx():
                buffer.store_one(self.store, self.reg, chunk, f"m{self.n}".encode())
                events = self.engine.evaluate(self.store, node, sensor, [t], [v])
                alerts.record(self.store, events)

    def alerts(self) -> list[dict]:
        rows = self.store.conn.execute("SELECT payload FROM alerts ORDER BY seq").fetchall()
        return [json.loads(bytes(r[0])) for r in rows]

    def raw(self) -> list[RawReadings]:
        rows = self.store.conn.execute("SELECT payload FROM raw ORDER BY seq").fetchall()
        return [decode_raw(bytes(r[0])) for r in rows]


def test_a_raise_captures_the_readings_on_both_sides_of_it(tmp_path: Path) -> None:
    d = Device(tmp_path / "b.sqlite")
    ts = T0 + np.arange(60) * S
    temp = np.full(60, 20.0) + np.arange(60) / 100
    temp[30] = 80.0  # the raise, at T0 + 30 s
    d.feed("n1", "other", ts[:34], temp[:34])  # another sensor: not captured
    d.feed("n1", "temp", ts[:34], temp[:34])
    raised, cleared = d.alerts()
    assert cleared["state"] == "cleared" and "capture" not in cleared
    assert raised["state"] == "raised" and raised["capture"] == f"alert-{raised['seq']}"
    assert d.recorder.tick() == 0  # no reading of the device reaches T0 + 35 s yet
    d.feed("n1", "other", ts[34:], temp[34:])
    d.feed("n1", "temp", ts[34:], temp[34:])
    assert d.recorder.tick() == 1
    (msg,) = d.raw()
    assert (msg.request, msg.node, msg.sensor) == (raised["capture"], "n1", "temp")
    sel = (ts >= T0 + 20 * S) & (ts < T0 + 35 * S)
    assert msg.ts.tolist() == ts[sel].tolist() and msg.values.tobytes() == temp[sel].tobytes()
    c = d.store.counters()
    assert c[counters.CAPTURES_STARTED] == 1 and c[counters.CAPTURES_SENT] == 1
    assert counters.CAPTURES_PARTIAL not in c
    assert d.store.conn.execute("SELECT count(*) FROM captures").fetchone()[0] == 0
    assert d.recorder.tick() == 0  # sent once


def test_a_rule_raising_again_extends_its_pending_capture(tmp_path: Path) -> None:
    d = Device(tmp_path / "b.sqlite")
    ts = T0 + np.arange(40) * S
    temp = np.full(40, 20.0)
    temp[[10, 13]] = 80.0  # raised, cleared, raised again within after_s
    d.feed("n1", "temp", ts, temp)
    first, cleared, second, _ = d.alerts()
    assert (first["state"], cleared["state"], second["state"]) == ("raised", "cleared", "raised")
    assert second["capture"] == first["capture"] and "capture" not in cleared
    assert d.recorder.tick() == 1
    (msg,) = d.raw()
    assert msg.ts[0] == T0 and msg.ts[-1] == T0 + 17 * S  # [10 - 10, 13 + 5)
    assert d.store.counters()[counters.CAPTURES_EXTENDED] == 1


def test_retention_and_the_budget_keep_a_pending_captures_readings(tmp_path: Path) -> None:
    d = Device(tmp_path / "b.sqlite")
    ts = T0 + np.arange(40) * S
    temp = np.full(40, 20.0)
    temp[30] = 80.0
    d.feed("n1", "temp", ts[:31], temp[:31])  # raised; its after-readings not here yet
    d.feed("n1", "other", ts, temp)
    with d.store.tx():
        d.store.set_state(buffer.CLOSED_UNTIL, T0 + 40 * S)
    buffer.prune(d.store, T0 + 40 * S)  # every closed chunk but the capture's
    kept = d.store.conn.execute("SELECT min(t_min), count(*) FROM chunks").fetchone()
    assert kept == (T0 + 20 * S, 11)
    # a budget the rest cannot meet drops the capture, counted, and then its chunks
    budget.enforce(d.store, budget.used_bytes(d.store) - 1)
    c = d.store.counters()
    assert c[counters.DROPPED_BUDGET_CAPTURES] == 1 and c[counters.BUDGET_PRUNED_CHUNKS] >= 1
    assert d.recorder.tick() == 0 and d.raw() == []


def test_a_capture_whose_sensor_went_quiet_is_sent_at_its_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rule = AlertRule("hot", "n1/temp", "threshold", above=50.0, capture=Capture(5.0, 0.01))
    d = Device(tmp_path / "b.sqlite", (rule,))
    ts = T0 + np.arange(10) * S
    d.feed("n1", "temp", ts, np.array([20.0] * 9 + [80.0]))  # nothing after the raise
    monkeypatch.setattr(captures, "GRACE_S", 0.0)
    assert d.recorder.tick() == 0  # its deadline starts now: after_s on the monotonic clock
    from devstack.services import wait_until

    wait_until(lambda: d.recorder.tick() == 1, 5, "the deadline")
    (msg,) = d.raw()
    assert msg.ts.tolist() == ts[4:].tolist()  # [9 - 5, 9 + 0.01)


def test_a_capture_reaching_past_the_retention_is_refused_at_start(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    with pytest.raises(ConfigError) as err:
        from_dict(
            AgentConfig,
            {
                "storage": {"raw_retention_s": 3600},
                "window": {"max_age_s": 60},
                "alerts": [
                    {"name": "x", "sensor": "a/b", "kind": "threshold", "above": 1,
                     "capture": {"before_s": 7200, "after_s": 10}}
                ],
            },
            str(path),
        )  # fmt: skip
    assert "alerts[0].capture.before_s" in str(err.value)
    with pytest.raises(ConfigError, match="after_s"):
        from_dict(AgentConfig, {"alerts": [{"name": "x", "sensor": "a/b", "kind": "threshold",
                  "above": 1, "capture": {"before_s": 0, "after_s": 0}}]})  # fmt: skip
    assert StorageConfig().raw_retention_s >= Capture().before_s
