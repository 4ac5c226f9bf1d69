"""``/metrics`` (Prometheus) and ``/healthz`` for cloud ingest, on ``[http] listen``.

Served from a small thread (the standard library's HTTP server), so a slow
scraper never touches the asyncio loop that moves the data.

Metrics (all counters end in ``_total``):

* ``cloud_ingest_events_total{event=…}``: every counter of the processor:
  ``received``, ``batches_written``, ``points_written``, ``duplicates``,
  ``alerts_received``, ``alerts_written``, ``acks_stored``, ``acks_rejected``,
  ``influx_retries``, ``archive_retries``, ``mqtt_reconnects``, …
* ``cloud_ingest_quarantined_total{reason=…}``: rejected input, by reason (the
  per-device quotas' reasons among them: cloud_ingest/ingest/quotas.py)
* ``cloud_ingest_deferred_total{reason=…}``: messages acknowledged to the broker
  and not answered, which their devices send again: ``rate`` (a device over its
  message rate), ``series-table-full``, ``sink-limit`` (InfluxDB's state refused
  the batch: a series limit, a field type conflict) and ``archive-refused``
* ``cloud_ingest_sink_seconds{sink="influx"|"archive"}``: a histogram of the time
  each successful write took, retries included
* ``cloud_ingest_up``: 1 while subscribed to the broker
* ``cloud_ingest_queue_depth``: messages received and not yet acknowledged to the
  broker, waiting or being written (at most ``mqtt.receive_maximum`` with a broker
  that honours it; Mosquitto 2.0.11 does not)
* ``cloud_ingest_in_hand``: of those, the messages in groups being decoded or
  written: at most ``cloud_ingest_in_hand_limit`` (``mqtt.receive_maximum``),
  whatever the broker does
* ``cloud_ingest_acks_pending``: device acks published and not yet acknowledged
  by the broker (at most 16,384; beyond that an ack is not
  sent and counted as ``acks_not_sent``: the device resends and is answered then)
* ``cloud_ingest_group_messages``: a histogram of the messages per group (large
  groups under load share the fixed costs; docs/cloud-ingest.md)

Fleet health, one series per device the ingestor remembers (at most
``fleet.max_devices``; cloud_ingest/ingest/registry.py), label ``device_id``:

* ``cloud_ingest_device_last_heard_timestamp_seconds``: when any message of the
  device last decoded, at the ingestor's clock
* from its latest health report (shared/health.py), when one arrived within
  ``fleet.health_fresh_s`` (so that, with several ingestors sharing the load, one
  that took no report of a device for long does not keep an old one alive):
  ``edge_agent_ok`` (1 when the report lists no problem),
  ``edge_agent_backlog_batches``, ``edge_agent_oldest_unsent_age_seconds``
  (0 when nothing is unsent), ``edge_agent_disk_used_ratio`` (of its budget; 0
  without one), ``edge_agent_drops_total`` (every ``dropped_*`` counter added up),
  ``edge_agent_store_errors_total``, ``edge_agent_report_timestamp_seconds``
  (the device's clock), ``edge_agent_config_version`` (the desired config version
  in force, 0 for the config file alone) and ``edge_agent_config_rolled_back``
  (1 when the device rolled its last version back; docs/commands.md)
* ``edge_agent_config_desired_version``: the newest desired config version the
  device accepted (the result of its ``config`` command), when this ingestor saw
  one: ``edge_agent_config_desired_version != edge_agent_config_version`` is a
  device that is not on the version it accepted (on trial, or rolled back)
* ``cloud_ingest_fleet_devices``: devices remembered;
  ``cloud_ingest_fleet_devices_forgotten_total``: devices forgotten to keep the bound

``/healthz`` answers 200 while the service is subscribed, 503 otherwise.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from cloud_ingest.ingest import events
from cloud_ingest.ingest.registry import DeviceRegistry
from cloud_ingest.ingest.writer import Stats


class Liveness:
    """What /healthz and the gauges read from the running service: subscribed yet,
    and how much is queued, in hand and waiting for an ack. (Not the devices'
    health reports: those are shared/health.py.)"""

    def __init__(self) -> None:
        self.subscribed = threading.Event()
        self.queue_depth: Callable[[], int] = lambda: 0
        self.in_hand: Callable[[], int] = lambda: 0
        self.acks_pending: Callable[[], int] = lambda: 0
        #: mqtt.receive_maximum: the bound of in_hand
        self.in_hand_limit = 0


class _StatsCollector(Collector):
    def __init__(self, stats: Stats, health: Liveness) -> None:
        self.stats = stats
        self.health = health

    def collect(self) -> Iterator[Any]:
        counted = CounterMetricFamily(
            "cloud_ingest_events",
            "Processor events (cloud_ingest/ingest/events.py)",
            labels=["event"],
        )
        quarantined = CounterMetricFamily(
            "cloud_ingest_quarantined", "Input sent to quarantine", labels=["reason"]
        )
        deferred = CounterMetricFamily(
            "cloud_ingest_deferred",
            "Messages deferred: acknowledged to the broker, not answered; the device "
            "sends them again (a quota, or a sink's state)",
            labels=["reason"],
        )
        # every registered event from 0, so that the first one is an increase
        counts = {**dict.fromkeys(events.ALL, 0), **dict(self.stats.counters)}
        for name, value in sorted(counts.items()):
            if name.startswith(events.QUARANTINED_PREFIX):
                quarantined.add_metric([name[len(events.QUARANTINED_PREFIX) :]], value)
            elif name.startswith(events.DEFERRED_PREFIX):
                deferred.add_metric([name[len(events.DEFERRED_PREFIX) :]], value)
            else:
                counted.add_metric([name], value)
        yield counted
        yield quarantined
        yield deferred
        up = GaugeMetricFamily("cloud_ingest_up", "1 while subscribed to the broker")
        up.add_metric([], 1.0 if self.health.subscribed.is_set() else 0.0)
        yield up
        depth = GaugeMetricFamily(
            "cloud_ingest_queue_depth", "Received messages not yet acknowledged to the broker"
        )
        depth.add_metric([], float(self.health.queue_depth()))
        yield depth
        in_hand = GaugeMetricFamily(
            "cloud_ingest_in_hand", "Messages in groups being decoded or written"
        )
        in_hand.add_metric([], float(self.health.in_hand()))
        yield in_hand
        limit = GaugeMetricFamily(
            "cloud_ingest_in_hand_limit", "The bound of cloud_ingest_in_hand (receive_maximum)"
        )
        limit.add_metric([], float(self.health.in_hand_limit))
        yield limit
        acks = GaugeMetricFamily(
            "cloud_ingest_acks_pending",
            "Device acks published and not yet acknowledged by the broker",
        )
        acks.add_metric([], float(self.health.acks_pending()))
        yield acks


class _DevicesCollector(Collector):
    """Per-device series from :class:`Fleet`: a snapshot per scrape."""

    def __init__(self, devices: DeviceRegistry) -> None:
        self.devices = devices

    def collect(self) -> Iterator[Any]:
        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=["device_id"])

        heard = gauge(
            "cloud_ingest_device_last_heard_timestamp_seconds",
            "When a message of the device last decoded (ingestor clock)",
        )
        ok = gauge("edge_agent_ok", "1 when the latest health report lists no problem")
        backlog = gauge("edge_agent_backlog_batches", "Batches not yet acknowledged by the cloud")
        oldest = gauge("edge_agent_oldest_unsent_age_seconds", "Age of the oldest unsent batch")
        disk = gauge("edge_agent_disk_used_ratio", "Buffer use over storage.max_bytes")
        drops = CounterMetricFamily(
            "edge_agent_drops",
            "Every dropped_* counter of the agent, added up",
            labels=["device_id"],
        )
        errors = CounterMetricFamily(
            "edge_agent_store_errors", "Failed buffer transactions", labels=["device_id"]
        )
        reported = gauge(
            "edge_agent_report_timestamp_seconds", "Device clock of the latest health report"
        )
        config = gauge(
            "edge_agent_config_version", "Desired config version in force (0: the file alone)"
        )
        rolled_back = gauge(
            "edge_agent_config_rolled_back",
            "1 when the device rolled its last desired config version back",
        )
        desired = gauge(
            "edge_agent_config_desired_version",
            "Newest desired config version the device accepted (its config command's result)",
        )
        fresh_from = time.time_ns() - int(self.devices.health_fresh_s * 1e9)
        for d in self.devices.snapshot():
            label = [d.device]
            heard.add_metric(label, d.last_heard_ns / 1e9)
            if d.desired_version:
                desired.add_metric(label, float(d.desired_version))
            h = d.health
            if h is None or d.health_received_ns < fresh_from:
                continue
            ok.add_metric(label, 0.0 if h.problems else 1.0)
            backlog.add_metric(label, float(h.backlog_batches))
            oldest.add_metric(label, h.oldest_unsent_age_s or 0.0)
            disk.add_metric(
                label, h.disk_used_bytes / h.disk_budget_bytes if h.disk_budget_bytes else 0.0
            )
            drops.add_metric(label, float(h.dropped_total))
            errors.add_metric(label, float(h.store_errors))
            reported.add_metric(label, h.ts_ns / 1e9)
            config.add_metric(label, float(h.config_version))
            rolled_back.add_metric(label, 1.0 if h.config_state == "rolled-back" else 0.0)
        yield from (heard, ok, backlog, oldest, disk, drops, errors, reported)
        yield from (config, rolled_back, desired)
        devices = GaugeMetricFamily("cloud_ingest_fleet_devices", "Devices remembered")
        devices.add_metric([], float(len(self.devices)))
        yield devices
        forgotten = CounterMetricFamily(
            "cloud_ingest_fleet_devices_forgotten",
            "Devices forgotten to keep fleet.max_devices",
        )
        forgotten.add_metric([], float(self.devices.forgotten))
        yield forgotten


class MetricsServer:
    def __init__(
        self, listen: str, stats: Stats, health: Liveness, devices: DeviceRegistry | None = None
    ) -> None:
        host, _, port = listen.rpartition(":")
        self.registry = CollectorRegistry()
        self.registry.register(_StatsCollector(stats, health))
        if devices is not None:
            self.registry.register(_DevicesCollector(devices))
        self.sink_seconds = Histogram(
            "cloud_ingest_sink_seconds",
            "Time of a successful sink write, retries included",
            ["sink"],
            registry=self.registry,
        )
        self.group_messages = Histogram(
            "cloud_ingest_group_messages",
            "Messages per group",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096),
            registry=self.registry,
        )
        registry, healthy = self.registry, health

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/metrics":
                    body, status = generate_latest(registry), 200
                    ctype = "text/plain; version=0.0.4; charset=utf-8"
                elif self.path == "/healthz":
                    ok = healthy.subscribed.is_set()
                    body, status = (b"ok\n" if ok else b"not subscribed\n"), 200 if ok else 503
                    ctype = "text/plain; charset=utf-8"
                else:
                    body, status, ctype = b"not found\n", 404, "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: Any) -> None:  # scrapes are not worth a log line
                pass

        self.server = ThreadingHTTPServer((host or "127.0.0.1", int(port)), Handler)
        self.thread = threading.Thread(
            target=self.server.serve_forever, daemon=True, name="metrics-http"
        )

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> MetricsServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
