"""Where each object of the lake lives: its key, its day partition, and the SQL
that reads the latest revision of each window (see the package's docstring)."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Final

from cloud_ingest.sinks.base import ObjectStore

LAKE_VERSION: Final = "2"
AGGREGATES: Final = "aggregates"
ALERTS: Final = "alerts"
#: raw readings devices sent on request (docs/commands.md): keyed like alerts
RAW: Final = "raw"
DAY_NS: Final = 86_400 * 10**9

#: DuckDB: the aggregates as InfluxDB holds them (latest revision of each window).
#: ``{root}`` is the archive directory (a local copy, or ``s3://…`` with httpfs).
LATEST_AGGREGATES_SQL: Final = """
SELECT * FROM read_parquet('{root}/aggregates/*/*.parquet', hive_partitioning = true,
                           union_by_name = true)
QUALIFY row_number() OVER (
    PARTITION BY device_id, node, sensor, window_kind, window_width_ns, window_hop_ns,
                 window_start
    ORDER BY revision DESC, seq DESC) = 1
"""


#: DuckDB: the raw readings captured around each raise of an alert (docs/commands.md),
#: with the alert's rule and time beside them.
CAPTURED_READINGS_SQL: Final = """
SELECT a.device_id, a.rule, a.ts AS alert_ts, r.node, r.sensor, r.ts, r.value
FROM read_parquet('{root}/alerts/*/*/*.parquet', hive_partitioning = true,
                  union_by_name = true) AS a
JOIN read_parquet('{root}/raw/*/*/*.parquet', hive_partitioning = true) AS r
  ON r.request = a.capture AND r.device_id = a.device_id
ORDER BY a.device_id, a.ts, r.ts
"""


def day(ts_ns: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts_ns // 10**9))


def object_key(table: str, dt: str, device_id: str, seq: int) -> str:
    """An alert's object, or a raw-readings message's."""
    return f"{table}/dt={dt}/device_id={device_id}/seq={seq:020d}.parquet"


def part_key(dt: str, name: str) -> str:
    """A group's ``aggregates`` object of day ``dt``; ``name`` is unique to the group
    (:class:`PartNames`), the same for every day's object of it and for its retries."""
    return f"{AGGREGATES}/dt={dt}/part-{name}.parquet"


#: a compacted day's object: ``compacted`` (or ``compacted-<b>-of-<n>`` when split)
COMPACTED_NAME: Final = "compacted"


class PartNames:
    """Names for a writer's group objects: the group's time, this writer's random id
    (two ingestors never collide) and a counter (nor do two groups of one)."""

    def __init__(self) -> None:
        self.writer = secrets.token_hex(4)
        self.n = 0

    def next(self) -> str:
        self.n += 1
        return f"{time.time_ns():020d}-{self.writer}-{self.n:06d}"


@dataclass(frozen=True)
class LakeKey:
    table: str
    dt: str
    #: an alert's device; "" for an aggregates object (its rows name their devices)
    device_id: str = ""
    #: an alert's seq (the first of a compacted alerts object); 0 for aggregates
    seq: int = 0
    #: == seq for one alert's object; the last seq of a compacted one (``seq=<a>-<b>``)
    seq_last: int = 0
    #: an aggregates object's name: ``part-…`` (a group's) or ``compacted``
    name: str = ""

    @property
    def compacted(self) -> bool:
        return self.seq_last != self.seq or _is_compacted(self.name)


def _is_compacted(name: str) -> bool:
    if name == COMPACTED_NAME:
        return True
    b, of, n = name[len(COMPACTED_NAME) + 1 :].partition("-of-")
    return name.startswith(COMPACTED_NAME + "-") and b.isdigit() and bool(of) and n.isdigit()


def parse_key(key: str) -> LakeKey | None:
    """``aggregates/dt=…/part-<name>.parquet`` (a group's) or ``…/compacted.parquet``,
    and ``alerts/dt=…/device_id=…/seq=<n>.parquet`` (an alert) or ``seq=<a>-<b>.parquet``
    (compacted, cloud_ingest/jobs/compact.py), and ``raw/…`` keyed as an alert → its
    parts; None for other keys."""
    parts = key.split("/")
    if len(parts) < 3 or not parts[1].startswith("dt=") or not parts[-1].endswith(".parquet"):
        return None
    dt, name = parts[1][3:], parts[-1][: -len(".parquet")]
    if parts[0] == AGGREGATES and len(parts) == 3:
        if _is_compacted(name) or (name.startswith("part-") and len(name) > len("part-")):
            return LakeKey(AGGREGATES, dt, name=name)
        return None
    if parts[0] not in (ALERTS, RAW) or len(parts) != 4 or not parts[2].startswith("device_id="):
        return None
    if not name.startswith("seq="):
        return None
    first, _, last = name[4:].partition("-")
    if not first.isdigit() or not (last.isdigit() or not last):
        return None
    seq = int(first)
    return LakeKey(parts[0], dt, parts[2][len("device_id=") :], seq, int(last) if last else seq)


def list_objects(
    store: ObjectStore,
    table: str,
    *,
    since_dt: str | None = None,
    until_dt: str | None = None,
) -> list[tuple[LakeKey, str]]:
    """The lake's objects of ``table``, of days in ``[since_dt, until_dt]``
    (``YYYY-MM-DD``; the partition names order as dates)."""
    out = []
    for key in store.list(f"{table}/"):
        k = parse_key(key)
        if k is None or k.table != table:
            continue
        if (since_dt is not None and k.dt < since_dt) or (until_dt is not None and k.dt > until_dt):
            continue
        out.append((k, key))
    return out


#: Columns that identify a window.
WINDOW_KEY: Final = (
    "device_id", "node", "sensor", "window_kind", "window_width_ns", "window_hop_ns",
    "window_start",
)  # fmt: skip
