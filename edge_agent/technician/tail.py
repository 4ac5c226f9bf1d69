"""``edge-agent tail``: print readings live, as the sensor nodes publish them.

Subscribes to the device broker with its own throw-away session (a plain, not
shared, subscription: the agent still gets every message), so it works whether
or not the agent runs. It subscribes to every MQTT source of the config and reads
each message with that source's decoder (edge_agent/sources), so it shows
ESPHome's values, Tasmota's JSON or Telegraf's lines as the agent will store them
(the HTTP intake and Modbus polls are not on the broker: `sensors` shows those).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import paho.mqtt.client as mqtt

from edge_agent.config import AgentConfig
from edge_agent.mqtt import make_client
from edge_agent.sources.router import MqttSources
from edge_agent.sources.transform import Transforms
from shared.errors import WireError


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
    q: queue.SimpleQueue[tuple[mqtt.MQTTMessage, int]] = queue.SimpleQueue()
    sources = MqttSources(cfg.intake.mqtt_sources, Transforms(cfg.intake.transforms))
    b = cfg.intake.broker
    client = make_client(b, "")  # the broker names the throw-away session
    subscribed = threading.Event()
    client.on_message = lambda _c, _u, msg: q.put((msg, time.time_ns()))
    client.on_subscribe = lambda _c, _u, _m, _rc, _p: subscribed.set()
    client.on_connect = lambda c, _u, _f, _rc, _p: c.subscribe(
        [(f, 0) for f, _ in sources.subscriptions()]
    )
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
                msg, arrived = q.get(timeout=wait)
            except queue.Empty:
                continue
            _, item = sources.decode(msg.topic, bytes(msg.payload), arrived)
            if isinstance(item, WireError):
                yield item
                continue
            for rej in item.rejects:
                yield WireError(rej.reason, rej.message)
            for chunk in item.chunks:
                for t, v in zip(chunk.ts.tolist(), chunk.values.tolist(), strict=True):
                    yield Reading(chunk.node, chunk.sensor, chunk.unit, t, v)
    finally:
        client.disconnect()
        client.loop_stop()
