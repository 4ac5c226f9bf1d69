"""Hourly and daily roll-ups of the windows, with quantiles from merged sketches.

``cloud-ingest rollup`` reads the windows of a time range from the lake (the
latest revision of each), merges them per (device, sensor, window width, period)
and writes one point per group to ``<measurement>_1h`` / ``<measurement>_1d``
with the same tags as the windows and the period start as its time:

* ``count``, ``invalid``, ``sum``, ``windows`` (how many windows were merged): sums;
* ``min``, ``max``: of the windows' min and max;
* ``mean`` = sum / count; ``stddev`` (population) from the windows' counts, means
  and standard deviations by the parallel-variance formula (Chan et al.), so it
  is the standard deviation of all the readings, not an average;
* ``first`` / ``last``: of the earliest / latest window;
* ``p50``, ``p90``, ``p99``: from the merge of the windows' DDSketches
  (shared/sketch.py), within 1 % relative of the exact quantile of all readings
  of the period, clamped to [min, max]. Averaging the windows' p99 instead can be
  far off: a spike in one window is the hour's p99 but moves the average p99 a
  little. Without a
  sketch in every window of a group, the quantile fields are left out.

Only tumbling windows whose width divides the period are rolled up (hopping
windows overlap, and would count readings several times). The range is widened
to whole periods, so each point covers its whole period. Writing the same
period again overwrites it: run it after late data, or for a range twice.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from cloud_ingest.lake import (
    AGGREGATES,
    DAY_NS,
    day,
    list_objects,
    pycolumns,
    read_table,
    reading,
)
from cloud_ingest.lineproto import escape_measurement, escape_tag, window_label
from cloud_ingest.sinks.base import ObjectStore
from shared.errors import WireError
from shared.sketch import DDSketch

PERIODS: Final = {"1h": 3600 * 10**9, "1d": DAY_NS}


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

    def add(self, row: dict[str, Any], start: int) -> None:
        n = int(row["count"])
        self.count += n
        self.invalid += int(row["invalid"])
        self.windows += 1
        if n == 0:
            return
        self.total += float(row["sum"])
        self.vmin = min(self.vmin, float(row["min"]))
        self.vmax = max(self.vmax, float(row["max"]))
        self.parts.append((n, float(row["mean"]), float(row["stddev"])))
        if start < self.first[0]:
            self.first = (start, float(row["first"]))
        if start > self.last[0]:
            self.last = (start, float(row["last"]))
        blob = row.get("sketch")
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


GroupKey = tuple[str, str, str, str, int, int]  # device, node, sensor, unit, width, period start


def widen(since_ns: int, until_ns: int, period_ns: int) -> tuple[int, int]:
    """The range grown to whole periods: [floor(since), ceil(until))."""
    return since_ns - since_ns % period_ns, -(-until_ns // period_ns) * period_ns


def latest_windows(
    store: ObjectStore, since_ns: int, until_ns: int, device: str | None = None
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(device_id, row) of every tumbling window starting in [since, until), at its
    latest revision."""
    best: dict[tuple[str, str, str, int, int], tuple[tuple[int, int], dict[str, Any]]] = {}
    for _, key in list_objects(
        store, AGGREGATES, since_dt=day(since_ns), until_dt=day(until_ns - 1)
    ):
        data = store.get(key)
        with reading(key):  # a damaged object stops the roll-up: it would be wrong
            cols = pycolumns(read_table(data))
            for i, start in enumerate(cols["window_start"]):
                if not since_ns <= start < until_ns or cols["window_kind"][i] != "tumbling":
                    continue
                dev = cols["device_id"][i]
                if device is not None and dev != device:
                    continue
                row = {name: values[i] for name, values in cols.items()}
                row["start_ns"] = start
                wkey = (dev, row["node"], row["sensor"], row["window_width_ns"], start)
                rank = (int(row["revision"]), int(row["seq"]))
                have = best.get(wkey)
                if have is None or rank > have[0]:
                    best[wkey] = (rank, row)
    for (dev, *_), (_, row) in best.items():
        yield dev, row


def rollup_lines(
    store: ObjectStore,
    since_ns: int,
    until_ns: int,
    period: str,
    measurement: str,
    device: str | None = None,
) -> list[str]:
    """Line protocol for the roll-ups of ``period`` ("1h" or "1d") over the range
    (widened to whole periods)."""
    pns = PERIODS[period]
    since_ns, until_ns = widen(since_ns, until_ns, pns)
    groups: dict[GroupKey, _Group] = {}
    for dev, row in latest_windows(store, since_ns, until_ns, device):
        width = int(row["window_width_ns"])
        if pns % width:
            continue
        start = int(row["start_ns"])
        key = (dev, row["node"], row["sensor"], row["unit"], width, start - start % pns)
        groups.setdefault(key, _Group()).add(row, start)
    meas = escape_measurement(f"{measurement}_{period}")
    lines = []
    for (dev, node, sensor, unit, width, t), g in sorted(groups.items()):
        tags = (
            f"{meas},device_id={escape_tag(dev)},node={escape_tag(node)}"
            f",sensor={escape_tag(sensor)}"
            + (f",unit={escape_tag(unit)}" if unit else "")
            + f",window={window_label(width)}"
        )
        parts = []
        for name, v in g.fields().items():
            if isinstance(v, int):
                parts.append(f"{name}={v}i")
            elif math.isfinite(v):
                parts.append(f"{name}={v!r}")
        lines.append(f"{tags} {','.join(parts)} {t}")
    return lines
