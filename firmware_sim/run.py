"""Run the simulated sensor nodes: publish reading chunks on an event-time schedule.

Event time starts at ``start_ns`` (now, by default) and advances ``speed``
times faster than wall time; a chunk is published once event time reaches its
last reading. Every chunk is published at QoS 1 to the local broker (or posted
to the agent's HTTP intake), as its node's device family does
(firmware_sim/families.py), and written to the ground-truth file once, whatever
becomes of its publishes.

Like real firmware, the simulator outlives its broker: paho keeps every QoS 1
message until the broker acknowledges it, queues what is published while the
connection is down, reconnects with backoff and sends again what was not
acknowledged. It gives up, with a one-line error naming why, only when the
broker has been unreachable for ``broker.give_up_s`` or has not acknowledged
everything within ``give_up_s`` of the last chunk.
"""

from __future__ import annotations

import heapq
import logging
import threading
import time
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from firmware_sim.config import SensorSpec, SimConfig
from firmware_sim.families import STAMPED, post, publication
from firmware_sim.sensors import chunk_times, chunk_values, period_ns
from firmware_sim.truth import TruthWriter
from shared import backoff
from shared.auth import apply_paho
from shared.tls import ssl_context

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimResult:
    readings: int
    messages: int
    start_ns: int
    end_ns: int


class Acks:
    """The QoS 1 messages the broker has not acknowledged yet, by packet id.

    paho's ``MQTTMessageInfo.is_published`` raises for a message published while
    the link was down (its ``rc`` stays "not connected" even after paho has sent
    it on the reconnect and the broker has acknowledged it): its ``on_publish``
    callback is what says a message arrived. paho gives an id again only once its
    message was acknowledged, so a set of ids is exact.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: set[int] = set()
        self._early: set[int] = set()  # acknowledged before publish() returned its id
        self.sent = 0

    def on_publish(self, _c: mqtt.Client, _u: object, mid: int, _rc: object, _p: object) -> None:
        with self._lock:
            if mid in self._pending:
                self._pending.remove(mid)
            else:
                self._early.add(mid)

    def track(self, info: mqtt.MQTTMessageInfo) -> None:
        with self._lock:
            self.sent += 1
            if info.mid in self._early:
                self._early.remove(info.mid)
            else:
                self._pending.add(info.mid)

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)


class Link:
    """Whether the broker connection is up, and since when it is down (monotonic)."""

    def __init__(self) -> None:
        self.down_since: float | None = time.monotonic()
        self.losses = 0

    def on_connect(self, _c: mqtt.Client, _u: object, _f: object, rc: object, _p: object) -> None:
        if not getattr(rc, "is_failure", False):
            self.down_since = None

    def on_disconnect(
        self, _c: mqtt.Client, _u: object, _f: object, _rc: object, _p: object
    ) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            self.losses += 1
            log.warning(
                "firmware-sim: lost the broker; reconnecting, keeping what it has not acknowledged"
            )

    def check(self, cfg: SimConfig, unacked: int) -> None:
        """Raise ``ConnectionError`` once the broker has been away for ``give_up_s``."""
        since = self.down_since
        if since is not None and time.monotonic() - since > cfg.broker.give_up_s:
            raise ConnectionError(
                f"the broker at {cfg.broker.host}:{cfg.broker.port} was unreachable for "
                f"{cfg.broker.give_up_s:g} s (broker.give_up_s); {unacked} messages not "
                "acknowledged"
            )


def _connect(cfg: SimConfig, link: Link, acks: Acks, timeout_s: float = 30.0) -> mqtt.Client:
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=cfg.broker.client_id,
        protocol=mqtt.MQTTv5,
    )
    client.max_inflight_messages_set(100)
    client.max_queued_messages_set(0)  # 0 = unbounded: never drop a reading locally
    backoff.set_paho(client, cfg.broker.reconnect_min_s, cfg.broker.reconnect_max_s)
    ctx = ssl_context(cfg.broker.tls)
    if ctx is not None:
        client.tls_set_context(ctx)
    apply_paho(client, cfg.broker.auth)
    client.on_connect = link.on_connect
    client.on_disconnect = link.on_disconnect
    client.on_publish = acks.on_publish
    client.connect_async(cfg.broker.host, cfg.broker.port, keepalive=30)
    client.loop_start()
    deadline = time.monotonic() + timeout_s
    while not client.is_connected():
        if time.monotonic() > deadline:
            client.loop_stop()
            raise ConnectionError(
                f"could not connect to the broker at {cfg.broker.host}:{cfg.broker.port}"
            )
        time.sleep(0.02)
    return client


def delay_ns(spec: SensorSpec) -> int:
    return round(spec.delay_s * 1e9)


def run_sim(cfg: SimConfig) -> SimResult:
    start_ns = cfg.start_ns or (time.time_ns() // 1_000_000) * 1_000_000
    end_ns = start_ns + int(cfg.duration_s * 1e9)
    # heap of (publish time, node index, sensor index, chunk index), in event time: a
    # chunk is due when its last reading is taken, and published delay_s after that
    heap: list[tuple[int, int, int, int]] = []
    for ni, node in enumerate(cfg.nodes):
        for si, spec in enumerate(node.sensors):
            due = start_ns + (spec.chunk - 1) * period_ns(spec)
            if due < end_ns:
                heap.append((due + delay_ns(spec), ni, si, 0))
    heapq.heapify(heap)
    link, acks = Link(), Acks()
    client = _connect(cfg, link, acks)
    truth = TruthWriter(cfg.truth_path)
    readings = posts = 0
    wall0 = time.monotonic()
    try:
        while heap:
            due, ni, si, k = heapq.heappop(heap)
            wait = wall0 + (due - start_ns) / 1e9 / cfg.speed - time.monotonic()
            if wait > 0:
                time.sleep(wait)  # pacing of the simulated clock, not a wait for a service
            link.check(cfg, acks.pending())
            node = cfg.nodes[ni]
            spec = node.sensors[si]
            ts = chunk_times(spec, start_ns, k)
            vals = chunk_values(spec, ts, cfg.seed, ni, si, k)
            ts_l, v_l = ts.tolist(), vals.tolist()
            pub = publication(cfg, node, spec, ts_l, v_l)
            for topic, payload in pub.messages:
                # while the link is down paho queues the message (rc NO_CONN) and
                # sends it after the reconnect, as it resends what was not acknowledged
                acks.track(client.publish(topic, payload, qos=1))
            if pub.http_body is not None:
                post(cfg, pub.http_body)  # 204 only once the agent has committed it
                posts += 1
            truth.write(node.id, spec.name, spec.unit, pub.ts, v_l, stamped=node.family in STAMPED)
            readings += len(ts_l)
            nxt = due + spec.chunk * period_ns(spec)  # (due includes the delay)
            if nxt - delay_ns(spec) < end_ns:
                heapq.heappush(heap, (nxt, ni, si, k + 1))
        deadline = time.monotonic() + cfg.broker.give_up_s
        while acks.pending():
            link.check(cfg, acks.pending())
            if time.monotonic() > deadline:
                raise ConnectionError(
                    f"{acks.pending()} messages were not acknowledged by the broker at "
                    f"{cfg.broker.host}:{cfg.broker.port} within {cfg.broker.give_up_s:g} s "
                    "(broker.give_up_s)"
                )
            time.sleep(0.02)  # polling paho's acknowledgements, with the deadline above
    finally:
        truth.close()
        client.disconnect()
        client.loop_stop()
    log.info(
        "firmware-sim: published %d readings in %d messages and %d HTTP posts "
        "(the broker was lost %d times)",
        readings,
        acks.sent,
        posts,
        link.losses,
    )
    return SimResult(
        readings=readings, messages=acks.sent + posts, start_ns=start_ns, end_ns=end_ns
    )
