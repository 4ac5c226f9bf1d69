"""What a ``raw`` command for one sensor-hour costs (docs/commands.md): bytes on the
uplink, the device's time to copy the readings out of its buffer and encode them,
and the ingestor's to decode them and make the lake objects, for readings as
real parts report them and as full-precision noise, side by side in one run.

    .venv/bin/python bench/raw_request.py --repeat 5

Each case fills a fresh buffer with one sensor-hour, one reading per chunk (what a
device sending one reading per message leaves in the buffer), with 20 other
sensors beside it, and asks for that sensor's hour.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cloud_ingest.config import IngestConfig
from cloud_ingest.ingest.decode import decode_message
from cloud_ingest.lake import raw_objects
from edge_agent.config import AgentConfig
from edge_agent.pipeline import buffer, rawdata
from edge_agent.store import Store
from shared.readings import ReadingChunk

S = 10**9
T0 = 1_790_000_000 * S
HOUR = 3600 * S

#: name → (readings per second, values of an hour of n readings)
CASES: dict[str, tuple[float, Callable[[int, np.random.Generator], np.ndarray]]] = {
    # DS18B20: 1/16 °C steps (its datasheet's 12-bit resolution)
    "DS18B20 1 Hz, 1/16 °C steps": (
        1.0, lambda n, rng: np.round((21 + np.cumsum(rng.normal(0, 0.02, n))) * 16) / 16
    ),
    # a BME280's humidity as ESPHome reports it: two decimals
    "BME280 humidity 1 Hz, 0.01 %": (
        1.0, lambda n, rng: np.round(45 + np.cumsum(rng.normal(0, 0.05, n)), 2)
    ),
    "full-precision noise 1 Hz": (1.0, lambda n, rng: rng.normal(20, 3, n)),
    "ADC 10 Hz, 12-bit counts": (
        10.0, lambda n, rng: np.clip(np.round(2048 + rng.normal(0, 40, n)), 0, 4095)
    ),
}  # fmt: skip


def fill(store: Store, rate: float, values: np.ndarray) -> None:
    reg = buffer.SensorRegistry(store)
    n = len(values)
    ts = T0 + (np.arange(n) * (S / rate)).astype(np.int64)
    with store.tx():
        for i in range(n):
            chunk = ReadingChunk("node-1", "probe", "u", ts[i : i + 1], values[i : i + 1])
            buffer.store_one(store, reg, chunk, f"m{i}".encode())
        for k in range(20):  # the other sensors: a minute's worth each, in one chunk
            other = ReadingChunk("node-2", f"s{k}", "u", ts[:60], values[:60])
            buffer.store_one(store, reg, other, f"o{k}".encode())


def run_case(
    name: str, rate: float, make: Callable[[int, np.random.Generator], np.ndarray], repeat: int
) -> dict[str, float]:
    n = int(3600 * rate)
    values = make(n, np.random.default_rng(7))
    cfg = AgentConfig(device_id="pi-0042")
    icfg = IngestConfig()
    device_s, cloud_s = [], []
    size = messages = 0
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "b.sqlite", synchronous="normal")
        fill(store, rate, values)
        request = rawdata.RawRequest("node-1/probe", T0, T0 + HOUR)
        for r in range(repeat):
            started = time.perf_counter()
            with store.tx():
                answer = rawdata.queue(store, cfg, f"c-{r}", request, T0 + 2 * HOUR)
            device_s.append(time.perf_counter() - started)
            rows = store.conn.execute("SELECT payload FROM raw").fetchall()
            payloads = [bytes(p) for (p,) in rows]
            with store.tx():
                store.conn.execute("DELETE FROM raw")
            assert answer["readings"] == n, answer
            size, messages = sum(map(len, payloads)), len(payloads)
            started = time.perf_counter()
            for p in payloads:
                d = decode_message("telemetry/v1/pi-0042/raw", p, icfg)
                assert d.raw is not None, d.error
                raw_objects("pi-0042", d.raw)
            cloud_s.append(time.perf_counter() - started)
        store.close()
    return {
        "readings": n,
        "bytes": size,
        "messages": messages,
        "bytes_per_reading": size / n,
        "device_ms": 1000 * statistics.median(device_s),
        "cloud_ms": 1000 * statistics.median(cloud_s),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5, help="requests per case (median reported)")
    args = ap.parse_args()
    print(
        f"{'case':32} {'readings':>8} {'bytes':>8} {'msgs':>4} {'B/reading':>9} "
        f"{'device ms':>9} {'cloud ms':>8} {'at 10 kB/s':>10}"
    )
    for name, (rate, make) in CASES.items():
        r = run_case(name, rate, make, args.repeat)
        print(
            f"{name:32} {r['readings']:8d} {r['bytes']:8d} {r['messages']:4d} "
            f"{r['bytes_per_reading']:9.2f} {r['device_ms']:9.1f} {r['cloud_ms']:8.1f} "
            f"{r['bytes'] / 10_000:9.1f}s"
        )


if __name__ == "__main__":
    main()
