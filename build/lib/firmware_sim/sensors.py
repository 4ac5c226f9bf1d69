"""Deterministic sensor signal models.

The readings of chunk ``k`` of a sensor depend only on (seed, node index, sensor
index, k) and the chunk's timestamps, never on wall-clock timing, so the same
seed and start time always give the same readings.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from firmware_sim.config import SensorSpec

DAY_S = 86400.0


def period_ns(spec: SensorSpec) -> int:
    return round(1e9 / spec.rate_hz)


def chunk_times(spec: SensorSpec, start_ns: int, k: int) -> npt.NDArray[np.int64]:
    i = np.arange(k * spec.chunk, (k + 1) * spec.chunk, dtype=np.int64)
    return start_ns + i * period_ns(spec)


def chunk_values(
    spec: SensorSpec, ts: npt.NDArray[np.int64], seed: int, node_ix: int, sensor_ix: int, k: int
) -> npt.NDArray[np.float64]:
    rng = np.random.default_rng([seed, node_ix, sensor_ix, k])
    t = (ts % int(DAY_S * 1e9)).astype(np.float64) / 1e9  # seconds into the UTC day
    if spec.kind == "temperature":
        base = 21.0 + 3.0 * np.sin(2 * np.pi * (t / DAY_S - 0.25))
        return base + rng.normal(0.0, 0.05, len(ts))
    if spec.kind == "humidity":
        base = 45.0 - 10.0 * np.sin(2 * np.pi * (t / DAY_S - 0.25))
        return np.clip(base + rng.normal(0.0, 0.3, len(ts)), 0.0, 100.0)
    if spec.kind == "vibration":
        tt = (ts % 1_000_000_000).astype(np.float64) / 1e9
        base = 0.5 * np.sin(2 * np.pi * 50.0 * tt) + 0.1 * np.sin(2 * np.pi * 120.0 * tt)
        return base + rng.normal(0.0, 0.05, len(ts))
    raise ValueError(f"unknown sensor kind {spec.kind!r}")
