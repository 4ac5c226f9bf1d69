"""Per-sensor view for the technician: last value, rate, last seen (and how long ago,
and whether it stopped), recent trend.

Computed from the raw chunks in the buffer (kept ``storage.raw_retention_s``),
so it works with the agent stopped and with no network.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_agent.pipeline import buffer
from edge_agent.pipeline.window import sensor_windows, spec_of
from edge_agent.technician.status import open_readonly

SPARK = "▁▂▃▄▅▆▇█"


@dataclass(frozen=True)
class SensorView:
    node: str
    sensor: str
    unit: str
    last_value: float | None
    last_seen_ns: int | None
    #: readings per second while it reports: over the readings of the last
    #: ``rate_window_s`` of event time, (n - 1) / their time span; 0 with fewer than 2
    rate_hz: float
    trend: list[float]  # window means, oldest first (NaN for a window with no reading)
    #: seconds since its newest reading (device clock); None when it has none
    last_seen_age_s: float | None = None
    #: nothing for 3 of its intervals, and at least 3 windows: it stopped sending
    stale: bool = False

    @property
    def sparkline(self) -> str:
        return sparkline(self.trend)


def sparkline(values: list[float]) -> str:
    vals = np.array(values, dtype=float)
    ok = np.isfinite(vals)
    if not ok.any():
        return ""
    lo, hi = vals[ok].min(), vals[ok].max()
    span = hi - lo or 1.0
    return "".join(
        SPARK[int((v - lo) / span * (len(SPARK) - 1))] if np.isfinite(v) else " " for v in vals
    )


def read_sensors(
    path: str | Path,
    *,
    width_ns: int,
    windows: int = 20,
    rate_window_s: float = 60.0,
    now_ns: int | None = None,
) -> list[SensorView]:
    now_ns = time.time_ns() if now_ns is None else now_ns
    store = open_readonly(path)
    try:
        max_ts = store.get_state(buffer.MAX_TS)
        end = (max_ts // width_ns + 1) * width_ns
        start = end - windows * width_ns
        data = buffer.read_range(store, min(start, max_ts - int(rate_window_s * 1e9)), end)
        out = []
        for sid, ref in sorted(
            buffer.load_sensors(store).items(), key=lambda x: (x[1].node, x[1].name)
        ):
            last = store.conn.execute(
                "SELECT t_max, vals FROM chunks WHERE sensor_id = ? ORDER BY t_max DESC LIMIT 1",
                (sid,),
            ).fetchone()
            ts, vals = data.get(sid, (np.empty(0, np.int64), np.empty(0)))
            recent = ts >= max_ts - int(rate_window_s * 1e9)
            trend = [float("nan")] * windows
            in_range = ts >= start
            if in_range.any():
                starts, stats, _, _ = sensor_windows(
                    ts[in_range], vals[in_range], spec_of(width_ns, None), start, end - 1
                )
                means = stats.mean
                for st, m in zip(starts.tolist(), means.tolist(), strict=True):
                    trend[(st - start) // width_ns] = m
            span = ts[recent]
            duration_s = (int(span[-1]) - int(span[0])) / 1e9 if len(span) > 1 else 0.0
            rate = (len(span) - 1) / duration_s if duration_s > 0 else 0.0
            age = (now_ns - int(last[0])) / 1e9 if last else None
            quiet_after = max(3 * width_ns / 1e9, 3 / rate if rate else 0.0)
            out.append(
                SensorView(
                    node=ref.node,
                    sensor=ref.name,
                    unit=ref.unit,
                    last_value=float(np.frombuffer(last[1], "<f8")[-1]) if last else None,
                    last_seen_ns=int(last[0]) if last else None,
                    rate_hz=float(rate),
                    trend=trend,
                    last_seen_age_s=age,
                    stale=age is not None and age > quiet_after,
                )
            )
        return out
    finally:
        store.close()
