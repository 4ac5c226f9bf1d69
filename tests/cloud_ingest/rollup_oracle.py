"""The roll-ups as the project computed them before the SQL engines, in plain
Python, one window at a time: the oracle that ``cloud-ingest rollup`` on DuckDB
and on Spark must equal (tests/cloud_ingest/test_jobs_engines.py). It was
cloud_ingest/jobs/rollup.py until the engines replaced it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from cloud_ingest.jobs.rollup import PERIODS, widen
from cloud_ingest.lake import (
    AGGREGATES,
    current_rows,
    day,
    list_objects,
    pycolumns,
    read_table,
    reading,
)
from cloud_ingest.sinks.base import ObjectStore
from cloud_ingest.sinks.lineproto import float_fields, window_label, window_series
from shared.errors import WireError
from shared.sketch import DDSketch


@dataclass
class _Group:
    count: int = 0
    invalid: int = 0
    windows: int = 0
    total: float = 0.0
    vmin: float = math.inf
    vmax: float = -math.inf
    # per window (count, mean, stddev) for the variance merge
    parts: list[tuple[int, float, float]] = field(default_factory=list)
    first: tuple[int, float] = (2**63 - 1, math.nan)
    last: tuple[int, float] = (-(2**63), math.nan)
    sketch: DDSketch | None = None
    sketch_missing: bool = False
    bad_sketches: int = 0  # sketches that could not be decoded or merged (no quantiles)

    def add(self, cols: dict[str, list[Any]], i: int) -> None:
        """Window ``i`` of the lake's columns."""
        n = int(cols["count"][i])
        self.count += n
        self.invalid += int(cols["invalid"][i])
        self.windows += 1
        if n == 0:
            return
        start = int(cols["window_start"][i])
        self.total += float(cols["sum"][i])
        self.vmin = min(self.vmin, float(cols["min"][i]))
        self.vmax = max(self.vmax, float(cols["max"][i]))
        self.parts.append((n, float(cols["mean"][i]), float(cols["stddev"][i])))
        if start < self.first[0]:
            self.first = (start, float(cols["first"][i]))
        if start > self.last[0]:
            self.last = (start, float(cols["last"][i]))
        blob = cols["sketch"][i]
        if blob is None:
            self.sketch_missing = True
        else:
            try:
                sk = DDSketch.decode(blob)
                self.sketch = sk if self.sketch is None else self.sketch.merge(sk)
            except (WireError, ValueError):  # damaged, or of another accuracy: no quantiles
                self.sketch_missing = True
                self.bad_sketches += 1

    def fields(self) -> dict[str, float | int]:
        out: dict[str, float | int] = {
            "count": self.count,
            "invalid": self.invalid,
            "windows": self.windows,
        }
        if self.count == 0:
            return out
        mean = self.total / self.count
        m2 = sum(n * (sd * sd + (m - mean) ** 2) for n, m, sd in self.parts)
        out.update(
            sum=self.total,
            min=self.vmin,
            max=self.vmax,
            mean=mean,
            stddev=math.sqrt(max(m2, 0.0) / self.count),
            first=self.first[1],
            last=self.last[1],
        )
        if self.sketch is not None and not self.sketch_missing:
            for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
                # the sketch is within 1 % relative; the true quantile is within
                # [min, max], so clamping only ever brings it closer
                out[name] = min(max(self.sketch.quantile(q), self.vmin), self.vmax)
        return out


#: device, node, sensor, unit, width, the static tags written as tags, period start
GroupKey = tuple[str, str, str, str, int, tuple[tuple[str, str], ...], int]


def latest_windows(
    store: ObjectStore, since_ns: int, until_ns: int, device: str | None = None
) -> dict[str, list[Any]]:
    """The columns of every tumbling window starting in [since, until), at its
    latest revision (:func:`cloud_ingest.lake.current_rows`, in Arrow), once."""
    import pyarrow as pa
    import pyarrow.compute as pc

    tables = []
    for _, key in list_objects(
        store, AGGREGATES, since_dt=day(since_ns), until_dt=day(until_ns - 1)
    ):
        data = store.get(key)
        with reading(key):  # a damaged object stops the roll-up: it would be wrong
            table = read_table(data)
            start = table.column("window_start").cast(pa.int64())
            keep = pc.and_(
                pc.and_(pc.greater_equal(start, since_ns), pc.less(start, until_ns)),
                pc.equal(table.column("window_kind"), "tumbling"),
            )
            if device is not None:
                keep = pc.and_(keep, pc.equal(table.column("device_id"), device))
            tables.append(table.filter(keep))
    if not tables:
        return {}
    return pycolumns(current_rows(pa.concat_tables(tables, promote_options="default")))


def oracle_lines(
    store: ObjectStore,
    since_ns: int,
    until_ns: int,
    period: str,
    measurement: str,
    device: str | None = None,
    tag_keys: frozenset[str] = frozenset(),
) -> list[str]:
    """Line protocol for the roll-ups of ``period`` ("1h" or "1d") over the range
    (widened to whole periods), with the windows' series keys
    (:func:`cloud_ingest.sinks.lineproto.window_series`: the static tags that
    ``tag_keys`` allows included)."""
    pns = PERIODS[period]
    since_ns, until_ns = widen(since_ns, until_ns, pns)
    cols = latest_windows(store, since_ns, until_ns, device)
    groups: dict[GroupKey, _Group] = {}
    for i, start in enumerate(cols.get("window_start", ())):
        width = int(cols["window_width_ns"][i])
        if pns % width:
            continue
        tags = tuple((k, v) for k, v in (cols["tags"][i] or ()) if k in tag_keys)
        key = (
            cols["device_id"][i], cols["node"][i], cols["sensor"][i], cols["unit"][i],
            width, tags, start - start % pns,
        )  # fmt: skip
        groups.setdefault(key, _Group()).add(cols, i)
    lines = []
    for (dev, node, sensor, unit, width, tags, t), g in sorted(groups.items()):
        series = window_series(
            f"{measurement}_{period}", dev, node, sensor, unit, window_label(width), tags, tag_keys
        )
        values = g.fields()
        parts = [f"{name}={v}i" for name, v in values.items() if isinstance(v, int)]
        # a later run may have fewer sketches than an earlier one: `absent` says so
        parts += float_fields((n, float(v)) for n, v in values.items() if not isinstance(v, int))
        lines.append(f"{series} {','.join(parts)} {t}")
    return lines
