"""Read window points back from InfluxDB 1.x (InfluxQL) and VictoriaMetrics (export API)."""

from __future__ import annotations

import json
import math
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from cloud_ingest.lake import LATEST_AGGREGATES_SQL
from cloud_ingest.sinks.lineproto import FLOAT_FIELDS, absent_bit
from shared.wire import EXTRA_FIELDS, STAT_FIELDS

WindowKey = tuple[str, str, str, int]  # device_id, node, sensor, start_ns
FIELDS = ("count", "invalid", "revision", *STAT_FIELDS, *EXTRA_FIELDS)


def influxql(url: str, q: str, db: str | None = None, method: str = "GET") -> Any:
    params = {"q": q, "epoch": "ns"}
    if db:
        params["db"] = db
    data = urllib.parse.urlencode(params)
    if method == "POST":
        req = urllib.request.Request(f"{url}/query", data=data.encode(), method="POST")
    else:
        req = urllib.request.Request(f"{url}/query?{data}")
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def rows(url: str, q: str, db: str) -> list[dict[str, Any]]:
    """The rows of an InfluxQL query's first series, as dicts (time in ns)."""
    result = influxql(url, q, db)["results"][0]
    if "error" in result:
        raise ValueError(f"{q}: {result['error']}")
    out: list[dict[str, Any]] = []
    for series in result.get("series", []):
        cols = series["columns"]
        out += [dict(zip(cols, values, strict=True)) for values in series["values"]]
    return out


def create_database(url: str, db: str) -> None:
    influxql(url, f'CREATE DATABASE "{db}"', method="POST")


def v1_windows(url: str, db: str, measurement: str = "window") -> dict[WindowKey, dict[str, Any]]:
    out: dict[WindowKey, dict[str, Any]] = {}
    res = influxql(url, f'SELECT * FROM "{measurement}"', db)
    for series in res["results"][0].get("series", []):
        cols = series["columns"]
        for row in series["values"]:
            rec = dict(zip(cols, row, strict=True))
            key = (rec["device_id"], rec["node"], rec["sensor"], int(rec["time"]))
            # docs/wire-format.md §5: a field the point names in `absent` is not its own
            absent = int(rec.get("absent") or 0)
            out[key] = {
                f: None if f in FLOAT_FIELDS and absent & absent_bit(f) else rec.get(f)
                for f in FIELDS
            }
    return out


def vm_windows(url: str, measurement: str = "window") -> dict[WindowKey, dict[str, Any]]:
    """VictoriaMetrics stores field F of measurement M as metric M_F, in milliseconds."""
    q = urllib.parse.urlencode({"match[]": f'{{__name__=~"{measurement}_.*"}}'})
    out: dict[WindowKey, dict[str, Any]] = {}
    with urllib.request.urlopen(f"{url}/api/v1/export?{q}", timeout=30) as resp:
        for line in resp.read().decode().splitlines():
            if not line.strip():
                continue
            obj = json.loads(line)
            m = obj["metric"]
            fname = m["__name__"][len(measurement) + 1 :]
            for value, ts_ms in zip(obj["values"], obj["timestamps"], strict=True):
                key = (m["device_id"], m["node"], m["sensor"], int(ts_ms) * 1_000_000)
                out.setdefault(key, {})[fname] = value
    return out


def vm_flush(url: str) -> None:
    """Make recently written samples visible to queries."""
    with urllib.request.urlopen(f"{url}/internal/force_flush", timeout=30):
        pass


def total_count(windows: dict[WindowKey, dict[str, Any]]) -> int:
    return sum(int(w.get("count") or 0) + int(w.get("invalid") or 0) for w in windows.values())


def lake_windows(root: str | Path) -> dict[WindowKey, dict[str, Any]]:
    """The lake's windows as InfluxDB holds them (latest revision), read with DuckDB
    from a local copy of the archive, in the shape of :func:`v1_windows` (a float
    that is not finite becomes None: line protocol leaves such fields out)."""
    import duckdb  # a dev dependency: the analyst's view, for tests

    sql = "SELECT device_id, node, sensor, epoch_ns(window_start) AS start, {} FROM ({})".format(
        ", ".join(f'"{f}"' for f in FIELDS),
        LATEST_AGGREGATES_SQL.format(root=Path(root).as_posix()),
    )
    out: dict[WindowKey, dict[str, Any]] = {}
    with duckdb.connect() as con:
        for row in con.execute(sql).fetchall():
            vals = [None if isinstance(v, float) and not math.isfinite(v) else v for v in row[4:]]
            out[(str(row[0]), row[1], row[2], int(row[3]))] = dict(zip(FIELDS, vals, strict=True))
    return out
