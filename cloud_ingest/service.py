"""The ingest service: an aiomqtt subscriber feeding :class:`Processor`, then acking.

It subscribes with a persistent MQTT v5 session (clean_start=False) so that
batches published while it is down wait in the broker. It acknowledges a
message (PUBACK) only after handling it, and tells the broker (Receive Maximum)
to send at most ``mqtt.receive_maximum`` unacknowledged ones: that is the
bounded queue between receiving and writing. After a batch is written
to both sinks (or quarantined) and acknowledged to the broker, it publishes the
verdict on the device's ack topic; the device keeps and resends every batch
until then. PUBACK first: a device that has its ack can be sure that the broker
holds no copy of that batch to deliver again later, which is what lets it send
the next version of a window (docs/cloud-ingest.md, "Revisions in order").

Messages are handled in groups (:meth:`Processor.handle_group`): every message
waiting when the previous group has been decoded (see ``_consume`` for the
limits). A group may be decoded while the one before it is written; writes go
one group after the other, so one device's batches are written in arrival
order, and PUBACKs go out in arrival order. A sink outage holds the groups in
hand in their retries and the broker holds the rest: that is the backpressure.

On SIGTERM/SIGINT it stops taking messages, lets the groups in hand finish for
up to ``retry.shutdown_grace_s``, acknowledges only those that were written, and
exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import aiomqtt

from cloud_ingest.config import IngestConfig
from cloud_ingest.http import Health, MetricsServer
from cloud_ingest.mqttclient import IngestClient
from cloud_ingest.process import Outcome, Processor, ShuttingDown
from cloud_ingest.sinks.archive import open_archive
from cloud_ingest.sinks.influx import make_point_sink
from shared import backoff
from shared.acks import CONTENT_TYPE as ACK_CONTENT_TYPE
from shared.cli import write_ready_file
from shared.mqttprops import publish_properties
from shared.topics import ack_topic, alert_filter, batch_filter

log = logging.getLogger("cloud_ingest.service")
ACK_PROPERTIES = publish_properties(ACK_CONTENT_TYPE, [])
#: Groups in hand: one being written, the next decoded and waiting for it. More
#: would only make them smaller (each group's writes wait for the one before).
GROUPS_IN_HAND = 2


async def serve(
    cfg: IngestConfig,
    stop: asyncio.Event,
    ready_file: str | None = None,
    died: list[str] | None = None,
) -> Processor:
    points = make_point_sink(cfg.influx)
    archive = open_archive(cfg.archive)
    proc = Processor(cfg, points, archive, stop)
    health = Health()
    metrics: MetricsServer | None = None
    on_group: Callable[[float], None] = _ignore
    watcher: asyncio.Future[None] | None = None
    if cfg.http.listen:
        metrics = MetricsServer(cfg.http.listen, proc.stats, health).start()
        sink_seconds = metrics.sink_seconds
        proc.on_sink_time = lambda sink, secs: sink_seconds.labels(sink).observe(secs)
        on_group = metrics.group_messages.observe
        log.info("metrics on http://%s/metrics", cfg.http.listen)
        watcher = asyncio.ensure_future(
            _watch_threads(metrics, stop, died if died is not None else [])
        )
    topic = cfg.mqtt.subscription or batch_filter(cfg.mqtt.topic_prefix)
    alerts = cfg.mqtt.alert_subscription or alert_filter(cfg.mqtt.topic_prefix)
    delay = cfg.mqtt.reconnect_min_s
    try:
        while not stop.is_set():
            try:
                # Received and not acknowledged, queued or in hand, at most what
                # Receive Maximum promises, whatever the broker sends (mqttclient.py)
                async with IngestClient(cfg, cfg.mqtt.receive_maximum) as client:
                    await client.subscribe(topic)
                    await client.subscribe(alerts)
                    log.info("subscribed to %s on %s:%s", topic, cfg.mqtt.host, cfg.mqtt.port)
                    delay = cfg.mqtt.reconnect_min_s
                    health.subscribed.set()
                    write_ready_file(ready_file)
                    await _consume(client, proc, stop, health, on_group)
                    health.subscribed.clear()
            except aiomqtt.MqttError as exc:
                health.subscribed.clear()
                if stop.is_set():
                    break
                proc.stats.inc("mqtt_reconnects")
                wait = backoff.jittered(delay)
                log.warning("mqtt: %s; reconnecting in %.1f s", exc, wait)
                try:
                    await asyncio.wait_for(stop.wait(), timeout=wait)
                except TimeoutError:
                    delay = backoff.next_delay(delay, cfg.mqtt.reconnect_max_s)
    finally:
        health.subscribed.clear()
        if watcher is not None:
            watcher.cancel()
        if metrics is not None:
            metrics.stop()
        proc.close()
        points.close()
        archive.close()
        log.info("stats %s", json.dumps(dict(sorted(proc.stats.counters.items()))))
    return proc


async def _consume(
    client: IngestClient,
    proc: Processor,
    stop: asyncio.Event,
    health: Health,
    on_group: Callable[[float], None],
) -> None:
    """Take the messages in groups and PUBACK them in arrival order, as MQTT requires;
    on ``stop`` take no more and drain what is in hand.

    A group is every message waiting (up to what ``receive_maximum`` leaves room
    for) once the previous group has been decoded, at most one other group is
    unfinished, and at most half of ``receive_maximum`` is in hand. While one group
    is being written, the next one is decoded; writes run one group after the
    other, so a device's batches are written in order."""
    inflight: deque[tuple[list[aiomqtt.Message], asyncio.Task[list[Outcome] | None]]] = deque()
    failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    # Read by the HTTP server's thread: integers that the event loop updates, never
    # the deque itself (iterating it there raced with the loop's changes).
    health.queue_depth = lambda: client.held
    health.in_hand = lambda: client.in_hand
    client.bound()
    prefix = proc.cfg.mqtt.topic_prefix

    def puback_ready(_task: object = None) -> None:
        while inflight and inflight[0][1].done():
            msgs, task = inflight.popleft()
            if task.cancelled() or task.exception() is not None:
                if not failed.done():
                    failed.set_exception(task.exception() or asyncio.CancelledError())
                continue
            outcomes = task.result()
            if outcomes is None:
                client.forget(len(msgs))  # abandoned at shutdown: neither acked nor answered
                continue
            for msg in msgs:
                client.ack(msg)  # now the broker may forget it
            # Only then the devices: once a device has its ack, no copy of the batch
            # is left with the broker to be delivered again, to this process or to
            # another member of a shared subscription (the PUBACK went first on this
            # connection). The device sends a later version of a window only after
            # the ack of the earlier one, so versions are written in order.
            try:
                for o in outcomes:
                    if o.ack is not None and o.device is not None:
                        client.tell(ack_topic(o.device, prefix), o.ack.encode())
                        proc.stats.inc(f"acks_{o.ack.status}")
            except aiomqtt.MqttError as exc:
                if not failed.done():
                    failed.set_exception(exc)

    async def work(
        msgs: list[aiomqtt.Message],
        after: asyncio.Task[list[Outcome] | None] | None,
        decoded: asyncio.Event,
    ) -> list[Outcome] | None:
        """The outcomes once written, recognised or quarantined (and the devices
        told); None if abandoned at shutdown (then nothing is acknowledged)."""
        group = [(str(m.topic), _payload(m)) for m in msgs]
        try:
            outcomes = await proc.handle_group(group, after, decoded)
        except ShuttingDown as exc:
            proc.stats.inc("abandoned_at_shutdown", len(msgs))
            log.error("%s (%d messages not written; redelivered later)", exc, len(msgs))
            return None
        finally:
            decoded.set()
        return outcomes  # acknowledged, and the devices told, in puback_ready

    messages = aiter(client.messages)
    stop_wait = asyncio.ensure_future(stop.wait())
    last: asyncio.Task[list[Outcome] | None] | None = None
    decoded = asyncio.Event()
    decoded.set()
    rm = proc.cfg.mqtt.receive_maximum
    room = asyncio.Event()  # a new group may form (see below)
    room.set()
    unfinished: dict[asyncio.Task[list[Outcome] | None], int] = {}  # group → its size

    def update_room() -> None:
        # At most GROUPS_IN_HAND groups, and the next one may take at least half of
        # receive_maximum: a group of the few left over would cost a whole cycle.
        if len(unfinished) < GROUPS_IN_HAND and sum(unfinished.values()) <= rm // 2:
            room.set()
        else:
            room.clear()

    def finished(task: asyncio.Task[list[Outcome] | None]) -> None:
        unfinished.pop(task, None)
        update_room()

    async def until(gate: asyncio.Event) -> bool:
        """Wait for ``gate``; False if told to stop (or the connection failed) first."""
        if gate.is_set():
            return True
        ready = asyncio.ensure_future(gate.wait())
        either: set[asyncio.Future[object]] = {ready, stop_wait, failed}  # type: ignore[arg-type]
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if ready.done():
            return True
        ready.cancel()
        return False

    try:
        # The next group forms once the previous one is decoded and there is room
        # (update_room): messages that arrive meanwhile make it larger.
        while await until(decoded) and await until(room):
            nxt = asyncio.ensure_future(anext(messages))
            waits: set[asyncio.Future[object]] = {nxt, stop_wait, failed}  # type: ignore[arg-type]
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            if nxt not in done:
                nxt.cancel()
                break
            msgs = [nxt.result()]
            client.taken()
            # Brokers should send no more than Receive Maximum unacknowledged;
            # Mosquitto 2.0.11 sends more once PUBACKs flow (eclipse/mosquitto#2301),
            # so the limit is kept here too: the rest waits in the client's queue
            # (which stops reading the socket when full, see mqttclient.py).
            take = rm - (client.in_hand - 1)
            while len(msgs) < take and client.waiting():
                msgs.append(client.take_nowait())
            on_group(len(msgs))
            decoded = asyncio.Event()
            last = asyncio.create_task(work(msgs, last, decoded))
            unfinished[last] = len(msgs)
            update_room()
            last.add_done_callback(finished)
            last.add_done_callback(puback_ready)
            inflight.append((msgs, last))
    finally:
        stop_wait.cancel()
        if inflight:  # drain; retries end within retry.shutdown_grace_s of the stop
            await asyncio.wait([t for _, t in inflight])
        puback_ready()
    if failed.done():
        failed.result()  # an MQTT error while publishing an ack: reconnect


def _ignore(_value: float) -> None:
    pass


def _payload(msg: aiomqtt.Message) -> bytes:
    return bytes(msg.payload) if isinstance(msg.payload, bytes | bytearray) else b""


async def _watch_threads(metrics: MetricsServer, stop: asyncio.Event, died: list[str]) -> None:
    """No silent death: if the HTTP server's thread ends, /healthz and /metrics go
    with it; stop, so that the process exits 1 and its service manager restarts it."""
    while not stop.is_set():
        if not metrics.thread.is_alive():
            log.critical("the metrics thread died; stopping, to exit with 1")
            died.append(metrics.thread.name)
            stop.set()
            return
        with contextlib.suppress(TimeoutError):  # a second passed: look again
            await asyncio.wait_for(stop.wait(), timeout=1.0)


def run_service(cfg: IngestConfig, ready_file: str | None = None) -> int:
    died: list[str] = []

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        # Decoding and InfluxDB requests run in these threads (Parquet encoding and
        # lake puts in pools of their own, see Processor). More threads than cores
        # fight over the GIL: 2 were faster than 1 or 3 in bench/ingest.py here.
        loop.set_default_executor(
            ThreadPoolExecutor(cfg.worker_threads, thread_name_prefix="ingest")
        )
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(cfg, stop, ready_file, died)

    try:
        asyncio.run(main())
    except Exception:  # a bug: say so in the log, and exit 1 for a restart
        log.critical("cloud-ingest stopped on an unexpected error", exc_info=True)
        return 1
    return 1 if died else 0
