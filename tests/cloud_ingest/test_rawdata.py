"""Raw readings in the ingestor (docs/commands.md): a message becomes one lake object
per UTC day under ``raw/``, value for value, optionally InfluxDB points; a resend
overwrites its own objects; a bad or another device's message is quarantined and
answered ``rejected``; a time outside the quotas is refused like a batch's."""

from __future__ import annotations

import asyncio

import numpy as np

from cloud_ingest.config import IngestConfig
from cloud_ingest.ingest.process import Processor
from cloud_ingest.lake import RAW, day, list_objects, read_table
from shared.config import from_dict
from shared.rawdata import DAY_NS, RawReadings
from tests.cloud_ingest.test_process import PREFIX, FakePoints, FakeStore

NOW = 1_790_000_000 * 10**9
MIDNIGHT = NOW // DAY_NS * DAY_NS


def raw(device: str = "dev-1", seq: int = 9, ts: np.ndarray | None = None) -> RawReadings:
    ts = MIDNIGHT + np.arange(-3, 3, dtype=np.int64) * 10**9 if ts is None else ts
    values = np.array([1.0, np.nan, 2.5, np.inf, -4.0, 0.125])[: len(ts)]
    return RawReadings(device, seq, "c-1", 2, "n1", "temp", "°C", NOW, ts, values, generation=4)


def handle(proc: Processor, *msgs: tuple[str, bytes]) -> list[str]:
    return [o.result for o in asyncio.run(proc.handle_group(list(msgs)))]


def test_a_raw_message_is_in_the_lake_value_for_value_one_object_per_day() -> None:
    points, store = FakePoints(), FakeStore()
    cfg = from_dict(IngestConfig, {"influx": {"raw_measurement": "raw"}})
    proc = Processor(cfg, points, store)
    msg = (f"{PREFIX}/dev-1/raw", raw().encode())
    out = asyncio.run(proc.handle_group([msg]))
    assert out[0].result == "written" and out[0].ack is not None
    assert (out[0].ack.seq, out[0].ack.status, out[0].ack.generation) == (9, "stored", 4)
    objects = list_objects(store, RAW)  # type: ignore[arg-type]
    assert [(k.dt, k.device_id, k.seq) for k, _ in objects] == [
        (day(MIDNIGHT - 1), "dev-1", 9),
        (day(MIDNIGHT), "dev-1", 9),
    ]
    tables = [read_table(store.objects[key]) for _, key in objects]
    rows = [t.to_pydict() for t in tables]
    got_ts = np.concatenate([t.column("ts").cast("int64").to_numpy() for t in tables])
    got_v = np.concatenate([np.array(r["value"]) for r in rows])
    assert got_ts.tolist() == raw().ts.tolist() and got_v.tobytes() == raw().values.tobytes()
    assert {x for r in rows for x in r["request"]} == {"c-1"}
    assert {x for r in rows for x in r["unit"]} == {"°C"}
    # InfluxDB gets the finite readings only (line protocol has no NaN)
    (lines,) = points.requests
    assert len(lines) == 4 and lines[0].startswith(
        "raw,device_id=dev-1,node=n1,sensor=temp,unit=°C "
    )
    c = proc.stats.counters
    assert c["raw_received"] == 1 and c["raw_written"] == 1 and c["raw_readings_written"] == 6
    # the same message again (a lost ack): answered, the objects as they were
    before = dict(store.objects)
    assert handle(proc, msg) == ["duplicate"] and store.objects == before
    proc.close()


def test_a_raw_message_without_influx_writes_the_lake_only() -> None:
    points, store = FakePoints(), FakeStore()
    proc = Processor(from_dict(IngestConfig, {}), points, store)
    assert handle(proc, (f"{PREFIX}/dev-1/raw", raw().encode())) == ["written"]
    assert points.requests == [] and len(list_objects(store, RAW)) == 2  # type: ignore[arg-type]
    proc.close()


def test_bad_raw_messages_are_quarantined_and_rejected() -> None:
    points, store = FakePoints(), FakeStore()
    proc = Processor(from_dict(IngestConfig, {}), points, store)
    old = raw(seq=3, ts=np.array([NOW - 200 * DAY_NS]))
    damaged = bytearray(raw(seq=5).encode())
    damaged[-6] ^= 1
    out = asyncio.run(
        proc.handle_group(
            [
                (f"{PREFIX}/dev-2/raw", raw(seq=1).encode()),  # another device's
                (f"{PREFIX}/dev-1/raw", old.encode()),
                (f"{PREFIX}/dev-1/raw", bytes(damaged)),
                (f"{PREFIX}/dev-1/raw", b"TLMR\x01\x00junk"),
            ]
        )
    )
    assert [o.result for o in out] == ["quarantined"] * 4
    assert [o.ack.seq if o.ack else None for o in out] == [1, 3, None, None]
    assert all(o.ack is None or o.ack.status == "rejected" for o in out)
    c = proc.stats.counters
    assert c["quarantined_device-mismatch"] == 1 and c["quarantined_time-too-old"] == 1
    assert c["quarantined_bad-compression"] == 1 and c["quarantined_too-large"] == 1
    assert list_objects(store, RAW) == []  # type: ignore[arg-type]
    proc.close()
