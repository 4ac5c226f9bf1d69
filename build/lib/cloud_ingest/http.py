"""``/metrics`` (Prometheus) and ``/healthz`` for cloud ingest, on ``[http] listen``.

Served from a small thread (the standard library's HTTP server), so a slow
scraper never touches the asyncio loop that moves the data.

Metrics (all counters end in ``_total``):

* ``cloud_ingest_events_total{event=…}``: every counter of the processor:
  ``received``, ``batches_written``, ``points_written``, ``duplicates``,
  ``alerts_received``, ``alerts_written``, ``acks_stored``, ``acks_rejected``,
  ``influx_retries``, ``archive_retries``, ``mqtt_reconnects``, …
* ``cloud_ingest_quarantined_total{reason=…}``: rejected input, by reason
* ``cloud_ingest_sink_seconds{sink="influx"|"archive"}``: a histogram of the time
  each successful write took, retries included
* ``cloud_ingest_up``: 1 while subscribed to the broker
* ``cloud_ingest_queue_depth``: messages received and not yet acknowledged to the
  broker, waiting or being written (at most ``mqtt.receive_maximum`` with a broker
  that honours it; Mosquitto 2.0.11 does not)
* ``cloud_ingest_in_hand``: of those, the messages in groups being decoded or
  written: at most ``mqtt.receive_maximum``, whatever the broker does
* ``cloud_ingest_acks_pending``: device acks published and not yet acknowledged
  by the broker (at most 16,384; beyond that an ack is not
  sent and counted as ``acks_not_sent``: the device resends and is answered then)
* ``cloud_ingest_group_messages``: a histogram of the messages per group (large
  groups under load share the fixed costs; docs/cloud-ingest.md)

``/healthz`` answers 200 while the service is subscribed, 503 otherwise.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from cloud_ingest.writer import Stats


class Health:
    def __init__(self) -> None:
        self.subscribed = threading.Event()
        self.queue_depth: Callable[[], int] = lambda: 0
        self.in_hand: Callable[[], int] = lambda: 0
        self.acks_pending: Callable[[], int] = lambda: 0


class _StatsCollector(Collector):
    def __init__(self, stats: Stats, health: Health) -> None:
        self.stats = stats
        self.health = health

    def collect(self) -> Iterator[Any]:
        events = CounterMetricFamily("cloud_ingest_events", "Processor events", labels=["event"])
        quarantined = CounterMetricFamily(
            "cloud_ingest_quarantined", "Input sent to quarantine", labels=["reason"]
        )
        for name, value in sorted(dict(self.stats.counters).items()):
            if name.startswith("quarantined_"):
                quarantined.add_metric([name[len("quarantined_") :]], value)
            else:
                events.add_metric([name], value)
        yield events
        yield quarantined
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
        acks = GaugeMetricFamily(
            "cloud_ingest_acks_pending",
            "Device acks published and not yet acknowledged by the broker",
        )
        acks.add_metric([], float(self.health.acks_pending()))
        yield acks


class MetricsServer:
    def __init__(self, listen: str, stats: Stats, health: Health) -> None:
        host, _, port = listen.rpartition(":")
        self.registry = CollectorRegistry()
        self.registry.register(_StatsCollector(stats, health))
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
