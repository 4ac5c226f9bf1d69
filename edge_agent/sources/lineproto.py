"""``influx``: InfluxDB line protocol, as Telegraf, every InfluxDB client library and
Node-RED write it (https://docs.influxdata.com/influxdb/v2/reference/syntax/line-protocol/)::

    climate,host=kitchen,room=east temperature=21.5,humidity=40i 1732600000000000000

* the node is the value of the tag ``node_tag`` (default ``host``), else the
  source's ``node``;
* the sensor is ``<measurement>.<tag values>.<field>``, or just the measurement
  (and tag values) for a field named ``value``: every tag but the node's and
  ``ignore_tags`` is part of it, as of InfluxDB's series key
  (:mod:`edge_agent.sources.series`);
* floats, integers (``1i``), unsigned (``1u``) and booleans are readings, NaN and
  ±Inf invalid readings; string fields are counted as ``text``
  (:mod:`edge_agent.sources.values`);
* the timestamp is in ``precision`` (ns by default; InfluxDB 1.x's ``m`` and
  ``h`` too); a line without one is stamped on arrival.

Each line stands alone: a line that cannot be read is quarantined (``bad-line``,
or ``bad-timestamp`` naming the precision setting) and the others are stored, as
InfluxDB does. Lines without a backslash or a double quote take a fast path of
``str.split``; the general path handles escapes and quoted strings, and a fuzz
test holds the two equal.
"""

from __future__ import annotations

import math

from edge_agent.sources import timestamps
from edge_agent.sources.contract import Builder, Decoded
from edge_agent.sources.series import SeriesNaming, sensor_name
from edge_agent.sources.transform import Transforms
from shared.errors import WireError

_TRUE = frozenset(("t", "T", "true", "True", "TRUE"))
_FALSE = frozenset(("f", "F", "false", "False", "FALSE"))
_ESCAPABLE = ', ="\\'
#: series (measurement and tags) remembered per message
_SERIES_CACHE = 10_000

#: InfluxDB's precision names (v1 /write uses n, u, ms, s, m, h; v2 ns, us, ms, s).
PRECISIONS = {
    "ns": "ns",
    "n": "ns",
    "us": "us",
    "u": "us",
    "µ": "us",
    "ms": "ms",
    "s": "s",
    "m": "m",
    "h": "h",
}
#: nanoseconds per unit of each precision
NS_PER_UNIT = {**timestamps.NS_PER, "m": 60 * 10**9, "h": 3600 * 10**9}


class BadLine(ValueError):
    pass


def _split(text: str, sep: str, *, quotes: bool, maxsplit: int = -1) -> list[str]:
    """Split on ``sep`` where it is not escaped by a backslash (nor, with ``quotes``,
    inside a double-quoted string). The parts keep their escapes."""
    out: list[str] = []
    start = 0
    i = 0
    n = len(text)
    in_str = False
    while i < n:
        c = text[i]
        if c == "\\" and i + 1 < n:
            i += 2
            continue
        if quotes and c == '"':
            in_str = not in_str
        elif c == sep and not in_str:
            out.append(text[start:i])
            start = i + 1
            if len(out) == maxsplit:
                break
        i += 1
    if in_str:
        raise BadLine("an unterminated string")
    out.append(text[start:])
    return out


def _unescape(text: str) -> str:
    if "\\" not in text:
        return text
    out = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in _ESCAPABLE:
            out.append(text[i + 1])
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


def field_value(v: str) -> float | None:
    """A field's value as a reading (NaN: an invalid one); None for a string field;
    :class:`BadLine` if it is not a valid value."""
    if not v:
        raise BadLine("a field without a value")
    if v[0] == '"':
        if len(v) >= 2 and v[-1] == '"':
            return None
        raise BadLine("an unterminated string")
    if not v.isascii() or "_" in v:
        raise BadLine(f"{v[:40]!r} is not a number")
    last = v[-1]
    if last == "i" or last == "u":
        body = v[:-1]
        if not body or len(body) > 20 or not body.lstrip("-").isdigit():
            raise BadLine(f"{v[:40]!r} is not an integer")
        num = int(body)
        if last == "u" and num < 0:
            raise BadLine(f"{v[:40]!r}: an unsigned integer is not negative")
        return float(num)
    if v in _TRUE:
        return 1.0
    if v in _FALSE:
        return 0.0
    try:
        x = float(v)
    except ValueError:
        raise BadLine(f"{v[:40]!r} is not a number") from None
    return x if math.isfinite(x) else math.nan


class LineDecoder:
    """Decodes bodies of line protocol into readings (one instance per source)."""

    def __init__(
        self,
        transforms: Transforms,
        *,
        node: str,
        node_tag: str = "host",
        sensor_tags: tuple[str, ...] = (),
        ignore_tags: tuple[str, ...] = (),
        unit: str = "",
        max_bytes: int = 64 << 20,
    ) -> None:
        self.transforms = transforms
        self.node = node
        self.naming = SeriesNaming(node_tag, sensor_tags, ignore_tags)
        self.node_tag = node_tag
        self.unit = unit
        self.max_bytes = max_bytes

    def decode(self, payload: bytes, now_ns: int, precision: str, setting: str) -> Decoded:
        if len(payload) > self.max_bytes:
            raise WireError("too-large", f"a body of {len(payload)} bytes, limit {self.max_bytes}")
        unit = PRECISIONS.get(precision)
        if unit is None:
            raise WireError("bad-precision", f"precision {precision[:20]!r}: ns, us, ms, s, m or h")
        mult = NS_PER_UNIT[unit]
        try:
            lines = payload.decode("utf-8").split("\n")
        except UnicodeDecodeError:
            lines = [
                ln.decode("utf-8", "replace") if self._utf8(ln) else "\ufffd"
                for ln in payload.split(b"\n")
            ]
        b = Builder(self.transforms, now_ns)
        series_cache: dict[str, tuple[str, str] | str] = {}
        sensor_cache: dict[tuple[str, str], str | None] = {}
        lo, hi = timestamps.PLAUSIBLE_MIN_NS, timestamps.PLAUSIBLE_MAX_NS
        add = b.add
        for line in lines:
            if line and line[-1] == "\r":
                line = line[:-1]
            if not line or line[0] == "#" or line.isspace():
                continue
            if "\ufffd" in line:
                b.reject("bad-line", "not UTF-8", line)
                continue
            try:
                fast = "\\" not in line and '"' not in line
                if fast:
                    parts = line.split(" ")
                else:
                    head = _split(line, " ", quotes=False, maxsplit=1)
                    parts = head[:1] + (
                        _split(head[1], " ", quotes=True, maxsplit=1) if len(head) > 1 else []
                    )
                if len(parts) == 2:
                    series, fields = parts
                    ts: int | None = None
                elif len(parts) == 3:
                    series, fields, raw_ts = parts
                    if not raw_ts or len(raw_ts) > 20 or not raw_ts.lstrip("-").isdigit():
                        raise BadLine(f"timestamp {raw_ts[:40]!r} is not an integer")
                    ts = int(raw_ts) * mult
                    if not lo <= ts < hi:
                        b.reject(
                            "bad-timestamp", self._ts_message(int(raw_ts), unit, setting), line
                        )
                        continue
                else:
                    raise BadLine("a line is <measurement>[,tags] <fields> [timestamp]")
                target = series_cache.get(series)
                if target is None:
                    target = self._series(series, fast)
                    if len(series_cache) >= _SERIES_CACHE:
                        series_cache.clear()
                    series_cache[series] = target
                if isinstance(target, str):
                    raise BadLine(target)
                node, prefix = target
                for field in fields.split(",") if fast else _split(fields, ",", quotes=True):
                    key, eq, value = field.partition("=") if fast else self._kv(field)
                    if not eq or not key:
                        raise BadLine(f"field {field[:40]!r} is not key=value")
                    reading = field_value(value)
                    if reading is None:
                        b.text()
                        continue
                    skey = (prefix, key)
                    if skey in sensor_cache:
                        sensor = sensor_cache[skey]
                    else:
                        sensor = sensor_name(prefix, _unescape(key))
                        if len(sensor_cache) >= _SERIES_CACHE:
                            sensor_cache.clear()
                        sensor_cache[skey] = sensor
                    if sensor is None:
                        raise BadLine(f"field {key[:40]!r} makes no usable sensor name")
                    add(node, sensor, self.unit, ts, reading, line)
            except BadLine as exc:
                b.reject("bad-line", str(exc), line)
        out = b.done()
        if not out.chunks and not out.rejects and not out.filtered:
            raise WireError("no-readings", "no line with a numeric field")
        return out

    @staticmethod
    def _utf8(line: bytes) -> bool:
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            return False
        return True

    @staticmethod
    def _kv(field: str) -> tuple[str, str, str]:
        parts = _split(field, "=", quotes=True, maxsplit=1)
        return (parts[0], "=", parts[1]) if len(parts) == 2 else (field, "", "")

    def _series(self, series: str, fast: bool) -> tuple[str, str] | str:
        """(node, sensor prefix) for a series key, or why it is not usable."""
        parts = series.split(",") if fast else _split(series, ",", quotes=False)
        measurement = _unescape(parts[0])
        tags: dict[str, str] = {}
        for tag in parts[1:]:
            kv = tag.split("=") if fast else _split(tag, "=", quotes=False)
            if len(kv) != 2 or not kv[0] or not kv[1]:
                return f"tag {tag[:40]!r} is not key=value"
            tags[_unescape(kv[0])] = _unescape(kv[1])
        return self.naming.target(measurement, tags, self.node)

    @staticmethod
    def _ts_message(raw: int, unit: str, setting: str) -> str:
        try:
            timestamps.check(raw * NS_PER_UNIT[unit], raw, unit, setting)
        except timestamps.BadTimestamp as exc:
            return str(exc)
        return f"timestamp {raw} is out of range"
