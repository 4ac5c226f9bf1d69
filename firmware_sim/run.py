"""Run the simulated sensor nodes: publish reading chunks on an event-time schedule.

Event time starts at ``start_ns`` (now, by default) and advances ``speed``
times faster than wall time; a chunk is published once event time reaches its
last reading. Every chunk is published at QoS 1 to the local broker (or posted
to the agent's HTTP intake), as its node's device family does
(firmware_sim/families.py), and written to the ground-truth file.
"""

from __future__ import annotations

import heapq
import logging
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

log = logging.getLogger("firmware_sim")


@dataclass(frozen=True)
class SimResult:
    readings: int
    messages: int
    start_ns: int
    end_ns: int


def _connect(cfg: SimConfig, timeout_s: float = 30.0) -> mqtt.Client:
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
    client = _connect(cfg)
    truth = TruthWriter(cfg.truth_path)
    infos: list[mqtt.MQTTMessageInfo] = []
    readings = posts = 0
    wall0 = time.monotonic()
    try:
        while heap:
            due, ni, si, k = heapq.heappop(heap)
            wait = wall0 + (due - start_ns) / 1e9 / cfg.speed - time.monotonic()
            if wait > 0:
                time.sleep(wait)  # pacing of the simulated clock, not a wait for a service
            node = cfg.nodes[ni]
            spec = node.sensors[si]
            ts = chunk_times(spec, start_ns, k)
            vals = chunk_values(spec, ts, cfg.seed, ni, si, k)
            ts_l, v_l = ts.tolist(), vals.tolist()
            pub = publication(cfg, node, spec, ts_l, v_l)
            for topic, payload in pub.messages:
                infos.append(client.publish(topic, payload, qos=1))
            if pub.http_body is not None:
                post(cfg, pub.http_body)  # 204 only once the agent has committed it
                posts += 1
            truth.write(node.id, spec.name, spec.unit, pub.ts, v_l, stamped=node.family in STAMPED)
            readings += len(ts_l)
            nxt = due + spec.chunk * period_ns(spec)  # (due includes the delay)
            if nxt - delay_ns(spec) < end_ns:
                heapq.heappush(heap, (nxt, ni, si, k + 1))
        deadline = time.monotonic() + 60
        for info in infos:
            info.wait_for_publish(timeout=max(0.1, deadline - time.monotonic()))
        unacked = sum(1 for i in infos if not i.is_published())
        if unacked:
            raise ConnectionError(f"{unacked} messages were not acknowledged by the broker")
    finally:
        truth.close()
        client.disconnect()
        client.loop_stop()
    log.info(
        "firmware-sim: published %d readings in %d messages and %d HTTP posts",
        readings,
        len(infos),
        posts,
    )
    return SimResult(
        readings=readings, messages=len(infos) + posts, start_ns=start_ns, end_ns=end_ns
    )
