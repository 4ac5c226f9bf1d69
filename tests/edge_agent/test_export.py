"""`edge-agent export --kind windows` computes windows as the agent does, hopping ones too."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_agent.pipeline import buffer
from edge_agent.store import Store
from edge_agent.technician.export import iter_rows
from shared.readings import ReadingChunk
from shared.wire import WindowSpec

S = 10**9
T0 = 1_800_000_000 * S


def test_hopping_windows_are_exported_as_the_agent_sends_them(tmp_path: Path) -> None:
    path = tmp_path / "b.sqlite"
    store = Store(path)
    ts = T0 + np.arange(0, 120 * S, S // 2, dtype=np.int64)  # 2 Hz for 2 minutes
    vals = np.sin(np.arange(len(ts)) / 7.0)
    buffer.store_chunk(store, buffer.SensorRegistry(store), ReadingChunk("n", "s", "", ts, vals))
    store.close()
    spec = WindowSpec("hopping", 60 * S, 10 * S)
    rows: dict[int, tuple[int, float]] = {}
    for _, cols in iter_rows(path, "windows", T0, T0 + 120 * S, spec=spec, slice_ns=30 * S):
        for st, n, mean in zip(cols["start_ns"], cols["count"], cols["mean"], strict=True):
            assert st not in rows, "a window in two slices"
            rows[st] = (n, mean)
    # every window [s, s + 60 s) with s a multiple of 10 s in the range, from numpy
    want = {}
    for st in range(T0, T0 + 120 * S, 10 * S):
        sel = (ts >= st) & (ts < st + 60 * S)
        want[st] = (int(sel.sum()), float(vals[sel].mean()))
    assert rows.keys() == want.keys()
    for st, (n, mean) in want.items():
        assert rows[st][0] == n and abs(rows[st][1] - mean) < 1e-12


def test_a_range_from_1970_reads_only_the_slices_the_buffer_has(tmp_path: Path) -> None:
    """`--since 0` walks the buffer's own span, not one hourly slice per hour since
    1970 (half a million of them, minutes of CPU); its rows are the tight range's."""
    path = tmp_path / "b.sqlite"
    store = Store(path)
    ts = T0 + 7 * S + np.arange(0, 90 * S, S, dtype=np.int64)
    buffer.store_chunk(
        store, buffer.SensorRegistry(store), ReadingChunk("n", "s", "", ts, np.arange(90.0))
    )
    store.close()
    spec = WindowSpec("hopping", 60 * S, 10 * S)
    for kind in ("raw", "windows"):
        wide = list(iter_rows(path, kind, 0, T0 * 2, spec=spec, slice_ns=3600 * S))
        tight = list(iter_rows(path, kind, T0 - 60 * S, T0 + 200 * S, spec=spec, slice_ns=3600 * S))
        assert len(wide) == 1
        assert wide[0][1] == tight[0][1] and sum(len(c["node"]) for _, c in tight) == len(
            wide[0][1]["node"]
        )
    Store(tmp_path / "empty.sqlite").close()
    assert list(iter_rows(tmp_path / "empty.sqlite", "raw", 0, T0, spec=spec, slice_ns=S)) == []


def test_parquet_export_starting_in_an_empty_hour(tmp_path: Path) -> None:
    """The first hour of the range holds no reading: its empty slice used to fix
    every column's type as null, and the next slice failed ("Table schema does
    not match")."""
    import pyarrow.parquet as pq

    from edge_agent.technician.export import export

    path = tmp_path / "b.sqlite"
    store = Store(path)
    hour = 3600 * S
    registry = buffer.SensorRegistry(store)
    for start in (T0, T0 + 3 * hour):  # two hours apart: the range starts between them
        ts = start + np.arange(0, 10 * S, S, dtype=np.int64)
        buffer.store_chunk(store, registry, ReadingChunk("n", "s", "C", ts, np.arange(10.0)))
    store.close()
    spec = WindowSpec("tumbling", 5 * S, 5 * S)
    for kind, rows in (("raw", 10), ("windows", 2)):
        out = tmp_path / f"{kind}.parquet"
        since = T0 + hour  # an empty hour first
        n = export(path, out, kind, since, T0 + 4 * hour, spec=spec, fmt="parquet")  # type: ignore[arg-type]
        table = pq.read_table(out)
        assert n == table.num_rows == rows
        assert str(table.schema.field("node").type) == "string"
        assert table.column("count" if kind == "windows" else "value").to_pylist()[0] in (5, 0.0)
