"""Messages in, in groups: decode, plan, encode, write to InfluxDB and the lake, or quarantine.

Independent of MQTT so that it can be tested on its own (service.py and consume.py
feed it from the broker).

The unit of work is a *group*: the messages the ingestor has in hand at one
moment. A group costs one thread hand-off to decode every message in it, Parquet
encoding spread over ``worker_threads`` threads, InfluxDB requests of up to
``influx.max_lines_per_write`` lines, and concurrent lake puts
(``archive.max_concurrent_puts``). Under load, groups grow to
``mqtt.receive_maximum`` messages and the fixed costs are shared; when idle, a
group is one message and nothing waits. Per message, a group still gives one
:class:`Outcome`: written (both sinks hold it), duplicate, or quarantined with a
reason.

The stages and what they hand on, each immutable:

1. decode (a worker thread): ``(topic, payload)`` → :class:`~cloud_ingest.ingest.decode.Decoded`
2. plan (the same thread): → :class:`~cloud_ingest.ingest.decode.GroupPlan` (each message's
   lines; the Arrow rows of all the group's batches, per day)
3. encode (an encoder thread): the rows → one Parquet object per day
4. when the group before has been written: recognise resends, leave out window
   versions older than ones written, → :class:`~cloud_ingest.ingest.writer.Write`,
   :class:`~cloud_ingest.ingest.writer.SharedObject` (the day's rows of the batches
   written now) and :class:`~cloud_ingest.ingest.writer.Quarantine` for :meth:`Writer.write`
5. the writer's verdicts → one :class:`Outcome` per message, counted in :class:`Stats`
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np

from cloud_ingest.config import IngestConfig
from cloud_ingest.ingest import events
from cloud_ingest.ingest.decode import Decoded, GroupPlan, Planned, decode_group, plan_group
from cloud_ingest.ingest.quotas import DEFER_RATE, Quotas
from cloud_ingest.ingest.registry import DeviceRegistry
from cloud_ingest.ingest.revisions import RevisionMemory, WindowKey
from cloud_ingest.ingest.writer import (
    Deferral,
    Quarantine,
    SharedObject,
    ShuttingDown,
    Stats,
    Verdict,
    Write,
    Writer,
)
from cloud_ingest.lake import GroupRows, PartNames, part_key, to_parquet
from cloud_ingest.sinks.base import ObjectStore, PointSink
from shared.acks import Ack
from shared.errors import WireError
from shared.sketch import DDSketch
from shared.topics import batch_topic
from shared.wire import COLUMNS, SensorRef, WindowSpec, encode_batch, make_batch

__all__ = ["Outcome", "Processor", "ShuttingDown", "Stats"]

log = logging.getLogger(__name__)

#: (device_id, generation, seq) of the batches and alerts written most recently
#: (they share the device's seq counter; a re-created buffer has a new generation
#: and counts from 1 again), to answer a resend with an ack at once. The sinks are
#: idempotent anyway; this saves the rewrite.
RECENT_BATCHES = 100_000


NOT_KEPT_LOG_EVERY_S = 60.0  # quarantine entries not kept: one summary line this often


@dataclass(frozen=True)
class Outcome:
    """``deferred``: not written and not answered (a quota of the ingestor, or a
    sink's state refused it): acknowledged to the broker all the same, so that the
    device, which keeps every batch until it is answered, sends it again later."""

    result: Literal["written", "duplicate", "quarantined", "deferred"]
    device: str | None
    ack: Ack | None


@dataclass(frozen=True)
class _Step:
    """Stage 4 for one message: written now, a resend of one written before, or
    neither (quarantined, or a repeat within the group)."""

    write: Write | None = None
    resent: bool = False
    #: revised windows it writes, remembered once it is written
    versions: dict[WindowKey, int] | None = None


class Processor:
    def __init__(
        self,
        cfg: IngestConfig,
        points: PointSink,
        archive: ObjectStore,
        stop: asyncio.Event | None = None,
    ) -> None:
        self.cfg = cfg
        self.stop = stop or asyncio.Event()
        self.stats = Stats()
        self.writer = Writer(cfg, points, archive, self.stats, self.stop)
        #: last heard, and latest health, per device (cloud_ingest/ingest/registry.py)
        self.devices = DeviceRegistry(cfg.fleet.max_devices, cfg.fleet.health_fresh_s)
        self._encoders = ThreadPoolExecutor(cfg.worker_threads, thread_name_prefix="encode")
        self._recent: OrderedDict[tuple[str, int, int], None] = OrderedDict()
        self._revisions = RevisionMemory()
        self._names = PartNames()
        #: what one device may cost the fleet (cloud_ingest/ingest/quotas.py)
        self.quotas = Quotas(cfg.quotas, cfg.influx.allowed_tags)
        self._not_kept = DeviceTally(
            "quarantine: %d entries not kept (over quotas.max_quarantined_per_min), "
            "counted only: %s"
        )
        self._throttled = DeviceTally(
            "quotas: %d messages deferred over quotas.max_messages_per_s (their devices "
            "send them again): %s"
        )

    def close(self) -> None:
        self.writer.close()
        self._encoders.shutdown(wait=True)
        self.quotas.close()

    async def handle_group(
        self,
        messages: Sequence[tuple[str, bytes]],
        after: Awaitable[object] | Sequence[Awaitable[object]] = (),
        decoded: asyncio.Event | None = None,
    ) -> list[Outcome]:
        """Process messages: write each, recognise it as a duplicate, or quarantine it.

        Batches come on ``…/<device>/batch``, alerts on ``…/<device>/alert``, health
        reports on ``…/<device>/health``. Each
        outcome says which ack (if any) to send to which device: ``stored`` once both
        sinks hold the message, ``rejected`` when it is quarantined and its seq can be
        read, nothing when not even that is possible. The messages are decoded at
        once (then ``decoded`` is set); their writes start only when ``after`` (the
        earlier groups that hold messages of the same devices) is done, so that one
        device's batches reach InfluxDB in arrival order.

        Raises :class:`ShuttingDown` if the service stops while a sink is still
        failing: then no message of the group counts as handled.
        """
        try:
            plan = await asyncio.to_thread(self._decode_and_plan, messages)
        finally:
            if decoded is not None:
                decoded.set()  # the next group may be decoded while this one encodes
        loop = asyncio.get_running_loop()
        encoded = await asyncio.gather(
            *(loop.run_in_executor(self._encoders, to_parquet, g.rows) for g in plan.rows)
        )
        for p in plan.planned:
            self.stats.inc(events.received(p.msg.kind))
        earlier = [after] if inspect.isawaitable(after) else list(after)
        if earlier:
            await asyncio.wait([asyncio.ensure_future(a) for a in earlier])
        return await self._write(plan, encoded)

    def warm_up(self) -> float:
        """Decode, plan and encode a made-up batch, writing nothing: the imports and
        first calls (pyarrow's above all) that would otherwise hold up the first group
        by ~0.2 s, and with it every message that arrives meanwhile. Returns seconds."""
        started = time.monotonic()
        now = time.time_ns()
        width = 10 * 10**9
        batch = make_batch(
            device_id="warm-up",
            seq=0,
            created_ns=now,
            window=WindowSpec("tumbling", width),
            sensors=(SensorRef("node", "sensor", "unit"),),
            columns={
                "sensor": [0],
                "start_ns": [now // width * width - width],
                "count": [2],
                "invalid": [0],
                **{name: [1.0] for name, (dt, _) in COLUMNS.items() if dt == "float64"},
            },
            sketch=(DDSketch.from_values(np.array([1.0, 1.0])).encode(),),
        )
        topic = batch_topic("warm-up", self.cfg.mqtt.topic_prefix)
        plan = self._decode_and_plan([(topic, encode_batch(batch))], quotas=False)
        if plan.planned[0].msg.error is not None:  # a bug, not input: say so at start
            raise RuntimeError(f"the warm-up batch did not decode: {plan.planned[0].msg.error}")
        for g in plan.rows:
            to_parquet(g.rows)
        return time.monotonic() - started

    def _decode_and_plan(
        self, messages: Sequence[tuple[str, bytes]], quotas: bool = True
    ) -> GroupPlan:
        return plan_group(
            decode_group(messages, self.cfg, self.quotas if quotas else None), self.cfg
        )

    async def _write(self, plan: GroupPlan, encoded: Sequence[bytes]) -> list[Outcome]:
        # Resends are recognised here, not when decoding: the group before may hold them.
        planned = plan.planned
        steps = self._steps(planned)
        writes = [(i, s.write) for i, s in enumerate(steps) if s.write is not None]
        quarantine = self._quarantine(planned)
        shared = await self._shared_objects(plan.rows, encoded, [i for i, _ in writes])
        verdicts = await self.writer.write([w for _, w in writes], quarantine, shared)
        errors: list[Verdict] = [p.msg.error for p in planned]
        for (i, _), verdict in zip(writes, verdicts, strict=True):
            errors[i] = verdict
        return [self._outcome(planned, steps, errors, i) for i in range(len(planned))]

    def _quarantine(self, planned: Sequence[Planned]) -> list[Quarantine]:
        """The group's quarantine entries (refused messages, and batches taken in part),
        at most ``quotas.max_quarantined_per_min`` a minute per device: a device that
        floods the ingestor with bad messages costs a counter, not a lake object each."""
        out = []
        for p in planned:
            error = p.msg.error or p.msg.partial
            if error is None:
                continue
            if self.quotas.keep_quarantined(p.msg.device):
                out.append(Quarantine(p.msg.topic, p.msg.payload, error))
                continue
            self.stats.inc(events.QUARANTINE_NOT_KEPT)
            self._not_kept.add(p.msg.device)
        return out

    async def _shared_objects(
        self, rows: Sequence[GroupRows], encoded: Sequence[bytes], writing: list[int]
    ) -> list[SharedObject]:
        """The group's lake objects, one per day, holding the rows of the batches that
        are written now (a resend of a batch written before is left out)."""
        index = {m: j for j, m in enumerate(writing)}  # message → its index in writes
        name = self._names.next()
        out = []
        for g, data in zip(rows, encoded, strict=True):
            members = sorted({index[m] for m in g.which.tolist() if m in index})
            if not members:
                continue
            left_out = frozenset(m for m in g.which.tolist() if m not in index)
            rebuild = _rebuilder(g, left_out, writing)
            if left_out:
                again = await asyncio.get_running_loop().run_in_executor(
                    self._encoders, rebuild, frozenset()
                )
                assert again is not None  # members is not empty
                data = again
            out.append(SharedObject(part_key(g.dt, name), data, tuple(members), rebuild))
        return out

    def _steps(self, planned: list[Planned]) -> list[_Step]:
        """Recognise resends of what was written before, and leave out the InfluxDB
        lines of window versions older than ones written already (by an earlier
        group, or by an earlier batch of this one)."""
        written: dict[WindowKey, int] = {}
        steps: list[_Step] = []
        for p in planned:
            msg = p.msg
            if not p.writes:
                steps.append(_Step())
                continue
            assert msg.key is not None
            if msg.key in self._recent:
                steps.append(_Step(resent=True))
                continue
            lines: Sequence[str] = p.lines
            versions: dict[WindowKey, int] = {}
            if msg.batch is not None:
                keep, versions = self._revisions.screen(msg.batch, written)
                if not keep.all():
                    lines = self._superseded(p, keep.tolist())
            steps.append(_Step(Write(msg.topic, msg.payload, lines, p.objects), False, versions))
        return steps

    def _superseded(self, p: Planned, keep: list[bool]) -> list[str]:
        dropped = keep.count(False)
        self.stats.inc(events.REVISIONS_SUPERSEDED, dropped)
        log.warning(
            "%s seq %s: %d window versions older than ones already written are not "
            "written over them",
            p.msg.device,
            p.msg.seq,
            dropped,
            extra={"device_id": p.msg.device, "seq": p.msg.seq},
        )
        return [line for line, k in zip(p.lines, keep, strict=True) if k]

    def _outcome(
        self,
        planned: list[Planned],
        steps: list[_Step],
        errors: list[Verdict],
        i: int,
    ) -> Outcome:
        msg, step, error = planned[i].msg, steps[i], errors[i]
        repeat_of = planned[i].repeat_of
        if repeat_of is not None:  # a repeat within the group: the first copy's fate
            error = errors[repeat_of]
            self.stats.inc(events.DUPLICATES)
        defer = msg.defer or (error.reason if isinstance(error, Deferral) else None)
        if defer is not None:
            self.stats.inc(events.deferred(defer))
            if defer == DEFER_RATE:
                self._throttled.add(msg.device)
            return Outcome("deferred", msg.device, None)
        if isinstance(error, WireError):
            self.stats.inc(events.quarantined(error.reason))
            ack = None
            if msg.device is not None and msg.seq is not None:
                ack = Ack(msg.seq, "rejected", error.reason, generation=msg.generation)
            return Outcome("quarantined", msg.device, ack)
        assert msg.device is not None and msg.seq is not None and msg.key is not None
        self._remember(msg.key)
        self.devices.heard(msg.device, msg.health, desired_version=_desired_version(msg))
        # taken in part: stored, and the reason the rest was not (cloud_ingest/ingest/quotas.py)
        partly = msg.partial.reason if msg.partial is not None else ""
        stored = Ack(msg.seq, "stored", partly, generation=msg.generation)
        if msg.partial is not None and repeat_of is None and not step.resent:
            self.stats.inc(events.quarantined(msg.partial.reason))
            self.stats.inc(events.QUOTA_WINDOWS_REFUSED, msg.refused_rows)
        if repeat_of is not None or step.resent:
            if step.resent:
                self.stats.inc(events.DUPLICATES)
            return Outcome("duplicate", msg.device, stored)
        assert step.write is not None
        if msg.kind == "batch":
            self.stats.inc(events.BATCHES_WRITTEN)
            self.stats.inc(events.POINTS_WRITTEN, len(step.write.lines))
            self._revisions.remember(step.versions or {})
        else:
            self.stats.inc(events.written(msg.kind))
            if msg.raw is not None:
                self.stats.inc(events.RAW_READINGS_WRITTEN, msg.raw.n)
        return Outcome("written", msg.device, stored)

    def _remember(self, key: tuple[str, int, int]) -> None:
        self._recent[key] = None
        self._recent.move_to_end(key)
        if len(self._recent) > RECENT_BATCHES:
            self._recent.popitem(last=False)


def _desired_version(msg: Decoded) -> int:
    """The version of a desired config the device accepted, from its ``config``
    command's result (docs/commands.md); 0 for any other message."""
    r = msg.result
    if r is None or r.kind != "config" or r.status != "done":
        return 0
    version = r.result.get("version")
    return version if type(version) is int and 0 < version < 2**63 else 0


class DeviceTally:
    """What a few devices do too often, summed up in one log line a minute (the devices
    that did most of it first), instead of a line each time."""

    def __init__(self, message: str, every_s: float = NOT_KEPT_LOG_EVERY_S) -> None:
        self.message = message  # with %d (the total) and %s (the devices)
        self.every_s = every_s
        self._counts: dict[str, int] = {}
        self._logged = float("-inf")

    def add(self, device: str | None) -> None:
        name = device or "?"
        self._counts[name] = self._counts.get(name, 0) + 1
        now = time.monotonic()
        if now >= self._logged + self.every_s:
            self._logged = now
            worst = sorted(self._counts.items(), key=lambda kv: -kv[1])[:5]
            log.warning(
                self.message,
                sum(self._counts.values()),
                ", ".join(f"{d} {n}" for d, n in worst),
                extra={"device_id": worst[0][0]},
            )
            self._counts.clear()


def _rebuilder(
    g: GroupRows, left_out: frozenset[int], writing: Sequence[int]
) -> Callable[[frozenset[int]], bytes | None]:
    """The bytes of a group's object of one day without the rows of the batches left
    out (not written now) and of the writes refused (indexes in ``writing``)."""

    def rebuild(refused: frozenset[int]) -> bytes | None:
        kept = g.without(left_out | {writing[j] for j in refused})
        return None if kept is None else to_parquet(kept)

    return rebuild
