"""Intake: readings from the sensor nodes' local broker into the durable buffer.

Subscribes to ``<prefix>/+/+`` at QoS 1 with a persistent session, so the broker
keeps readings while the agent is down. Acknowledgement is manual: messages are
committed to SQLite in groups (``storage.group_commit_max`` per transaction, one
fsync) and each PUBACK goes to the broker only after its group's commit, in
arrival order, so a reading the broker saw acknowledged is on disk. A message
that cannot be parsed is stored in the ``quarantine`` table with its reason,
counted, and acknowledged (resending it cannot fix it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

from edge_agent import alerts, buffer
from edge_agent.alerts import AlertEngine
from edge_agent.config import AgentConfig
from edge_agent.mqtt import connect_async, make_client
from edge_agent.store import Store
from shared.errors import WireError
from shared.readings import ReadingChunk, decode_chunk
from shared.topics import sensor_filter

log = logging.getLogger("edge_agent.intake")


class Intake:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.store = Store(cfg.storage.path, synchronous=cfg.storage.synchronous)
        self.registry = buffer.SensorRegistry(self.store)
        self.connected = threading.Event()
        self.store_errors = 0
        self.subscribed = threading.Event()
        self.late_policy = buffer.LatePolicy(
            cfg.window.width_ns, cfg.window.max_age_ns, cfg.window.hop_ns
        )
        self.alerts = AlertEngine(cfg.alerts, self.store)
        # Group commit: messages wait here (unacknowledged) until their transaction.
        # The lock also serialises this thread's and the agent tick's use of self.store.
        self._lock = threading.Lock()
        self._pending: list[tuple[mqtt.MQTTMessage, ReadingChunk]] = []
        self._first_pending = 0.0
        client_id = cfg.intake.broker.client_id or f"edge-agent-{cfg.device_id}-intake"
        self.client = make_client(cfg.intake.broker, client_id, manual_ack=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe

    def start(self) -> None:
        connect_async(self.client, self.cfg.intake.broker)

    def stop(self) -> None:
        self.flush()
        self.client.disconnect()
        self.client.loop_stop()
        self.store.close()

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            log.warning("intake: connect refused: %s", rc)
            return
        client.subscribe(sensor_filter(self.cfg.intake.topic_prefix), qos=1)
        self.connected.set()
        log.info(
            "intake: connected to %s:%s", self.cfg.intake.broker.host, self.cfg.intake.broker.port
        )

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, _mid: int, rcs: Any, _p: Any) -> None:
        if any(rc.is_failure for rc in rcs):
            log.error("intake: subscription refused: %s", rcs)
            return
        self.subscribed.set()

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        self.connected.clear()
        self.subscribed.clear()
        log.warning("intake: disconnected (%s); paho reconnects", rc)

    def _on_message(self, client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            chunk = decode_chunk(msg.topic, bytes(msg.payload), self.cfg.intake.topic_prefix)
        except WireError as exc:
            with self._lock:
                self._flush_locked()  # PUBACKs go out in the order the messages came
                self._quarantine(msg, exc)
                client.ack(msg.mid, msg.qos)  # resending cannot fix it; kept with its reason
            return
        with self._lock:
            if not self._pending:
                self._first_pending = time.monotonic()
            self._pending.append((msg, chunk))
            st = self.cfg.storage
            if (
                len(self._pending) >= st.group_commit_max
                or time.monotonic() - self._first_pending >= st.group_commit_ms / 1000
            ):
                self._flush_locked()

    def flush(self) -> None:
        """Commit and acknowledge what waits for its group (the agent's tick calls this)."""
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if not self._pending:
            return
        group, self._pending = self._pending, []
        items = [
            buffer.Incoming(
                chunk,
                buffer.message_digest(msg.topic, bytes(msg.payload)),
                self._alert_hook(chunk.node, chunk.sensor),
            )
            for msg, chunk in group
        ]
        try:
            results = buffer.store_many(
                self.store,
                self.registry,
                items,
                future_limit_ns=time.time_ns() + self.cfg.window.max_future_ns,
                late=self.late_policy,
            )
        except Exception:  # logged and counted; paho's thread must survive any error
            # Not acknowledged: the broker keeps the messages and redelivers them when
            # the session resumes.
            self.store_errors += 1
            log.exception("intake: could not store %d messages (not acknowledged)", len(group))
            return
        for (msg, chunk), res in zip(group, results, strict=True):
            if res.future:
                log.warning(
                    "intake: dropped %d readings of %s/%s stamped more than %.0f s ahead",
                    res.future,
                    chunk.node,
                    chunk.sensor,
                    self.cfg.window.max_future_s,
                )
            if res.late:
                log.warning(
                    "intake: dropped %d late readings of %s/%s (windows closed, and too old "
                    "for a revision or revisions are off)",
                    res.late,
                    chunk.node,
                    chunk.sensor,
                )
            # Only after the commit above: now the broker may forget the message.
            self.client.ack(msg.mid, msg.qos)

    def _alert_hook(self, node: str, sensor: str) -> Callable[[Any, Any], None] | None:
        """Rules for this sensor, evaluated inside the transaction that stores its readings."""
        if f"{node}/{sensor}" not in self.alerts.by_sensor:
            return None

        def hook(ts: Any, vals: Any) -> None:
            events = self.alerts.evaluate(node, sensor, ts.tolist(), vals.tolist())
            if events:
                alerts.record(self.store, events)
                for ev in events:
                    log.warning("alert %s %s: %s", ev.rule, ev.state, ev.message)

        return hook

    def _quarantine(self, msg: mqtt.MQTTMessage, exc: WireError) -> None:
        log.warning("intake: quarantined message on %s: %s", msg.topic, exc)
        with self.store.tx():
            self.store.conn.execute(
                "INSERT INTO quarantine(received_ns, topic, reason, message, payload) "
                "VALUES (?, ?, ?, ?, ?)",
                (time.time_ns(), msg.topic, exc.reason, str(exc), bytes(msg.payload[:65536])),
            )
            self.store.add_counter(f"quarantined_{exc.reason}", 1)
