"""The group write path of :class:`Processor`, with fakes behind its sink interfaces
(PointSink, ObjectStore). The real services are in test_ingest.py and test_fleet.py."""

from __future__ import annotations

import asyncio
import threading

import numpy as np

from cloud_ingest.config import IngestConfig
from cloud_ingest.ingest.process import Processor
from cloud_ingest.lake import archived_seqs, parse_key, read_table, table_to_batches
from shared.config import from_dict
from shared.errors import PermanentSinkError, SinkLimitError
from shared.wire import STAT_FIELDS, SensorRef, WindowSpec, encode_batch, make_batch

W = 10_000_000_000
T0 = 1_790_000_000 * 10**9
PREFIX = "telemetry/v1"


class FakePoints:
    """InfluxDB: keeps each request; a request with a line of ``bad_device`` fails for
    good (HTTP 400), one with a line of ``limited_device`` for the server's state (a
    series limit); ``gate`` holds requests."""

    def __init__(self, bad_device: str = "", limited_device: str = "") -> None:
        self.requests: list[list[str]] = []
        self.bad_device = bad_device
        self.limited_device = limited_device
        self.gate = threading.Event()
        self.gate.set()

    def write(self, lines: list[str]) -> None:
        self.gate.wait(10)
        self.requests.append(list(lines))
        if self.bad_device and any(f"device_id={self.bad_device}," in ln for ln in lines):
            raise PermanentSinkError("400: unable to parse")
        if self.limited_device and any(f"device_id={self.limited_device}," in ln for ln in lines):
            raise SinkLimitError("400: partial write: max-values-per-tag limit exceeded")

    def close(self) -> None:
        pass


class FakeStore:
    def __init__(self, refuse: str = "") -> None:
        self.objects: dict[str, bytes] = {}
        self.puts = 0
        self.refuse = refuse
        self.lock = threading.Lock()

    def put(self, key: str, data: bytes) -> None:
        if self.refuse and self.refuse in key:
            raise PermanentSinkError(f"S3 put rejected: {key}")
        with self.lock:
            self.objects[key] = data
            self.puts += 1

    def get(self, key: str) -> bytes:
        return self.objects[key]

    def list(self, prefix: str) -> list[str]:
        return sorted(k for k in self.objects if k.startswith(prefix))

    def delete(self, key: str) -> None:
        self.objects.pop(key, None)

    def close(self) -> None:
        pass


def message(device: str, seq: int, rows: int = 2, generation: int = 0) -> tuple[str, bytes]:
    b = make_batch(
        generation=generation,
        device_id=device,
        seq=seq,
        created_ns=0,
        window=WindowSpec("tumbling", W),
        sensors=(SensorRef("n1", "temp", "degC"),),
        columns={
            "sensor": np.zeros(rows),
            "start_ns": T0 + (seq * rows + np.arange(rows)) * W,
            "count": np.full(rows, 10),
            "invalid": np.zeros(rows),
            **{f: np.full(rows, 20.0) for f in STAT_FIELDS},
        },
    )
    return f"{PREFIX}/{device}/batch", encode_batch(b)


def aggregates(store: FakeStore) -> list[str]:
    keys = [k for k in store.objects if k.startswith("aggregates/")]
    assert all(parse_key(k) is not None for k in keys), keys
    return keys


def lake_rows(store: FakeStore) -> dict[tuple[str, int], int]:
    """(device, seq) → its rows in the lake, over every object."""
    out: dict[tuple[str, int], int] = {}
    for key in aggregates(store):
        for b in table_to_batches(read_table(store.objects[key])):
            out[(b.device_id, b.seq)] = out.get((b.device_id, b.seq), 0) + b.rows
    return out


def processor(points: FakePoints, store: FakeStore) -> Processor:
    return Processor(from_dict(IngestConfig, {"retry": {"initial_s": 0.01}}), points, store)


def test_a_group_shares_requests_and_gives_each_message_its_outcome() -> None:
    points, store = FakePoints(), FakeStore()
    proc = processor(points, store)
    group = [message("a", 1), message("b", 1), message("a", 1), message("a", 2)]
    group.append((f"{PREFIX}/a/batch", b"not a batch"))
    out = asyncio.run(proc.handle_group(group))
    proc.close()
    assert [o.result for o in out] == ["written", "written", "duplicate", "written", "quarantined"]
    assert [o.ack.status if o.ack else None for o in out] == [
        "stored",
        "stored",
        "stored",
        "stored",
        None,  # not even the seq can be read
    ]
    assert len(points.requests) == 1 and len(points.requests[0]) == 6  # 3 batches x 2
    # one lake object for the group, holding the three batches once
    assert len(aggregates(store)) == 1
    assert lake_rows(store) == {("a", 1): 2, ("a", 2): 2, ("b", 1): 2}
    assert sum(k.startswith("quarantine/reason=bad-magic/") for k in store.objects) == 2
    c = proc.stats.counters
    assert c["received"] == 5 and c["batches_written"] == 3 and c["duplicates"] == 1
    assert c["points_written"] == 6 and c["quarantined_bad-magic"] == 1


def test_a_new_generation_of_a_device_is_never_taken_for_a_resend_of_the_old() -> None:
    """A device whose buffer was re-created (new SD card, re-flash) counts its seqs
    from 1 again, under a new generation: its batches are written, not answered as
    duplicates of the old buffer's, and each ack names the generation it answers."""
    points, store = FakePoints(), FakeStore()
    proc = processor(points, store)

    async def main() -> list[tuple[str, int]]:
        out = await proc.handle_group([message("a", 1, generation=111)])
        out += await proc.handle_group([message("a", 1, rows=3, generation=222)])
        out += await proc.handle_group([message("a", 1, rows=3, generation=222)])  # resent
        return [(o.result, o.ack.generation if o.ack else -1) for o in out]

    assert asyncio.run(main()) == [("written", 111), ("written", 222), ("duplicate", 222)]
    proc.close()
    assert proc.stats.counters["batches_written"] == 2
    assert sum(len(r) for r in points.requests) == 5  # 2 + 3 points: nothing lost


def test_a_permanent_influx_failure_is_pinned_on_its_batch() -> None:
    points, store = FakePoints(bad_device="bad"), FakeStore()
    proc = processor(points, store)
    out = asyncio.run(proc.handle_group([message("a", 1), message("bad", 1), message("c", 1)]))
    proc.close()
    assert [o.result for o in out] == ["written", "quarantined", "written"]
    assert out[1].ack is not None and out[1].ack.reason == "sink-rejected"
    # the group's request, then one per batch to find the one at fault
    assert [len(r) for r in points.requests] == [6, 2, 2, 2]
    assert any(k.startswith("quarantine/reason=sink-rejected/") for k in store.objects)
    assert proc.stats.counters["batches_written"] == 2
    # the lake holds what InfluxDB holds: the refused batch is only in the quarantine,
    # so that a replay of the lake never meets it
    # (the group's object is written again without its rows)
    assert len(aggregates(store)) == 1
    assert lake_rows(store) == {("a", 1): 2, ("c", 1): 2}


def test_a_group_whose_batches_influx_refuses_all_leaves_no_object() -> None:
    points, store = FakePoints(bad_device="bad"), FakeStore()
    proc = processor(points, store)
    out = asyncio.run(proc.handle_group([message("bad", 1), message("bad", 2)]))
    proc.close()
    assert [o.result for o in out] == ["quarantined", "quarantined"]
    assert aggregates(store) == []


def test_a_refused_group_object_defers_the_batches_it_holds() -> None:
    """The store refusing an object for good (a size or key it will not take) is not
    about one batch in it: no device is told "rejected" (which would make it drop the
    batch); they are deferred, unanswered, and their devices send them again."""
    points, store = FakePoints(), FakeStore(refuse="aggregates/")
    proc = processor(points, store)
    out = asyncio.run(proc.handle_group([message("a", 1), message("b", 1)]))
    proc.close()
    assert [(o.result, o.ack) for o in out] == [("deferred", None), ("deferred", None)]
    assert proc.stats.counters["archive_rejected"] == 1
    assert proc.stats.counters["deferred_archive-refused"] == 2
    assert not [k for k in store.objects if k.startswith("quarantine/")]


def test_a_refusal_for_influxdbs_state_defers_only_the_batch_it_concerns() -> None:
    """InfluxDB refusing a batch for its own state (a series limit that another device
    filled) is not the batch's fault: it is deferred, never answered "rejected", and
    the other batches of the request are written. The lake holds what InfluxDB holds."""
    points, store = FakePoints(limited_device="new"), FakeStore()
    proc = processor(points, store)
    out = asyncio.run(proc.handle_group([message("a", 1), message("new", 1), message("c", 1)]))
    proc.close()
    assert [(o.result, o.ack and o.ack.status) for o in out] == [
        ("written", "stored"),
        ("deferred", None),
        ("written", "stored"),
    ]
    c = proc.stats.counters
    assert c["deferred_sink-limit"] == 1 and c["influx_limited"] == 1
    assert "influx_rejected" not in c and not any(k.startswith("quarantined_") for k in c)
    assert lake_rows(store) == {("a", 1): 2, ("c", 1): 2}
    assert not [k for k in store.objects if k.startswith("quarantine/")]


def test_a_resend_in_the_next_group_is_a_duplicate_once_the_first_is_written() -> None:
    """Groups are decoded ahead of the writes before them; whether a batch is a resend
    is decided when its group's turn to write comes, not when it is decoded."""
    points, store = FakePoints(), FakeStore()
    proc = processor(points, store)

    async def main() -> tuple[list[str], list[str]]:
        points.gate.clear()  # the first group's write waits
        first = asyncio.create_task(proc.handle_group([message("a", 1)]))
        second = asyncio.create_task(proc.handle_group([message("a", 1)], after=first))
        deadline = asyncio.get_running_loop().time() + 10
        while proc.stats.counters["received"] < 2:  # both decoded
            assert asyncio.get_running_loop().time() < deadline, "the groups were not decoded"
            await asyncio.sleep(0.01)
        points.gate.set()
        return [o.result for o in await first], [o.result for o in await second]

    assert asyncio.run(main()) == (["written"], ["duplicate"])
    proc.close()
    assert len(points.requests) == 1
    assert lake_rows(store) == {("a", 1): 2} and len(aggregates(store)) == 1


def test_a_resend_beside_new_batches_is_left_out_of_the_groups_object() -> None:
    points, store = FakePoints(), FakeStore()
    proc = processor(points, store)

    async def main() -> list[str]:
        out = await proc.handle_group([message("a", 1)])
        out += await proc.handle_group([message("a", 1), message("a", 2, rows=3)])
        return [o.result for o in out]

    assert asyncio.run(main()) == ["written", "duplicate", "written"]
    proc.close()
    assert len(aggregates(store)) == 2
    assert lake_rows(store) == {("a", 1): 2, ("a", 2): 3}  # a:1 once


def revised(device: str, seq: int, revisions: list[int], count: int) -> tuple[str, bytes]:
    """One row per revision given, all of the same window (T0), with ``count`` readings."""
    rows = len(revisions)
    b = make_batch(
        device_id=device,
        seq=seq,
        created_ns=0,
        window=WindowSpec("tumbling", W),
        sensors=tuple(SensorRef("n1", f"s{i}", "u") for i in range(rows)),
        columns={
            "sensor": np.arange(rows),
            "start_ns": np.full(rows, T0),
            "count": np.full(rows, count),
            "invalid": np.zeros(rows),
            "revision": np.array(revisions),
            **{f: np.full(rows, 20.0) for f in STAT_FIELDS},
        },
    )
    return f"{PREFIX}/{device}/batch", encode_batch(b)


def test_an_older_window_version_is_not_written_over_a_newer_one() -> None:
    """Revision 3 of s0's window is written; a stale copy of an older batch carrying its
    revision 1 (and a new window s1) arrives later: s0's line is left out, s1's written,
    the batch is acked as stored and its lake object kept (the lake keeps every version)."""
    points, store = FakePoints(), FakeStore()
    proc = processor(points, store)

    async def main() -> list[str]:
        out = await proc.handle_group([revised("a", 7, [3], 20)])
        out += await proc.handle_group([revised("a", 5, [1, 0], 12)])
        # in one group: the older version after the newer one is left out as well
        out += await proc.handle_group([revised("b", 2, [2], 9), revised("b", 1, [1], 5)])
        return [o.result for o in out]

    assert asyncio.run(main()) == ["written"] * 4
    proc.close()
    lines = [ln for r in points.requests for ln in r]
    assert [ln.split(" ")[0].split(",")[1:4] for ln in lines] == [
        ["device_id=a", "node=n1", "sensor=s0"],
        ["device_id=a", "node=n1", "sensor=s1"],  # s0's revision 1 left out
        ["device_id=b", "node=n1", "sensor=s0"],  # b's revision 1 left out
    ]
    assert "revision=3i" in lines[0] and "count=20i" in lines[0]
    assert proc.stats.counters["revisions_superseded"] == 2
    assert archived_seqs(store) == {"a": {5, 7}, "b": {1, 2}}


def test_replay_shares_the_write_path_and_leaves_the_lake_alone() -> None:
    """cloud-ingest replay writes through the same Writer: the lake written by a
    Processor goes back to InfluxDB line for line; a batch InfluxDB now refuses is
    counted as rejected, and the replay neither writes nor deletes lake objects."""
    from cloud_ingest.jobs.replay import ReplayFilter, replay

    points, store = FakePoints(), FakeStore()
    proc = processor(points, store)
    asyncio.run(proc.handle_group([message("a", 1), message("b", 1), message("a", 2, rows=3)]))
    proc.close()
    written = sorted(ln for r in points.requests for ln in r)
    before = dict(store.objects)

    again = FakePoints(bad_device="b")
    cfg = from_dict(IngestConfig, {"retry": {"initial_s": 0.01}})
    res = asyncio.run(replay(cfg, store, again, ReplayFilter()))
    assert (res.objects, res.batches, res.points, res.rejected) == (1, 3, 5, 1)
    # the requests InfluxDB took (a refused one is tried again write by write)
    ok = [r for r in again.requests if not any("device_id=b," in ln for ln in r)]
    replayed = sorted(ln for r in ok for ln in r)
    assert replayed == sorted(ln for ln in written if "device_id=b," not in ln)
    assert store.objects == before


def test_warm_up_runs_the_decode_and_encode_path_and_writes_nothing() -> None:
    points, store = FakePoints(), FakeStore()
    proc = processor(points, store)
    try:
        assert proc.warm_up() > 0
        assert points.requests == [] and store.objects == {}
        assert proc.stats.counters == {}
    finally:
        proc.close()


def test_v2_batches_on_v2_topics_are_written_as_v1_ones_are() -> None:
    """Wire format v2 (docs/wire-format.md §2.14) on telemetry/v2: the same lines and
    lake rows as the batch in v1; a payload of the other version on a topic is
    refused as unsupported-version, and its device told (its seq can be read)."""
    from shared.wire import decode_batch

    def of(device: str, version: int) -> bytes:
        payload = encode_batch(decode_batch(message(device, 1)[1]), version=version)
        assert payload[4] == version
        return payload

    written = {}
    for version in (1, 2):
        points, store = FakePoints(), FakeStore()
        proc = processor(points, store)
        group = [(f"telemetry/v{version}/a/batch", of("a", version))]
        if version == 2:
            group += [("telemetry/v1/c/batch", of("c", 2)), ("telemetry/v2/d/batch", of("d", 1))]
        out = asyncio.run(proc.handle_group(group))
        proc.close()
        assert out[0].result == "written"
        for o in out[1:]:
            assert o.result == "quarantined" and o.ack is not None
            assert (o.ack.status, o.ack.reason, o.ack.seq) == ("rejected", "unsupported-version", 1)
        written[version] = ([ln for r in points.requests for ln in r], lake_rows(store))
    assert written[1] == written[2] and written[1][1] == {("a", 1): 2}
