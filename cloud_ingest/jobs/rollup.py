"""Hourly and daily roll-ups of the windows, with quantiles from merged sketches.

``cloud-ingest rollup`` reads the windows of a time range from the lake (the
latest revision of each), merges them per (device, sensor, window width, period)
and writes one point per group to ``<measurement>_1h`` / ``<measurement>_1d``
with the windows' series keys (their tags, the static ones that ``[influx]
tag_keys`` allows included: :func:`cloud_ingest.sinks.lineproto.window_series`) and
the period start as its time:

* ``count``, ``invalid``, ``sum``, ``windows`` (how many windows were merged): sums;
* ``min``, ``max``: of the windows' min and max;
* ``mean`` = sum / count; ``stddev`` (population) from the windows' counts, means
  and standard deviations by the parallel-variance formula (Chan et al.), so it
  is the standard deviation of all the readings, not an average;
* ``first`` / ``last``: of the earliest / latest window;
* ``p50``, ``p90``, ``p99``: from the merge of the windows' DDSketches
  (shared/sketch.py), within 1 % relative of the value at rank ⌊q·(n−1)⌋ of
  the period's n readings (not the interpolated quantile the windows' own
  columns hold), clamped to [min, max]. Averaging the windows' p99 instead can be
  far off: a spike in one window is the hour's p99 but moves the average p99 a
  little. Without a
  sketch in every window of a group, the quantile fields are left out.

Only tumbling windows whose width divides the period are rolled up (hopping
windows overlap, and would count readings several times). The range is widened
to whole periods, so each point covers its whole period. Writing the same
period again overwrites it: run it after late data, or for a range twice.

It is one SQL query (:func:`rollup_sql`) per day of the range, on DuckDB in this
process or on Spark (:mod:`cloud_ingest.jobs.engines`): a period never crosses a
UTC day, nor does an object (``dt`` is its windows' day). Memory is the engine's:
DuckDB spills past its ``memory_limit``, and this process holds one result row
at a time. The sums are a different order of the same additions as before the
engines (the test oracle, tests/cloud_ingest/rollup_oracle.py): equal within
rounding.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from cloud_ingest.jobs.engines import Engine, device_slices, open_engine, stage
from cloud_ingest.lake import AGGREGATES, DAY_NS, day, list_objects
from cloud_ingest.sinks.base import ObjectStore
from cloud_ingest.sinks.lineproto import float_fields, window_label, window_series
from shared.sketch import ALPHA
from shared.tags import TAG_KEY
from shared.topics import ID_PATTERN

PERIODS: Final = {"1h": 3600 * 10**9, "1d": DAY_NS}
QUANTILES: Final = (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))
#: a roll-up point's fields, in the order they are written
INT_FIELDS: Final = ("count", "invalid", "windows")
FLOAT_FIELDS: Final = ("sum", "min", "max", "mean", "stddev", "first", "last",
                       *(name for name, _ in QUANTILES))  # fmt: skip


def widen(since_ns: int, until_ns: int, period_ns: int) -> tuple[int, int]:
    """The range grown to whole periods: [floor(since), ceil(until))."""
    return since_ns - since_ns % period_ns, -(-until_ns // period_ns) * period_ns


def rollup_sql(
    period_ns: int,
    since_ns: int,
    until_ns: int,
    unnest: str,
    device: str | None = None,
    tag_keys: tuple[str, ...] = (),
    where: str = "TRUE",
) -> str:
    """The roll-up of the windows starting in [since, until) over ``aggregates``
    (those of the devices ``where`` takes: :func:`~cloud_ingest.jobs.engines.device_slices`)
    (:mod:`cloud_ingest.jobs.engines`), one row per group: DuckDB and Spark SQL
    alike, ``unnest`` being the one word they differ in. Device ids and tag keys
    are checked against their patterns before they go into the text."""
    if device is not None and not ID_PATTERN.match(device):
        raise ValueError(f"not a device id: {device!r}")
    for k in tag_keys:
        if not TAG_KEY.match(k):
            raise ValueError(f"not a tag key: {k!r}")
    p = int(period_ns)
    tags = [f"tags['{k}']" for k in tag_keys]
    group = ["device_id", "node", "sensor", "unit", "window_width_ns",
             *(f"tag_{i}" for i in range(len(tags))), "period_ns"]  # fmt: skip
    g = ", ".join(group)
    same = " AND ".join(f"s.{c} IS NOT DISTINCT FROM q.{c}" for c in group)
    gamma = f"({1 + ALPHA!r}E0 / {1 - ALPHA!r}E0)"
    only_device = f"AND device_id = '{device}'" if device is not None else ""
    quantiles = ",\n       ".join(
        f"least(greatest(q.{name}, s.vmin), s.vmax) AS {name}" for name, _ in QUANTILES
    )
    picks = ",\n           ".join(
        f"min(value) FILTER (WHERE upto > {q!r}E0 * (total - 1)) AS {name}" for name, q in QUANTILES
    )
    tag_columns = "".join(f", {t} AS tag_{i}" for i, t in enumerate(tags))
    return f"""
WITH latest AS (
    SELECT * FROM aggregates
    WHERE window_kind = 'tumbling' AND start_ns >= {int(since_ns)} AND start_ns < {int(until_ns)}
      AND CASE WHEN window_width_ns > 0 THEN {p} % window_width_ns ELSE 1 END = 0
      {only_device} AND ({where})
    QUALIFY row_number() OVER (
        PARTITION BY device_id, node, sensor, window_kind, window_width_ns, window_hop_ns,
                     window_start
        ORDER BY revision DESC, seq DESC) = 1
),
keyed AS (
    SELECT *, start_ns - ((start_ns % {p}) + {p}) % {p} AS period_ns{tag_columns}
    FROM latest
),
centred AS (
    SELECT *, sum(CASE WHEN "count" > 0 THEN "sum" END) OVER (PARTITION BY {g})
              / NULLIF(sum("count") OVER (PARTITION BY {g}), 0) AS group_mean
    FROM keyed
),
s AS (
    SELECT {g},
           CAST(sum("count") AS BIGINT) AS "count", CAST(sum(invalid) AS BIGINT) AS invalid,
           count(*) AS windows,
           sum("sum") FILTER (WHERE "count" > 0) AS "sum",
           min("min") FILTER (WHERE "count" > 0) AS vmin,
           max("max") FILTER (WHERE "count" > 0) AS vmax,
           sum("count" * ("stddev" * "stddev" + ("mean" - group_mean) * ("mean" - group_mean)))
               FILTER (WHERE "count" > 0) AS m2,
           min_by("first", start_ns) FILTER (WHERE "count" > 0) AS "first",
           max_by("last", start_ns) FILTER (WHERE "count" > 0) AS "last",
           count(*) FILTER (WHERE "count" > 0 AND sketch_bins IS NULL) AS unsketched
    FROM centred
    GROUP BY {g}
),
bins AS (
    SELECT {g}, b.s AS bs, b.k AS bk, sum(b.n) AS n
    FROM (SELECT {g}, {unnest}(sketch_bins) AS b FROM keyed WHERE "count" > 0)
    GROUP BY {g}, b.s, b.k
),
ranked AS (
    SELECT {g},
           CASE WHEN bs = 0 THEN 0.0
                ELSE bs * 2 * pow({gamma}, bk) / ({gamma} + 1) END AS value,
           sum(n) OVER (PARTITION BY {g} ORDER BY bs, bs * bk
                        ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS upto,
           sum(n) OVER (PARTITION BY {g}) AS total
    FROM bins
),
q AS (
    SELECT {g},
           {picks}
    FROM ranked
    GROUP BY {g}
)
SELECT s.*, s."sum" / NULLIF(s."count", 0) AS "mean",
       sqrt(greatest(s.m2, 0.0) / NULLIF(s."count", 0)) AS "stddev",
       {quantiles}
FROM s LEFT JOIN q ON {same}
ORDER BY {", ".join(f"s.{c}" for c in group)}
"""


def _line(
    row: dict[str, Any],
    measurement: str,
    period: str,
    tag_keys: tuple[str, ...],
    allowed: frozenset[str],
) -> str:
    """A result row of :func:`rollup_sql` as a line of protocol."""
    tags = [
        (k, str(row[f"tag_{i}"])) for i, k in enumerate(tag_keys) if row[f"tag_{i}"] is not None
    ]
    series = window_series(
        f"{measurement}_{period}", row["device_id"], row["node"], row["sensor"],
        row["unit"] or "", window_label(int(row["window_width_ns"])), tags, allowed,
    )  # fmt: skip
    parts = [f"{name}={int(row[name])}i" for name in INT_FIELDS]
    if row["count"]:
        values = {
            name: row["v" + name if name in ("min", "max") else name] for name in FLOAT_FIELDS
        }
        if row["unsketched"]:  # a window without a sketch: no quantiles for the group
            for name, _ in QUANTILES:
                values[name] = None
        # a later run may have fewer sketches than an earlier one: `absent` says so
        parts += float_fields((name, float(v)) for name, v in values.items() if v is not None)
    return f"{series} {','.join(parts)} {row['period_ns']}"


def _days(since_ns: int, until_ns: int) -> Iterator[tuple[str, int, int]]:
    """Each UTC day of [since, until) with the part of the range in it."""
    start = since_ns - since_ns % DAY_NS
    while start < until_ns:
        yield day(start), max(start, since_ns), min(start + DAY_NS, until_ns)
        start += DAY_NS


def rollup_lines(
    store: ObjectStore,
    since_ns: int,
    until_ns: int,
    period: str,
    measurement: str,
    device: str | None = None,
    tag_keys: frozenset[str] = frozenset(),
    engine: Engine | None = None,
) -> Iterator[str]:
    """Line protocol for the roll-ups of ``period`` ("1h" or "1d") over the range
    (widened to whole periods), with the windows' series keys
    (:func:`cloud_ingest.sinks.lineproto.window_series`: the static tags that
    ``tag_keys`` allows included), a day at a time, in group order. Without an
    ``engine``, DuckDB in a temporary folder."""
    pns = PERIODS[period]
    since_ns, until_ns = widen(since_ns, until_ns, pns)
    keys = tuple(sorted(tag_keys))
    with tempfile.TemporaryDirectory(prefix="cloud-ingest-rollup-") as tmp:
        own = engine is None
        eng = engine if engine is not None else open_engine("duckdb", Path(tmp))
        try:
            by_day: dict[str, list[str]] = {}  # the lake listed once for the range
            for k, key in list_objects(
                store, AGGREGATES, since_dt=day(since_ns), until_dt=day(until_ns - 1)
            ):
                by_day.setdefault(k.dt, []).append(key)
            for dt, a, b in _days(since_ns, until_ns):
                objects = by_day.get(dt)
                if not objects:
                    continue
                folder = Path(tmp) / f"stage-{dt}"
                folder.mkdir()
                try:
                    staged = stage(store, objects, folder)
                    eng.view([s.path for s in staged])
                    for where in device_slices(eng, staged):
                        sql = rollup_sql(pns, a, b, eng.unnest, device, keys, where)
                        for row in eng.rows(sql):
                            yield _line(row, measurement, period, keys, tag_keys)
                finally:  # an S3 lake's copies: disk for one day at a time
                    shutil.rmtree(folder, ignore_errors=True)
        finally:
            if own:
                eng.close()
