"""The config of one MQTT link, the same for the agent's two brokers
(``[intake.broker]``, ``[forward.broker]``) and the ingestor's (``[mqtt]``): where
the broker is, how the session is kept, how to reconnect, TLS and credentials.

Each side adds what is its own (the ingestor its subscriptions and Receive
Maximum) and its own checks (the cloud link refuses plain MQTT to another machine
unless ``insecure``: :func:`shared.tls.require_tls`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from shared import backoff
from shared.auth import AuthConfig
from shared.config import Invalid, port, positive
from shared.tls import TlsConfig


@dataclass(frozen=True)
class MqttLinkConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    #: the persistent session is keyed by it ("" = the component's default)
    client_id: str = ""
    keepalive_s: int = 30
    session_expiry_s: int = 7 * 24 * 3600
    reconnect_min_s: float = backoff.DEFAULT_MIN_S
    reconnect_max_s: float = backoff.DEFAULT_MAX_S
    tls: TlsConfig = field(default_factory=TlsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    #: plain MQTT to another machine only if true (secure by default); links to a
    #: broker on the same machine (the device's own) need no TLS
    insecure: bool = False

    def __post_init__(self) -> None:
        port("port", self.port)
        positive("keepalive_s", self.keepalive_s)
        if self.session_expiry_s < 0:
            raise Invalid("session_expiry_s", "must be >= 0")
        backoff.check(self.reconnect_min_s, self.reconnect_max_s)
