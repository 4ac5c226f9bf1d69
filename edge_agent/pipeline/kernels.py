"""Per-window statistics over numpy arrays: numba kernels with a numpy fallback.

``window_stats(values, seg_starts)`` summarises consecutive segments of
``values``; segment ``k`` is ``values[seg_starts[k]:seg_starts[k+1]]`` (the last
runs to the end). Segments must be non-empty and ``seg_starts[0] == 0``.

Statistics per segment, over *finite* values only:

* ``count``   finite readings; ``invalid`` NaN/±Inf readings (excluded from the rest)
* ``min``, ``max``, ``mean``
* ``stddev``  population standard deviation (ddof=0), two-pass (sum, then the sum
  of squared deviations from the mean), which is numerically stable; 0.0 for a
  single reading
* ``first``, ``last``  the first and last finite value in segment order (callers
  sort by event time first)
* ``sum``
* ``p50``, ``p90``, ``p99``  exact quantiles of the finite values, by linear
  interpolation between closest ranks (numpy's default ``method="linear"``); the
  numba kernel finds the ranks by bucket selection, not a sort (``_stats_loop``),
  the numpy one by one row sort per window length (``_order_statistics``)

A segment with no finite value has count 0 and NaN for every float statistic.

numba is loaded when a call is large enough to pay for it (``kernel = "auto"``,
the agent's default): a call with fewer than :data:`NUMBA_MIN_READINGS` readings
runs the numpy implementation, and the first larger one imports numba and loads
the compiled kernel (``cache=True``: from ``__pycache__`` after the first start,
about 0.1 s; compiling it takes seconds). numba and LLVM cost about 110 MB of
RSS once loaded (docs/benchmarks.md, "Agent memory"), while the numpy
implementation runs at about half numba's speed on windows of a thousand
readings and faster than numba on windows of ten (docs/benchmarks.md, "Window
kernels"), so "auto" loads numba only for a call where that difference outweighs
loading it: a backlog of days, or ``edge-agent export`` of a large buffer.
``configure("numba")`` loads it at once, ``configure("numpy")`` never. Where
numba has no wheel (32-bit ARM) or ``TELEMETRY_NO_NUMBA=1`` is set, the numpy
implementation always runs. Both give the same results up to floating-point
rounding (relative differences of the
order of 1e-15; the tests hold them to 1e-9 of the window's scale).
"""

from __future__ import annotations

import importlib.util
import os
import threading
import time
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]
I64 = npt.NDArray[np.int64]


@dataclass(frozen=True, eq=False)
class WindowStats:
    count: I64
    invalid: I64
    min: F64
    max: F64
    mean: F64
    stddev: F64
    first: F64
    last: F64
    sum: F64
    p50: F64
    p90: F64
    p99: F64

    def columns(self) -> dict[str, npt.NDArray[Any]]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


QUANTILES = (0.5, 0.9, 0.99)


def _lerp(a: Any, b: Any, t: Any) -> Any:
    """numpy's own interpolation formula for quantiles (stable at both ends)."""
    if isinstance(t, float):
        return a + (b - a) * t if t < 0.5 else b - (b - a) * (1 - t)
    return np.where(t < 0.5, a + (b - a) * t, b - (b - a) * (1 - t))


def _order_statistics(key: F64, seg_starts: I64, lengths: I64, count: I64) -> F64:
    """min, p50, p90, p99 and max (rows) of each segment's finite values (columns),
    exact; NaN for a segment without one.

    ``key`` holds the values with +inf for the invalid ones, so that a segment's
    finite values sort first. One sort for all windows of a length: the segments
    are laid out as the rows of a 2-D array and numpy sorts the rows (its
    vectorised sort; a ``lexsort`` by window and value, which this replaced, ran at
    ~4 M readings/s). Windows of equal length (a steady sensor) are one block;
    otherwise up to eight distinct lengths get a block each, and more are grouped
    by powers of two, the shorter rows padded with +inf, so a block wastes at most
    half its cells. A block whose windows have the same count reads the same ranks
    from every row: columns, not a gather."""
    nseg = len(seg_starts)
    n = len(key)
    out = np.empty((len(QUANTILES) + 2, nseg))
    groups: list[tuple[I64 | None, int]]
    if lengths.min() == lengths.max():
        groups = [(None, int(lengths[0]))]
    else:
        distinct = np.unique(lengths)
        if len(distinct) <= 8:
            groups = [(np.flatnonzero(lengths == w), int(w)) for w in distinct]
        else:
            octave = np.frexp(lengths.astype(np.float64) - 0.5)[1]  # ceil(log2(length))
            groups = []
            for c in np.unique(octave):
                alike = np.flatnonzero(octave == c)
                groups.append((alike, int(lengths[alike].max())))
    for members, width in groups:
        cols = np.arange(width)
        if members is None:  # all windows the same length, back to back
            block = key.reshape(nseg, width).copy()
            counts = count
        else:
            starts, lens = seg_starts[members], lengths[members]
            if (lens == width).all():
                block = key[starts[:, None] + cols]
            else:
                block = key[np.minimum(starts[:, None] + cols, n - 1)]
                block[cols >= lens[:, None]] = np.inf
            counts = count[members]
        block.sort(axis=1)
        got = _ranks_of_sorted(block, counts)
        if members is None:
            out[:] = got
        else:
            out[:, members] = got
    return out


def _ranks_of_sorted(block: F64, counts: I64) -> F64:
    """min, quantiles and max of each sorted row's first ``counts`` values, numpy's
    linear interpolation between the closest ranks; NaN for a row with no finite value."""
    if counts.min() == counts.max():  # the usual case: the same ranks in every row
        c = int(counts[0])
        if c == 0:
            return np.full((len(QUANTILES) + 2, block.shape[0]), np.nan)
        rows = [block[:, 0]]
        for q in QUANTILES:
            at = q * (c - 1)
            below = int(np.floor(at))
            rows.append(_lerp(block[:, below], block[:, min(below + 1, c - 1)], at - below))
        rows.append(block[:, c - 1])
        return np.array(rows)
    idx = np.array(QUANTILES)[:, None] * (counts - 1)
    lo = np.floor(idx).astype(np.int64)
    hi = np.minimum(lo + 1, counts - 1)
    rows_at = np.arange(block.shape[0])
    last = np.maximum(counts - 1, 0)
    with np.errstate(invalid="ignore"):
        qv = _lerp(block[rows_at, np.maximum(lo, 0)], block[rows_at, np.maximum(hi, 0)], idx - lo)
    out = np.concatenate([block[None, :, 0], qv, block[None, rows_at, last]])
    out[:, counts == 0] = np.nan
    return out


def window_stats_numpy(values: F64, seg_starts: I64) -> WindowStats:
    """The numpy implementation: whole-array reductions (``reduceat``) for the sums
    and extremes, and one row sort per window length for the quantiles
    (:func:`_order_statistics`). When every reading is finite (the usual case) it
    skips the masking. It allocates a few arrays the size of ``values``."""
    values = np.asarray(values, dtype=np.float64)
    seg_starts = np.asarray(seg_starts, dtype=np.int64)
    nseg = len(seg_starts)
    if nseg == 0:
        e = np.empty(0)
        z = np.empty(0, dtype=np.int64)
        return WindowStats(z, z.copy(), *(e.copy() for _ in range(10)))
    n = len(values)
    lengths = np.diff(seg_starts, append=n)
    seg_ends = seg_starts + lengths
    finite = np.isfinite(values)
    all_finite = bool(finite.all())
    if all_finite:
        count = lengths.copy()
        safe = low = values
    else:
        count = np.add.reduceat(finite.astype(np.int64), seg_starts)
        safe = np.where(finite, values, 0.0)
        low = np.where(finite, values, np.inf)  # the sort key: invalid ones sort last
    invalid = lengths - count
    total = np.add.reduceat(safe, seg_starts)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
        dev = np.repeat(mean, lengths)  # in place from here: one array, not three
        np.subtract(safe, dev, out=dev)
        if not all_finite:
            dev[~finite] = 0.0
        np.multiply(dev, dev, out=dev)
        std = np.sqrt(np.add.reduceat(dev, seg_starts) / count)
    del dev
    empty = count == 0
    if all_finite:
        first = values[seg_starts]
        last = values[seg_ends - 1]
    else:
        for column in (mean, total, std):
            column[empty] = np.nan
        first = np.full(nseg, np.nan)
        last = np.full(nseg, np.nan)
        pos = np.flatnonzero(finite)
        if len(pos):
            fi = np.searchsorted(pos, seg_starts, side="left")
            li = np.searchsorted(pos, seg_ends, side="left") - 1
            ok = ~empty
            first[ok] = values[pos[fi[ok]]]
            last[ok] = values[pos[li[ok]]]
    vmin, *qv, vmax = _order_statistics(low, seg_starts, lengths, count)
    return WindowStats(count, invalid, vmin, vmax, mean, std, first, last, total, *qv)


#: Windows with at most this many finite readings sort them for the quantiles; larger
#: ones select (below).
SMALL_WINDOW = 64


def _stats_loop(values: Any, seg_starts: Any) -> Any:
    """Per window: one pass for count/sum/min/max (the finite values are copied into
    a buffer reused across windows only when the window has NaN or infinities), one
    pass over the finite values for the
    squared deviations from the mean (the stable two-pass variance) and a histogram
    of the values in ``nb`` equal-width buckets between min and max, and one pass
    that copies out only the values of the buckets holding the six ranks the
    quantiles need. Those few are sorted and read. Bucketing is monotone (IEEE
    rounding is), so a rank's value is exact, as numpy's full sort gives it; a
    window whose values crowd into one bucket costs one sort of them, as before.
    Plain Python; numba compiles it."""
    nseg = seg_starts.shape[0]
    n = values.shape[0]
    count = np.zeros(nseg, dtype=np.int64)
    invalid = np.zeros(nseg, dtype=np.int64)
    vmin = np.full(nseg, np.nan)
    vmax = np.full(nseg, np.nan)
    mean = np.full(nseg, np.nan)
    std = np.full(nseg, np.nan)
    first = np.full(nseg, np.nan)
    last = np.full(nseg, np.nan)
    total = np.full(nseg, np.nan)
    quant = np.full((3, nseg), np.nan)
    longest = 0
    for k in range(nseg):
        b = seg_starts[k + 1] if k + 1 < nseg else n
        longest = max(longest, b - seg_starts[k])
    buf = np.empty(longest)  # the window's finite values
    cand = np.empty(longest)  # the values of the buckets that hold a needed rank
    hist = np.zeros(4096, dtype=np.int64)
    slot_of = np.full(4096, -1, dtype=np.int64)  # bucket -> its region in cand
    ranks = np.empty(6, dtype=np.int64)
    rank_val = np.empty(6)
    rank_bucket = np.empty(6, dtype=np.int64)
    rank_off = np.empty(6, dtype=np.int64)
    region_start = np.empty(6, dtype=np.int64)
    region_fill = np.empty(6, dtype=np.int64)
    region_bucket = np.empty(6, dtype=np.int64)
    qs = np.array([0.5, 0.9, 0.99])
    for k in range(nseg):
        a = seg_starts[k]
        b = seg_starts[k + 1] if k + 1 < nseg else n
        c = 0
        s = 0.0
        lo = np.inf
        hi = -np.inf
        for i in range(a, b):
            x = values[i]
            if np.isfinite(x):
                c += 1
                s += x
                lo = min(lo, x)
                hi = max(hi, x)
        count[k] = c
        invalid[k] = (b - a) - c
        if c == 0:
            continue
        if c == b - a:  # all finite (the usual case): read the values where they are
            fin = values[a:b]
        else:
            j = 0
            for i in range(a, b):
                if np.isfinite(values[i]):
                    buf[j] = values[i]
                    j += 1
            fin = buf[:c]
        m = s / c
        vmin[k] = lo
        vmax[k] = hi
        mean[k] = m
        first[k] = fin[0]
        last[k] = fin[c - 1]
        total[k] = s
        for qi in range(3):  # the ranks: floor and ceiling of q * (c - 1)
            r = int(np.floor(qs[qi] * (c - 1)))
            ranks[2 * qi] = r
            ranks[2 * qi + 1] = min(r + 1, c - 1)
        nb = min(4096, c // 4)
        scale = nb / (hi - lo) if hi > lo else 0.0
        ss = 0.0
        if c <= SMALL_WINDOW or not (np.isfinite(scale) and scale > 0.0):
            for j in range(c):
                d = fin[j] - m
                ss += d * d
            part = cand[:c]  # a copy: the input is not ours to sort
            part[:] = fin
            part.sort()
            for t in range(6):
                rank_val[t] = part[ranks[t]]
        else:
            hist[:nb] = 0
            for j in range(c):
                x = fin[j]
                d = x - m
                ss += d * d
                f = (x - lo) * scale
                hist[nb - 1 if f >= nb else int(f)] += 1
            # the bucket of each rank (ranks ascend), and its place in the bucket
            t = 0
            below = 0
            for bk in range(nb):
                upto = below + hist[bk]
                while t < 6 and ranks[t] < upto:
                    rank_bucket[t] = bk
                    rank_off[t] = ranks[t] - below
                    t += 1
                if t == 6:
                    break
                below = upto
            regions = 0
            used = 0
            for t in range(6):
                bk = rank_bucket[t]
                if slot_of[bk] < 0:
                    slot_of[bk] = regions
                    region_bucket[regions] = bk
                    region_start[regions] = used
                    region_fill[regions] = 0
                    used += hist[bk]
                    regions += 1
            for j in range(c):
                x = fin[j]
                f = (x - lo) * scale
                sl = slot_of[nb - 1 if f >= nb else int(f)]
                if sl >= 0:
                    cand[region_start[sl] + region_fill[sl]] = x
                    region_fill[sl] += 1
            for g in range(regions):
                cand[region_start[g] : region_start[g] + region_fill[g]].sort()
            for t in range(6):
                g = slot_of[rank_bucket[t]]
                rank_val[t] = cand[region_start[g] + rank_off[t]]
            for g in range(regions):
                slot_of[region_bucket[g]] = -1
        std[k] = np.sqrt(ss / c)
        for qi in range(3):
            idx = qs[qi] * (c - 1)
            t = idx - np.floor(idx)
            x0 = rank_val[2 * qi]
            x1 = rank_val[2 * qi + 1]
            quant[qi, k] = x0 + (x1 - x0) * t if t < 0.5 else x1 - (x1 - x0) * (1 - t)
    return (count, invalid, vmin, vmax, mean, std, first, last, total, quant[0], quant[1], quant[2])


#: How the agent picks an implementation: "auto" (numpy below NUMBA_MIN_READINGS,
#: numba from the first larger call on), "numba" (at once) or "numpy" (always).
KERNELS = ("auto", "numba", "numpy")
#: "auto": the smallest call that loads numba. numpy's kernel takes ~0.1 s for
#: this many readings here, numba about half that, and loading numba from its
#: cache ~0.1 s and 110 MB of RSS for the rest of the agent's life.
NUMBA_MIN_READINGS = 10_000_000

_lock = threading.Lock()
_mode = "auto"
_numba_kernel: Any = None


def numba_available() -> bool:
    """numba can be imported here (without importing it: that costs ~80 MB)."""
    if os.environ.get("TELEMETRY_NO_NUMBA") == "1":
        return False
    return importlib.util.find_spec("numba") is not None


def _load_numba() -> Any:
    """The compiled kernel, importing numba on the first call; None without numba."""
    global _numba_kernel
    with _lock:
        if _numba_kernel is None and numba_available():
            try:
                import numba
            except ImportError:  # a broken install: numpy it is
                return None
            kernel = numba.njit(cache=True, nogil=True)(_stats_loop)
            # Compile (first start) or load from the cache both kinds of input now:
            # a read-only array (np.frombuffer over the buffer's blobs) is a type of
            # its own to numba, and met first in a window close it was compiled
            # there, seconds and ~60 MB later than the warm-up.
            v, segs = np.array([1.0, 2.0]), np.array([0], dtype=np.int64)
            kernel(v, segs)
            v.flags.writeable = False
            kernel(v, segs)
            _numba_kernel = kernel
        return _numba_kernel


def configure(kernel: str) -> None:
    """Choose how :func:`window_stats` picks its implementation (:data:`KERNELS`)."""
    global _mode
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, not {kernel!r}")
    _mode = kernel


def backend() -> str:
    """What :func:`window_stats` runs now: "numba", "numpy", or, in "auto" mode
    before the first large call, "numpy (numba on demand)"."""
    if _numba_kernel is not None and _mode != "numpy":
        return "numba"
    if _mode == "auto" and numba_available():
        return "numpy (numba on demand)"
    return "numpy"


def window_stats_numba(values: F64, seg_starts: I64) -> WindowStats:
    kernel = _load_numba()
    if kernel is None:
        raise RuntimeError("numba is not available")
    out = kernel(
        np.ascontiguousarray(values, dtype=np.float64),
        np.ascontiguousarray(seg_starts, dtype=np.int64),
    )
    return WindowStats(*out)


def warm_up() -> float:
    """In "numba" mode, compile (first start) or load from the cache (later starts)
    the numba kernel now, so that the first window close, or a technician's
    ``flush``, does not wait for it. Returns the seconds it took; a no-op otherwise."""
    started = time.monotonic()
    if _mode == "numba":
        _load_numba()
    return time.monotonic() - started


def window_stats(values: F64, seg_starts: I64) -> WindowStats:
    """Statistics per segment, with the implementation :func:`configure` chose."""
    if _mode == "numpy":
        return window_stats_numpy(values, seg_starts)
    wanted = _numba_kernel is not None or _mode == "numba" or len(values) >= NUMBA_MIN_READINGS
    if wanted and _load_numba() is not None:
        return window_stats_numba(values, seg_starts)
    return window_stats_numpy(values, seg_starts)


def segment_windows(ts: I64, width_ns: int) -> tuple[I64, I64]:
    """Split event-time-sorted ``ts`` into epoch-aligned tumbling windows.

    Returns ``(window_start_ns, seg_starts)``: one entry per non-empty window.
    Windows are ``[k*width, (k+1)*width)``; empty windows produce no segment.
    """
    ts = np.asarray(ts, dtype=np.int64)
    if len(ts) == 0:
        z = np.empty(0, dtype=np.int64)
        return z, z.copy()
    idx = ts // width_ns  # floor division: correct for negative times too
    change = np.flatnonzero(np.diff(idx)) + 1
    seg_starts = np.concatenate(([0], change)).astype(np.int64)
    return (idx[seg_starts] * width_ns).astype(np.int64), seg_starts


def hopping_windows(
    ts: I64, values: F64, width_ns: int, hop_ns: int, lo_start: int, hi_start: int
) -> tuple[I64, I64, F64]:
    """Windows ``[s, s + width)`` with ``s`` a multiple of ``hop`` in ``[lo_start, hi_start]``.

    ``ts`` must be sorted. A reading belongs to ``width / hop`` windows, so it is
    repeated once per window. Returns ``(window_start_ns, seg_starts, values)``
    ready for :func:`window_stats`; within a window, values keep their time order.
    With ``hop == width`` this is :func:`segment_windows` restricted to the range.
    """
    ts = np.asarray(ts, dtype=np.int64)
    values = np.asarray(values, dtype=np.float64)
    m = width_ns // hop_ns
    if m == 1:  # tumbling: each reading in one window, already in order
        keep = (ts >= lo_start) & (ts < hi_start + width_ns)
        starts, segs = segment_windows(ts[keep], width_ns)
        return starts, segs, values[keep]
    base = (ts // hop_ns) * hop_ns
    starts = np.concatenate([base - j * hop_ns for j in range(m)])
    idx = np.tile(np.arange(len(ts)), m)
    keep = (starts >= lo_start) & (starts <= hi_start)
    starts, idx = starts[keep], idx[keep]
    order = np.lexsort((idx, starts))  # by window, then by time (idx follows ts order)
    starts, idx = starts[order], idx[order]
    if len(starts) == 0:
        z = np.empty(0, dtype=np.int64)
        return z, z.copy(), np.empty(0)
    change = np.flatnonzero(np.diff(starts)) + 1
    seg_starts = np.concatenate(([0], change)).astype(np.int64)
    return starts[seg_starts].astype(np.int64), seg_starts, values[idx]
