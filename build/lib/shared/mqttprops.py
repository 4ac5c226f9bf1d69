"""MQTT v5 property builders (paho's ``Properties`` is untyped; kept to this module)."""

from __future__ import annotations

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def connect_properties(session_expiry_s: int, receive_maximum: int | None = None) -> Properties:
    """CONNECT properties for a persistent session that outlives the connection;
    ``receive_maximum`` caps the QoS 1 messages the broker sends before our PUBACKs."""
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = session_expiry_s
    if receive_maximum is not None:
        props.ReceiveMaximum = receive_maximum
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
