"""Bytes on the wire per window point: wire format v1 against InfluxDB line protocol.

Builds batches from simulator-like data (the same sensor models), encodes them
with shared.wire and as line protocol with cloud_ingest.lineproto, and reports
bytes per point for both, for a few batch sizes.

    .venv/bin/python bench/wire_size.py
"""

from __future__ import annotations

import numpy as np

from cloud_ingest.lineproto import batch_to_lines
from edge_agent.pipeline.kernels import segment_windows, window_stats
from firmware_sim.config import DEFAULT_NODES
from firmware_sim.sensors import chunk_times, chunk_values
from shared.sketch import DDSketch
from shared.wire import Batch, SensorRef, WindowSpec, encode_batch, make_batch

WIDTH = 10_000_000_000
T0 = 1_790_000_000 * 10**9


def batch_for(seconds: int, copies: int) -> Batch:
    sensors: list[SensorRef] = []
    sketches: list[bytes] = []
    cols: dict[str, list[np.ndarray]] = {}
    for c in range(copies):
        for ni, node in enumerate(DEFAULT_NODES):
            for si, spec in enumerate(node.sensors):
                n_chunks = int(seconds * spec.rate_hz) // spec.chunk
                ts = np.concatenate([chunk_times(spec, T0, k) for k in range(n_chunks)])
                vals = np.concatenate(
                    [
                        chunk_values(spec, chunk_times(spec, T0, k), c, ni, si, k)
                        for k in range(n_chunks)
                    ]
                )
                starts, segs = segment_windows(ts, WIDTH)
                st = window_stats(vals, segs)
                ends = np.append(segs[1:], len(vals))
                sketches += [
                    DDSketch.from_values(vals[a:b]).encode()
                    for a, b in zip(segs.tolist(), ends.tolist(), strict=True)
                ]
                cols.setdefault("sensor", []).append(np.full(len(starts), len(sensors)))
                cols.setdefault("start_ns", []).append(starts)
                for k, v in st.columns().items():
                    cols.setdefault(k, []).append(v)
                sensors.append(SensorRef(f"{node.id}-{c}", spec.name, spec.unit))
    return make_batch(
        sketch=tuple(sketches),
        device_id="pi-0042",
        seq=1,
        created_ns=T0,
        window=WindowSpec("tumbling", WIDTH),
        sensors=tuple(sensors),
        columns={k: np.concatenate(v) for k, v in cols.items()},
    )


def main() -> None:
    print(
        f"{'windows':>8} {'sensors':>8} {'wire v1 B/pt':>13} {'line proto B/pt':>16} {'ratio':>6}"
    )
    for seconds, copies in ((10, 1), (60, 1), (60, 10), (600, 10)):
        b = batch_for(seconds, copies)
        wire = len(encode_batch(b))
        lp = len("\n".join(batch_to_lines(b)).encode())
        rows = b.rows
        print(
            f"{rows:>8} {3 * copies:>8} {wire / rows:>13.1f} {lp / rows:>16.1f} {lp / wire:>6.1f}"
        )


if __name__ == "__main__":
    main()
