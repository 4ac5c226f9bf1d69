"""Window-kernel throughput: numba kernel, numpy fallback and a numpy reduceat baseline.

All three run in the same process, interleaved, on the same data; the best of
--repeat runs is reported for each, with the ratio to the baseline, because the
machines are shared and noisy.

    .venv/bin/python bench/kernels.py [--readings 10000000] [--window 1000] [--repeat 7]

The baseline computes only count/sum/min/max/sum of squares with five
``np.*.reduceat`` calls (about 230 M readings/s in the team's design notes); the kernels
compute 12 statistics: they also handle NaN, compute first/last, a two-pass
stddev and the exact p50/p90/p99 (a bucket selection per window, see
edge_agent/pipeline/kernels.py). The per-window DDSketch is measured beside the
kernel, and the quantiles are compared with pandas ``groupby().quantile()``.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import numpy as np

from edge_agent.pipeline import kernels
from firmware_sim.parts import quantize


def baseline(values: np.ndarray, seg: np.ndarray) -> None:
    np.add.reduceat(np.ones_like(values), seg)
    np.add.reduceat(values, seg)
    np.minimum.reduceat(values, seg)
    np.maximum.reduceat(values, seg)
    np.add.reduceat(values * values, seg)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--readings", type=int, default=10_000_000)
    ap.add_argument("--window", type=int, default=1000, help="readings per window")
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args()

    rng = np.random.default_rng(1)
    # a DS18B20's readings: its 1/16 degC steps (firmware_sim/parts.py)
    values = quantize(rng.normal(20.0, 1.0, args.readings), "temperature")
    seg = np.arange(0, args.readings, args.window, dtype=np.int64)
    print(
        f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, "
        f"python {platform.python_version()}, numpy {np.__version__}, "
        f"kernel backend {kernels.backend()}"
    )
    if kernels.numba_available():
        kernels.window_stats_numba(values[:10], seg[:1])  # compile / load from cache
    # the shapes a window close meets: a steady sensor's equal windows (the given
    # width, and 10 readings: 1 Hz in 10 s windows), and windows of every length
    ragged = np.unique(np.concatenate([[0], rng.integers(1, args.readings, args.readings // 300)]))
    shapes = {
        f"windows of {args.window}": seg,
        "windows of 10": np.arange(0, args.readings, 10, dtype=np.int64),
        f"{len(ragged):,} windows of 1 to {int(np.diff(ragged).max()):,}": ragged.astype(np.int64),
    }
    for label, segs in shapes.items():
        compare(values, segs, label, args.repeat)
    sketch_report(values, seg, args.repeat)
    quantile_report(values, seg, args.repeat)


def compare(values: np.ndarray, seg: np.ndarray, label: str, repeat: int) -> None:
    """The kernels beside the reduceat baseline, interleaved, best of ``repeat``."""
    cases: dict[str, Callable[[np.ndarray, np.ndarray], object]] = {
        "numpy reduceat baseline (5 stats)": baseline,
        "numpy kernel (12 stats)": kernels.window_stats_numpy,
    }
    if kernels.numba_available():
        cases["numba kernel (12 stats)"] = kernels.window_stats_numba
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(repeat):
        for name, fn in cases.items():
            t = time.perf_counter()
            fn(values, seg)
            best[name] = min(best[name], time.perf_counter() - t)
    print(f"{len(values):,} readings, {label}, best of {repeat}")
    base = best["numpy reduceat baseline (5 stats)"]
    for name, secs in best.items():
        print(
            f"  {name:<36} {len(values) / secs / 1e6:8.1f} M readings/s"
            f"   x{base / secs:5.2f} vs baseline"
        )


def sketch_report(values: np.ndarray, seg: np.ndarray, repeat: int) -> None:
    """The per-window DDSketch the agent sends beside the statistics (window.sketches),
    measured beside the kernel in the same run: together they are the cost of
    closing windows."""
    from shared.sketch import DDSketch, encode_windows

    windows = min(len(seg), 2000)  # a sample of windows: the sketches are per window
    n = int(seg[windows]) if windows < len(seg) else len(values)
    sub, sub_seg = values[:n], seg[:windows]
    ends = np.append(sub_seg[1:], n)
    best = {
        "kernel, all 12 stats": float("inf"),
        "DDSketch per window (before)": float("inf"),
        "sketches, encode_windows (now)": float("inf"),
    }
    for _ in range(repeat):
        t = time.perf_counter()
        kernels.window_stats(sub, sub_seg)
        best["kernel, all 12 stats"] = min(best["kernel, all 12 stats"], time.perf_counter() - t)
        t = time.perf_counter()
        for a, b in zip(sub_seg.tolist(), ends.tolist(), strict=True):
            DDSketch.from_values(sub[a:b]).encode()
        best["DDSketch per window (before)"] = min(
            best["DDSketch per window (before)"], time.perf_counter() - t
        )
        t = time.perf_counter()
        encode_windows(sub, sub_seg)
        best["sketches, encode_windows (now)"] = min(
            best["sketches, encode_windows (now)"], time.perf_counter() - t
        )
    print(f"sketches beside the kernel ({windows:,} windows):")
    for name, secs in best.items():
        print(f"  {name:<36} {n / secs / 1e6:8.1f} M readings/s")


def quantile_report(values: np.ndarray, seg: np.ndarray, repeat: int) -> None:
    """Exact p50/p90/p99 per window: the kernel (which computes all its statistics in
    the same pass) against pandas ``groupby().quantile()``, interleaved."""
    try:
        import pandas as pd
    except ImportError:
        print("pandas not installed: pip install -e '.[bench]' for the quantile comparison")
        return
    lengths = np.diff(np.append(seg, len(values)))
    frame = pd.DataFrame({"w": np.repeat(np.arange(len(seg)), lengths), "v": values})
    best = {"pandas groupby().quantile(3 q)": float("inf"), "kernel, all 12 stats": float("inf")}
    for _ in range(repeat):
        t = time.perf_counter()
        frame.groupby("w")["v"].quantile([0.5, 0.9, 0.99])
        best["pandas groupby().quantile(3 q)"] = min(
            best["pandas groupby().quantile(3 q)"], time.perf_counter() - t
        )
        t = time.perf_counter()
        kernels.window_stats(values, seg)
        best["kernel, all 12 stats"] = min(best["kernel, all 12 stats"], time.perf_counter() - t)
    base = best["pandas groupby().quantile(3 q)"]
    print(f"quantiles ({kernels.backend()} kernel vs pandas {pd.__version__}):")
    for name, secs in best.items():
        print(
            f"  {name:<36} {len(values) / secs / 1e6:8.1f} M readings/s"
            f"   x{base / secs:5.2f} vs pandas"
        )


if __name__ == "__main__":
    main()
