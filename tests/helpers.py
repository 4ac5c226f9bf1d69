"""Helpers that more than one test module uses, defined once."""

from __future__ import annotations

from cloud_ingest.lake import group_rows, part_key, to_parquet
from shared.wire import Batch


def batch_objects(batch: Batch, name: str = "0") -> list[tuple[str, bytes]]:
    """The lake objects of a group of one batch (one per UTC day its windows start
    on), named ``name``: what the ingestor writes for it."""
    return [(part_key(g.dt, name), to_parquet(g.rows)) for g in group_rows([batch])]
