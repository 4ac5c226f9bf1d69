"""Durable intake path throughput: reading chunks → SQLite → windows → outbox.

Runs the agent's own functions (``buffer.store_many`` with redelivery digests,
``window.close_until`` with the numba kernels, ``outbox.add`` with encoding and
zstd) on a real SQLite file, without MQTT. Each configuration runs in the same
process, one after the other, interleaved over --repeat rounds; the best round is
reported. Every message is its own transaction, as without group commit, and then
again in groups of --group messages per transaction (``storage.group_commit_max``).
The local JSON decode of the same chunks is measured apart, since it is the other
cost of real intake. The layout the agent does not use, one SQLite row
per reading, runs in the same rounds for comparison: that comparison is why raw
readings are stored as one BLOB row per chunk.

    .venv/bin/python bench/durable_path.py [--readings 2000000] [--chunk 1000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from edge_agent.pipeline import buffer, kernels, window
from edge_agent.store import Store
from firmware_sim.sensors import readings as part_readings
from shared.readings import ReadingChunk, decode_chunk, encode_chunk

W = 10_000_000_000
T0 = 1_790_000_000 * 10**9


def make_chunks(readings: int, chunk: int, sensors: int) -> list[ReadingChunk]:
    rng = np.random.default_rng(0)
    per_sensor = readings // sensors
    period = 1_000_000  # 1 kHz per sensor
    out = []
    for start in range(0, per_sensor, chunk):
        for s in range(sensors):
            ts = T0 + (start + np.arange(chunk, dtype=np.int64)) * period
            # a 1 kHz sensor: an accelerometer, in its part's 1/256 g steps
            out.append(ReadingChunk("node", f"s{s}", "g", ts, part_readings("vibration", ts, rng)))
    return out


def run(
    chunks: list[ReadingChunk], synchronous: str, folder: Path, close_every: int, group: int = 1
) -> float:
    """``group``: messages per transaction (the agent's storage.group_commit_max)."""
    path = folder / f"bench-{synchronous}-{time.monotonic_ns()}.sqlite"
    store = Store(path, synchronous=synchronous)
    reg = buffer.SensorRegistry(store)
    t = time.perf_counter()
    pending: list[buffer.Incoming] = []
    for i, c in enumerate(chunks):
        pending.append(buffer.Incoming(c, i.to_bytes(16, "little")))
        if len(pending) >= group or i == len(chunks) - 1:
            buffer.store_many(store, reg, pending)
            pending = []
        if i % close_every == close_every - 1:
            upto = window.close_boundary(store.get_state(buffer.MAX_TS), 2 * 10**9, W)
            window.close_until(store, device_id="bench", width_ns=W, upto_ns=upto, max_rows=5000)
    window.close_until(
        store,
        device_id="bench",
        width_ns=W,
        upto_ns=window.flush_boundary(store.get_state(buffer.MAX_TS), W),
        max_rows=5000,
    )
    elapsed = time.perf_counter() - t
    n = store.counters()["readings_stored"]
    store.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return n / elapsed


def run_rows(chunks: list[ReadingChunk], folder: Path, close_every: int) -> float:
    """The layout not chosen: one SQLite row per reading (same transactions, same
    windows and kernels, reading back with fetchall into numpy)."""
    import sqlite3

    path = folder / f"bench-rows-{time.monotonic_ns()}.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("CREATE TABLE readings(sensor INTEGER, ts INTEGER, value REAL)")
    conn.execute("CREATE INDEX readings_ts ON readings(ts)")
    sensors: dict[str, int] = {}
    closed = 0
    max_ts = 0
    n = 0

    def close(upto: int) -> None:
        nonlocal closed
        upto = (upto // W) * W
        if upto <= closed:
            return
        rows = conn.execute(
            "SELECT sensor, ts, value FROM readings WHERE ts >= ? AND ts < ? ORDER BY sensor, ts",
            (closed, upto),
        ).fetchall()
        if rows:
            arr = np.array(rows, dtype=np.float64)
            sid, ts, vals = arr[:, 0].astype(np.int64), arr[:, 1].astype(np.int64), arr[:, 2]
            for s in np.unique(sid):
                sel = sid == s
                _starts, segs = kernels.segment_windows(ts[sel], W)
                kernels.window_stats(vals[sel], segs)
        closed = upto

    t = time.perf_counter()
    for i, c in enumerate(chunks):
        sid = sensors.setdefault(c.sensor, len(sensors))
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO readings VALUES (?, ?, ?)",
            zip([sid] * len(c), c.ts.tolist(), c.values.tolist(), strict=True),
        )
        conn.execute("COMMIT")
        n += len(c)
        max_ts = max(max_ts, int(c.ts[-1]))
        if i % close_every == close_every - 1:
            close(max_ts - 2 * 10**9)
    close(max_ts + W)
    elapsed = time.perf_counter() - t
    conn.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return n / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--readings", type=int, default=2_000_000)
    ap.add_argument("--chunk", type=int, default=1000, help="readings per sensor message")
    ap.add_argument("--sensors", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--group", type=int, default=16, help="messages per transaction, grouped")
    ap.add_argument("--dir", default=None, help="folder for the SQLite files (default: /tmp)")
    args = ap.parse_args()

    chunks = make_chunks(args.readings, args.chunk, args.sensors)
    n = sum(len(c) for c in chunks)
    folder = Path(args.dir or tempfile.gettempdir())
    close_every = max(1, (W // 1_000_000 // args.chunk) * args.sensors)  # about once a window
    # compile or load the kernel outside the timing
    kernels.window_stats(np.ones(3), np.array([0]))
    best = {"full": 0.0, "normal": 0.0}
    grouped = 0.0
    rows_best = 0.0
    for _ in range(args.repeat):
        for sync in best:
            best[sync] = max(best[sync], run(chunks, sync, folder, close_every))
        grouped = max(grouped, run(chunks, "full", folder, close_every, group=args.group))
        rows_best = max(rows_best, run_rows(chunks, folder, close_every))
    payloads = [
        (f"sensors/node/{c.sensor}", encode_chunk("u", c.ts.tolist(), c.values.tolist()))
        for c in chunks
    ]
    t = time.perf_counter()
    for topic, p in payloads:
        decode_chunk(topic, p, "sensors")
    json_rate = n / (time.perf_counter() - t)

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cpus, python "
        f"{platform.python_version()}, kernel backend {kernels.backend()}, files in {folder}"
    )
    print(
        f"{n:,} readings in chunks of {args.chunk} ({len(chunks):,} messages), "
        f"{args.sensors} sensors, best of {args.repeat}"
    )
    for sync, rate in best.items():
        print(f"  store + window + outbox, synchronous={sync:<6} {rate / 1e6:6.2f} M readings/s")
    print(
        f"  the same, group commit of {args.group:<3}, full     {grouped / 1e6:6.2f} M readings/s"
        f"   x{grouped / best['full']:.1f} vs one per message"
    )
    print(
        f"  one row per reading (not chosen), full     {rows_best / 1e6:6.2f} M readings/s"
        f"   chunk layout x{best['full'] / rows_best:.1f}"
    )
    print(f"  JSON decode of the same chunks (apart)     {json_rate / 1e6:6.2f} M readings/s")


if __name__ == "__main__":
    main()
