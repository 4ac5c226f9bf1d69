"""The data lake: Parquet tables with Hive-style day partitions.

``layout`` names the objects, ``schema`` gives their columns, ``write`` makes them
and ``read`` reads them back; the names below are the package's API.

Layout under the archive root (``s3://bucket/prefix`` or a directory)::

    aggregates/dt=YYYY-MM-DD/part-<ns, 20 digits>-<writer>-<n>.parquet   one per group and day
    aggregates/dt=YYYY-MM-DD/compacted.parquet                            cloud-ingest compact
    alerts/dt=YYYY-MM-DD/device_id=<id>/seq=<seq, 20 digits>.parquet     one per alert
    raw/dt=YYYY-MM-DD/device_id=<id>/seq=<seq, 20 digits>.parquet        raw readings on request

``dt`` is the UTC day of the window start (of the alert's event time), so a group
whose windows cross midnight becomes two objects. The ingestor writes the rows of
all the batches of a group (up to ``mqtt.receive_maximum`` messages, from many
devices) as one ``aggregates`` object per day, with the device in a
``device_id`` column: one object per batch cost more than every other step of a
batch together (pyarrow's fixed cost per file, and one PUT request each: at
S3's prices, 8.6 million PUTs a day for a fleet of 1,000 devices). Objects appear
whole or not at all (S3 PutObject; the directory backend writes a temporary file
and renames it).

A batch is in the lake once, unless it was delivered again after it was written
(a lost ack, a reconnect): then it is in two objects, row for row the same.
:data:`LATEST_AGGREGATES_SQL`, the query that returns what InfluxDB holds (the
highest revision of each window, see docs/wire-format.md), shows it once, and so
do ``cloud-ingest compact`` (which rewrites a day as one object holding only that),
``replay`` and ``rollup``. The raw batch is not kept beside the Parquet object:
every field of it, sketches included, is in the rows, and :func:`table_to_batches`
rebuilds it for a replay. Alerts are rare: they keep one object per alert, whose
key is a function of the alert alone, so that a resend overwrites it.
"""

from cloud_ingest.lake.layout import (
    AGGREGATES,
    ALERTS,
    CAPTURED_READINGS_SQL,
    COMPACTED_NAME,
    DAY_NS,
    LAKE_VERSION,
    LATEST_AGGREGATES_SQL,
    RAW,
    WINDOW_KEY,
    LakeKey,
    PartNames,
    day,
    list_objects,
    object_key,
    parse_key,
    part_key,
)
from cloud_ingest.lake.read import (
    archived_seqs,
    current_rows,
    pycolumns,
    read_table,
    reading,
    table_to_alerts,
    table_to_batches,
)
from cloud_ingest.lake.write import GroupRows, alert_object, group_rows, raw_objects, to_parquet

__all__ = [
    "AGGREGATES",
    "ALERTS",
    "CAPTURED_READINGS_SQL",
    "COMPACTED_NAME",
    "DAY_NS",
    "LAKE_VERSION",
    "LATEST_AGGREGATES_SQL",
    "RAW",
    "WINDOW_KEY",
    "GroupRows",
    "LakeKey",
    "PartNames",
    "alert_object",
    "archived_seqs",
    "current_rows",
    "day",
    "group_rows",
    "list_objects",
    "object_key",
    "parse_key",
    "part_key",
    "pycolumns",
    "raw_objects",
    "read_table",
    "reading",
    "table_to_alerts",
    "table_to_batches",
    "to_parquet",
]  # fmt: skip
