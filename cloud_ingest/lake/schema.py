"""The Arrow schemas of the lake's tables (the columns are docs/wire-format.md §3)."""

from __future__ import annotations

import functools
from typing import Any, Final

import numpy as np

from cloud_ingest.lake.layout import LAKE_VERSION
from shared.errors import PermanentSinkError
from shared.sketch import ALPHA, bins_many
from shared.wire import COLUMNS


def arrow() -> Any:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - a platform without pyarrow wheels
        raise PermanentSinkError(
            "the Parquet archive needs pyarrow, which is not installed here"
        ) from None
    return pa, pq


@functools.cache
def float_columns() -> list[str]:
    return [name for name, (dt, _) in COLUMNS.items() if dt == "float64"]


@functools.cache
def aggregates_schema() -> Any:
    pa, _ = arrow()
    fields = [
        ("device_id", pa.string()),
        ("seq", pa.int64()),
        ("batch_created_ns", pa.int64()),
        ("window_kind", pa.string()),
        ("window_width_ns", pa.int64()),
        ("window_hop_ns", pa.int64()),
        ("node", pa.string()),
        ("sensor", pa.string()),
        ("unit", pa.string()),
        ("window_start", pa.timestamp("ns", tz="UTC")),
        ("count", pa.uint32()),
        ("invalid", pa.uint32()),
        *[(name, pa.float64()) for name in float_columns()],
        ("revision", pa.uint32()),
        ("sketch", pa.binary()),
        # the sensor's static tags from the agent's config (added within lake v1:
        # read_table gives older objects an empty column)
        ("tags", tags_type()),
        # the device's buffer generation (docs/wire-format.md §2.3; 0 = none): a batch
        # is (device_id, generation, seq). Older objects read as 0 (read_table).
        ("generation", pa.int64()),
        # the sketch's bins as SQL can merge them (docs/lake-sql.md; added within lake
        # v2: read_table computes them from ``sketch`` for older objects)
        ("sketch_bins", sketch_bins_type()),
    ]
    return pa.schema(
        fields,
        metadata={"telemetry.lake_version": LAKE_VERSION, "telemetry.sketch_alpha": str(ALPHA)},
    )


def sketch_bins_type() -> Any:
    """A window's sketch bins: ``s`` the sign (-1, 0, 1), ``k`` the key, ``n`` the count."""
    pa, _ = arrow()
    return pa.list_(pa.struct([("s", pa.int8()), ("k", pa.int32()), ("n", pa.int64())]))


def sketch_bins_array(sketches: list[bytes | None]) -> Any:
    """The ``sketch_bins`` column of encoded sketches: null where there is none, and
    where the bytes are not a sketch (the ingestor does not check a batch's sketches;
    their bytes are kept as they came, and a device's bad ones must cost no one
    else's row)."""
    pa, _ = arrow()
    bins = bins_many(sketches)
    values = pa.StructArray.from_arrays(
        [pa.array(bins.sign), pa.array(bins.key.astype(np.int32)), pa.array(bins.count)],
        names=["s", "k", "n"],
    )
    offsets = pa.array(bins.offsets.astype(np.int32))
    return pa.ListArray.from_arrays(offsets, values, mask=pa.array(~bins.valid)).cast(
        sketch_bins_type()
    )


def tags_type() -> Any:
    pa, _ = arrow()
    return pa.map_(pa.string(), pa.string())


@functools.cache
def alert_schema() -> Any:
    pa, _ = arrow()
    return pa.schema(
        [
            ("seq", pa.int64()),
            ("ts", pa.timestamp("ns", tz="UTC")),
            ("rule", pa.string()),
            ("kind", pa.string()),
            ("node", pa.string()),
            ("sensor", pa.string()),
            ("state", pa.string()),
            ("value", pa.float64()),
            ("message", pa.string()),
            ("capture", pa.string()),
        ],
        metadata={"telemetry.lake_version": LAKE_VERSION},
    )


def raw_schema() -> Any:
    """The ``raw`` table: readings a device sent on request (docs/commands.md)."""
    pa, _ = arrow()
    return pa.schema(
        [
            ("request", pa.string()),
            ("part", pa.int64()),
            ("seq", pa.int64()),
            ("node", pa.string()),
            ("sensor", pa.string()),
            ("unit", pa.string()),
            ("ts", pa.timestamp("ns", tz="UTC")),
            ("value", pa.float64()),
        ],
        metadata={"telemetry.lake_version": LAKE_VERSION},
    )


DICT_COLUMNS: Final = (
    "device_id", "window_kind", "node", "sensor", "unit", "rule", "kind", "state"
)  # fmt: skip
STATS_COLUMNS: Final = ("device_id", "seq", "window_start", "ts")
