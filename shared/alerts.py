"""The alert message (device → cloud on ``telemetry/v1/<device_id>/alert``), decoded
and checked at the boundary. The device side builds it in ``edge_agent.alerts``.

A UTF-8 JSON object::

    {"seq": 812, "rule": "motor-hot", "kind": "threshold", "node": "env-1",
     "sensor": "temperature", "state": "raised", "ts_ns": 1732600000000000000,
     "value": 61.2, "message": "value 61.2 above 60"}

``seq`` shares the device's counter with batches; ``value`` may be null (a
``silent`` rule has no reading); ``ts_ns`` is the event time of the reading that
changed the rule's state (the device clock for ``silent``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from shared.errors import WireError
from shared.topics import is_valid_id

KINDS = ("threshold", "rate", "stuck", "silent", "zscore")
MAX_ALERT_BYTES = 4096


@dataclass(frozen=True)
class Alert:
    seq: int
    rule: str
    kind: str
    node: str
    sensor: str
    state: str
    ts_ns: int
    value: float | None
    message: str


def decode_alert(payload: bytes) -> Alert:
    if len(payload) > MAX_ALERT_BYTES:
        raise WireError("too-large", f"alert of {len(payload)} bytes, limit {MAX_ALERT_BYTES}")
    try:
        obj: Any = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError("bad-alert", f"not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise WireError("bad-alert", "not a JSON object")

    def get(key: str, tp: type | tuple[type, ...]) -> Any:
        v = obj.get(key)
        if not isinstance(v, tp) or isinstance(v, bool):
            raise WireError("bad-alert", f"{key!r} has the wrong type")
        return v

    seq, ts = get("seq", int), get("ts_ns", int)
    if seq < 0 or ts < 0:
        raise WireError("bad-alert", "seq and ts_ns must be non-negative")
    value = obj.get("value")
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
    ):
        raise WireError("bad-alert", "value must be a finite number or null")
    alert = Alert(
        seq,
        get("rule", str),
        get("kind", str),
        get("node", str),
        get("sensor", str),
        get("state", str),
        ts,
        None if value is None else float(value),
        get("message", str),
    )
    if alert.kind not in KINDS:
        raise WireError("bad-alert", f"kind {alert.kind!r} is not one of {KINDS}")
    if alert.state not in ("raised", "cleared"):
        raise WireError("bad-alert", "state must be 'raised' or 'cleared'")
    if not (is_valid_id(alert.node) and is_valid_id(alert.sensor)) or not 0 < len(alert.rule) <= 64:
        raise WireError("bad-alert", "rule, node or sensor is not a valid id")
    return alert
