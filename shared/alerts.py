"""The alert message (device → cloud on ``telemetry/v1/<device_id>/alert``), decoded
and checked at the boundary. The device side builds it in ``edge_agent.pipeline.alerts``.

A UTF-8 JSON object::

    {"seq": 812, "rule": "motor-hot", "kind": "threshold", "node": "env-1",
     "sensor": "temperature", "state": "raised", "ts_ns": 1732600000000000000,
     "value": 61.2, "message": "value 61.2 above 60"}

``seq`` shares the device's counter with batches (and ``generation``, optional,
is the device's buffer generation, docs/wire-format.md §2.3; ``capture``,
optional, the id of the raw readings captured around a raise); ``value`` may be null (a
``silent`` rule has no reading); ``ts_ns`` is the event time of the reading that
changed the rule's state (the device clock for ``silent``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from shared import jsonwire
from shared.errors import WireError
from shared.jsonwire import printable
from shared.topics import is_valid_id

KINDS = ("threshold", "rate", "stuck", "silent", "zscore")
MAX_ALERT_BYTES = 4096
FIELDS = ("seq", "rule", "kind", "node", "sensor", "state", "ts_ns", "value", "message")


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
    #: the device's buffer generation (docs/wire-format.md §2.3); 0 = none. Optional
    #: on the wire, so not in :data:`FIELDS`.
    generation: int = 0
    #: the capture of raw readings around this raise (edge_agent/pipeline/captures.py):
    #: the ``request`` of its rows in the lake's raw table; "" = none. Optional.
    capture: str = ""


def decode_alert(payload: bytes) -> Alert:
    """Parse and check untrusted bytes; raise :class:`WireError` (``bad-alert`` or
    ``too-large``) for anything but an alert as documented: every field present,
    ``seq`` and ``ts_ns`` in [0, 2^63), ``value`` a finite number or null, the
    strings free of control characters."""
    obj: Any = jsonwire.loads(
        payload, reason="bad-alert", what="an alert", max_bytes=MAX_ALERT_BYTES
    )
    if not isinstance(obj, dict):
        raise WireError("bad-alert", "not a JSON object")
    absent = [k for k in FIELDS if k not in obj]
    if absent:
        raise WireError("bad-alert", f"missing {', '.join(absent)}")

    def get(key: str, tp: type | tuple[type, ...]) -> Any:
        v = obj.get(key)
        if not isinstance(v, tp) or isinstance(v, bool):
            raise WireError("bad-alert", f"{key!r} has the wrong type")
        return v

    seq, ts = get("seq", int), get("ts_ns", int)
    if not (0 <= seq < 2**63 and 0 <= ts < 2**63):
        raise WireError("bad-alert", "seq and ts_ns must be integers in [0, 2^63)")
    generation = obj.get("generation", 0)
    if type(generation) is not int or not 0 <= generation < 2**63:
        raise WireError("bad-alert", "generation must be an integer in [0, 2^63)")
    capture = obj.get("capture", "")
    if not isinstance(capture, str) or (capture and not is_valid_id(capture)):
        raise WireError("bad-alert", "capture must be an id")
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
        generation,
        capture,
    )
    if alert.kind not in KINDS:
        raise WireError("bad-alert", f"kind {alert.kind!r} is not one of {KINDS}")
    if alert.state not in ("raised", "cleared"):
        raise WireError("bad-alert", "state must be 'raised' or 'cleared'")
    if not (is_valid_id(alert.node) and is_valid_id(alert.sensor)) or not is_valid_rule(alert.rule):
        raise WireError("bad-alert", "rule, node or sensor is not a valid id")
    if not printable(alert.message):
        raise WireError("bad-alert", "message has a control character")
    return alert


def is_valid_rule(name: str) -> bool:
    """An alert rule's name: 1 to 64 characters, no control character (it is a tag)."""
    return 0 < len(name) <= 64 and printable(name)
