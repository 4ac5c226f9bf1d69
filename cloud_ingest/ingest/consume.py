"""From the broker to :meth:`Processor.handle_group` and back: groups, PUBACKs, device acks.

:class:`GroupConsumer` takes the messages of one connection in groups. A group is
every message waiting, up to half of ``mqtt.receive_maximum``, once the previous
group has been decoded, at most one other group is unfinished, and at most half
of ``receive_maximum`` is in hand. (A group that took all of ``receive_maximum``
left nothing for the next one until it was written: under load the stages ran
one after the other, decode, write, PUBACK, receive, 14,300 points/s in
bench/ingest.py against 15,400 with half-size groups that overlap; CPU per batch
the same.)

While one group is being written, the next one is decoded. Its writes wait only
for the earlier unfinished groups that hold messages of any of its devices
(:func:`~cloud_ingest.ingest.decode.route`), so that a device's messages are
written in arrival order while the groups of other devices are written side by
side: InfluxDB works on two requests at once. (Written strictly one group after
the other, the ingestor, InfluxDB and the broker left a part of the two cores
idle under full load: docs/benchmarks.md, "Cloud ingest".)

PUBACKs go out in arrival order, as MQTT requires: a group's messages are
acknowledged once it and every group before it are done. Then its devices are
told (``stored`` or ``rejected``). PUBACK first: once a device has its ack, no
copy of the batch is left with the broker to be delivered again, to this process
or to another member of a shared subscription, so the device may send the next
version of a window (docs/cloud-ingest.md, "Revisions in order").

On ``stop`` it takes no more messages and drains what is in hand; a group
abandoned at shutdown (a sink still failing after ``retry.shutdown_grace_s``) is
neither acknowledged nor answered, so the broker delivers it again later.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiomqtt

from cloud_ingest.ingest import events
from cloud_ingest.ingest.decode import route
from cloud_ingest.ingest.metrics import Liveness
from cloud_ingest.ingest.mqttclient import IngestClient
from cloud_ingest.ingest.process import Outcome, Processor, ShuttingDown
from shared.acks import device_key
from shared.topics import ack_topic

log = logging.getLogger(__name__)

#: Groups in hand: one being written, the next decoded and waiting for it. More
#: would only make them smaller (each group's writes wait for the one before).
GROUPS_IN_HAND = 2

#: A group's outcomes once handled; None if abandoned at shutdown.
GroupTask = asyncio.Task[list[Outcome] | None]


@dataclass(frozen=True)
class Group:
    messages: list[aiomqtt.Message]
    task: GroupTask


class GroupConsumer:
    def __init__(
        self,
        client: IngestClient,
        proc: Processor,
        stop: asyncio.Event,
        health: Liveness,
        on_group: Callable[[float], None] | None = None,
    ) -> None:
        self.client = client
        self.proc = proc
        self.stop = stop
        self.on_group = on_group
        self.prefix = proc.cfg.mqtt.topic_prefix
        self.prefix_v2 = proc.cfg.mqtt.topic_prefix_v2
        self.master_key = proc.cfg.acks.master_key()  # signs acks, if set (shared/acks.py)
        self.receive_maximum = proc.cfg.mqtt.receive_maximum
        #: groups not yet acknowledged, in arrival order
        self.inflight: deque[Group] = deque()
        #: set with the error that ends this connection (an ack could not be sent, or
        #: a group failed on a bug)
        self.failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        #: unfinished groups and their sizes; ``room`` is set while a new one may form
        self.unfinished: dict[GroupTask, int] = {}
        #: the devices of each unfinished group (route(): None for a topic without one)
        self.devices: dict[GroupTask, frozenset[str | None]] = {}
        self.room = asyncio.Event()
        self.room.set()
        # Read by the HTTP server's thread: integers that the event loop updates, never
        # the deque itself (iterating it there raced with the loop's changes).
        health.queue_depth = lambda: client.held
        health.in_hand = lambda: client.in_hand
        health.acks_pending = lambda: client.acks_pending

    async def run(
        self, topics: Sequence[str] = (), on_subscribed: Callable[[], None] | None = None
    ) -> None:
        """Subscribe to ``topics`` (then call ``on_subscribed``) while taking messages,
        until ``stop`` (then drain) or until the connection fails (then raise its
        MqttError, for the caller to reconnect).

        Messages are taken from the first moment, not after the SUBACKs: a persistent
        session's backlog arrives before them, and once the bound on messages in hand
        is reached only taking messages makes room to read the SUBACK. (Waiting for
        it first made a reconnect under a large backlog time out again and again,
        each attempt filling memory with redelivered messages.)"""
        self.client.bound()
        subscribing = asyncio.ensure_future(self._subscribe(topics, on_subscribed))
        subscribing.add_done_callback(self._subscribed)
        messages = aiter(self.client.messages)
        stop_wait = asyncio.ensure_future(self.stop.wait())
        decoded = asyncio.Event()
        decoded.set()
        try:
            # The next group forms once the previous one is decoded and there is
            # room: messages that arrive meanwhile make it larger.
            while await self._until(decoded, stop_wait) and await self._until(self.room, stop_wait):
                first = asyncio.ensure_future(anext(messages))
                waits: set[asyncio.Future[object]] = {first, stop_wait, self.failed}  # type: ignore[arg-type]
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                if first not in done:
                    first.cancel()
                    break
                msgs = self._form_group(first.result())
                decoded = asyncio.Event()
                devices = frozenset(self._device_of(m) for m in msgs)
                after = [t for t, theirs in self.devices.items() if theirs & devices]
                last = asyncio.create_task(self._handle(msgs, after, decoded))
                self.unfinished[last] = len(msgs)
                self.devices[last] = devices
                self._update_room()
                last.add_done_callback(self._finished)
                last.add_done_callback(self._puback_ready)
                self.inflight.append(Group(msgs, last))
        finally:
            stop_wait.cancel()
            subscribing.cancel()
            if self.inflight:  # drain; retries end within retry.shutdown_grace_s of the stop
                await asyncio.wait([g.task for g in self.inflight])
            self._puback_ready()
        if self.failed.done():
            self.failed.result()  # raise: reconnect

    async def _subscribe(
        self, topics: Sequence[str], on_subscribed: Callable[[], None] | None
    ) -> None:
        # Generous: the SUBACK may wait behind a backlog that is being worked off.
        timeout = max(60.0, 2.0 * self.proc.cfg.mqtt.keepalive_s)
        for topic in topics:
            await self.client.subscribe(topic, timeout)
        if on_subscribed is not None:
            on_subscribed()

    def _subscribed(self, task: asyncio.Future[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._fail(task.exception())  # type: ignore[arg-type]

    def _form_group(self, first: aiomqtt.Message) -> list[aiomqtt.Message]:
        msgs = [first]
        self.client.taken()
        # Brokers should send no more than Receive Maximum unacknowledged; Mosquitto
        # 2.0.11 sends more once PUBACKs flow (eclipse/mosquitto#2301), so the limit
        # is kept here too: the rest waits in the client's queue (which stops reading
        # the socket when full, see mqttclient.py).
        take = min(
            self.receive_maximum - (self.client.in_hand - 1),
            max(1, self.receive_maximum // GROUPS_IN_HAND),  # room for the next group
        )
        while len(msgs) < take and self.client.waiting():
            msgs.append(self.client.take_nowait())
        if self.on_group is not None:
            self.on_group(len(msgs))
        return msgs

    async def _handle(
        self, msgs: list[aiomqtt.Message], after: list[GroupTask], decoded: asyncio.Event
    ) -> list[Outcome] | None:
        """The outcomes once written, recognised or quarantined; None if abandoned at
        shutdown (then nothing is acknowledged). Acks go out in :meth:`_puback_ready`."""
        group = [(str(m.topic), _payload(m)) for m in msgs]
        try:
            return await self.proc.handle_group(group, after, decoded)
        except ShuttingDown as exc:
            self.proc.stats.inc(events.ABANDONED_AT_SHUTDOWN, len(msgs))
            log.error("%s (%d messages not written; redelivered later)", exc, len(msgs))
            return None
        finally:
            decoded.set()

    def _puback_ready(self, _task: object = None) -> None:
        """PUBACK every finished group at the head of the line, then tell its devices."""
        while self.inflight and self.inflight[0].task.done():
            group = self.inflight.popleft()
            task = group.task
            if task.cancelled() or task.exception() is not None:
                self._fail(task.exception() or asyncio.CancelledError())
                continue
            outcomes = task.result()
            if outcomes is None:
                self.client.forget(len(group.messages))  # neither acked nor answered
                continue
            for msg in group.messages:
                self.client.ack(msg)  # now the broker may forget it
            now_ns = time.time_ns()  # the cloud's clock, for the devices' clock offset
            try:
                for o in outcomes:
                    if o.ack is not None and o.device is not None:
                        ack = o.ack.at(now_ns)
                        if self.master_key is not None:
                            ack = ack.signed(o.device, device_key(self.master_key, o.device))
                        if self.client.tell(ack_topic(o.device, self.prefix), ack.encode()):
                            self.proc.stats.inc(events.acks(o.ack.status))
                        else:  # too many await the broker's PUBACK (mqttclient.py)
                            self.proc.stats.inc(events.ACKS_NOT_SENT)
            except aiomqtt.MqttError as exc:
                self._fail(exc)

    def _fail(self, exc: BaseException) -> None:
        if not self.failed.done():
            self.failed.set_exception(exc)

    def _update_room(self) -> None:
        # At most GROUPS_IN_HAND groups, and the next one may take at least half of
        # receive_maximum: a group of the few left over would cost a whole cycle.
        if (
            len(self.unfinished) < GROUPS_IN_HAND
            and sum(self.unfinished.values()) <= self.receive_maximum // 2
        ):
            self.room.set()
        else:
            self.room.clear()

    def _device_of(self, msg: aiomqtt.Message) -> str | None:
        """The device a message is of (None for a topic without one, which the
        decoder quarantines; None is shared with every such message)."""
        try:
            return route(str(msg.topic), self.prefix, self.prefix_v2)[1]
        except Exception:  # noqa: BLE001 (route is string slicing; a bug must not end the loop)
            return None

    def _finished(self, task: GroupTask) -> None:
        self.unfinished.pop(task, None)
        self.devices.pop(task, None)
        self._update_room()

    async def _until(self, gate: asyncio.Event, stop_wait: asyncio.Future[Any]) -> bool:
        """Wait for ``gate``; False if told to stop (or the connection failed) first."""
        if gate.is_set():
            return True
        ready = asyncio.ensure_future(gate.wait())
        either: set[asyncio.Future[object]] = {ready, stop_wait, self.failed}  # type: ignore[arg-type]
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if ready.done():
            return True
        ready.cancel()
        return False


def _payload(msg: aiomqtt.Message) -> bytes:
    return bytes(msg.payload) if isinstance(msg.payload, bytes | bytearray) else b""
