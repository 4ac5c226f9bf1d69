"""Deterministic sensor signal models.

The readings of chunk ``k`` of a sensor depend only on (seed, node index, sensor
index, k) and the chunk's timestamps, never on wall-clock timing, so the same
seed and start time always give the same readings. Each kind is a daily cycle
(or a vibration) with noise, reported at its part's resolution
(firmware_sim/parts.py).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from firmware_sim.config import SensorSpec
from firmware_sim.parts import PARTS, quantize

DAY_S = 86400.0

F64 = npt.NDArray[np.float64]


def period_ns(spec: SensorSpec) -> int:
    return round(1e9 / spec.rate_hz)


def chunk_times(spec: SensorSpec, start_ns: int, k: int) -> npt.NDArray[np.int64]:
    i = np.arange(k * spec.chunk, (k + 1) * spec.chunk, dtype=np.int64)
    return start_ns + i * period_ns(spec)


def signal(kind: str, ts: npt.NDArray[np.int64], rng: np.random.Generator) -> F64:
    """The physical quantity at times ``ts`` (ns), with the part's noise, unrounded."""
    t = (ts % int(DAY_S * 1e9)).astype(np.float64) / 1e9  # seconds into the UTC day
    day = np.sin(2 * np.pi * (t / DAY_S - 0.25))
    n = len(ts)
    if kind == "temperature":
        return 21.0 + 3.0 * day + rng.normal(0.0, 0.05, n)
    if kind == "humidity":
        return 45.0 - 10.0 * day + rng.normal(0.0, 0.3, n)
    if kind == "pressure":
        return 1013.25 + 4.0 * day + rng.normal(0.0, 0.02, n)
    if kind == "adc":
        return 2048.0 + 600.0 * day + rng.normal(0.0, 2.0, n)
    if kind == "vibration":
        tt = (ts % 1_000_000_000).astype(np.float64) / 1e9
        base = 0.5 * np.sin(2 * np.pi * 50.0 * tt) + 0.1 * np.sin(2 * np.pi * 120.0 * tt)
        return base + rng.normal(0.0, 0.05, n)
    raise ValueError(f"unknown sensor kind {kind!r}; known: {', '.join(PARTS)}")


def readings(kind: str, ts: npt.NDArray[np.int64], rng: np.random.Generator) -> F64:
    """A sensor of ``kind`` at times ``ts``, as its part reports it (the benchmarks')."""
    return quantize(signal(kind, ts, rng), kind)


def chunk_values(
    spec: SensorSpec, ts: npt.NDArray[np.int64], seed: int, node_ix: int, sensor_ix: int, k: int
) -> F64:
    rng = np.random.default_rng([seed, node_ix, sensor_ix, k])
    return quantize(signal(spec.kind, ts, rng), spec.kind, spec.resolution)
