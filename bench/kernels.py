"""Window-kernel throughput: numba kernel, numpy fallback and a numpy reduceat baseline.

All three run in the same process, interleaved, on the same data; the best of
--repeat runs is reported for each, with the ratio to the baseline, because the
machines are shared and noisy.

    .venv/bin/python bench/kernels.py [--readings 10000000] [--window 1000] [--repeat 7]

The baseline computes only count/sum/min/max/sum of squares with five
``np.*.reduceat`` calls (design.md measured ~230 M readings/s); the kernels also
handle NaN, compute first/last and a two-pass stddev.
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable

import numpy as np

from edge_agent import kernels


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
    values = rng.normal(20.0, 1.0, args.readings)
    seg = np.arange(0, args.readings, args.window, dtype=np.int64)
    cases: dict[str, Callable[[np.ndarray, np.ndarray], object]] = {
        "numpy reduceat baseline (5 stats)": baseline,
        "numpy fallback kernel (8 stats)": kernels.window_stats_numpy,
    }
    if kernels.BACKEND == "numba":
        cases["numba kernel (8 stats)"] = kernels.window_stats_numba
        kernels.window_stats_numba(values[:10], seg[:1])  # compile / load from cache
    best = dict.fromkeys(cases, float("inf"))
    for _ in range(args.repeat):
        for name, fn in cases.items():
            t = time.perf_counter()
            fn(values, seg)
            best[name] = min(best[name], time.perf_counter() - t)
    print(
        f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, "
        f"python {platform.python_version()}, numpy {np.__version__}, "
        f"kernel backend {kernels.BACKEND}"
    )
    print(f"{args.readings:,} readings, windows of {args.window}, best of {args.repeat}")
    base = best["numpy reduceat baseline (5 stats)"]
    for name, secs in best.items():
        print(
            f"  {name:<36} {args.readings / secs / 1e6:8.1f} M readings/s"
            f"   x{base / secs:5.2f} vs baseline"
        )


if __name__ == "__main__":
    main()
