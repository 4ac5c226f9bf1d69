"""``json``: an object whose fields are sensors (Tasmota, Zigbee2MQTT, Shelly).

Nested objects give dotted paths (Tasmota's ``{"BME280": {"Temperature": 21.4}}``
is the sensor ``BME280.Temperature``), and arrays one path per element, from 0
(a two-channel Tasmota meter's ``"ENERGY":{"Power":[23.63,67.17]}`` is
``ENERGY.Power.0`` and ``ENERGY.Power.1``). Each value is read by the one rule
of :mod:`edge_agent.sources.values`: numbers, numeric text and states are
readings, NaN and null invalid readings, other text is counted as ``text``.
``include`` and ``exclude`` (globs on the path) choose fields (the others are
counted as ``excluded``); ``root`` reads
one object inside the message (Shelly's ``params``). When the topic names a
sensor, it comes first: ``<sensor>.<path>``.

``time_field`` names the field with the reading time, read by ``time_format``;
without it (or when a message lacks it) readings are stamped on arrival. A
message with no reading at all is quarantined (``no-readings``), so that a
technician sees what the agent does not take.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from typing import Any

from edge_agent.sources import timestamps, values
from edge_agent.sources.config import SourceConfig
from edge_agent.sources.contract import Builder, Decoded, Decoder
from edge_agent.sources.naming import joined, node_and_sensor
from edge_agent.sources.transform import Transforms
from shared import jsonwire
from shared.errors import WireError

MAX_DEPTH = 8
MAX_FIELDS = 10_000
#: stands for an object or array nested deeper than MAX_DEPTH (quarantined, not read)
TOO_DEEP = object()


def fields(
    obj: dict[str, Any] | list[Any], prefix: str = "", depth: int = 0
) -> Iterator[tuple[str, Any]]:
    """(path, scalar) of every value in an object, depth first: objects by key,
    arrays by index from 0. An object or array deeper than :data:`MAX_DEPTH`
    levels is one ``(path, TOO_DEEP)``."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj)
    for key, value in items:
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict | list):
            if depth < MAX_DEPTH:
                yield from fields(value, path, depth + 1)
            elif value:
                yield path, TOO_DEEP
        else:
            yield path, value


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
    states = src.state_table

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
        body = lookup(obj, src.root) if src.root else obj
        if not isinstance(body, dict):
            raise WireError("no-readings", f"no object at {src.root!r} (the source's root)")
        skip = src.time_field[len(src.root) + 1 :] if src.root else src.time_field
        b = Builder(transforms, now_ns)
        seen = 0
        for path, value in fields(body):
            if path == skip:
                continue
            if not wanted(path):
                b.out.counts["excluded"] += 1
                continue
            if value is TOO_DEEP:
                b.reject("too-deep", f"{path[:100]!r} nests deeper than {MAX_DEPTH} levels", path)
                continue
            kind, reading = values.classify(value, states)
            if kind == "text":
                b.text()
                continue
            seen += 1
            if seen > MAX_FIELDS:
                raise WireError("bad-json", f"more than {MAX_FIELDS} fields")
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
            keys = ", ".join(list(body)[:10])
            raise WireError(
                "no-readings", f"no reading (after include/exclude) among: {keys[:300]}"
            )
        return out

    return decode
