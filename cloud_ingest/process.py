"""One message in: decode, validate, write to InfluxDB and the archive, or quarantine.

Independent of MQTT so that it can be tested, and later replayed, on its own.
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

from cloud_ingest.coalesce import Coalescer, ThreadHops
from cloud_ingest.config import IngestConfig
from cloud_ingest.lake import alert_object, batch_objects
from cloud_ingest.lineproto import alert_to_line, batch_to_lines
from cloud_ingest.sinks.base import ObjectStore, PointSink
from shared.acks import Ack
from shared.alerts import Alert, decode_alert
from shared.errors import PermanentSinkError, RetryableSinkError, WireError
from shared.topics import device_from_alert_topic, device_from_batch_topic
from shared.wire import Batch, check_ranges, decode_batch, peek_seq

log = logging.getLogger("cloud_ingest.process")


@dataclass
class Stats:
    counters: Counter[str] = field(default_factory=Counter)

    def inc(self, name: str, n: int = 1) -> None:
        self.counters[name] += n


#: (device_id, seq) of the batches written most recently, to answer a resend with
#: an ack at once. The sinks are idempotent anyway; this saves the rewrite.
RECENT_BATCHES = 100_000


@dataclass(frozen=True)
class Outcome:
    result: Literal["written", "duplicate", "quarantined"]
    device: str | None
    ack: Ack | None


def _json_seq(payload: bytes) -> int | None:
    """Best effort: the seq of a JSON message that failed validation."""
    try:
        seq = json.loads(payload).get("seq")
    except (ValueError, AttributeError):
        return None
    return seq if type(seq) is int and seq >= 0 else None


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
        self.influx = Coalescer(points.write, cfg.influx.max_lines_per_write)
        # decoding and lake writes of the messages in hand share thread hand-offs
        self._decode_hops = ThreadHops()
        self._lake_hops = ThreadHops()
        self.archive = archive
        self.stop = stop or asyncio.Event()
        self.stats = Stats()
        self._give_up_at: float | None = None
        #: called with (sink, seconds) after each successful write, retries included
        self.on_sink_time: Callable[[str, float], None] | None = None
        self._recent: OrderedDict[tuple[str, int], None] = OrderedDict()

    async def handle(self, topic: str, payload: bytes) -> Outcome:
        """Process one message: write it, recognise it as a duplicate, or quarantine it.

        Batches come on ``…/<device>/batch``, alerts on ``…/<device>/alert``. The
        outcome says which ack (if any) to send to which device: ``stored`` once both
        sinks hold the message, ``rejected`` when it is quarantined and its seq can be
        read, nothing when not even that is possible.
        """
        if topic.endswith("/alert"):
            return await self._handle_alert(topic, payload)
        self.stats.inc("received")
        device = device_from_batch_topic(topic, self.cfg.mqtt.topic_prefix)
        try:
            if device is None:
                raise WireError("bad-topic", f"{topic!r} is not <prefix>/<device_id>/batch")
            # decoding (zstd, numpy) and formatting in a worker thread keep the event
            # loop free for MQTT: it was the busiest thread under load
            batch, lines = await self._decode_hops.run(lambda: self._decode(device, payload))
        except WireError as exc:
            seq = peek_seq(payload, max_body_bytes=self.cfg.limits.max_body_bytes)
            return await self._reject(topic, payload, device, seq, exc)
        out = await self._store(
            topic, payload, device, batch.seq, lines, lambda: batch_objects(batch)
        )
        if out.result == "written":
            self.stats.inc("batches_written")
            self.stats.inc("points_written", len(lines))
        return out

    def _decode(self, device: str, payload: bytes) -> tuple[Batch, list[str]]:
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
        check_ranges(batch, time.time_ns())
        return batch, batch_to_lines(batch, self.cfg.influx.measurement)

    async def _handle_alert(self, topic: str, payload: bytes) -> Outcome:
        self.stats.inc("alerts_received")
        device = device_from_alert_topic(topic, self.cfg.mqtt.topic_prefix)
        try:
            if device is None:
                raise WireError("bad-topic", f"{topic!r} is not <prefix>/<device_id>/alert")
            alert = decode_alert(payload)
        except WireError as exc:
            return await self._reject(topic, payload, device, _json_seq(payload), exc)
        line = alert_to_line(device, alert, self.cfg.influx.alert_measurement)
        out = await self._store(
            topic, payload, device, alert.seq, [line], lambda: [alert_object(device, alert)]
        )
        if out.result == "written":
            self.stats.inc("alerts_written")
        return out

    async def write_batch(self, batch: Batch) -> Outcome:
        """Write a batch rebuilt from the lake (replay): to InfluxDB only, never
        recognised as a duplicate (a batch across midnight is two objects)."""
        lines = batch_to_lines(batch, self.cfg.influx.measurement)
        return await self._store(
            "replay", b"", batch.device_id, batch.seq, lines, list, dedupe=False
        )

    async def write_alert(self, device: str, alert: Alert) -> Outcome:
        line = alert_to_line(device, alert, self.cfg.influx.alert_measurement)
        return await self._store("replay", b"", device, alert.seq, [line], list, dedupe=False)

    async def _reject(
        self, topic: str, payload: bytes, device: str | None, seq: int | None, exc: WireError
    ) -> Outcome:
        await self.quarantine(topic, payload, exc.reason, str(exc))
        ack = None if device is None or seq is None else Ack(seq, "rejected", exc.reason)
        return Outcome("quarantined", device, ack)

    async def _store(
        self,
        topic: str,
        payload: bytes,
        device: str,
        seq: int,
        lines: list[str],
        objects: Callable[[], list[tuple[str, bytes]]],
        *,
        dedupe: bool = True,
    ) -> Outcome:
        """Write to InfluxDB and the lake; ``written`` only when both hold it.

        ``objects`` builds the lake objects; it runs in a worker thread with the
        writes, because Parquet encoding is the costliest step of a batch."""
        if dedupe and (device, seq) in self._recent:
            self._recent.move_to_end((device, seq))
            self.stats.inc("duplicates")
            return Outcome("duplicate", device, Ack(seq, "stored"))
        # Both sinks run to their end (success or final failure) before we decide.
        outcomes = await asyncio.gather(
            self._with_retry("influx", lambda: self.influx.write(lines)),
            self._with_retry(
                "archive", lambda: self._lake_hops.run(lambda: self._put_all(objects))
            ),
            return_exceptions=True,
        )
        for outcome in outcomes:
            if isinstance(outcome, ShuttingDown):
                raise outcome
        for outcome in outcomes:
            if isinstance(outcome, PermanentSinkError):
                await self.quarantine(topic, payload, "sink-rejected", str(outcome))
                return Outcome("quarantined", device, Ack(seq, "rejected", "sink-rejected"))
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        self._recent[(device, seq)] = None
        if len(self._recent) > RECENT_BATCHES:
            self._recent.popitem(last=False)
        log.debug(
            "wrote %s seq %d: %d points",
            device,
            seq,
            len(lines),
            extra={"device_id": device, "seq": seq, "points": len(lines)},
        )
        return Outcome("written", device, Ack(seq, "stored"))

    def _put_all(self, objects: Callable[[], list[tuple[str, bytes]]]) -> None:
        for key, data in objects():
            self.archive.put(key, data)

    async def quarantine(self, topic: str, payload: bytes, reason: str, message: str) -> None:
        self.stats.inc(f"quarantined_{reason}")
        log.warning(
            "quarantine: %s on %s: %s",
            reason,
            topic,
            message,
            extra={"reason": reason, "topic": topic, "bytes": len(payload)},
        )
        digest = hashlib.sha256(payload).hexdigest()
        meta = json.dumps(
            {
                "topic": topic,
                "reason": reason,
                "message": message,
                "received_ns": time.time_ns(),
                "bytes": len(payload),
            }
        ).encode()
        base = f"quarantine/reason={reason}/{digest}"
        await self._with_retry(
            "archive", lambda: asyncio.to_thread(self.archive.put, base + ".bin", payload)
        )
        await self._with_retry(
            "archive", lambda: asyncio.to_thread(self.archive.put, base + ".json", meta)
        )

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
                self.stats.inc(f"{stage}_rejected")
                raise
