"""``csv``: rows of comma-separated values.

* Without a header, each row is ``ts,value`` (or just ``value``, stamped on
  arrival) of the one sensor the topic (or the source's ``sensor``, or the HTTP
  request's ``sensor`` parameter) names.
* With a header (a first row that is not numbers), each column after the first
  is a sensor named by its header; the first column is the time if its header
  is ``ts``, ``time``, ``timestamp`` or ``_time``, else it is a sensor too and
  the rows are stamped on arrival. An empty cell is no reading (CSV has no
  null: a logger leaves a cell empty when a sensor has no sample in that row).
* Campbell Scientific TOA5 files (the first cell ``TOA5``): the second row names
  the columns, the third gives their units, the fourth how they were processed;
  ``TIMESTAMP`` is the time (the logger's clock, without a zone: ``time_format =
  "local"`` and the logger's ``timezone``) and ``RECORD`` the record number,
  not a sensor. ``"NAN"`` is an invalid reading.

Cells are values by the one rule of :mod:`edge_agent.sources.values`.

Times are read by ``time_format`` (rfc3339, or s/ms/us/ns numbers). A row that
cannot be read is quarantined (``bad-csv`` or ``bad-timestamp``); the others
are stored.
"""

from __future__ import annotations

import csv
import io

from edge_agent.sources import timestamps, values
from edge_agent.sources.config import SourceConfig
from edge_agent.sources.contract import Builder, Decoded
from edge_agent.sources.naming import joined
from edge_agent.sources.transform import Transforms
from shared.errors import WireError
from shared.topics import is_valid_unit

TIME_HEADERS = frozenset(("ts", "time", "timestamp", "_time"))
#: TOA5's record number: a counter of the logger's table, not a measurement
TOA5_SKIP = frozenset(("RECORD",))
MAX_COLUMNS = 1000


def _is_text(cell: str) -> bool:
    return values.from_text(cell, values.DEFAULT_STATES)[0] == "text"


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
    states = src.state_table
    b = Builder(transforms, now_ns)
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise WireError("bad-csv", f"not CSV: {exc}") from None
    rows = [r for r in rows if r and any(c.strip() for c in r)]
    if not rows:
        raise WireError("no-readings", "an empty CSV body")
    units: list[str] = []
    skip: frozenset[str] = frozenset()
    if rows[0][0].strip() == "TOA5":
        if len(rows) < 4:
            raise WireError("bad-csv", "a TOA5 file has four header rows")
        units = [u.strip() if is_valid_unit(u.strip()) else "" for u in rows[2]]
        rows = rows[1:2] + rows[4:]
        skip = TOA5_SKIP
    head = rows[0]
    if len(head) > MAX_COLUMNS:
        raise WireError("bad-csv", f"more than {MAX_COLUMNS} columns")
    lone = head[0].strip()
    header = any(_is_text(c) for c in head[1:]) or (
        len(head) == 1 and _is_text(lone) and lone.lower() not in TIME_HEADERS
    )
    if header:
        names = [c.strip() for c in head]
        timed = names[0].lower() in TIME_HEADERS
        sensors = [None if n in skip else joined(sensor, n) for n in names]
        for i, name in enumerate(sensors):
            if name is None and not (timed and i == 0) and names[i] not in skip:
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
        for i, cell in cells:
            name = sensors[i]
            if cell.strip() and name is not None:
                kind, value = values.from_text(cell, states)
                if kind == "text":
                    b.text()
                else:
                    unit = src.unit or (units[i] if i < len(units) else "")
                    b.add(node, name, unit, ts, value, line)
    out = b.done()
    if not out.chunks and not out.rejects and not out.filtered:
        raise WireError("no-readings", "no reading in the CSV body")
    return out
