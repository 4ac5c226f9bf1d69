"""Closing event-time tumbling windows into outbox batches.

Windows are ``[k*width, (k+1)*width)`` in event time, aligned to the Unix epoch.
The watermark is the newest event time stored minus the allowed lateness; every
window that ends at or before the watermark is closed. Closing reads the raw
chunks, runs the kernels, writes the batches and advances ``closed_until`` in
one transaction: a crash leaves either all of it or none of it.
"""

from __future__ import annotations

import time

import numpy as np

from edge_agent import buffer, outbox
from edge_agent.kernels import segment_windows, window_stats
from edge_agent.store import Store
from shared.wire import SensorRef, WindowSpec, make_batch


def close_boundary(max_ts: int, lateness_ns: int, width_ns: int) -> int:
    """The end of the newest window that the watermark allows to close."""
    return ((max_ts - lateness_ns) // width_ns) * width_ns


def flush_boundary(max_ts: int, width_ns: int) -> int:
    """The end of the window holding ``max_ts``: closing up to it closes everything."""
    return (max_ts // width_ns + 1) * width_ns


def close_until(
    store: Store, *, device_id: str, width_ns: int, upto_ns: int, max_rows: int
) -> list[int]:
    """Close every window ending at or before ``upto_ns``; return the new batch seqs."""
    upto_ns = (upto_ns // width_ns) * width_ns
    seqs: list[int] = []
    with store.tx():
        closed = store.get_state(buffer.CLOSED_UNTIL)
        if upto_ns <= closed:
            return seqs
        data = buffer.read_range(store, closed, upto_ns)
        sensors = buffer.load_sensors(store)
        cols: dict[str, list[np.ndarray]] = {}
        sids: list[np.ndarray] = []
        for sid, (ts, vals) in sorted(data.items()):
            starts, segs = segment_windows(ts, width_ns)
            stats = window_stats(vals, segs)
            sids.append(np.full(len(starts), sid, dtype=np.int64))
            cols.setdefault("start_ns", []).append(starts)
            for name, arr in stats.columns().items():
                cols.setdefault(name, []).append(arr)
        if sids:
            sid_all = np.concatenate(sids)
            merged = {k: np.concatenate(v) for k, v in cols.items()}
            order = np.lexsort((sid_all, merged["start_ns"]))
            sid_all = sid_all[order]
            merged = {k: v[order] for k, v in merged.items()}
            spec = WindowSpec("tumbling", width_ns)
            for a in range(0, len(sid_all), max_rows):
                part = slice(a, a + max_rows)
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
                )
                outbox.add(store, batch)
                seqs.append(seq)
        store.set_state(buffer.CLOSED_UNTIL, upto_ns)
    return seqs
