"""``json``: an object whose numeric fields are sensors (Tasmota, Zigbee2MQTT, Shelly).

Nested objects give dotted paths (Tasmota's ``{"BME280": {"Temperature": 21.4}}``
is the sensor ``BME280.Temperature``). Numbers are readings; so are booleans and
the strings ON/OFF, true/false (as 1/0) and strings holding a number. Other
strings, arrays and nulls are not readings and are skipped. ``include`` and
``exclude`` (globs on the path) choose fields. When the topic names a sensor, it
comes first: ``<sensor>.<path>``.

``time_field`` names the field with the reading time, read by ``time_format``;
without it (or when a message lacks it) readings are stamped on arrival. A
message with no reading at all is quarantined (``no-readings``), so that a
technician sees what the agent does not take.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from typing import Any

from edge_agent.sources import timestamps
from edge_agent.sources.config import SourceConfig
from edge_agent.sources.contract import Builder, Decoded, Decoder, number
from edge_agent.sources.naming import joined, node_and_sensor
from edge_agent.sources.transform import Transforms
from shared import jsonwire
from shared.errors import WireError

MAX_DEPTH = 8
MAX_FIELDS = 10_000


def _fields(obj: dict[str, Any], prefix: str, depth: int) -> Iterator[tuple[str, Any]]:
    for key, value in obj.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            if depth < MAX_DEPTH:
                yield from _fields(value, path, depth + 1)
        else:
            yield path, value


def _reading(value: Any) -> float | None:
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, int | float):
        return float(value) if abs(value) < 1e308 else None
    if isinstance(value, str):
        return number(value)
    return None


def lookup(obj: dict[str, Any], path: str) -> Any:
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def read_time(src: SourceConfig, raw: Any, setting: str) -> int:
    """A reading time from JSON, or :class:`WireError` ``bad-timestamp``."""
    tz = timestamps.zone(src.timezone)
    try:
        if isinstance(raw, str):
            return timestamps.from_text(raw, src.time_format, tz, setting)
        if src.time_format in timestamps.NS_PER:
            return timestamps.from_number(raw, src.time_format, setting)
        raise timestamps.BadTimestamp(
            f"timestamp {str(raw)[:40]} is not text: for epoch numbers set {setting} to "
            "'s', 'ms', 'us' or 'ns'"
        )
    except timestamps.BadTimestamp as exc:
        raise WireError("bad-timestamp", str(exc)) from None


def decoder(src: SourceConfig, transforms: Transforms, setting: str = "time_format") -> Decoder:
    def wanted(path: str) -> bool:
        if src.include and not any(fnmatch.fnmatchcase(path, g) for g in src.include):
            return False
        return not any(fnmatch.fnmatchcase(path, g) for g in src.exclude)

    def decode(topic: str, payload: bytes, now_ns: int) -> Decoded:
        node, topic_sensor = node_and_sensor(src, topic)
        obj = jsonwire.loads(
            payload, reason="bad-json", what="a JSON payload", max_bytes=src.max_bytes
        )
        if not isinstance(obj, dict):
            raise WireError("bad-json", "the payload is not a JSON object")
        ts: int | None = None
        if src.time_field:
            raw = lookup(obj, src.time_field)
            if raw is not None:
                ts = read_time(src, raw, setting)
        b = Builder(transforms, now_ns)
        seen = 0
        for path, value in _fields(obj, "", 0):
            if path == src.time_field or not wanted(path):
                continue
            reading = _reading(value)
            if reading is None:
                continue
            seen += 1
            if seen > MAX_FIELDS:
                raise WireError("bad-json", f"more than {MAX_FIELDS} numeric fields")
            sensor = joined(topic_sensor, path)
            if sensor is None:
                b.reject(
                    "bad-name",
                    f"field {path[:100]!r} is not a usable sensor name",
                    path.encode()[:200],
                )
                continue
            b.add(node, sensor, src.unit, ts, reading, payload)
        out = b.done()
        if not out.chunks and not out.rejects and not out.filtered:
            keys = ", ".join(list(obj)[:10])
            raise WireError(
                "no-readings", f"no numeric field (after include/exclude) among: {keys[:300]}"
            )
        return out

    return decode
