"""paho-mqtt client construction for the agent: the one place paho is configured,
and the one place its internals are read (its network thread, for supervision)."""

from __future__ import annotations

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.config import BrokerConfig
from shared import backoff
from shared.auth import apply_paho
from shared.mqttprops import connect_properties
from shared.tls import ssl_context


def make_client(cfg: BrokerConfig, client_id: str, *, manual_ack: bool = False) -> mqtt.Client:
    """An MQTT v5 client with a persistent session (clean_start=False)."""
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
        manual_ack=manual_ack,
    )
    backoff.set_paho(client, cfg.reconnect_min_s, cfg.reconnect_max_s)
    ctx = ssl_context(cfg.tls)
    if ctx is not None:
        client.tls_set_context(ctx)
    apply_paho(client, cfg.auth)
    return client


def connect_async(
    client: mqtt.Client,
    cfg: BrokerConfig,
    max_packet_size: int,
    receive_maximum: int | None = None,
) -> None:
    """Start connecting in the background; paho's loop thread reconnects on loss.
    ``max_packet_size``: the largest packet this client takes (MQTT v5 Maximum
    Packet Size), so that a broker never hands the agent a message larger than it
    can use (paho would read it whole into memory first). ``receive_maximum``: the
    QoS 1 and 2 messages the broker may have in flight to this client."""
    client.connect_async(
        cfg.host,
        cfg.port,
        keepalive=cfg.keepalive_s,
        clean_start=False,
        properties=connect_properties(
            cfg.session_expiry_s, receive_maximum, max_packet_size=max_packet_size
        ),
    )
    client.loop_start()


def network_thread_alive(client: mqtt.Client) -> bool:
    """True while paho's network thread (``loop_start``) runs. paho ends that thread
    when a callback raises, and offers no public way to see it: its ``_thread``
    attribute is read here, and only here (paho-mqtt is pinned below 3)."""
    thread = client._thread  # private: no public accessor (see the docstring)
    return thread is not None and thread.is_alive()
