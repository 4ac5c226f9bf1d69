"""Alert rules, evaluated on every reading at intake (not at window close).

Rules come from the config's ``[[alerts]]`` tables. Each rule watches one sensor
(``node/sensor``) and is either *raised* or *clear*; a change of state is an
alert event. Events are stored in the ``alerts`` table in the same transaction
as the readings that caused them, then published on
``telemetry/v1/<device_id>/alert`` ahead of every batch, acknowledged by the
cloud and resent like batches (they share the device's seq counter).

Kinds:

* ``threshold``: raised when a value goes above ``above`` (or below ``below``);
  cleared when it comes back by ``hysteresis`` (above − hysteresis, below + hysteresis).
* ``rate``: raised when |Δvalue / Δt| exceeds ``max_rate`` per second; cleared
  when it no longer does.
* ``stuck``: raised when the value has not changed for ``seconds`` (event time);
  cleared when it changes.
* ``silent``: raised when no reading has arrived for ``seconds`` (device clock,
  checked every tick, since a silent sensor sends nothing to evaluate); cleared by
  the next reading.
* ``zscore``: raised when a value is more than ``z`` standard deviations from the
  mean of the previous ``window`` readings; cleared when one is within.

Rule state (baselines, last values) lives in memory and starts afresh after a
restart; whether a rule is raised is kept in the file, so a restart neither
repeats nor loses a raise. Rules are evaluated inside the transaction that
stores their readings (or records a silent sensor), and the engine's state
follows it: if that transaction rolls back, the state goes back to what it was
before, so the readings, when stored again, raise the same alerts.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from edge_agent import counters
from edge_agent.pipeline import captures, outbox
from edge_agent.pipeline.captures import Capture
from edge_agent.store import Store, crc
from shared.alerts import is_valid_rule
from shared.config import Invalid, positive

Kind = Literal["threshold", "rate", "stuck", "silent", "zscore"]


@dataclass(frozen=True)
class AlertRule:
    name: str
    sensor: str
    kind: Kind
    above: float | None = None
    below: float | None = None
    hysteresis: float = 0.0
    max_rate: float | None = None
    seconds: float | None = None
    window: int = 60
    z: float = 4.0
    #: the raw readings around each raise, to the lake (a flight recorder)
    capture: Capture | None = None

    def __post_init__(self) -> None:
        if not is_valid_rule(self.name):
            raise Invalid("name", "must be 1-64 characters, none a control character")
        if self.sensor.count("/") != 1:
            raise Invalid("sensor", "must be <node>/<sensor>")
        if self.hysteresis < 0:
            raise Invalid("hysteresis", "must be >= 0")
        if self.kind == "threshold" and self.above is None and self.below is None:
            raise Invalid("above", "a threshold rule needs above, below or both")
        if self.kind == "rate" and (self.max_rate is None or self.max_rate <= 0):
            raise Invalid("max_rate", "a rate rule needs max_rate > 0 (per second)")
        if self.kind in ("stuck", "silent"):
            if self.seconds is None:
                raise Invalid("seconds", f"a {self.kind} rule needs seconds")
            positive("seconds", self.seconds)
        if self.kind == "zscore":
            if self.window < 2:
                raise Invalid("window", "must be at least 2 readings")
            positive("z", self.z)


@dataclass(frozen=True)
class AlertEvent:
    rule: str
    kind: str
    node: str
    sensor: str
    state: Literal["raised", "cleared"]
    ts_ns: int
    value: float | None
    message: str
    #: the rule's capture, for a raise (not on the wire: the capture's id is)
    capture: Capture | None = None

    def payload(self, seq: int, generation: int = 0, capture_id: str = "") -> bytes:
        obj = {k: v for k, v in self.__dict__.items() if k != "capture"}
        obj = {"seq": seq, **obj}
        if generation:
            obj["generation"] = generation
        if capture_id:
            obj["capture"] = capture_id
        return json.dumps(obj, separators=(",", ":")).encode()


@dataclass
class _State:
    prev_ts: int | None = None
    prev_value: float | None = None
    changed_ts: int | None = None
    baseline: deque[float] = field(default_factory=deque)

    def copy(self) -> _State:
        return _State(
            self.prev_ts,
            self.prev_value,
            self.changed_ts,
            deque(self.baseline, maxlen=self.baseline.maxlen),
        )


class AlertEngine:
    """Evaluates the rules; one per agent, used from the intake thread and the tick."""

    def __init__(self, rules: tuple[AlertRule, ...], store: Store) -> None:
        self.rules = rules
        self.by_sensor: dict[str, list[AlertRule]] = {}
        for r in rules:
            self.by_sensor.setdefault(r.sensor, []).append(r)
        self.state = {r.name: _State(baseline=deque(maxlen=r.window)) for r in rules}
        #: rules checked by the clock, not by readings (silent sensors)
        self.has_timers = any(r.kind == "silent" for r in rules)
        self.raised = {
            str(n) for (n,) in store.conn.execute("SELECT rule FROM alert_state WHERE raised = 1")
        }
        self.last_received: dict[str, float] = {}
        self._lock = threading.Lock()  # the intake thread evaluates, the agent's tick checks
        self._saved_for: tuple[int, int] | None = None  # (store, transaction) saved for

    def _save_for_rollback(self, store: Store) -> None:
        """Once per transaction of ``store``: put back today's state if it rolls back."""
        key = (id(store), store.tx_serial)
        if self._saved_for == key or not store.in_tx:
            return  # saved already; or no transaction, so nothing to roll back
        self._saved_for = key
        raised = set(self.raised)
        state = {name: st.copy() for name, st in self.state.items()}
        last = dict(self.last_received)

        def restore() -> None:
            with self._lock:
                self.raised, self.state, self.last_received = raised, state, last
                self._saved_for = None

        store.on_rollback(restore)

    def evaluate(
        self, store: Store, node: str, sensor: str, ts: list[int], values: list[float]
    ) -> list[AlertEvent]:
        """Events from these readings; call inside the transaction that stores them."""
        with self._lock:
            self._save_for_rollback(store)
            return self._evaluate(node, sensor, ts, values)

    def _evaluate(
        self, node: str, sensor: str, ts: list[int], values: list[float]
    ) -> list[AlertEvent]:
        key = f"{node}/{sensor}"
        self.last_received[key] = time.monotonic()
        events: list[AlertEvent] = []
        for rule in self.by_sensor.get(key, ()):
            if rule.kind == "silent":
                if rule.name in self.raised:
                    events.append(
                        self._event(rule, "cleared", ts[0], values[0], "readings arrive again")
                    )
                continue
            for t, v in zip(ts, values, strict=True):
                if math.isfinite(v):
                    ev = self._one(rule, t, v)
                    if ev is not None:
                        events.append(ev)
        return events

    def _one(self, rule: AlertRule, t: int, v: float) -> AlertEvent | None:
        st = self.state[rule.name]
        raised = rule.name in self.raised
        out: AlertEvent | None = None
        if rule.kind == "threshold":
            hi = rule.above is not None and v > rule.above
            lo = rule.below is not None and v < rule.below
            if not raised and (hi or lo):
                out = self._event(
                    rule,
                    "raised",
                    t,
                    v,
                    f"value {v:g} " + (f"above {rule.above:g}" if hi else f"below {rule.below:g}"),
                )
            elif raised:
                ok_hi = rule.above is None or v <= rule.above - rule.hysteresis
                ok_lo = rule.below is None or v >= rule.below + rule.hysteresis
                if ok_hi and ok_lo:
                    out = self._event(rule, "cleared", t, v, f"value {v:g} back in range")
        elif rule.kind == "rate":
            if st.prev_ts is not None and st.prev_value is not None and t > st.prev_ts:
                rate = (v - st.prev_value) / ((t - st.prev_ts) / 1e9)
                assert rule.max_rate is not None
                if not raised and abs(rate) > rule.max_rate:
                    out = self._event(rule, "raised", t, v, f"changing at {rate:g}/s")
                elif raised and abs(rate) <= rule.max_rate:
                    out = self._event(rule, "cleared", t, v, f"rate {rate:g}/s back in range")
        elif rule.kind == "stuck":
            if st.prev_value is None or v != st.prev_value:
                st.changed_ts = t
                if raised:
                    out = self._event(rule, "cleared", t, v, "value changes again")
            elif (
                not raised
                and st.changed_ts is not None
                and rule.seconds is not None
                and t - st.changed_ts >= rule.seconds * 1e9
            ):
                out = self._event(
                    rule, "raised", t, v, f"value {v:g} unchanged for {rule.seconds:g} s"
                )
        elif rule.kind == "zscore":
            base = st.baseline
            if len(base) == base.maxlen:
                mean = sum(base) / len(base)
                sd = math.sqrt(sum((x - mean) ** 2 for x in base) / len(base))
                if sd > 0:
                    z = abs(v - mean) / sd
                    if not raised and z > rule.z:
                        out = self._event(rule, "raised", t, v, f"z-score {z:.1f} > {rule.z:g}")
                    elif raised and z <= rule.z:
                        out = self._event(rule, "cleared", t, v, f"z-score {z:.1f}")
            base.append(v)
        st.prev_ts, st.prev_value = t, v
        return out

    def check_silent(self, store: Store, now_ns: int) -> list[AlertEvent]:
        """Timer-driven rules (silent sensors); call from the agent's tick, inside the
        transaction that records the events."""
        with self._lock:
            self._save_for_rollback(store)
            return self._check_silent(now_ns)

    def _check_silent(self, now_ns: int) -> list[AlertEvent]:
        events = []
        now = time.monotonic()
        for rule in self.rules:
            if rule.kind != "silent" or rule.name in self.raised or rule.seconds is None:
                continue
            last = self.last_received.setdefault(rule.sensor, now)  # from start-up on
            if now - last >= rule.seconds:
                events.append(
                    self._event(rule, "raised", now_ns, None, f"no reading for {rule.seconds:g} s")
                )
        return events

    def _event(
        self,
        rule: AlertRule,
        state: Literal["raised", "cleared"],
        t: int,
        v: float | None,
        message: str,
    ) -> AlertEvent:
        node, sensor = rule.sensor.split("/")
        if state == "raised":
            self.raised.add(rule.name)
        else:
            self.raised.discard(rule.name)
        capture = rule.capture if state == "raised" else None
        return AlertEvent(rule.name, rule.kind, node, sensor, state, t, v, message, capture)


def record(store: Store, events: list[AlertEvent]) -> list[int]:
    """Store events for sending (call inside the transaction of their readings)."""
    seqs = []
    generation = outbox.generation(store)
    for ev in events:
        seq = outbox.next_seq(store)
        capture_id = ""
        if ev.capture is not None:
            capture_id = captures.start(
                store, rule=ev.rule, node=ev.node, sensor=ev.sensor, ts_ns=ev.ts_ns,
                capture=ev.capture, seq=seq,
            )  # fmt: skip
        payload = ev.payload(seq, generation, capture_id)
        store.conn.execute(
            "INSERT INTO alerts(seq, created_ns, payload, state, crc, generation) "
            "VALUES (?, ?, ?, 'pending', ?, ?)",
            (seq, time.time_ns(), payload, crc(payload), generation),
        )
        store.conn.execute(
            "INSERT INTO alert_state(rule, raised, since_ns) VALUES (?, ?, ?) "
            "ON CONFLICT(rule) DO UPDATE SET raised = excluded.raised, "
            "since_ns = excluded.since_ns",
            (ev.rule, int(ev.state == "raised"), ev.ts_ns),
        )
        store.add_counter(counters.alerts(ev.state), 1)
        seqs.append(seq)
    return seqs
