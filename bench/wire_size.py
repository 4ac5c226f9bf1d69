"""Bytes on the wire per window point: wire format v1 against InfluxDB line protocol.

Builds batches from simulator-like data (the same sensor models), encodes them
with shared.wire and as line protocol with cloud_ingest.sinks.lineproto, and reports
bytes per point for both, for a few batch sizes, with and without sketches.

It also measures candidate encodings for a later wire format (none of them is a
format yet): the body's float columns byte-shuffled before zstd (each byte of
the eight of a float64 in a plane of its own), and the sketches' bin counts as
one byte each (counts above 254 escaped) in one plane; the rest as in v1.

    .venv/bin/python bench/wire_size.py
"""

from __future__ import annotations

import dataclasses

import numpy as np
import zstandard

from cloud_ingest.sinks.lineproto import batch_to_lines
from edge_agent.pipeline.kernels import segment_windows, window_stats
from firmware_sim.config import DEFAULT_NODES
from firmware_sim.sensors import chunk_times, chunk_values
from shared.sketch import DDSketch
from shared.wire import COLUMNS, Batch, SensorRef, WindowSpec, encode_batch, make_batch

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


def _planes(a: np.ndarray) -> bytes:
    """The bytes of ``a``, byte 0 of every value first, then byte 1 ..."""
    b = np.ascontiguousarray(a).view(np.uint8).reshape(len(a), -1)
    return b.T.tobytes()


def candidate_size(b: Batch, sketches: bool) -> int:
    """Bytes of the batch with float columns shuffled, and sketches with one-byte
    counts, the rest (header, integer columns, sketch headers) as in v1."""
    z = zstandard.ZstdCompressor(level=3)
    plain = len(encode_batch(dataclasses.replace(b, sketch=()), compress=False))
    floats = [name for name, (dt, _) in COLUMNS.items() if dt == "float64"]
    rest = plain - 8 * b.rows * len(floats)  # preamble, header and integer columns
    body = [_planes(getattr(b, name)) for name in floats]
    if sketches:
        heads, counts = [], []
        for blob in b.sketch:
            sk = DDSketch.decode(blob)
            heads.append(np.array([sk.zero], dtype=np.uint64).tobytes())
            for bins in (sk.pos, sk.neg):
                lo = min(bins) if bins else 0
                dense = np.zeros(max(bins) - lo + 1 if bins else 0, dtype=np.uint32)
                for k, v in bins.items():
                    dense[k - lo] = v
                heads.append(np.array([lo, len(dense)], dtype=np.int32).tobytes())
                counts.append(dense)
        c = np.concatenate(counts) if counts else np.zeros(0, np.uint32)
        body += [b"".join(heads), np.minimum(c, 255).astype(np.uint8).tobytes(),
                 c[c >= 255].astype(np.uint32).tobytes()]  # fmt: skip
    head = encode_batch(dataclasses.replace(b, sketch=()), compress=False)[:rest]
    return len(z.compress(head + b"".join(body)))


def main() -> None:
    print("bytes per window point; in brackets, the ratio to line protocol")
    print(
        f"{'windows':>8} {'sensors':>8} {'line proto':>11} {'v1':>15} {'v1+sketch':>15}"
        f" {'cand.':>15} {'cand.+sketch':>15}"
    )
    for seconds, copies in ((10, 1), (60, 1), (60, 10), (600, 10)):
        b = batch_for(seconds, copies)
        rows = b.rows
        lp = len("\n".join(batch_to_lines(b)).encode()) / rows
        sizes = [
            len(encode_batch(dataclasses.replace(b, sketch=()))) / rows,
            len(encode_batch(b)) / rows,
            candidate_size(b, False) / rows,
            candidate_size(b, True) / rows,
        ]
        cells = " ".join(f"{v:>7.1f} (x{v / lp:.2f})" for v in sizes)
        print(f"{rows:>8} {3 * copies:>8} {lp:>11.1f} {cells}")


if __name__ == "__main__":
    main()
