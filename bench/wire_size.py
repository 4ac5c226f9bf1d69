"""Bytes on the uplink: per window point, and per device-month.

Two measurements, both on the simulator's sensor models at their parts'
resolutions (firmware_sim/parts.py; ``--full-precision`` for unrounded noise):

1. ``points``: wire format v1 against InfluxDB line protocol, bytes per window
   point for a few batch sizes, with and without sketches.
2. ``month``: the uplink of a reference device in MB per 30-day month, and the
   levers that move it, one at a time and together. The reference device has
   20 sensors at 1 Hz (the kinds temperature, humidity, pressure, ADC and
   vibration in turn, four of each) and 10-second windows, and sends one batch
   per window close, as the agent does while its link is up. A month is one
   simulated hour times 720. Each figure counts the MQTT PUBLISH packets of
   the batches (fixed header, topic, packet id, the properties the agent sets,
   payload) and the device's PUBACK of each ack; TCP/IP and TLS come on top
   (docs/benchmarks.md gives the estimate).

The levers marked "candidate" are encodings that wire format v1 cannot carry
(they are not a wire format yet: docs/wire-format.md §2.6 would make them v2);
the others need no format change.

    .venv/bin/python bench/wire_size.py [points|month|all] [--full-precision]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import struct
from collections.abc import Callable, Sequence

import numpy as np
import zstandard
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cloud_ingest.sinks.lineproto import batch_to_lines
from edge_agent.pipeline.kernels import segment_windows, window_stats
from firmware_sim.config import DEFAULT_NODES
from firmware_sim.fleet import FLEET_KINDS
from firmware_sim.parts import PARTS, quantize
from firmware_sim.sensors import chunk_times, chunk_values, signal
from shared.mqttprops import packed_len, publish_properties
from shared.sketch import DDSketch, encode_windows
from shared.topics import batch_topic
from shared.wire import (
    COLUMNS,
    CONTENT_TYPE,
    FORMAT_VERSION,
    Batch,
    SensorRef,
    WindowSpec,
    encode_batch,
    make_batch,
)

WIDTH = 10_000_000_000
T0 = 1_790_000_000 * 10**9
MONTH_HOURS = 30 * 24
FLOATS = [name for name, (dt, _) in COLUMNS.items() if dt == "float64"]
QUANTILES = ("p50", "p90", "p99")
_Z = zstandard.ZstdCompressor(level=3, write_checksum=True)


# -- 1. bytes per point against line protocol ------------------------------------


def batch_for(seconds: int, copies: int, full: bool) -> Batch:
    sensors: list[SensorRef] = []
    sketches: list[bytes] = []
    cols: dict[str, list[np.ndarray]] = {}
    for c in range(copies):
        for ni, node in enumerate(DEFAULT_NODES):
            for si, spec in enumerate(node.sensors):
                if full:
                    spec = dataclasses.replace(spec, resolution=0.0)
                n_chunks = int(seconds * spec.rate_hz) // spec.chunk
                ts = np.concatenate([chunk_times(spec, T0, k) for k in range(n_chunks)])
                vals = np.concatenate(
                    [
                        chunk_values(spec, chunk_times(spec, T0, k), c, ni, si, k)
                        for k in range(n_chunks)
                    ]
                )
                starts, segs = segment_windows(ts, WIDTH)
                for k, v in window_stats(vals, segs).columns().items():
                    cols.setdefault(k, []).append(v)
                sketches += encode_windows(vals, segs)
                cols.setdefault("sensor", []).append(np.full(len(starts), len(sensors)))
                cols.setdefault("start_ns", []).append(starts)
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


def points(full: bool) -> None:
    print("bytes per window point; in brackets, the ratio to line protocol")
    print(f"{'windows':>8} {'sensors':>8} {'line proto':>11} {'v1':>15} {'v1+sketch':>15}")
    for seconds, copies in ((10, 1), (60, 1), (60, 10), (600, 10)):
        b = batch_for(seconds, copies, full)
        lp = len("\n".join(batch_to_lines(b)).encode()) / b.rows
        sizes = [len(encode_batch(dataclasses.replace(b, sketch=()))), len(encode_batch(b))]
        cells = " ".join(f"{v / b.rows:>7.1f} (x{v / b.rows / lp:.2f})" for v in sizes)
        print(f"{b.rows:>8} {3 * copies:>8} {lp:>11.1f} {cells}")


# -- 2. the reference device's month ---------------------------------------------


@dataclasses.dataclass(frozen=True)
class Closes:
    """One simulated hour of the reference device: per window close, its rows."""

    refs: tuple[SensorRef, ...]
    starts: np.ndarray  # window starts
    stats: list[dict[str, np.ndarray]]  # per sensor: column -> value per window
    values: list[np.ndarray]  # per sensor: the readings
    segs: np.ndarray  # window boundaries in each sensor's readings (1 Hz: the same)


def reference_hour(full: bool, sensors: int = 20, rate_hz: float = 1.0) -> Closes:
    n = int(3600 * rate_hz)
    ts = T0 + (np.arange(n) * round(1e9 / rate_hz)).astype(np.int64)
    rng = np.random.default_rng(1)
    starts, segs = segment_windows(ts, WIDTH)
    stats, values = [], []
    for j in range(sensors):
        kind = FLEET_KINDS[j % len(FLEET_KINDS)]
        v = quantize(signal(kind, ts, rng) + rng.normal(0.0, 1.0), kind, 0.0 if full else None)
        stats.append(window_stats(v, segs).columns())
        values.append(v)
    refs = tuple(
        SensorRef("n1", f"s{j:02d}", PARTS[FLEET_KINDS[j % len(FLEET_KINDS)]].unit)
        for j in range(sensors)
    )
    return Closes(refs, starts, stats, values, segs)


@dataclasses.dataclass(frozen=True)
class Lever:
    """How the reference device sends its hour: which columns, which sketches,
    how many window closes per batch, and how the batch is encoded."""

    quantiles: bool = True
    closes_per_batch: int = 1
    alpha: float = 0.01
    sketch_windows: int = 1  # one sketch per sensor per this many windows
    drop_mean: bool = False  # candidate
    scaled: bool = False  # candidate: floats as integers of a decimal or binary step
    binary_header: bool = False  # candidate
    compact_sketches: bool = False  # candidate: varints, one alpha per batch
    by_sensor: bool = False  # rows ordered by sensor, then time (v1 allows it)
    v2: bool = False  # wire format v2 as built (shared/wire.py, docs/wire-format.md §2.14)


def batches(h: Closes, lever: Lever) -> list[tuple[Batch, list[bytes]]]:
    """The hour's batches (sketch column left empty) and each one's sketches."""
    nsens, nwin = len(h.refs), len(h.starts)
    sketch_of: list[list[bytes]] = []  # per sensor, per sketch period
    for v in h.values:
        per = lever.sketch_windows
        bounds = h.segs[::per]
        sketch_of.append(
            [DDSketch.from_values(v[a:b], lever.alpha).encode()
             for a, b in zip(bounds.tolist(), [*bounds[1:].tolist(), len(v)], strict=True)]
        )  # fmt: skip
    out = []
    for first in range(0, nwin, lever.closes_per_batch):
        wins = range(first, min(nwin, first + lever.closes_per_batch))
        cols: dict[str, list[float]] = {"sensor": [], "start_ns": []}
        sketches: list[bytes] = []
        order = [(w, j) for w in wins for j in range(nsens)]
        if lever.by_sensor:  # a sensor's windows next to each other
            order.sort(key=lambda wj: (wj[1], wj[0]))
        for w, j in order:
            if True:
                cols["sensor"].append(j)
                cols["start_ns"].append(int(h.starts[w]))
                for name, col in h.stats[j].items():
                    cols.setdefault(name, []).append(col[w])
                if lever.quantiles and (w + 1) % lever.sketch_windows == 0:
                    sketches.append(sketch_of[j][w // lever.sketch_windows])
        b = make_batch(
            device_id="pi-0042",
            seq=first + 1,
            created_ns=int(h.starts[wins[-1]]) + WIDTH,
            window=WindowSpec("tumbling", WIDTH),
            sensors=h.refs,
            columns=cols,
            generation=5_871_133_021_644_519_207,
        )
        out.append((b, sketches))
    return out


def _varints(values: Sequence[int] | np.ndarray) -> bytes:
    out = bytearray()
    for x in values:
        x = int(x)
        while x >= 0x80:
            out.append((x & 0x7F) | 0x80)
            x >>= 7
        out.append(x)
    return bytes(out)


def _zigzag(x: int) -> int:
    return (x << 1) ^ (x >> 63)


def _compact_sketch(blob: bytes) -> bytes:
    sk = DDSketch.decode(blob)
    parts = [_varints([sk.zero])]
    for store in (sk.pos, sk.neg):
        if not store:
            parts.append(b"\x00")
            continue
        lo, hi = min(store), max(store)
        parts.append(_varints([hi - lo + 1, _zigzag(lo)]))
        parts.append(_varints([store.get(k, 0) for k in range(lo, hi + 1)]))
    return b"".join(parts)


def _step_of(v: np.ndarray) -> float | None:
    """The coarsest decimal (10^-d) or binary (2^-k) step of which every value of
    ``v`` is a whole multiple, exactly (the float64 that parsing the decimal gives),
    or None. A sensor's readings are; its min, max, first and last are readings."""
    v = v[np.isfinite(v)]
    for step in STEPS:
        ints = np.round(v / step)
        if np.all(np.abs(ints) < 2**53) and np.array_equal(_times(ints, step), v):
            return step
    return None


#: the steps tried, coarsest first: 1, 0.1 ... 1e-6, then 1/2 ... 1/2^30
STEPS = [10.0**-d for d in range(7)] + [2.0**-k for k in range(1, 31)]


def _times(ints: np.ndarray, step: float) -> np.ndarray:
    """What a decoder computes: ``ints`` steps of ``step`` (a division for a decimal
    step, so that the result is the float64 nearest the decimal)."""
    if step < 1 and round(1 / step) == 1 / step and np.log10(1 / step) % 1 == 0:
        return ints / round(1 / step)
    return ints * step


def _float_column(v: np.ndarray, steps: np.ndarray | None) -> bytes:
    """Plain f64, or (``steps``: each row's sensor step, NaN for none) a bitmap of the
    rows whose value is a whole number of steps, their zigzag varints, and the f64 of
    the rest."""
    if steps is None:
        return v.astype("<f8").tobytes()
    ok = np.zeros(len(v), dtype=bool)
    ints = np.zeros(len(v), dtype=np.int64)
    for step in np.unique(steps[np.isfinite(steps)]):
        rows = steps == step
        k = np.round(v[rows] / step)
        exact = np.isfinite(v[rows]) & (np.abs(k) < 2**53) & (_times(k, step) == v[rows])
        ok[rows] = exact
        ints[rows] = np.where(exact, k, 0).astype(np.int64)
    return (
        np.packbits(ok).tobytes()
        + ints[ok].astype("<i4").tobytes()
        + v[~ok].astype("<f8").tobytes()
    )


def _binary_header(b: Batch, col_bytes: list[tuple[int, int]]) -> bytes:
    def text(s: str) -> bytes:
        raw = s.encode()
        return bytes([len(raw)]) + raw

    head = text(b.device_id) + _varints([b.seq, b.created_ns, b.generation, b.window.width_ns])
    head += _varints([len(b.sensors)])
    for s in b.sensors:
        head += text(s.node) + text(s.name) + text(s.unit)
    head += _varints([b.rows, len(col_bytes)])
    for code, size in col_bytes:
        head += _varints([code, size])
    return head


def payload(b: Batch, sketches: list[bytes], lever: Lever) -> bytes:
    """The batch as v1 (``lever`` without candidates) or as the candidate encoding."""
    names = [n for n in COLUMNS if lever.quantiles or n not in QUANTILES]
    if lever.drop_mean:
        names.remove("mean")
    candidate = lever.drop_mean or lever.scaled or lever.binary_header or lever.compact_sketches
    if lever.v2:
        payload = encode_batch(dataclasses.replace(b, sketch=tuple(sketches)), version=2)
        assert payload[4] == 2, "v2 fell back to v1"
        return payload  # without quantiles: without sketches (v2 has the p-columns)
    if not candidate:
        cut = dataclasses.replace(b, sketch=tuple(sketches))
        if not lever.quantiles:  # v1 cannot leave its columns out: cut them from the bytes
            return _v1_without(cut, names)
        return encode_batch(cut)
    blobs: list[bytes] = []
    steps = None
    if lever.scaled:  # each sensor's step, from its readings in the batch
        per_sensor = np.full(len(b.sensors), np.nan)
        for j in range(len(b.sensors)):
            rows = b.sensor == j
            seen = np.concatenate([b.min[rows], b.max[rows], b.first[rows], b.last[rows]])
            found = _step_of(seen)
            per_sensor[j] = np.nan if found is None else found
        steps = per_sensor[b.sensor]
        blobs.append(per_sensor.astype("<f8").tobytes())  # the steps travel once a batch
    for name in names:
        col = getattr(b, name)
        if name in FLOATS:
            blobs.append(_float_column(col, steps))
        elif COLUMNS[name][1] == "delta":
            blobs.append(np.diff(col, prepend=np.int64(0)).astype("<i8").tobytes())
        else:
            blobs.append(np.ascontiguousarray(col).astype(COLUMNS[name][0]).tobytes())
    if sketches:
        if lever.compact_sketches:
            packed = [_compact_sketch(s) for s in sketches]
            blobs.append(_varints([len(p) for p in packed]) + b"".join(packed))
        else:
            offsets = np.zeros(len(sketches) + 1, dtype="<u4")
            offsets[1:] = np.cumsum([len(s) for s in sketches])
            blobs.append(offsets.tobytes() + b"".join(sketches))
    sizes = [(i, len(x)) for i, x in enumerate(blobs)]
    if lever.binary_header:
        head = _binary_header(b, sizes)
    else:
        listed = ["steps"] * lever.scaled + names + ["sketch"] * bool(sketches)
        head = json.dumps(_json_header(b, listed, blobs), separators=(",", ":")).encode()
    body = struct.pack("<I", len(head)) + head + b"".join(blobs)
    return struct.pack("<4sBBI", b"TLMB", 2, 1, len(body)) + _Z.compress(body)


def _json_header(b: Batch, listed: list[str], blobs: list[bytes]) -> dict[str, object]:
    """v1's header (the same keys, a directory entry per column as v1 writes it)."""
    cols = [
        {"name": n, "type": COLUMNS.get(n, ("bytes", ""))[0], "encoding": "plain", "bytes": len(x)}
        for n, x in zip(listed, blobs, strict=True)
    ]
    return _header(b, cols)


def _header(b: Batch, columns: list[dict[str, object]]) -> dict[str, object]:
    """The JSON header v1 writes for ``b`` with this column directory."""
    return {
        "device_id": b.device_id,
        "seq": b.seq,
        "created_ns": b.created_ns,
        "window": {"kind": b.window.kind, "width_ns": b.window.width_ns},
        "sensors": [{"node": s.node, "name": s.name, "unit": s.unit} for s in b.sensors],
        "rows": b.rows,
        "columns": columns,
        "generation": b.generation,
    }


def _v1_without(b: Batch, names: list[str]) -> bytes:
    """v1 bytes of the batch with only ``names`` (and no sketches): what v1 would be if
    its quantile columns were optional to send (they are, as columns added within v1,
    for a decoder; the reference encoder always writes them)."""
    blobs, meta = [], []
    for name in names:
        dtype, encoding = COLUMNS[name]
        col = getattr(b, name)
        if encoding == "delta":
            col = np.diff(col, prepend=np.int64(0))
        data = np.ascontiguousarray(col, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()
        blobs.append(data)
        meta.append({"name": name, "type": dtype, "encoding": encoding, "bytes": len(data)})
    head = json.dumps(_header(b, meta), separators=(",", ":")).encode()
    body = struct.pack("<I", len(head)) + head + b"".join(blobs)
    return struct.pack("<4sBBI", b"TLMB", FORMAT_VERSION, 1, len(body)) + _Z.compress(body)


def _varint_len(n: int) -> int:
    return len(_varints([n]))


def publish_bytes(topic: str, seq: int, body: bytes) -> int:
    """The MQTT v5 PUBLISH packet the agent sends for a batch, QoS 1."""
    props: Properties = publish_properties(
        CONTENT_TYPE, [("seq", str(seq)), ("schema", str(FORMAT_VERSION))]
    )
    remaining = 2 + len(topic.encode()) + 2 + packed_len(props) + len(body)
    return 1 + _varint_len(remaining) + remaining


#: the device's PUBACK of the cloud's ack message (MQTT v5, reason code 0: 4 bytes)
PUBACK_BYTES = len(bytes([PacketTypes.PUBACK << 4, 2, 0, 1]))


def month(h: Closes, lever: Lever) -> tuple[float, float, int]:
    """MB per month on MQTT, bytes per window point of payload, batches per hour."""
    topic = batch_topic("pi-0042", "telemetry/v2" if lever.v2 else "telemetry/v1")
    total = payload_total = 0
    made = batches(h, lever)
    for b, sketches in made:
        body = payload(b, sketches, lever)
        payload_total += len(body)
        total += publish_bytes(topic, b.seq, body) + PUBACK_BYTES
    pts = len(h.starts) * len(h.refs)
    return total * MONTH_HOURS / 1e6, payload_total / pts, len(made)


#: the candidates that pay (floats as steps do not: below)
PAYING = {"drop_mean": True, "binary_header": True, "compact_sketches": True}

LEVERS: list[tuple[str, Lever]] = [
    ("v1 today, one batch per window close", Lever()),
    ("forward.batch_every_s = 60 (6 closes a batch)", Lever(closes_per_batch=6)),
    ("forward.batch_every_s = 300 (30 closes a batch)", Lever(closes_per_batch=30)),
    ("  the same, rows by sensor, then time", Lever(closes_per_batch=30, by_sensor=True)),
    ("sketches at 2 % accuracy", Lever(alpha=0.02)),
    ("sketches at 5 % accuracy", Lever(alpha=0.05)),
    ("wire format v2 (built: no mean, varint sketches)", Lever(v2=True)),
    ("  v2, batch_every_s = 60", Lever(closes_per_batch=6, v2=True)),
    ("  v2, batch_every_s = 300", Lever(closes_per_batch=30, v2=True)),
    ("  v2, batch_every_s = 300, by sensor", Lever(closes_per_batch=30, by_sensor=True, v2=True)),
    ("candidate: one sketch per sensor a minute", Lever(sketch_windows=6)),
    ("candidate: no mean (it is sum / count)", Lever(drop_mean=True)),
    ("candidate: floats as whole steps of the sensor", Lever(scaled=True)),
    ("candidate: binary header", Lever(binary_header=True)),
    ("candidate: sketches as varints, alpha once", Lever(compact_sketches=True)),
    ("candidates that pay (no mean, binary header, varints)", Lever(**PAYING)),
    ("  the same, batch_every_s = 60", Lever(closes_per_batch=6, **PAYING)),
    (
        "  the same, batch_every_s = 60, a sketch a minute",
        Lever(closes_per_batch=6, sketch_windows=6, **PAYING),
    ),
    ("  the same, batch_every_s = 300", Lever(closes_per_batch=30, **PAYING)),
    (
        "  the same, batch_every_s = 300, by sensor",
        Lever(closes_per_batch=30, by_sensor=True, **PAYING),
    ),
    (
        "  the same, batch_every_s = 300, by sensor, steps",
        Lever(closes_per_batch=30, by_sensor=True, scaled=True, **PAYING),
    ),
]

#: estimated TCP/IP and TLS bytes per batch on the uplink, beside MQTT's: the
#: PUBLISH and the PUBACK of the ack in TLS records (5 + 16 + 1 bytes each, TLS 1.3
#: AES-GCM), and three packets' IPv4 and TCP headers with timestamps (52 bytes:
#: PUBLISH, PUBACK, one TCP ACK for the cloud's PUBACK and ack), if none is merged
TCP_TLS_PER_BATCH = 2 * 22 + 3 * 52


def month_report(full: bool) -> None:
    h = reference_hour(full)
    print(
        f"reference device: {len(h.refs)} sensors at 1 Hz, 10 s windows, "
        f"{'full-precision noise' if full else 'part resolutions'}; MB per 30-day month "
        "on MQTT (PUBLISH of the batches + PUBACK of the acks)"
    )
    print(
        f"{'lever':<56} {'with quantiles':>22} {'without':>22} {'batches/h':>9}"
        f" {'+TCP/IP/TLS est.':>16}"
    )
    for name, lever in LEVERS:
        cells = []
        for quantiles in (True, False):
            mb, bpp, nb = month(h, dataclasses.replace(lever, quantiles=quantiles))
            cells.append(f"{mb:8.1f} MB {bpp:6.1f} B/pt")
        extra = nb * TCP_TLS_PER_BATCH * MONTH_HOURS / 1e6
        print(f"{name:<56} {cells[0]:>22} {cells[1]:>22} {nb:>9} {extra:>13.1f} MB")


def check_candidates(h: Closes) -> None:
    """The candidate float encoding is lossless: a sensor's readings are whole steps,
    and the values it encodes as steps decode bit for bit."""
    for stats, v in zip(h.stats, h.values, strict=True):
        step = _step_of(v)
        if step is None:  # full-precision noise: nothing is encoded as steps
            continue
        for name in FLOATS:
            col = stats[name]
            k = np.round(col / step)
            exact = _times(k, step) == col
            assert np.array_equal(_times(k[exact], step), col[exact]), name


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("what", nargs="?", choices=("points", "month", "all"), default="all")
    ap.add_argument("--full-precision", action="store_true", help="unrounded noise")
    args = ap.parse_args()
    runs: dict[str, Callable[[bool], None]] = {"points": points, "month": month_report}
    for name, fn in runs.items():
        if args.what in (name, "all"):
            fn(args.full_precision)
    if args.what in ("month", "all"):
        check_candidates(reference_hour(args.full_precision))


if __name__ == "__main__":
    main()
