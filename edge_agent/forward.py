"""Forwarder: outbox batches to the cloud broker over MQTT v5, QoS 1.

At most ``max_in_flight`` batches await a PUBACK at once; the oldest pending
seq goes first. A PUBACK moves the batch to ``sent``. After a reconnect, every
batch still unacknowledged is published again (a duplicate is harmless: the
cloud's sinks are idempotent on (device_id, seq)).

Each message carries MQTT v5 properties instead of envelope fields: content
type, payload format indicator 0 (binary), an optional message expiry, and the
user properties ``seq`` and ``schema``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt

from edge_agent import outbox
from edge_agent.config import AgentConfig
from edge_agent.mqtt import connect_async, make_client
from edge_agent.store import Store
from shared.mqttprops import publish_properties
from shared.topics import batch_topic
from shared.wire import CONTENT_TYPE, FORMAT_VERSION

log = logging.getLogger("edge_agent.forward")


class Forwarder:
    def __init__(self, cfg: AgentConfig, store: Store) -> None:
        self.cfg = cfg
        self.store = store
        self.topic = batch_topic(cfg.device_id, cfg.forward.topic_prefix)
        self.connected = threading.Event()
        # paho's network thread only puts events here; all bookkeeping happens in
        # pump() on the agent's thread, so no lock is shared with paho's callbacks.
        self._events: queue.SimpleQueue[tuple[str, int]] = queue.SimpleQueue()
        self._in_flight: dict[int, int] = {}  # mid -> seq
        client_id = cfg.forward.broker.client_id or f"edge-agent-{cfg.device_id}-forward"
        self.client = make_client(cfg.forward.broker, client_id)
        self.client.max_inflight_messages_set(cfg.forward.max_in_flight)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish

    def start(self) -> None:
        connect_async(self.client, self.cfg.forward.broker)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, _c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            log.warning("forward: connect refused: %s", rc)
            return
        self._events.put(("connected", 0))  # pump() republishes what is still pending
        self.connected.set()
        log.info(
            "forward: connected to %s:%s",
            self.cfg.forward.broker.host,
            self.cfg.forward.broker.port,
        )

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        self.connected.clear()
        log.warning("forward: disconnected (%s); paho reconnects", rc)

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            log.warning("forward: broker refused mid %d: %s", mid, rc)
            self._events.put(("refused", mid))  # stays pending; published again
            return
        self._events.put(("puback", mid))

    def pump(self) -> int:
        """Record PUBACKs and publish more pending batches; returns batches newly sent."""
        acked: list[int] = []
        while True:
            try:
                kind, mid = self._events.get_nowait()
            except queue.Empty:
                break
            if kind == "connected":
                self._in_flight.clear()
                continue
            seq = self._in_flight.pop(mid, None)
            if seq is not None and kind == "puback":
                acked.append(seq)
        sent = outbox.mark_sent(self.store, acked) if acked else 0
        if not self.connected.is_set():
            return sent
        room = self.cfg.forward.max_in_flight - len(self._in_flight)
        if room <= 0:
            return sent
        busy = set(self._in_flight.values())
        for item in outbox.pending(self.store, room, exclude=busy):
            info = self.client.publish(
                self.topic,
                item.payload,
                qos=1,
                properties=publish_properties(
                    CONTENT_TYPE,
                    [("seq", str(item.seq)), ("schema", str(FORMAT_VERSION))],
                    self.cfg.forward.message_expiry_s,
                ),
            )
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                log.warning(
                    "forward: publish of seq %d failed: %s", item.seq, mqtt.error_string(info.rc)
                )
                break
            self._in_flight[info.mid] = item.seq
        return sent

    def idle(self) -> bool:
        """True when nothing is in flight and nothing is pending."""
        return (
            not self._in_flight and self._events.empty() and outbox.count_pending(self.store) == 0
        )

    def drain(self, timeout_s: float) -> bool:
        """Publish until the outbox has nothing pending, or ``timeout_s`` passes."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.pump()
            if self.idle():
                return True
            time.sleep(0.05)
        self.pump()
        return self.idle()
