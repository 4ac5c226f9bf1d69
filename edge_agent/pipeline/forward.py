"""Forwarder: outbox batches to the cloud broker over MQTT v5, QoS 1, until the cloud acks.

At most ``max_in_flight`` batches await a PUBACK at once; the oldest due seq
goes first (see :mod:`edge_agent.pipeline.outbox` for the states and the resend
backoff). The same connection subscribes to ``<prefix>/<device_id>/ack``, where
cloud ingest says that a batch is stored (InfluxDB and the archive) or rejected.
After a reconnect, every batch still in flight is published again; duplicates
are harmless because the cloud is idempotent on (device_id, seq).

Each message carries MQTT v5 properties instead of envelope fields: content
type, payload format indicator 0 (binary), an optional message expiry, and the
user properties ``seq`` and ``schema``.
"""

from __future__ import annotations

import logging
import queue
import random
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt

from edge_agent import counters
from edge_agent.clock import Clock, mono_ns
from edge_agent.config import AgentConfig
from edge_agent.desired import Desired
from edge_agent.mqtt import connect_async, make_client
from edge_agent.pipeline import outbox
from edge_agent.store import Store
from shared.acks import CONTENT_TYPE as JSON_CONTENT_TYPE
from shared.acks import MAX_ACK_BYTES, Ack, decode_ack
from shared.auth import read_key
from shared.errors import StorageError, WireError
from shared.mqttprops import PACKET_OVERHEAD, publish_properties
from shared.rawdata import CONTENT_TYPE as RAW_CONTENT_TYPE
from shared.topics import (
    ack_topic,
    alert_topic,
    batch_topic,
    command_topic,
    health_topic,
    raw_topic,
    result_topic,
)
from shared.wire import CONTENT_TYPE, CONTENT_TYPE_V2, FORMAT_VERSION

log = logging.getLogger(__name__)

#: the largest packet the forwarder takes from the cloud broker: acks (shared/acks.py)
ACK_MAX_PACKET = MAX_ACK_BYTES + PACKET_OVERHEAD
#: with commands on: commands too (shared/commands.py MAX_COMMAND_BYTES)
COMMAND_MAX_PACKET = 16 * 1024 + PACKET_OVERHEAD
#: command messages waiting for the agent's thread; more are left unacknowledged,
#: so that the broker delivers them again at the next connection
COMMANDS_WAITING = 64
#: the binary messages' content types; the others are JSON
_CONTENT_TYPES = {"batch": CONTENT_TYPE, "raw": RAW_CONTENT_TYPE}


@dataclass(frozen=True)
class _Verdict:
    """An ack that verified, as paho's thread hands it to :meth:`Forwarder.pump`."""

    ack: Ack
    wall_ns: int
    mono_ns: int
    #: its ``ts_ns`` may correct the device's clock (edge_agent/clock.py)
    trusted: bool


class Forwarder:
    def __init__(
        self,
        cfg: AgentConfig,
        store: Store,
        client: mqtt.Client | None = None,
        desired: Desired | None = None,
    ) -> None:
        """``client``: a paho client to use instead of a new one (tests inject a fake);
        ``desired``: the agent's desired config, for ``config`` commands."""
        self.cfg = cfg
        self.store = store
        self.topic = batch_topic(cfg.device_id, cfg.forward.topic_prefix)
        #: batches of wire format v2 go to their own prefix (docs/wire-format.md §2.6);
        #: each payload's version byte says which, so a change of forward.wire_version
        #: sends the outbox's older batches where they belong
        self.topic_v2 = batch_topic(cfg.device_id, cfg.forward.topic_prefix_v2)
        self.connected = threading.Event()
        # paho's network thread only puts events here; all bookkeeping happens in
        # pump() on the agent's thread, so no lock is shared with paho's callbacks.
        self._events: queue.SimpleQueue[tuple[str, int]] = queue.SimpleQueue()
        self._acks: queue.SimpleQueue[_Verdict] = queue.SimpleQueue()
        self._rng = random.Random()
        self._tokens = 0.0  # backfill byte budget
        self._refilled_ns = 0
        self.ack_topic = ack_topic(cfg.device_id, cfg.forward.topic_prefix)
        prefix = cfg.forward.topic_prefix
        self.topics: dict[outbox.Kind, str] = {
            "batch": self.topic,
            "alert": alert_topic(cfg.device_id, prefix),
            "health": health_topic(cfg.device_id, prefix),
            "result": result_topic(cfg.device_id, prefix),
            "raw": raw_topic(cfg.device_id, prefix),
        }
        #: commands (docs/commands.md), run by pump(): (mid, qos, payload), PUBACKed
        #: only once their transaction is committed
        self.command_topic = command_topic(cfg.device_id, prefix) if cfg.commands.enabled else None
        self._commands: queue.Queue[tuple[int, int, bytes]] = queue.Queue(COMMANDS_WAITING)
        self._runner: Any = None
        if cfg.commands.enabled:
            from edge_agent.pipeline.commands import CommandRunner

            self._runner = CommandRunner(cfg, store, desired=desired)
        self._in_flight: dict[int, int] = {}  # mid -> seq
        #: the device clock against the cloud's, from the acks (edge_agent/pipeline/health.py)
        self.clock = Clock()
        # acts only on acks that verify under this key, if set (shared/acks.py)
        self._ack_key = read_key("ack_key", cfg.forward.ack_key_file, cfg.forward.ack_key_env)
        # a resend is timed on the monotonic clock; times from another boot are void
        try:
            outbox.resume(store)
        except (sqlite3.Error, StorageError) as exc:  # a full disk at start: not fatal
            log.error("forward: could not reset the resend times of another boot: %s", exc)
        client_id = cfg.forward.broker.client_id or f"edge-agent-{cfg.device_id}-forward"
        self.client = client or make_client(cfg.forward.broker, client_id, manual_ack=True)
        self.client.max_inflight_messages_set(cfg.forward.max_in_flight)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message

    def start(self) -> None:
        # the cloud sends this connection acks (at most 1 KiB each), and commands if on
        largest = COMMAND_MAX_PACKET if self.command_topic else ACK_MAX_PACKET
        connect_async(self.client, self.cfg.forward.broker, largest)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, _c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            log.warning("forward: connect refused: %s", rc)
            return
        self.client.subscribe(self.ack_topic, qos=1)
        if self.command_topic is not None:
            self.client.subscribe(self.command_topic, qos=1)
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

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == self.command_topic:
            try:  # PUBACKed by pump(), after the command's transaction
                self._commands.put_nowait((msg.mid, msg.qos, bytes(msg.payload)))
            except queue.Full:
                self._events.put(("commands-busy", 0))
            return
        self.client.ack(msg.mid, msg.qos)  # an ack is in hand: nothing to lose
        self._on_ack(msg)

    def _on_ack(self, msg: mqtt.MQTTMessage) -> None:
        try:
            ack = decode_ack(bytes(msg.payload))
        except WireError as exc:
            log.warning("forward: ignoring a bad ack on %s: %s", msg.topic, exc)
            self._events.put(("bad-ack", 0))
            return
        key = self._ack_key
        if key is not None and not ack.verify(self.cfg.device_id, key):
            log.warning(
                "forward: ignoring an ack for seq %d that does not verify (%s); the batch "
                "is kept and sent again",
                ack.seq,
                "no mac" if not ack.mac else "wrong mac",
            )
            self._events.put(("unverified", ack.seq))
            return
        if ack.status == "rejected":
            log.error("forward: the cloud rejected batch %d: %s", ack.seq, ack.reason)
        elif ack.reason:
            log.warning(
                "forward: the cloud stored batch %d in part: %s (docs/cloud-ingest.md, "
                "'What one device can cost the fleet')",
                ack.seq,
                ack.reason,
            )
        # the cloud's clock counts for placing readings only if the MAC covers it
        trusted = key is None or ack.covers_time
        self._acks.put(_Verdict(ack, time.time_ns(), mono_ns(), trusted))

    def run_commands(self) -> None:
        """Run the commands received (edge_agent/pipeline/commands.py), each PUBACKed
        after its transaction: a crash before leaves it with the broker."""
        while True:
            try:
                mid, qos, payload = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                self._runner.handle(payload)
            except (sqlite3.Error, StorageError) as exc:
                log.error("commands: not run, the buffer failed (%s); the broker keeps it", exc)
                continue  # not PUBACKed: delivered again at the next connection
            self.client.ack(mid, qos)

    def pump(self) -> int:
        """Apply PUBACKs and acks, run the commands received, then publish due
        batches; returns batches newly acked."""
        if self._runner is not None:
            self.run_commands()
        f = self.cfg.forward
        broker_acked: list[int] = []
        bad_acks = unverified = busy = 0
        while True:
            try:
                kind, num = self._events.get_nowait()
            except queue.Empty:
                break
            if kind == "connected":
                self._in_flight.clear()
            elif kind in ("puback", "refused"):
                seq = self._in_flight.pop(num, None)
                if seq is not None and kind == "puback":
                    broker_acked.append(seq)
            elif kind == "unverified":
                unverified += 1
            elif kind == "commands-busy":
                busy += 1
            else:
                bad_acks += 1
        verdicts: list[_Verdict] = []
        while True:
            try:
                verdicts.append(self._acks.get_nowait())
            except queue.Empty:
                break
        if f.end_to_end_ack:
            outbox.mark_sent(
                self.store,
                broker_acked,
                timeout_s=f.ack_timeout_s,
                max_backoff_s=f.max_backoff_s,
                rng=self._rng,
            )
            done = 0
        else:  # the broker's PUBACK is the verdict
            done = sum(outbox.acknowledge(self.store, seq, stored=True) for seq in broker_acked)
        for v in verdicts:
            done += outbox.acknowledge(
                self.store,
                v.ack.seq,
                stored=v.ack.status == "stored",
                generation=v.ack.generation,
                partly=bool(v.ack.reason) and v.ack.status == "stored",
            )
            if v.ack.ts_ns:
                self.clock.acked(
                    v.ack.seq,
                    v.ack.ts_ns,
                    received_wall_ns=v.wall_ns,
                    received_mono_ns=v.mono_ns,
                    trusted=v.trusted,
                )
        if bad_acks or unverified or busy:
            with self.store.tx():
                if bad_acks:
                    self.store.add_counter(counters.ACKS_INVALID, bad_acks)
                if unverified:
                    self.store.add_counter(counters.ACKS_UNVERIFIED, unverified)
                if busy:
                    self.store.add_counter(counters.COMMANDS_DROPPED_BUSY, busy)
        if self.connected.is_set():
            self._publish_due()
        return done

    def _publish_due(self) -> None:
        f = self.cfg.forward
        room = f.max_in_flight - len(self._in_flight)
        if room <= 0:
            return
        busy = set(self._in_flight.values())
        now = mono_ns()  # resends are timed on the monotonic clock
        live_since = time.time_ns() - int(f.live_window_s * 1e9)  # created_ns: wall clock
        self._refill(now)
        for item in outbox.due(
            self.store, room, exclude=busy, now_ns=now, live_since_ns=live_since
        ):
            if not item.intact:
                log.error(
                    "forward: %s seq %d is damaged on disk (its checksum does not match); "
                    "dropped, counted as dropped_damaged_*",
                    item.kind,
                    item.seq,
                )
                outbox.drop_damaged(self.store, item)
                continue
            if not item.live and f.backfill_bytes_per_s:
                if self._tokens < min(len(item.payload), f.backfill_bytes_per_s):
                    return  # the backfill waits for its byte budget; live batches went first
                self._tokens -= len(item.payload)  # may go negative: paid back over time
            topic, schema = self.topics[item.kind], FORMAT_VERSION
            if item.kind == "batch" and item.payload[4:5] == b"\x02":
                topic, schema = self.topic_v2, 2
            info = self.client.publish(
                topic,
                item.payload,
                qos=1,
                properties=publish_properties(
                    _CONTENT_TYPES.get(item.kind, JSON_CONTENT_TYPE)
                    if schema == FORMAT_VERSION
                    else CONTENT_TYPE_V2,
                    [("seq", str(item.seq)), ("schema", str(schema))],
                    self.cfg.forward.message_expiry_s,
                ),
            )
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                log.warning(
                    "forward: publish of seq %d failed: %s", item.seq, mqtt.error_string(info.rc)
                )
                return
            self._in_flight[info.mid] = item.seq
            self.clock.published(item.seq, now)

    def _refill(self, now_ns: int) -> None:
        """Token bucket for the backfill: ``backfill_bytes_per_s``, bursts up to one
        second (``now_ns``: the monotonic clock)."""
        rate = self.cfg.forward.backfill_bytes_per_s
        if rate:
            elapsed = (now_ns - self._refilled_ns) / 1e9 if self._refilled_ns else 1.0
            self._tokens = min(float(rate), self._tokens + elapsed * rate)
        self._refilled_ns = now_ns

    def idle(self) -> bool:
        """True when nothing is in flight and nothing waits for the broker (or, with
        end-to-end acks, for the cloud)."""
        if self._in_flight or not self._events.empty():
            return False
        if self.cfg.forward.end_to_end_ack:
            return outbox.count_unacked(self.store) == 0
        return outbox.count_pending(self.store) == 0

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
