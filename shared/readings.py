"""The device-local reading format: what sensor nodes publish to the edge agent.

One MQTT message on ``sensors/<node>/<sensor>`` carries a chunk of readings of
one sensor as a JSON object::

    {"unit": "degC", "ts": [1732600000000000000, ...], "values": [21.5, ...]}

``ts`` are integer nanoseconds since the Unix epoch (event time, set by the
node), ``values`` are numbers (``NaN`` is allowed and counted as invalid). The
node and sensor come from the topic. JSON keeps the node firmware trivial and
round-trips float64 exactly; the local link is not billed per byte.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from shared import jsonwire
from shared.errors import WireError
from shared.topics import is_valid_id, is_valid_unit

MAX_CHUNK_READINGS = 100_000
#: A chunk of MAX_CHUNK_READINGS readings in JSON fits in about 4 MB.
MAX_CHUNK_BYTES = 4 << 20


@dataclass(frozen=True, eq=False)
class ReadingChunk:
    node: str
    sensor: str
    unit: str
    ts: npt.NDArray[np.int64]
    values: npt.NDArray[np.float64]

    def __len__(self) -> int:
        return len(self.ts)


def encode_chunk(unit: str, ts: list[int], values: list[float]) -> bytes:
    return json.dumps({"unit": unit, "ts": ts, "values": values}, separators=(",", ":")).encode()


def parse_sensor_topic(topic: str, prefix: str) -> tuple[str, str]:
    parts = topic.split("/")
    head = prefix.split("/")
    if len(parts) != len(head) + 2 or parts[: len(head)] != head:
        raise WireError("bad-topic", f"topic {topic!r} is not {prefix}/<node>/<sensor>")
    node, sensor = parts[-2], parts[-1]
    if not (is_valid_id(node) and is_valid_id(sensor)):
        raise WireError("bad-topic", f"topic {topic!r} has an invalid node or sensor id")
    return node, sensor


def decode_chunk(topic: str, payload: bytes, prefix: str) -> ReadingChunk:
    """Parse one local message; raise :class:`WireError` with a reason if bad."""
    node, sensor = parse_sensor_topic(topic, prefix)
    return decode_chunk_payload(node, sensor, payload)


def decode_chunk_payload(node: str, sensor: str, payload: bytes) -> ReadingChunk:
    """Parse a chunk's payload for a node and sensor named elsewhere (the topic)."""
    obj: Any = jsonwire.loads(
        payload, reason="bad-json", what="a reading chunk", max_bytes=MAX_CHUNK_BYTES
    )
    if not isinstance(obj, dict):
        raise WireError("bad-json", "payload is not a JSON object")
    ts, values, unit = obj.get("ts"), obj.get("values"), obj.get("unit", "")
    if not isinstance(ts, list) or not isinstance(values, list):
        raise WireError("bad-chunk", "ts and values must be arrays")
    if len(ts) != len(values):
        raise WireError("bad-chunk", f"{len(ts)} timestamps but {len(values)} values")
    if not ts:
        raise WireError("bad-chunk", "empty chunk")
    if len(ts) > MAX_CHUNK_READINGS:
        raise WireError("bad-chunk", f"more than {MAX_CHUNK_READINGS} readings in one chunk")
    if not is_valid_unit(unit):
        raise WireError(
            "bad-chunk", "unit must be a string of at most 32 characters, none a control one"
        )
    if not all(type(t) is int and 0 <= t < 2**63 for t in ts):
        raise WireError("bad-chunk", "ts must be non-negative integer nanoseconds")
    if not all(type(v) in (int, float) or v is None for v in values):
        raise WireError("bad-chunk", "values must be numbers")
    vals = np.array([math.nan if v is None else v for v in values], dtype=np.float64)
    return ReadingChunk(node, sensor, unit, np.array(ts, dtype=np.int64), vals)
