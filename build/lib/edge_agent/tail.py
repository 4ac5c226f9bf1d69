"""``edge-agent tail``: print readings live, as the sensor nodes publish them.

Subscribes to the device broker with its own throw-away session (a plain, not
shared, subscription: the agent still gets every message), so it works whether
or not the agent runs.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.config import AgentConfig
from shared.auth import apply_paho
from shared.errors import WireError
from shared.readings import decode_chunk
from shared.tls import ssl_context
from shared.topics import sensor_filter


@dataclass(frozen=True)
class Reading:
    node: str
    sensor: str
    unit: str
    ts_ns: int
    value: float


def tail(
    cfg: AgentConfig,
    *,
    timeout_s: float | None = None,
    connect_timeout_s: float = 5.0,
    on_subscribed: Callable[[], None] | None = None,
) -> Iterator[Reading | WireError]:
    """Yield readings (and errors for bad messages) until ``timeout_s`` passes, if given.
    ``on_subscribed`` is called once the broker has confirmed the subscription."""
    q: queue.SimpleQueue[mqtt.MQTTMessage] = queue.SimpleQueue()
    prefix = cfg.intake.topic_prefix
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    subscribed = threading.Event()
    client.on_message = lambda _c, _u, msg: q.put(msg)
    client.on_subscribe = lambda _c, _u, _m, _rc, _p: subscribed.set()
    client.on_connect = lambda c, _u, _f, _rc, _p: c.subscribe(sensor_filter(prefix), qos=0)
    b = cfg.intake.broker
    ctx = ssl_context(b.tls)
    if ctx is not None:
        client.tls_set_context(ctx)
    apply_paho(client, b.auth)
    client.connect(b.host, b.port, keepalive=30)
    client.loop_start()
    try:
        deadline = time.monotonic() + connect_timeout_s
        while not subscribed.is_set():
            if time.monotonic() > deadline:
                raise ConnectionError(f"no MQTT subscription at {b.host}:{b.port}")
            time.sleep(0.02)
        if on_subscribed is not None:
            on_subscribed()
        end = None if timeout_s is None else time.monotonic() + timeout_s
        while end is None or time.monotonic() < end:
            wait = 0.5 if end is None else max(0.0, min(0.5, end - time.monotonic()))
            try:
                msg = q.get(timeout=wait)
            except queue.Empty:
                continue
            try:
                chunk = decode_chunk(msg.topic, bytes(msg.payload), prefix)
            except WireError as exc:
                yield exc
                continue
            for t, v in zip(chunk.ts.tolist(), chunk.values.tolist(), strict=True):
                yield Reading(chunk.node, chunk.sensor, chunk.unit, t, v)
    finally:
        client.disconnect()
        client.loop_stop()
