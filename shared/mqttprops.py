"""MQTT v5 property builders (paho's ``Properties`` is untyped; kept to this module)."""

from __future__ import annotations

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

#: What an MQTT packet carries beside its payload, at most, in this project: a fixed
#: header, a topic of at most a few hundred bytes and the properties we set.
PACKET_OVERHEAD = 64 * 1024


def connect_properties(
    session_expiry_s: int,
    receive_maximum: int | None = None,
    max_packet_size: int | None = None,
) -> Properties:
    """CONNECT properties for a persistent session that outlives the connection;
    ``receive_maximum`` caps the QoS 1 messages the broker sends before our PUBACKs;
    ``max_packet_size`` (MQTT v5 Maximum Packet Size) is the largest packet the
    client takes: a broker must not send it a larger one (MQTT 5.0 §3.1.2.11.4;
    Mosquitto drops such a message for that client)."""
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = session_expiry_s
    if receive_maximum is not None:
        props.ReceiveMaximum = receive_maximum
    if max_packet_size is not None:
        props.MaximumPacketSize = max_packet_size
    return props


def subscribe_properties(subscription_id: int) -> Properties:
    """SUBSCRIBE properties: a Subscription Identifier (MQTT 5.0 §3.8.2.1.2), which
    the broker sends back with each message the subscription brings."""
    props = Properties(PacketTypes.SUBSCRIBE)
    props.SubscriptionIdentifier = subscription_id
    return props


def publish_properties(
    content_type: str, user: list[tuple[str, str]], expiry_s: int = 0
) -> Properties:
    """PUBLISH properties: binary payload, content type, user properties, optional expiry."""
    props = Properties(PacketTypes.PUBLISH)
    props.ContentType = content_type
    props.PayloadFormatIndicator = 0
    if expiry_s:
        props.MessageExpiryInterval = expiry_s
    props.UserProperty = user
    return props


def packed_len(props: Properties) -> int:
    """The bytes ``props`` take in a packet, their length prefix included."""
    return len(props.pack())
