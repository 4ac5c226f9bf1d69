"""Closing event-time windows into outbox batches.

Tumbling windows are ``[k*width, (k+1)*width)`` in event time, aligned to the
Unix epoch; hopping windows are ``[k*hop, k*hop + width)``, overlapping, with
``width`` a multiple of ``hop``. ``closed_until`` is the end of the newest closed
window: every window ending at or before it is closed.
The watermark is the newest event time stored minus the allowed lateness; every
window that ends at or before the watermark is closed. Closing reads the raw
chunks, runs the kernels, writes the batches and advances ``closed_until`` in
one transaction: a crash leaves either all of it or none of it.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edge_agent import counters
from edge_agent.config import AgentConfig, sensor_tags
from edge_agent.pipeline import buffer, outbox
from edge_agent.pipeline.kernels import WindowStats, hopping_windows, window_stats
from edge_agent.store import Store
from shared.sketch import encode_windows
from shared.tags import Tags
from shared.wire import SensorRef, WindowSpec, encode_batch, make_batch

log = logging.getLogger(__name__)


def close_boundary(max_ts: int, lateness_ns: int, step_ns: int) -> int:
    """The end of the newest window that the watermark allows to close (window ends
    are multiples of the step: the width, or the hop)."""
    return ((max_ts - lateness_ns) // step_ns) * step_ns


def flush_boundary(max_ts: int, width_ns: int, hop_ns: int | None = None) -> int:
    """The end of the last window holding ``max_ts``: closing up to it closes everything."""
    step = hop_ns or width_ns
    return (max_ts // step) * step + width_ns


def spec_of(width_ns: int, hop_ns: int | None) -> WindowSpec:
    if hop_ns and hop_ns != width_ns:
        return WindowSpec("hopping", width_ns, hop_ns)
    return WindowSpec("tumbling", width_ns)


Rows = tuple[np.ndarray, dict[str, np.ndarray], list[bytes]]


def sensor_windows(
    ts: np.ndarray, vals: np.ndarray, spec: WindowSpec, lo_start: int, hi_start: int
) -> tuple[np.ndarray, WindowStats, np.ndarray, np.ndarray]:
    """One sensor's windows starting in ``[lo_start, hi_start]`` (tumbling or hopping,
    as ``spec`` says): (starts, statistics, segment starts, the windowed values).
    The one place window statistics are computed: the agent's batches, ``edge-agent
    export --kind windows`` and the ``sensors`` trend all call it."""
    starts, segs, windowed = hopping_windows(
        ts, vals, spec.width_ns, spec.step_ns, lo_start, hi_start
    )
    return starts, window_stats(windowed, segs), segs, windowed


def _summarise(
    data: dict[int, tuple[np.ndarray, np.ndarray]],
    spec: WindowSpec,
    lo_start: int,
    hi_start: int,
    sketches_on: bool = True,
) -> Rows | None:
    """Statistics and sketches of the windows starting in ``[lo_start, hi_start]`` of every
    sensor in ``data``, as (sensor ids, columns, sketches), by window start then sensor."""
    cols: dict[str, list[np.ndarray]] = {}
    sids: list[np.ndarray] = []
    sketches: list[bytes] = []
    for sid, (ts, vals) in sorted(data.items()):
        starts, stats, segs, vals = sensor_windows(ts, vals, spec, lo_start, hi_start)
        if len(starts) == 0:
            continue
        if sketches_on:
            sketches += encode_windows(vals, segs)
        sids.append(np.full(len(starts), sid, dtype=np.int64))
        cols.setdefault("start_ns", []).append(starts)
        for name, arr in stats.columns().items():
            cols.setdefault(name, []).append(arr)
    if not sids:
        return None
    sid_all = np.concatenate(sids)
    merged = {k: np.concatenate(v) for k, v in cols.items()}
    order = np.lexsort((sid_all, merged["start_ns"]))
    return (
        sid_all[order],
        {k: v[order] for k, v in merged.items()},
        [sketches[i] for i in order.tolist()] if sketches_on else [],
    )


#: a batch's windows stay within one UTC day: the lake keeps a day per object, and
#: the cloud bounds the span of a batch (quotas.max_batch_span_s)
DAY_NS = 86_400 * 10**9


@dataclass(frozen=True)
class Limits:
    """What one batch may hold: what the cloud accepts from a device
    (docs/cloud-ingest.md, "What one device can cost the fleet")."""

    max_rows: int
    max_sensors: int = 1000
    max_bytes: int = 1_000_000
    #: the wire format the batches are encoded in (forward.wire_version)
    wire_version: int = 1


def _parts(sid_all: np.ndarray, starts: np.ndarray, limits: Limits) -> list[slice]:
    """Rows (sorted by window start) cut into batches: never across a UTC day, at most
    ``max_rows`` rows and ``max_sensors`` sensors each."""
    days = starts // DAY_NS
    bounds = [0, *(np.flatnonzero(np.diff(days)) + 1).tolist(), len(sid_all)]
    out = []
    for lo, hi in itertools.pairwise(bounds):
        for a in range(lo, hi, limits.max_rows):
            b = min(a + limits.max_rows, hi)
            if len(np.unique(sid_all[a:b])) <= limits.max_sensors:
                out.append(slice(a, b))
            else:  # rows of one window start are distinct sensors: this many fit
                step = limits.max_sensors
                out += [slice(x, min(x + step, b)) for x in range(a, b, step)]
    return out


def _emit(
    store: Store,
    device_id: str,
    spec: WindowSpec,
    limits: Limits,
    sid_all: np.ndarray,
    merged: dict[str, np.ndarray],
    sketches: list[bytes],
    prev_seq: np.ndarray | None = None,
    tags: Callable[[str], Tags] | None = None,
) -> list[int]:
    """Write the rows as batches within ``limits`` to the outbox; call in a transaction.

    A batch whose encoding is over ``limits.max_bytes`` (sketches of many bins) is
    cut in two, until each fits or holds one window. Each row's version is recorded
    in ``revisions`` with the seq of its batch. Where ``prev_seq`` names the batch
    that carried a row's previous version and that batch is still unacknowledged,
    the new batch waits for it (``outbox_after``), so that the cloud never receives
    a window's versions out of order.
    """
    sensors = buffer.load_sensors(store)
    if tags is not None:
        sensors = {i: dataclasses.replace(r, tags=tags(r.node)) for i, r in sensors.items()}
    starts = merged["start_ns"]
    revs = merged.get("revision", np.zeros(len(sid_all), dtype=np.int64))
    generation = outbox.generation(store)
    seqs = []
    todo = _parts(sid_all, starts, limits)[::-1]
    while todo:
        part = todo.pop()
        used = sorted(set(sid_all[part].tolist()))
        index = {s: i for i, s in enumerate(used)}
        refs: tuple[SensorRef, ...] = tuple(sensors[s] for s in used)
        columns = {k: v[part] for k, v in merged.items()}
        columns["sensor"] = np.array([index[s] for s in sid_all[part].tolist()])
        seq = outbox.next_seq(store)
        batch = make_batch(
            device_id=device_id,
            seq=seq,
            created_ns=time.time_ns(),
            window=spec,
            sensors=refs,
            columns=columns,
            sketch=tuple(sketches[part]) if sketches else (),
            generation=generation,
        )
        payload = encode_batch(batch, version=limits.wire_version)
        rows = part.stop - part.start
        if len(payload) > limits.max_bytes and rows > 1:
            store.set_state(outbox.NEXT_SEQ, seq)  # not used: seqs stay without gaps
            half = part.start + rows // 2
            todo += [slice(half, part.stop), slice(part.start, half)]
            store.add_counter(counters.BATCHES_SPLIT_FOR_SIZE, 1)
            continue
        outbox.add(store, batch, payload)
        store.conn.executemany(
            "INSERT INTO revisions(sensor_id, start_ns, revision, seq) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(sensor_id, start_ns) DO UPDATE SET "
            "revision = excluded.revision, seq = excluded.seq",
            [
                (sid, st, rev, seq)
                for sid, st, rev in zip(
                    sid_all[part].tolist(), starts[part].tolist(), revs[part].tolist(), strict=True
                )
            ],
        )
        if prev_seq is not None:
            for before in sorted(set(prev_seq[part].tolist()) - {0}):
                outbox.add_wait(store, seq, before)
        seqs.append(seq)
    return seqs


def close_until(
    store: Store,
    *,
    device_id: str,
    width_ns: int,
    upto_ns: int,
    max_rows: int | Limits,
    sketches: bool = True,
    hop_ns: int | None = None,
    tags: Callable[[str], Tags] | None = None,
) -> list[int]:
    """Close every window ending at or before ``upto_ns``; return the new batch seqs.
    ``max_rows``: a batch's limits (or only its rows); ``tags``: a node's sensors'
    static tags (edge_agent.config.sensor_tags)."""
    limits = max_rows if isinstance(max_rows, Limits) else Limits(max_rows)
    spec = spec_of(width_ns, hop_ns)
    step = spec.step_ns
    upto_ns = (upto_ns // step) * step
    seqs: list[int] = []
    with store.tx():
        closed = store.get_state(buffer.CLOSED_UNTIL)
        if upto_ns <= closed:
            return seqs
        # windows ending in (closed, upto]: starting in (closed - width, upto - width]
        lo, hi = closed - width_ns + step, upto_ns - width_ns
        rows = _summarise(buffer.read_range(store, lo, upto_ns), spec, lo, hi, sketches)
        if rows is not None:
            seqs = _emit(store, device_id, spec, limits, *rows, tags=tags)
        store.set_state(buffer.CLOSED_UNTIL, upto_ns)
    return seqs


def revise(
    store: Store,
    *,
    device_id: str,
    width_ns: int,
    max_rows: int | Limits,
    ready_until_ns: int,
    limit: int = 1000,
    sketches: bool = True,
    hop_ns: int | None = None,
    tags: Callable[[str], Tags] | None = None,
    widths: tuple[tuple[int, int], ...] = (),
) -> list[int]:
    """Send a new version of every closed window that late readings changed and that
    ends at or before ``ready_until_ns`` (the watermark, or a flush's boundary).
    ``widths``: tumbling windows whose width changed (:func:`adopt_width`): each
    window is revised at the width it was closed with.

    The new version is computed from all raw readings of the window (the earlier
    version's and the late ones) and goes out under a new seq. Its ``revision`` is
    one more than the last version sent, or 0 if none was (every reading of that
    sensor in that window came late). In InfluxDB it overwrites the earlier point
    (same series and timestamp); the batch waits for the one with the earlier
    version to be acknowledged (see :func:`_emit`). A window closed early by a
    flush is revised once, when the watermark passes its end, not at every tick
    while it fills. Returns the new batch seqs.
    """
    seqs: list[int] = []
    limits = max_rows if isinstance(max_rows, Limits) else Limits(max_rows)
    with store.tx():
        if len(widths) > 1:  # the widest window may end last: filter below
            narrowest = min(w for _, w in widths)
            dirty = store.conn.execute(
                "SELECT sensor_id, start_ns FROM dirty WHERE start_ns + ? <= ? "
                "ORDER BY start_ns LIMIT ?",
                (narrowest, ready_until_ns, limit),
            ).fetchall()
            width_of = dict(zip((int(s) for _, s in dirty), buffer.widths_at(
                widths, np.array([int(s) for _, s in dirty], dtype=np.int64)).tolist(),
                strict=True))  # fmt: skip
            dirty = [(sid, s) for sid, s in dirty if s + width_of[int(s)] <= ready_until_ns]
        else:
            dirty = store.conn.execute(
                "SELECT sensor_id, start_ns FROM dirty WHERE start_ns + ? <= ? "
                "ORDER BY start_ns LIMIT ?",
                (width_ns, ready_until_ns, limit),
            ).fetchall()
            width_of = {int(s): width_ns for _, s in dirty}
        if not dirty:
            return seqs
        by_start: dict[int, set[int]] = {}
        for sid, start in dirty:
            by_start.setdefault(int(start), set()).add(int(sid))
        by_width: dict[int, list[Rows]] = {}
        for start, sids in sorted(by_start.items()):
            width = width_of[start]
            data = {
                k: v for k, v in buffer.read_range(store, start, start + width).items() if k in sids
            }
            rows = _summarise(data, spec_of(width, hop_ns), start, start, sketches)
            if rows is not None:
                by_width.setdefault(width, []).append(rows)
        for width, parts in sorted(by_width.items()):
            spec = spec_of(width, hop_ns)
            sid_all = np.concatenate([p[0] for p in parts])
            merged = {k: np.concatenate([p[1][k] for p in parts]) for k in parts[0][1]}
            sketch_rows = [sk for p in parts for sk in p[2]]
            revs, prevs = [], []
            for sid, start in zip(sid_all.tolist(), merged["start_ns"].tolist(), strict=True):
                row = store.conn.execute(
                    "SELECT revision, seq FROM revisions WHERE sensor_id = ? AND start_ns = ?",
                    (sid, start),
                ).fetchone()
                revs.append(int(row[0]) + 1 if row else 0)
                prevs.append(int(row[1]) if row else 0)
            merged["revision"] = np.array(revs, dtype=np.int64)
            seqs += _emit(
                store,
                device_id,
                spec,
                limits,
                sid_all,
                merged,
                sketch_rows,
                np.array(prevs, dtype=np.int64),
                tags=tags,
            )
            store.add_counter(counters.WINDOWS_REVISED, sum(1 for r in revs if r > 0))
        store.conn.executemany("DELETE FROM dirty WHERE sensor_id = ? AND start_ns = ?", dirty)
    return seqs


def send_ready(
    store: Store, cfg: AgentConfig, *, flush: bool = False
) -> tuple[list[int], list[int]]:
    """Close the windows that the watermark allows (with ``flush``: every open
    window), then revise the closed windows that late readings changed and that end
    by the same boundary. Returns the seqs of the new batches: (closed, revised).
    The agent's tick and ``edge-agent flush`` with the agent stopped both do this."""
    widths = adopt_width(store, cfg)
    max_ts = store.get_state(buffer.MAX_TS)
    if max_ts == 0:
        return [], []
    w = cfg.window
    tags = sensor_tags(cfg) if cfg.tags or cfg.node_tags else None
    limits = Limits(
        cfg.forward.max_windows_per_batch,
        cfg.forward.max_sensors_per_batch,
        cfg.forward.max_batch_bytes,
        cfg.forward.wire_version,
    )
    if len(widths) > 1:
        return _send_ready_widths(store, cfg, widths, max_ts, flush, limits, tags)
    if flush:
        upto = flush_boundary(max_ts, w.width_ns, w.hop_ns)
    else:
        upto = close_boundary(max_ts, w.lateness_ns, w.hop_ns)
    closed = close_until(
        store,
        device_id=cfg.device_id,
        width_ns=w.width_ns,
        upto_ns=upto,
        max_rows=limits,
        sketches=w.sketches,
        hop_ns=w.hop_ns,
        tags=tags,
    )
    revised = revise(
        store,
        device_id=cfg.device_id,
        width_ns=w.width_ns,
        max_rows=limits,
        ready_until_ns=upto,
        sketches=w.sketches,
        hop_ns=w.hop_ns,
        tags=tags,
    )
    return closed, revised


def adopt_width(store: Store, cfg: AgentConfig) -> tuple[tuple[int, int], ...]:
    """The tumbling windows' widths over time, with the config's width in them.

    A width that differs from the last one the buffer closed with takes effect at
    B, the first multiple of both widths at or after the end of the last closed
    window: windows before B keep the old width (closed, and revised by late
    readings, at it), windows from B have the new one. So every reading is in one
    window of one width, whatever the restart between them (docs/commands.md,
    "Desired configuration"). Hopping windows keep no such record: their width or
    hop is not changed under a running buffer (config.py says so)."""
    w = cfg.window
    if w.hop_ns and w.hop_ns != w.width_ns:
        return ()
    widths = buffer.window_widths(store)
    if widths and widths[-1][1] == w.width_ns:
        return widths  # every tick: a read, no write transaction
    with store.tx():
        widths = buffer.window_widths(store)
        if widths and widths[-1][1] == w.width_ns:
            return widths
        if not widths:
            store.conn.execute(
                "INSERT INTO window_widths(from_ns, width_ns) VALUES (0, ?)", (w.width_ns,)
            )
            return ((0, w.width_ns),)
        last_from, last_width = widths[-1]
        step = math.lcm(last_width, w.width_ns)
        start = max(store.get_state(buffer.CLOSED_UNTIL), last_from)
        switch = -(-start // step) * step
        if switch == last_from and len(widths) > 1:
            # the last change has not begun (no window of it closed): it is undone,
            # and this width takes effect where it would have
            store.conn.execute("DELETE FROM window_widths WHERE from_ns = ?", (last_from,))
            if widths[-2][1] == w.width_ns:
                return widths[:-1]
        store.conn.execute(
            "INSERT OR REPLACE INTO window_widths(from_ns, width_ns) VALUES (?, ?)",
            (switch, w.width_ns),
        )
        store.add_counter(counters.WINDOW_WIDTH_CHANGES, 1)
    log.warning(
        "window: width %g s from %d on (before it, %g s)",
        w.width_ns / 1e9,
        switch,
        last_width / 1e9,
    )
    return buffer.window_widths(store)


def _send_ready_widths(
    store: Store,
    cfg: AgentConfig,
    widths: tuple[tuple[int, int], ...],
    max_ts: int,
    flush: bool,
    limits: Limits,
    tags: Callable[[str], Tags] | None,
) -> tuple[list[int], list[int]]:
    """:func:`send_ready` across a change of width: each span closed at its width, up
    to its end, before the next is."""
    closed_seqs: list[int] = []
    ends = [f for f, _ in widths[1:]] + [None]
    for (_, width), end in zip(widths, ends, strict=True):
        closed = store.get_state(buffer.CLOSED_UNTIL)
        if end is not None and closed >= end:
            continue
        if flush:
            upto = flush_boundary(max_ts, width)
        else:
            upto = close_boundary(max_ts, cfg.window.lateness_ns, width)
        if end is not None:
            upto = min(upto, end)
        if upto > closed:
            closed_seqs += close_until(
                store, device_id=cfg.device_id, width_ns=width, upto_ns=upto, max_rows=limits,
                sketches=cfg.window.sketches, tags=tags,
            )  # fmt: skip
        if end is None or upto < end:
            break
    revised = revise(
        store, device_id=cfg.device_id, width_ns=cfg.window.width_ns, max_rows=limits,
        ready_until_ns=store.get_state(buffer.CLOSED_UNTIL), sketches=cfg.window.sketches,
        tags=tags, widths=widths,
    )  # fmt: skip
    return closed_seqs, revised
