"""Messages in, in groups: decode, validate, write to InfluxDB and the lake, or quarantine.

Independent of MQTT so that it can be tested, and replayed, on its own.

The unit of work is a *group*: the messages the ingestor has in hand at one
moment. A group costs one thread hand-off to decode and encode every message in
it, InfluxDB requests of up to ``influx.max_lines_per_write`` lines, and
concurrent lake puts (``archive.max_concurrent_puts``). Under load, groups grow
to ``mqtt.receive_maximum`` messages and the fixed costs are shared; when idle,
a group is one message and nothing waits. Per message, a group still gives one
outcome: written (both sinks hold it), duplicate, or quarantined with a reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

from cloud_ingest.coalesce import Coalescer
from cloud_ingest.config import IngestConfig
from cloud_ingest.lake import alert_object, group_tables, to_parquet
from cloud_ingest.lineproto import alert_to_line, batch_to_lines
from cloud_ingest.revisions import RevisionMemory, WindowKey
from cloud_ingest.sinks.base import ObjectStore, PointSink
from shared import jsonwire
from shared.acks import Ack
from shared.alerts import Alert, decode_alert
from shared.errors import PermanentSinkError, RetryableSinkError, WireError
from shared.topics import device_from_alert_topic, device_from_batch_topic
from shared.wire import Batch, check_ranges_many, decode_batch, peek_seq

log = logging.getLogger("cloud_ingest.process")


@dataclass
class Stats:
    counters: Counter[str] = field(default_factory=Counter)

    def inc(self, name: str, n: int = 1) -> None:
        self.counters[name] += n


#: (device_id, seq) of the batches and alerts written most recently (they share
#: the device's seq counter), to answer a resend with an ack at once. The sinks
#: are idempotent anyway; this saves the rewrite.
RECENT_BATCHES = 100_000


@dataclass(frozen=True)
class Outcome:
    result: Literal["written", "duplicate", "quarantined"]
    device: str | None
    ack: Ack | None


@dataclass
class Item:
    """One message of a group, decoded and encoded (in a worker thread)."""

    topic: str
    payload: bytes
    kind: Literal["batch", "alert"]
    device: str | None = None
    seq: int | None = None
    lines: list[str] = field(default_factory=list)
    #: lake objects: key and bytes (key and Arrow rows until encoded)
    objects: list[tuple[str, Any]] = field(default_factory=list)
    #: why it is quarantined (a bad message, or a sink refused it for good)
    error: WireError | None = None
    #: a resend of a batch written before (-1) or of an earlier item of the group (its index)
    duplicate_of: int | None = None
    #: recognise a resend of a batch written recently (not in a replay, whose
    #: batches can be parts of one: a batch across midnight is two objects)
    dedupe: bool = True
    #: the decoded batch (one InfluxDB line per row, in row order)
    batch: Batch | None = None
    #: revised windows this item writes, remembered once it is written
    versions: dict[WindowKey, int] = field(default_factory=dict)


def _json_seq(payload: bytes) -> int | None:
    """Best effort: the seq of a JSON message that failed validation."""
    try:
        seq = jsonwire.loads(payload, reason="bad-alert", what="an alert", max_bytes=1 << 20)
        seq = seq.get("seq")
    except (WireError, AttributeError):
        return None
    return seq if type(seq) is int and 0 <= seq < 2**63 else None


def _encode(items: list[Item]) -> None:
    """Arrow rows → Parquet bytes, in place."""
    for item in items:
        item.objects = [
            (key, data if isinstance(data, bytes) else to_parquet(data))
            for key, data in item.objects
        ]


class ShuttingDown(Exception):
    """Raised inside a retry loop when the service is asked to stop."""


class Processor:
    def __init__(
        self,
        cfg: IngestConfig,
        points: PointSink,
        archive: ObjectStore,
        stop: asyncio.Event | None = None,
    ) -> None:
        self.cfg = cfg
        self.points = points
        # concurrent groups (a replay's devices) share InfluxDB requests too
        self.influx = Coalescer(points.write, cfg.influx.max_lines_per_write)
        self.archive = archive
        self._puts = ThreadPoolExecutor(
            cfg.archive.max_concurrent_puts, thread_name_prefix="archive-put"
        )
        self._encoders = ThreadPoolExecutor(cfg.worker_threads, thread_name_prefix="encode")
        self.stop = stop or asyncio.Event()
        self.stats = Stats()
        self._give_up_at: float | None = None
        #: called with (sink, seconds) after each successful write, retries included
        self.on_sink_time: Callable[[str, float], None] | None = None
        self._recent: OrderedDict[tuple[str, int], None] = OrderedDict()
        self._revisions = RevisionMemory()

    def close(self) -> None:
        self._puts.shutdown(wait=True)
        self._encoders.shutdown(wait=True)

    async def handle_group(
        self,
        messages: Sequence[tuple[str, bytes]],
        after: Awaitable[object] | None = None,
        decoded: asyncio.Event | None = None,
    ) -> list[Outcome]:
        """Process messages: write each, recognise it as a duplicate, or quarantine it.

        Batches come on ``…/<device>/batch``, alerts on ``…/<device>/alert``. Each
        outcome says which ack (if any) to send to which device: ``stored`` once both
        sinks hold the message, ``rejected`` when it is quarantined and its seq can be
        read, nothing when not even that is possible. The messages are decoded at
        once (then ``decoded`` is set); their writes start only when ``after`` (the
        previous group) is done, so that one device's batches reach InfluxDB in
        arrival order.

        Raises :class:`ShuttingDown` if the service stops while a sink is still
        failing: then no message of the group counts as handled.
        """
        try:
            items = await asyncio.to_thread(self._prepare_all, messages)
        finally:
            if decoded is not None:
                decoded.set()  # the next group may be decoded while this one encodes
        # Parquet encoding, the costliest step, in threads of its own: Arrow's encoder
        # runs without the GIL, so they overlap each other and the next decode
        work = [it for it in items if it.objects]
        n = min(self.cfg.worker_threads, len(work))
        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(loop.run_in_executor(self._encoders, _encode, work[i::n]) for i in range(n))
        )
        for item in items:
            self.stats.inc("received" if item.kind == "batch" else "alerts_received")
        if after is not None:
            await asyncio.wait([asyncio.ensure_future(after)])
        return await self._write_group(items)

    # ---- in a worker thread -------------------------------------------------------

    def _prepare_all(self, messages: Sequence[tuple[str, bytes]]) -> list[Item]:
        seen: dict[tuple[str, int], int] = {}
        decoded = [self._prepare(topic, payload) for topic, payload in messages]
        # the range check of every batch at once (a group of batches costs about
        # what one did), then batch by batch only if one fails
        checked = [(it, b) for it, b in decoded if b is not None]
        verdicts = check_ranges_many([b for _, b in checked], time.time_ns())
        for (item, _), verdict in zip(checked, verdicts, strict=True):
            item.error = verdict
        items: list[Item] = []
        batches: list[tuple[Item, Batch]] = []  # to write
        for item, batch in decoded:
            items.append(item)
            if item.error is not None or item.device is None or item.seq is None:
                continue
            key = (item.device, item.seq)  # alerts and batches share the device's seqs
            if key in seen:
                item.duplicate_of = seen[key]
                item.lines, item.objects = [], []
            else:
                seen[key] = len(items) - 1
                if batch is not None:
                    item.lines = batch_to_lines(batch, self.cfg.influx.measurement)
                    item.batch = batch
                    batches.append((item, batch))
        tables = group_tables([b for _, b in batches])
        for (item, _), objects in zip(batches, tables, strict=True):
            item.objects = objects
        return items

    def _prepare(self, topic: str, payload: bytes) -> tuple[Item, Batch | None]:
        """Decode one message. The decoders raise only WireError (tests/test_fuzz.py);
        should one still raise something else, that message is quarantined as
        ``undecodable`` and the others go on: a message must not stop the ingestor."""
        try:
            if topic.endswith("/alert"):
                return self._prepare_alert(topic, payload), None
            return self._prepare_batch(topic, payload)
        except Exception as exc:
            log.exception("decode: %s on %s", type(exc).__name__, topic)
            item = Item(topic, payload, "alert" if topic.endswith("/alert") else "batch")
            item.error = WireError("undecodable", f"{type(exc).__name__}: {exc}"[:500])
            return item, None

    def _prepare_batch(self, topic: str, payload: bytes) -> tuple[Item, Batch | None]:
        item = Item(topic, payload, "batch")
        item.device = device_from_batch_topic(topic, self.cfg.mqtt.topic_prefix)
        try:
            if item.device is None:
                raise WireError("bad-topic", f"{topic!r} is not <prefix>/<device_id>/batch")
            batch = self._decode(item.device, payload)
        except WireError as exc:
            item.seq = peek_seq(payload, max_body_bytes=self.cfg.limits.max_body_bytes)
            item.error = exc
            return item, None
        item.seq = batch.seq
        return item, batch

    def _decode(self, device: str, payload: bytes) -> Batch:
        batch = decode_batch(
            payload,
            max_payload_bytes=self.cfg.limits.max_payload_bytes,
            max_body_bytes=self.cfg.limits.max_body_bytes,
        )
        if batch.device_id != device:
            raise WireError(
                "device-mismatch",
                f"payload device_id {batch.device_id!r} on the topic of {device!r}",
            )
        return batch

    def _prepare_alert(self, topic: str, payload: bytes) -> Item:
        item = Item(topic, payload, "alert")
        item.device = device_from_alert_topic(topic, self.cfg.mqtt.topic_prefix)
        try:
            if item.device is None:
                raise WireError("bad-topic", f"{topic!r} is not <prefix>/<device_id>/alert")
            alert = decode_alert(payload)
        except WireError as exc:
            item.seq = _json_seq(payload)
            item.error = exc
            return item
        item.seq = alert.seq
        item.lines = [alert_to_line(item.device, alert, self.cfg.influx.alert_measurement)]
        item.objects = [alert_object(item.device, alert)]
        return item

    # ---- on the event loop ----------------------------------------------------------

    async def write_batch(self, batch: Batch) -> Outcome:
        """Write a batch rebuilt from the lake (replay): to InfluxDB only, never
        recognised as a duplicate (a batch across midnight is two objects)."""
        lines = batch_to_lines(batch, self.cfg.influx.measurement)
        item = Item("replay", b"", "batch", batch.device_id, batch.seq, lines, dedupe=False)
        item.batch = batch
        return (await self._write_group([item]))[0]

    async def write_alert(self, device: str, alert: Alert) -> Outcome:
        line = alert_to_line(device, alert, self.cfg.influx.alert_measurement)
        item = Item("replay", b"", "alert", device, alert.seq, [line], dedupe=False)
        return (await self._write_group([item]))[0]

    async def _write_group(self, items: list[Item]) -> list[Outcome]:
        """Both sinks run to their end (success or final failure) before we decide."""
        for item in items:  # here, not when decoding: the group before may hold it
            if item.dedupe and item.error is None and (item.device, item.seq) in self._recent:
                item.duplicate_of = -1
        todo = [i for i, it in enumerate(items) if it.error is None and it.duplicate_of is None]
        self._drop_superseded([items[i] for i in todo])
        bad = [it for it in items if it.error is not None]
        outcomes = await asyncio.gather(
            self._write_influx([items[i] for i in todo]),
            self._put_objects(
                [(items[i], obj) for i in todo for obj in items[i].objects]
                + [(it, obj) for it in bad for obj in self._quarantine_objects(it)]
            ),
            return_exceptions=True,
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome  # ShuttingDown, or a bug
        refused = [i for i in todo if items[i].error is not None]  # by a sink, for good
        if refused:
            await self._put_objects(
                [(items[i], obj) for i in refused for obj in self._quarantine_objects(items[i])]
            )
            # The lake holds what InfluxDB holds: a batch InfluxDB refused for good
            # leaves it (it is in the quarantine), so that a replay never meets it.
            await self._delete_objects([key for i in refused for key, _ in items[i].objects])
        return [self._outcome(items, i) for i in range(len(items))]

    def _outcome(self, items: list[Item], i: int) -> Outcome:
        item = items[i]
        if item.error is not None:
            self.stats.inc(f"quarantined_{item.error.reason}")
            ack = None
            if item.device is not None and item.seq is not None:
                ack = Ack(item.seq, "rejected", item.error.reason)
            return Outcome("quarantined", item.device, ack)
        assert item.device is not None and item.seq is not None
        if item.duplicate_of is not None:
            self.stats.inc("duplicates")
            if item.duplicate_of >= 0 and items[item.duplicate_of].error is not None:
                first = items[item.duplicate_of].error
                assert first is not None
                return Outcome("quarantined", item.device, Ack(item.seq, "rejected", first.reason))
            self._remember(item.device, item.seq)
            return Outcome("duplicate", item.device, Ack(item.seq, "stored"))
        if item.kind == "batch":
            self.stats.inc("batches_written")
            self.stats.inc("points_written", len(item.lines))
            self._revisions.remember(item.versions)
        else:
            self.stats.inc("alerts_written")
        if item.dedupe:
            self._remember(item.device, item.seq)
        return Outcome("written", item.device, Ack(item.seq, "stored"))

    def _drop_superseded(self, items: list[Item]) -> None:
        """Leave out the InfluxDB lines of window versions older than one written
        already (by an earlier group, or by an earlier batch of this one)."""
        written: dict[WindowKey, int] = {}
        for item in items:
            if item.batch is None:
                continue
            keep, item.versions = self._revisions.screen(item.batch, written)
            if keep.all():
                continue
            dropped = int((~keep).sum())
            self.stats.inc("revisions_superseded", dropped)
            log.warning(
                "%s seq %s: %d window versions older than ones already written are not "
                "written over them",
                item.device,
                item.seq,
                dropped,
                extra={"device_id": item.device, "seq": item.seq},
            )
            item.lines = [line for line, k in zip(item.lines, keep.tolist(), strict=True) if k]

    def _remember(self, device: str, seq: int) -> None:
        self._recent[(device, seq)] = None
        self._recent.move_to_end((device, seq))
        if len(self._recent) > RECENT_BATCHES:
            self._recent.popitem(last=False)

    async def _write_influx(self, items: list[Item]) -> None:
        """Requests of up to max_lines_per_write lines; an item whose lines InfluxDB
        refuses for good (HTTP 400) gets that as its error, the others are written."""
        chunks: list[list[Item]] = [[]]
        n = 0
        for item in items:
            if chunks[-1] and n + len(item.lines) > self.cfg.influx.max_lines_per_write:
                chunks.append([])
                n = 0
            chunks[-1].append(item)
            n += len(item.lines)

        async def one(chunk: list[Item]) -> None:
            lines = [line for item in chunk for line in item.lines]
            try:
                await self._with_retry("influx", lambda: self.influx.write(lines))
            except PermanentSinkError as exc:
                if len(chunk) == 1:
                    chunk[0].error = WireError("sink-rejected", str(exc))
                    return
                for item in chunk:  # find the batches at fault
                    await one([item])

        if items:
            await asyncio.gather(*(one(chunk) for chunk in chunks))

    async def _put_objects(self, objects: list[tuple[Item, tuple[str, Any]]]) -> None:
        """Put objects concurrently, retrying the ones that fail retryably; an item one
        of whose objects the store refuses for good gets that as its error."""
        pending = objects
        loop = asyncio.get_running_loop()

        async def attempt() -> None:
            nonlocal pending
            results = await asyncio.gather(
                *(
                    loop.run_in_executor(self._puts, self.archive.put, key, data)
                    for _, (key, data) in pending
                ),
                return_exceptions=True,
            )
            again: list[tuple[Item, tuple[str, Any]]] = []
            first: RetryableSinkError | None = None
            for (item, obj), res in zip(pending, results, strict=True):
                if isinstance(res, RetryableSinkError):
                    again.append((item, obj))
                    first = first or res
                elif isinstance(res, PermanentSinkError):
                    self.stats.inc("archive_rejected")
                    if item.error is None:
                        item.error = WireError("sink-rejected", str(res))
                elif isinstance(res, BaseException):
                    raise res
            pending = again
            if first is not None:
                raise first

        if pending:
            await self._with_retry("archive", attempt)

    async def _delete_objects(self, keys: list[str]) -> None:
        loop = asyncio.get_running_loop()

        async def attempt() -> None:
            await asyncio.gather(
                *(loop.run_in_executor(self._puts, self.archive.delete, key) for key in keys)
            )

        if keys:
            await self._with_retry("archive", attempt)

    def _quarantine_objects(self, item: Item) -> list[tuple[str, bytes]]:
        assert item.error is not None
        reason, message = item.error.reason, str(item.error)
        log.warning(
            "quarantine: %s on %s: %s",
            reason,
            item.topic,
            message,
            extra={"reason": reason, "topic": item.topic, "bytes": len(item.payload)},
        )
        digest = hashlib.sha256(item.payload).hexdigest()
        meta = json.dumps(
            {
                "topic": item.topic,
                "reason": reason,
                "message": message,
                "received_ns": time.time_ns(),
                "bytes": len(item.payload),
            }
        ).encode()
        base = f"quarantine/reason={reason}/{digest}"
        return [(base + ".bin", item.payload), (base + ".json", meta)]

    async def _with_retry(self, stage: str, op: Callable[[], Awaitable[None]]) -> None:
        """Await ``op()`` until it succeeds or fails permanently.

        Retryable failures back off exponentially with ±20 % jitter (honouring
        Retry-After). Once ``stop`` is set, retries go on for at most
        ``retry.shutdown_grace_s``, then :class:`ShuttingDown` is raised.
        """
        delay = self.cfg.retry.initial_s
        started = time.monotonic()
        while True:
            try:
                await op()
                if self.on_sink_time is not None:
                    self.on_sink_time(stage, time.monotonic() - started)
                return
            except RetryableSinkError as exc:
                self.stats.inc(f"{stage}_retries")
                wait = exc.retry_after if exc.retry_after is not None else delay
                wait = min(wait, self.cfg.retry.max_s) * random.uniform(0.8, 1.2)
                delay = min(delay * 2, self.cfg.retry.max_s)
                log.warning("%s: %s; retrying in %.1f s", stage, exc, wait, extra={"stage": stage})
                if not self.stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.stop.wait(), timeout=wait)
                    continue
                if self._give_up_at is None:
                    self._give_up_at = time.monotonic() + self.cfg.retry.shutdown_grace_s
                left = self._give_up_at - time.monotonic()
                if left <= 0:
                    raise ShuttingDown(f"{stage}: gave up retrying at shutdown") from exc
                await asyncio.sleep(min(wait, left))  # backoff between retries
            except PermanentSinkError:
                if stage == "influx":
                    self.stats.inc("influx_rejected")
                raise
