"""A batch decoder written from docs/wire-format.md §1 and §2 (§2.14: version 2) alone, to hold the
page to the code: it imports nothing of the project. It answers only the question
the page's §2.5 answers — which reason, if any, a payload on a topic is refused
for — and builds no batch.

Where the page is silent, this decoder does what a careful reader would (and the
test that compares it with the code then says whether the code does the same).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import struct
from typing import Any

import zstandard

ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # §1
TAG_KEY = re.compile(r"^[a-z][a-z0-9_]{0,31}$")  # §2.3
RESERVED_TAG_KEYS = {
    "device_id", "node", "sensor", "unit", "window", "revision", "count", "invalid",
    "seq", "time", "tags", "rule", "kind", "state",
}  # fmt: skip
#: §2.4: name → (type, encoding); the first ten are required
COLUMNS = {
    "sensor": ("uint16", "plain"),
    "start_ns": ("int64", "delta"),
    "count": ("uint32", "plain"),
    "invalid": ("uint32", "plain"),
    "min": ("float64", "plain"),
    "max": ("float64", "plain"),
    "mean": ("float64", "plain"),
    "stddev": ("float64", "plain"),
    "first": ("float64", "plain"),
    "last": ("float64", "plain"),
    "sum": ("float64", "plain"),
    "revision": ("uint32", "plain"),
    "p50": ("float64", "plain"),
    "p90": ("float64", "plain"),
    "p99": ("float64", "plain"),
}
REQUIRED = list(COLUMNS)[:10]
SIZE = {"uint16": 2, "uint32": 4, "int64": 8, "float64": 8}
FORMAT = {"uint16": "<H", "uint32": "<I", "int64": "<q", "float64": "<d"}
MAX_PAYLOAD = 1 << 20
MAX_BODY = 16 << 20
#: §1, §2.14: the prefix of each version's batches
PREFIXES = {"telemetry/v1": 1, "telemetry/v2": 2}


class Refused(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _big_int(text: str) -> int:
    if len(text.lstrip("-")) > 20:  # "integers of at most 20 digits"
        raise ValueError(text)
    return int(text)


def _inflate(frame: bytes, length: int) -> bytes:
    """The zstd frame's content, reading at most L + 1 bytes (§2.5, 2.6)."""
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(frame)
        body = b""
        while len(body) <= length:
            chunk = reader.read(length + 1 - len(body))
            if not chunk:
                break
            body += chunk
    except zstandard.ZstdError:
        raise Refused("bad-compression") from None
    if len(body) > length:
        raise Refused("too-large")
    return body


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json(raw: bytes) -> Any:
    """UTF-8 JSON, integers of at most 20 digits (§2.3, 2.5 step 3)."""
    try:
        return json.loads(raw.decode("utf-8"), parse_int=_big_int, parse_constant=_not_json)
    except (ValueError, RecursionError):
        raise Refused("bad-header") from None


def _prefix_of(topic: str) -> str:
    """The batch prefix ``topic`` is under (§1), or v1's if none."""
    for prefix in PREFIXES:
        if topic.startswith(prefix + "/"):
            return prefix
    return "telemetry/v1"


def reason(topic: str, payload: bytes) -> str | None:
    """The reason §2.5 gives for refusing ``payload`` on ``topic``; None if valid."""
    try:
        _check(topic, payload, _prefix_of(topic))
    except Refused as exc:
        return exc.reason
    return None


def acked_seq(topic: str, payload: bytes) -> int | None:
    """The seq a refused batch's `rejected` ack carries (§2.7), None for no ack."""
    prefix = _prefix_of(topic)
    device = topic[len(prefix) + 1 : -len("/batch")]
    if not topic.startswith(prefix + "/") or not topic.endswith("/batch") or not ID.match(device):
        return None
    if len(payload) < 10 or payload[:4] != b"TLMB" or payload[4] not in PREFIXES.values():
        return None
    (length,) = struct.unpack_from("<I", payload, 6)
    if length > MAX_BODY:
        return None
    body = payload[10:]
    if payload[5] == 1:
        try:
            body = _inflate(body, length)
        except Refused:
            return None
    if len(body) < 4:
        return None
    (hlen,) = struct.unpack_from("<I", body)
    if len(body) < 4 + hlen:
        return None
    try:
        header = _json(body[4 : 4 + hlen])
    except Refused:
        return None
    seq = header.get("seq") if isinstance(header, dict) else None
    return seq if _is_int(seq) and 0 <= seq < 2**63 else None


def decode(
    payload: bytes, topic: str = "telemetry/v1/dev-1/batch", *, ranges: bool = True
) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """A valid batch's header and columns (by name, the values as Python numbers);
    :class:`Refused` with the reason otherwise. ``ranges=False``: without step 7 (the
    statistics' NaN/Inf policy is the receiver's check, not the format's)."""
    return _check(topic, payload, "telemetry/v1", ranges)


def _check(
    topic: str, payload: bytes, prefix: str, ranges: bool = True
) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    # 1. the topic
    if not topic.startswith(prefix + "/") or not topic.endswith("/batch"):
        raise Refused("bad-topic")
    topic_device = topic[len(prefix) + 1 : -len("/batch")]
    if not ID.match(topic_device):
        raise Refused("bad-topic")
    # 2. the preamble
    if len(payload) > MAX_PAYLOAD:
        raise Refused("too-large")
    if len(payload) < 10:
        raise Refused("truncated")
    if payload[:4] != b"TLMB":
        raise Refused("bad-magic")
    version = PREFIXES[prefix]  # §2.14: each version on its own prefix only
    if payload[4] != version:
        raise Refused("unsupported-version")
    (length,) = struct.unpack_from("<I", payload, 6)
    if length > MAX_BODY:
        raise Refused("too-large")
    rest = payload[10:]
    if payload[5] == 1:
        body = _inflate(rest, length)
    elif payload[5] == 0:
        body = rest
    else:
        raise Refused("unsupported-codec")
    if len(body) != length:
        raise Refused("truncated")
    # 3. the body
    if len(body) < 4:
        raise Refused("truncated")
    (hlen,) = struct.unpack_from("<I", body)
    if hlen > len(body) - 4:
        raise Refused("truncated")
    header = _json(body[4 : 4 + hlen])
    if not isinstance(header, dict):
        raise Refused("bad-header")
    return header, _check_header(header, body, 4 + hlen, topic_device, ranges, version)


def _varints(data: bytes) -> list[int]:
    """§2.14: LEB128, at most 10 bytes a value, below 2^64; the data ends on a value."""
    out, value, shift, n = [], 0, 0, 0
    for byte in data:
        value |= (byte & 0x7F) << shift
        shift, n = shift + 7, n + 1
        if n > 10:
            raise Refused("bad-column")
        if not byte & 0x80:
            if value >= 2**64:
                raise Refused("bad-column")
            out.append(value)
            value, shift, n = 0, 0, 0
    if n:
        raise Refused("bad-column")
    return out


def _v2_sketches(data: bytes, rows: int) -> None:
    """§2.14: ``rows`` sketches, each a zero count and two runs, nothing after."""
    values = iter(_varints(data))
    try:
        for _ in range(rows):
            if next(values) >= 2**63:
                raise Refused("bad-column")
            for _sign in range(2):
                n = next(values)
                if n == 0:
                    continue
                z = next(values)
                low = (z >> 1) ^ -(z & 1)
                counts = [next(values) for _ in range(min(n, 65536))]
                if n > 65535 or not -(2**31) <= low <= low + n - 1 <= 2**31 - 1:
                    raise Refused("bad-column")
                if max(counts) >= 2**32:
                    raise Refused("bad-column")
    except StopIteration:
        raise Refused("bad-column") from None
    if next(values, None) is not None:
        raise Refused("bad-column")


def _check_header(
    h: dict[str, Any], body: bytes, offset: int, topic_device: str, ranges: bool, version: int = 1
) -> dict[str, list[Any]]:
    # 4.1
    rows, window, sensors = h.get("rows"), h.get("window"), h.get("sensors")
    if not _is_int(rows) or rows < 0:
        raise Refused("bad-header")
    if not isinstance(window, dict):
        raise Refused("bad-header")
    if not isinstance(sensors, list) or len(sensors) > 65536:
        raise Refused("bad-header")
    if not all(isinstance(s, dict) for s in sensors):
        raise Refused("bad-header")
    # 4.2
    for s in sensors:
        node, name = s.get("node"), s.get("name")
        unit = s.get("unit", "")
        tags = s.get("tags")
        if not isinstance(node, str) or not isinstance(name, str) or not isinstance(unit, str):
            raise Refused("bad-header")
        if tags is not None:
            if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
                raise Refused("bad-header")
            if len(tags) > 8:
                raise Refused("bad-header")
            for k, v in tags.items():
                if not TAG_KEY.match(k) or k in RESERVED_TAG_KEYS or not ID.match(v):
                    raise Refused("bad-header")
        if not ID.match(node) or not ID.match(name):
            raise Refused("bad-sensor")
        if len(unit) > 32 or not unit.isprintable():
            raise Refused("bad-sensor")
    # 4.3
    kind, width = window.get("kind"), window.get("width_ns")
    if not isinstance(kind, str) or not _is_int(width):
        raise Refused("bad-header")
    hop = window.get("hop_ns") if kind == "hopping" else None
    if kind == "hopping" and not _is_int(hop):
        raise Refused("bad-header")
    if kind not in ("tumbling", "hopping") or not 0 < width < 2**63:
        raise Refused("bad-window")
    if kind == "hopping" and (not 0 < hop < 2**63 or width % hop):
        raise Refused("bad-window")
    step = hop if kind == "hopping" else width
    # 4.4
    columns = h.get("columns")
    if not isinstance(columns, list):
        raise Refused("bad-header")
    found: dict[str, list[Any]] = {}
    for c in columns:
        if not isinstance(c, dict):
            raise Refused("bad-header")
        name, size = c.get("name"), c.get("bytes")
        if not isinstance(name, str) or not _is_int(size):
            raise Refused("bad-header")
        if size < 0 or offset + size > len(body):
            raise Refused("truncated")
        data = body[offset : offset + size]
        offset += size
        if name == "sketch" and version == 2:
            if c.get("type") != "bytes" or c.get("encoding") != "varint":
                raise Refused("bad-column")
            alpha = h.get("sketch_alpha")
            if not isinstance(alpha, float) or not 0 < alpha < 1:
                raise Refused("bad-header")
            _v2_sketches(data, rows)
            continue
        if name == "mean" and version == 2:
            raise Refused("bad-column")  # v2 has none (§2.14)
        if name == "sketch":
            if c.get("type") != "bytes" or c.get("encoding") != "offsets":
                raise Refused("bad-column")
            if 4 * (rows + 1) > len(data):
                raise Refused("bad-column")
            offs = struct.unpack_from(f"<{rows + 1}I", data)
            if offs[0] != 0 or any(b < a for a, b in itertools.pairwise(offs)):
                raise Refused("bad-column")
            if offs[-1] != len(data) - 4 * (rows + 1):
                raise Refused("bad-column")
            continue
        if name not in COLUMNS:
            continue
        ctype, encoding = COLUMNS[name]
        if c.get("type") != ctype or c.get("encoding") != encoding:
            raise Refused("bad-column")
        if size != rows * SIZE[ctype]:
            raise Refused("bad-column")
        values = [v for (v,) in struct.iter_unpack(FORMAT[ctype], data)]
        if encoding == "delta":  # a running sum
            running = 0
            for j, d in enumerate(values):
                running += d
                values[j] = running
        found[name] = values
    # 4.5 - 4.7
    if offset != len(body):
        raise Refused("bad-header")
    if version == 2 and "sum" not in found:  # §2.14: sum required, mean is sum / count
        raise Refused("bad-column")
    if any(name not in found for name in REQUIRED if not (version == 2 and name == "mean")):
        raise Refused("bad-column")
    if version == 2:
        found["mean"] = [
            s / c if c else math.nan for s, c in zip(found["sum"], found["count"], strict=True)
        ]
    generation = h.get("generation", 0)
    device, seq, created = h.get("device_id"), h.get("seq"), h.get("created_ns")
    if not _is_int(generation) or not isinstance(device, str):
        raise Refused("bad-header")
    if not _is_int(seq) or not _is_int(created):
        raise Refused("bad-header")
    # 5.
    if not ID.match(device):
        raise Refused("bad-device-id")
    if not 0 <= seq < 2**63:
        raise Refused("bad-seq")
    if not 0 <= created < 2**63 or not 0 <= generation < 2**63:
        raise Refused("bad-header")
    for i in range(rows):
        start = (found["start_ns"][i] + 2**63) % 2**64 - 2**63  # an int64 running sum
        if found["sensor"][i] >= len(sensors) or start % step:
            raise Refused("bad-column")
        if found["count"][i] + found["invalid"][i] < 1:
            raise Refused("bad-column")
    # 6.
    if device != topic_device:
        raise Refused("device-mismatch")
    # 7. the NaN/Inf policy
    if not ranges:
        return found
    stats = ("min", "max", "mean", "stddev", "first", "last", "sum", "p50", "p90", "p99")
    for i in range(rows):
        count = found["count"][i]
        mean = found["mean"][i]
        # a batch without sum: count × mean; without quantiles: NaN (§2.4)
        row = {n: found[n][i] if n in found else math.nan for n in stats}
        if "sum" not in found:
            row["sum"] = count * mean
        if any(math.isinf(v) for v in row.values()):
            raise Refused("bad-range")
        if count == 0:
            if not all(math.isnan(v) for v in row.values()):
                raise Refused("bad-range")
            continue
        if not all(math.isfinite(row[n]) for n in stats[:7]):
            raise Refused("bad-range")
        lo, hi = row["min"], row["max"]
        eps = 1e-9 * (abs(lo) + abs(hi)) + 1e-300
        for n in ("mean", "first", "last", "p50", "p90", "p99"):
            if row[n] < lo - eps or row[n] > hi + eps:  # NaN compares false
                raise Refused("bad-range")
        if row["stddev"] < 0:
            raise Refused("bad-range")
        if row["p50"] > row["p90"] + eps or row["p90"] > row["p99"] + eps:
            raise Refused("bad-range")
    return found
