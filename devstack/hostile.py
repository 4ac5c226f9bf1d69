"""Hostile input for the tests and the fuzz benchmark: messages that once stopped a
component (issue 9), and a mutator that makes more from valid ones.

Each known crasher comes with the reason it must be quarantined with.
"""

from __future__ import annotations

import json
import random
import struct
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from shared.health import HealthReport
from shared.sketch import DDSketch
from shared.wire import STAT_FIELDS, SensorRef, WindowSpec, encode_batch, make_batch

W = 10_000_000_000


def valid_batch(device: str = "dev-1", seq: int = 7, rows: int = 3, start_ns: int = 0) -> bytes:
    """A valid batch, uncompressed (so that its header is easy to rewrite)."""
    return encode_batch(
        make_batch(
            device_id=device,
            seq=seq,
            created_ns=1,
            window=WindowSpec("tumbling", W),
            sensors=(SensorRef("n1", "t", "degC"),),
            columns={
                "sensor": np.zeros(rows),
                "start_ns": start_ns + np.arange(rows) * W,
                "count": np.full(rows, 2),
                "invalid": np.zeros(rows),
                **{f: np.full(rows, 1.5) for f in STAT_FIELDS},
            },
            sketch=tuple(DDSketch.from_values(np.array([1.5, 1.5])).encode() for _ in range(rows)),
        ),
        compress=False,
    )


def split(payload: bytes) -> tuple[dict[str, Any], bytes]:
    """An uncompressed batch as (header, column bytes)."""
    (hlen,) = struct.unpack_from("<I", payload, 10)
    return json.loads(payload[14 : 14 + hlen]), payload[14 + hlen :]


def with_header(header: dict[str, Any], columns: bytes) -> bytes:
    hb = json.dumps(header).encode()
    body = struct.pack("<I", len(hb)) + hb + columns
    return struct.pack("<4sBBI", b"TLMB", 1, 0, len(body)) + body


def poison_batches(device: str, seq: int) -> list[tuple[bytes, str]]:
    """Batches that once stopped cloud-ingest, each with its quarantine reason."""
    header, cols = split(valid_batch(device, seq))
    out = []
    for change, reason in (
        ({"window": {"kind": "tumbling", "width_ns": 2**63}}, "bad-window"),
        ({"created_ns": 2**63}, "bad-header"),
        ({"seq": 2**64}, "bad-seq"),
        ({"sensors": [{"node": "n1", "name": "t", "unit": "deg\nC"}]}, "bad-sensor"),
    ):
        out.append((with_header({**header, **change}, cols), reason))
    return out


ALERT: dict[str, Any] = {
    "seq": 5,
    "rule": "hot",
    "kind": "threshold",
    "node": "n1",
    "sensor": "t",
    "state": "raised",
    "ts_ns": 10,
    "value": 61.5,
    "message": "too hot",
}


def poison_alerts(seq: int) -> list[bytes]:
    """Alerts that once stopped cloud-ingest or were wrongly accepted (all ``bad-alert``)."""
    base = {**ALERT, "seq": seq}
    return [
        json.dumps({**base, "seq": 2**64}).encode(),
        json.dumps({**base, "ts_ns": 2**63}).encode(),
        json.dumps({k: v for k, v in base.items() if k != "value"}).encode(),
        json.dumps({**base, "rule": "a\nb"}).encode(),
    ]


def valid_health(seq: int = 11, ts_ns: int = 1_800_000_000 * 10**9) -> bytes:
    """A health report as an agent sends it (shared/health.py)."""
    return HealthReport(
        seq=seq,
        ts_ns=ts_ns,
        version="0.1.0",
        reason="interval",
        problems=("dropping", "behind"),
        uptime_s=3600.5,
        intake_up=True,
        forward_up=True,
        backlog_batches=4,
        backlog_readings=4000,
        backlog_bytes=2048,
        disk_used_bytes=1 << 20,
        disk_budget_bytes=1 << 30,
        readings_stored=123_456,
        oldest_unsent_age_s=700.0,
        clock_offset_s=-0.25,
        clock_rtt_s=0.01,
        drops={"dropped_late": 3, "dropped_made_up": 2},
    ).encode()


def poison_health(seq: int) -> list[bytes]:
    """Health reports that must be quarantined (all ``bad-health``)."""
    base = json.loads(valid_health(seq))
    return [
        json.dumps({**base, "seq": 2**64}).encode(),
        json.dumps({**base, "backlog_batches": -1}).encode(),
        json.dumps({**base, "drops": {"dropped late": 1}}).encode(),
        json.dumps({**base, "drops": {f"d{i}": 1 for i in range(33)}}).encode(),
        json.dumps({**base, "state": "ok"}).encode(),  # not the worst of its problems
        json.dumps({**base, "version": "1\n2"}).encode(),  # a control character
        json.dumps({k: v for k, v in base.items() if k != "clock_offset_s"}).encode(),
    ]


def poison_chunks() -> list[tuple[bytes, str]]:
    """Local reading chunks that once stopped the agent's intake, with their reasons."""
    return [
        (b'{"ts": [' + b"9" * 5000 + b'], "values": [1.0]}', "bad-json"),
        (b"[" * 100_000 + b"]" * 100_000, "bad-json"),
        (b'{"ts": [1], "values": [1], "unit": "deg\\nC"}', "bad-chunk"),
    ]


def mutate(payload: bytes, rng: random.Random) -> bytes:
    """A random damage of ``payload``: flipped bytes, a cut, an insert, a splice."""
    data = bytearray(payload)
    kind = rng.randrange(5)
    if kind == 0 and data:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif kind == 1:
        del data[rng.randrange(len(data) + 1) :]
    elif kind == 2:
        at = rng.randrange(len(data) + 1)
        data[at:at] = rng.randbytes(rng.randint(1, 64))
    elif kind == 3 and data:
        bit = rng.randrange(len(data) * 8)
        data[bit // 8] ^= 1 << (bit % 8)
    else:
        data = bytearray(rng.randbytes(rng.randint(0, 2 * len(data) + 1)))
    return bytes(data)


# ---- one authenticated device that costs the fleet (issue 20) ---------------------------


def device_batch(
    device: str,
    seq: int,
    starts: list[int],
    sensors: list[str],
    *,
    generation: int = 0,
    count: int = 3,
) -> bytes:
    """A valid batch of ``device``: every sensor in every window of ``starts``."""
    rows = [(i, st) for st in starts for i in range(len(sensors))]
    return encode_batch(
        make_batch(
            device_id=device,
            seq=seq,
            created_ns=max(0, max(starts)),
            window=WindowSpec("tumbling", W),
            sensors=tuple(SensorRef("n1", s, "u") for s in sensors),
            columns={
                "sensor": [i for i, _ in rows],
                "start_ns": [st // W * W for _, st in rows],
                "count": [count] * len(rows),
                "invalid": [0] * len(rows),
                **{f: [1.0] * len(rows) for f in STAT_FIELDS},
            },
            generation=generation,
        )
    )


def new_series_batches(
    device: str, first_seq: int, batches: int, per_batch: int, start_ns: int
) -> list[bytes]:
    """Batches whose every sensor name is new (a counter or a MAC in the name): what
    filled InfluxDB's max-values-per-tag for the whole fleet."""
    return [
        device_batch(
            device,
            first_seq + b,
            [start_ns],
            [f"x-{b:04d}-{i:05d}" for i in range(per_batch)],
        )
        for b in range(batches)
    ]


DAY_NS = 86_400 * 10**9


def time_attack_batches(device: str, first_seq: int, now_ns: int) -> list[tuple[bytes, str]]:
    """Batches that made thousands of lake objects and InfluxDB shards, each with the
    reason the ingestor quarantines it for: windows once a day going back a year, a
    window in the year 1678, and one a week ahead."""
    day = now_ns // DAY_NS * DAY_NS
    return [
        (device_batch(device, first_seq, [day - k * DAY_NS for k in range(365)], ["t"]),
         "time-too-old"),
        (device_batch(device, first_seq + 1, [day, day - 2 * DAY_NS], ["t"]),
         "time-span"),
        (device_batch(device, first_seq + 2, [-9_200_000_000 * 10**9], ["t"]), "time-too-old"),
        (device_batch(device, first_seq + 3, [now_ns + 7 * DAY_NS], ["t"]), "time-too-new"),
    ]  # fmt: skip


def flood(publish: Callable[[bytes], object], rate: float, count: int) -> None:
    """``count`` bad messages through ``publish``, paced at ``rate`` a second (in
    steps of a twentieth of a second): one device's flood."""
    step = max(1, int(rate // 20))
    t0 = time.monotonic()
    for k in range(count):
        publish(b"junk %08d" % k)
        if k % step == step - 1:
            ahead = t0 + (k + 1) / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)  # the flood's own pace, not a wait for a result


def future_alert(seq: int, now_ns: int) -> bytes:
    """An alert 400 days ahead of the cloud's clock."""
    return json.dumps({**ALERT, "seq": seq, "ts_ns": now_ns + 400 * DAY_NS}).encode()
