"""Export a time range of raw readings, or of windows computed from them, to CSV or Parquet.

Windows are recomputed from the raw chunks with the same kernels the agent uses,
so an export works for any range still in the buffer (``storage.raw_retention_s``),
whether or not its batches have already left the device.

Parquet needs pyarrow, which a device's install (the ``edge`` extra) leaves out
(about 150 MB; no wheels for 32-bit ARM); CSV needs nothing. Floats are
written with full precision (Python's repr).
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

from edge_agent.pipeline import buffer
from edge_agent.pipeline.window import sensor_windows
from edge_agent.technician.status import open_readonly
from shared.wire import EXTRA_FIELDS, STAT_FIELDS, WindowSpec

Kind = Literal["raw", "windows"]
TEXT_COLUMNS = frozenset({"node", "sensor", "unit"})
INT_COLUMNS = frozenset({"ts_ns", "start_ns", "width_ns", "count", "invalid"})
RAW_COLUMNS = ("node", "sensor", "unit", "ts_ns", "value")
WINDOW_COLUMNS = (
    "node", "sensor", "unit", "start_ns", "width_ns", "count", "invalid",
    *STAT_FIELDS, *EXTRA_FIELDS,
)  # fmt: skip


class ExportError(Exception):
    pass


def iter_rows(
    path: str | Path,
    kind: Kind,
    since_ns: int,
    until_ns: int,
    *,
    spec: WindowSpec,
    slice_ns: int,
) -> Iterator[tuple[int, dict[str, list[Any]]]]:
    """Yield ``(slice end, columns)`` per time slice of ``[since_ns, until_ns)``.

    For windows (tumbling or hopping, as ``spec`` says, computed by the agent's own
    :func:`edge_agent.pipeline.window.sensor_windows`), the range is widened to whole steps,
    a slice holds the windows starting in it, and a window's readings are read up
    to its end.
    """
    if until_ns <= since_ns:
        raise ExportError("--until must be after --since")
    step = spec.step_ns
    if kind == "windows":
        since_ns = (since_ns // step) * step
        until_ns = -(-until_ns // step) * step
        slice_ns = max(step, (slice_ns // step) * step)
    store = open_readonly(path)
    try:
        sensors = buffer.load_sensors(store)
        lo, hi = store.conn.execute("SELECT min(t_min), max(t_max) FROM chunks").fetchone()
        if lo is None:
            return
        # only the slices the buffer can have readings in: `--since 0` is one
        # slice, not one for each hour since 1970
        if kind == "raw":
            a, until_ns = max(since_ns, lo), min(until_ns, hi + 1)
        else:
            a = max(since_ns, ((lo - spec.width_ns) // step + 1) * step)
            until_ns = min(until_ns, -(-(hi + 1) // step) * step)
        while a < until_ns:
            b = min(a + slice_ns, until_ns)
            cols: dict[str, list[Any]] = {
                c: [] for c in (RAW_COLUMNS if kind == "raw" else WINDOW_COLUMNS)
            }
            read_until = b if kind == "raw" else b - step + spec.width_ns
            for sid, (ts, vals) in sorted(buffer.read_range(store, a, read_until).items()):
                ref = sensors[sid]
                if kind == "raw":
                    n = len(ts)
                    cols["ts_ns"] += ts.tolist()
                    cols["value"] += vals.tolist()
                else:
                    starts, st, _, _ = sensor_windows(ts, vals, spec, a, b - step)
                    n = len(starts)
                    cols["start_ns"] += starts.tolist()
                    cols["width_ns"] += [spec.width_ns] * n
                    for name, arr in st.columns().items():
                        cols[name] += arr.tolist()
                cols["node"] += [ref.node] * n
                cols["sensor"] += [ref.name] * n
                cols["unit"] += [ref.unit] * n
            yield b, cols
            a = b
    finally:
        store.close()


def export(
    path: str | Path,
    out: str | Path,
    kind: Kind,
    since_ns: int,
    until_ns: int,
    *,
    spec: WindowSpec,
    fmt: Literal["csv", "parquet"],
    slice_ns: int = 3600 * 10**9,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write the export to ``out``; returns the number of rows. ``progress`` gets the
    nanoseconds of the range done after each slice. The rows go to ``<out>.partial``
    first, renamed to ``out`` once complete: a failed export leaves no half file."""
    final, out = out, Path(f"{out}.partial")
    rows = 0
    columns = RAW_COLUMNS if kind == "raw" else WINDOW_COLUMNS
    writer: Any
    if fmt == "parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ExportError(
                "Parquet export needs pyarrow, which is not installed here (pip install"
                " pyarrow, where it has wheels); export --format csv instead"
            ) from None
        writer = None
        schema = pa.schema(
            [
                (
                    c,
                    pa.string()
                    if c in TEXT_COLUMNS
                    else pa.int64()
                    if c in INT_COLUMNS
                    else pa.float64(),
                )
                for c in columns
            ]
        )
    try:  # the output's folder, before any work: one clear error
        fh = open(out, "w", newline="", encoding="utf-8")  # noqa: SIM115 (closed below)
    except OSError as exc:
        raise ExportError(f"cannot write {final}: {exc.strerror or exc}") from None
    if fmt == "parquet":
        fh.close()  # pyarrow opens it again
    else:
        writer = csv.writer(fh)
        writer.writerow(columns)
    last = since_ns
    done = False
    try:
        for end, cols in iter_rows(path, kind, since_ns, until_ns, spec=spec, slice_ns=slice_ns):
            n = len(cols["node"])
            rows += n
            if fmt == "parquet":
                # the schema from the columns' kinds, not from the first slice's
                # values (an empty first slice would make every column null)
                table = pa.table({c: cols[c] for c in columns}, schema=schema)
                if writer is None:
                    writer = pq.ParquetWriter(str(out), schema)
                if n:
                    writer.write_table(table)
            else:
                writer.writerows(zip(*(cols[c] for c in columns), strict=True))
            if progress is not None:
                progress(max(0, min(end, until_ns) - last))
                last = min(end, until_ns)
        done = True
    finally:
        if fmt == "parquet":
            if writer is not None:
                writer.close()
            else:
                done = False  # no rows at all: no file
        else:
            fh.close()
        if not done:
            out.unlink(missing_ok=True)
    if out.exists():
        out.replace(final)
    return rows
