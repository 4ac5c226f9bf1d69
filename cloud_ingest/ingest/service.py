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
waiting when the previous group has been decoded (see consume.py for the
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import aiomqtt

from cloud_ingest.config import IngestConfig
from cloud_ingest.ingest import events
from cloud_ingest.ingest.consume import GroupConsumer
from cloud_ingest.ingest.metrics import Liveness, MetricsServer
from cloud_ingest.ingest.mqttclient import IngestClient
from cloud_ingest.ingest.process import Processor
from cloud_ingest.ingest.watchdog import feed
from cloud_ingest.sinks.archive import open_archive
from cloud_ingest.sinks.influx import make_point_sink
from shared import backoff
from shared.cli import write_ready_file
from shared.errors import StorageError
from shared.sdnotify import Notifier
from shared.topics import alert_filter, batch_filter, health_filter, raw_filter, result_filter

log = logging.getLogger(__name__)


async def serve(
    cfg: IngestConfig,
    stop: asyncio.Event,
    ready_file: str | None = None,
    died: list[str] | None = None,
) -> Processor:
    points = make_point_sink(cfg.influx)
    archive = open_archive(cfg.archive)
    proc = Processor(cfg, points, archive, stop)
    log.info("decoders and encoders ready in %.2f s", await asyncio.to_thread(proc.warm_up))
    health = Liveness()
    health.in_hand_limit = cfg.mqtt.receive_maximum
    died = died if died is not None else []
    notifier = Notifier()  # systemd: READY=1 and the watchdog (cloud_ingest/ingest/watchdog.py)
    metrics: MetricsServer | None = None
    on_group: Callable[[float], None] | None = None
    watcher: asyncio.Future[None] | None = None
    if cfg.http.listen:
        metrics = MetricsServer(cfg.http.listen, proc.stats, health, proc.devices).start()
        sink_seconds = metrics.sink_seconds
        proc.writer.on_sink_time = lambda sink, secs: sink_seconds.labels(sink).observe(secs)
        on_group = metrics.group_messages.observe
        log.info("metrics on http://%s/metrics", cfg.http.listen)
        watcher = asyncio.ensure_future(_watch_threads(metrics, stop, died))
    topic = cfg.mqtt.subscription or batch_filter(cfg.mqtt.topic_prefix)
    alerts = cfg.mqtt.alert_subscription or alert_filter(cfg.mqtt.topic_prefix)
    reports = cfg.mqtt.health_subscription or health_filter(cfg.mqtt.topic_prefix)
    results = cfg.mqtt.result_subscription or result_filter(cfg.mqtt.topic_prefix)
    raw = cfg.mqtt.raw_subscription or raw_filter(cfg.mqtt.topic_prefix)
    topics = [topic, alerts, reports, results, raw]
    if cfg.mqtt.topic_prefix_v2:  # batches of wire format v2 (docs/wire-format.md §2.14)
        topics.append(cfg.mqtt.subscription_v2 or batch_filter(cfg.mqtt.topic_prefix_v2))
    delay = cfg.mqtt.reconnect_min_s
    dog = asyncio.ensure_future(feed(notifier, proc.stats, lambda: health.in_hand(), died, stop))
    try:
        while not stop.is_set():
            try:
                # Received and not acknowledged, queued or in hand, at most what
                # Receive Maximum promises, whatever the broker sends (mqttclient.py)
                async with IngestClient(cfg, cfg.mqtt.receive_maximum) as client:

                    def subscribed() -> None:
                        nonlocal delay
                        log.info("subscribed to %s on %s:%s", topic, cfg.mqtt.host, cfg.mqtt.port)
                        delay = cfg.mqtt.reconnect_min_s
                        health.subscribed.set()
                        write_ready_file(ready_file)
                        notifier.ready(f"subscribed to {cfg.mqtt.host}:{cfg.mqtt.port}")

                    consumer = GroupConsumer(client, proc, stop, health, on_group)
                    await consumer.run(topics, subscribed)
                    health.subscribed.clear()
            except aiomqtt.MqttError as exc:
                health.subscribed.clear()
                if stop.is_set():
                    break
                proc.stats.inc(events.MQTT_RECONNECTS)
                wait = backoff.jittered(delay)
                log.warning("mqtt: %s; reconnecting in %.1f s", exc, wait)
                try:
                    await asyncio.wait_for(stop.wait(), timeout=wait)
                except TimeoutError:
                    delay = backoff.next_delay(delay, cfg.mqtt.reconnect_max_s)
    finally:
        notifier.stopping()
        dog.cancel()
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
    except StorageError as exc:  # its own state file (quotas.state_file): one line
        log.critical("cloud-ingest cannot start: %s", exc)
        return 2
    except Exception:  # a bug: say so in the log, and exit 1 for a restart
        log.critical("cloud-ingest stopped on an unexpected error", exc_info=True)
        return 1
    return 1 if died else 0
