"""``csv``: rows of comma-separated values.

* Without a header, each row is ``ts,value`` (or just ``value``, stamped on
  arrival) of the one sensor the topic (or the source's ``sensor``, or the HTTP
  request's ``sensor`` parameter) names.
* With a header (a first row that is not numbers), each column after the first
  is a sensor named by its header; the first column is the time if its header
  is ``ts``, ``time``, ``timestamp`` or ``_time``, else it is a sensor too and
  the rows are stamped on arrival. An empty cell is no reading.

Times are read by ``time_format`` (rfc3339, or s/ms/us/ns numbers). A row that
cannot be read is quarantined (``bad-csv`` or ``bad-timestamp``); the others
are stored.
"""

from __future__ import annotations

import csv
import io

from edge_agent.sources import timestamps
from edge_agent.sources.config import SourceConfig
from edge_agent.sources.contract import Builder, Decoded, number
from edge_agent.sources.naming import joined
from edge_agent.sources.transform import Transforms
from shared.errors import WireError

TIME_HEADERS = frozenset(("ts", "time", "timestamp", "_time"))
MAX_COLUMNS = 1000


def decode_rows(
    src: SourceConfig,
    transforms: Transforms,
    node: str,
    sensor: str,
    payload: bytes,
    now_ns: int,
    setting: str,
) -> Decoded:
    if len(payload) > src.max_bytes:
        raise WireError("too-large", f"a body of {len(payload)} bytes, limit {src.max_bytes}")
    try:
        text = payload.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise WireError("bad-csv", "not UTF-8 text") from None
    tz = timestamps.zone(src.timezone)
    b = Builder(transforms, now_ns)
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise WireError("bad-csv", f"not CSV: {exc}") from None
    rows = [r for r in rows if r and any(c.strip() for c in r)]
    if not rows:
        raise WireError("no-readings", "an empty CSV body")
    head = rows[0]
    if len(head) > MAX_COLUMNS:
        raise WireError("bad-csv", f"more than {MAX_COLUMNS} columns")
    lone = head[0].strip()
    header = any(number(c) is None for c in head[1:]) or (
        len(head) == 1 and number(lone) is None and lone.lower() not in TIME_HEADERS
    )
    if header:
        names = [c.strip() for c in head]
        timed = names[0].lower() in TIME_HEADERS
        sensors = [joined(sensor, n) for n in names]
        for i, name in enumerate(sensors):
            if name is None and not (timed and i == 0):
                raise WireError("bad-csv", f"column {names[i][:40]!r} is not a usable sensor name")
        body = rows[1:]
    else:
        if not sensor:
            raise WireError(
                "bad-csv",
                "rows without a header need a sensor (the topic's {sensor}, the "
                "source's sensor, or ?sensor= over HTTP)",
            )
        timed = len(head) == 2
        sensors = [None, sensor] if timed else [sensor]
        body = rows
    width = len(sensors)
    for row in body:
        line = ",".join(row)
        if len(row) != width:
            b.reject("bad-csv", f"{len(row)} cells, the rows have {width}", line)
            continue
        ts: int | None = None
        cells = list(enumerate(row))
        if timed:
            try:
                if row[0].strip():
                    ts = timestamps.from_text(row[0], src.time_format, tz, setting)
            except timestamps.BadTimestamp as exc:
                b.reject("bad-timestamp", str(exc), line)
                continue
            cells = cells[1:]
        bad = [c for _, c in cells if c.strip() and number(c) is None]
        if bad:
            b.reject("bad-csv", f"{bad[0][:40]!r} is not a number", line)
            continue
        for i, cell in cells:
            name = sensors[i]
            if cell.strip() and name is not None:
                value = number(cell)
                if value is not None:
                    b.add(node, name, src.unit, ts, value, line)
    out = b.done()
    if not out.chunks and not out.rejects and not out.filtered:
        raise WireError("no-readings", "no reading in the CSV body")
    return out
