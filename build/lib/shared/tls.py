"""TLS for the MQTT links: one config table and one place that builds the SSL context.

``[<broker>.tls]`` with ``ca_file`` turns TLS on: the broker's certificate must
chain to that CA (and match the host name). ``system_ca = true`` turns it on
with the system's trust store instead, for brokers with a public certificate
(HiveMQ Cloud, EMQX Cloud, AWS IoT Core). ``cert_file`` and ``key_file`` add a
client certificate, for brokers that authenticate devices by certificate.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from shared.config import Invalid


@dataclass(frozen=True)
class TlsConfig:
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    system_ca: bool = False

    def __post_init__(self) -> None:
        for key in ("ca_file", "cert_file", "key_file"):
            path = getattr(self, key)
            if path and not Path(path).is_file():
                raise Invalid(key, f"file not found: {path}")
        if bool(self.cert_file) != bool(self.key_file):
            raise Invalid("cert_file", "cert_file and key_file go together")
        if self.cert_file and not self.enabled:
            raise Invalid("ca_file", "a client certificate needs TLS: ca_file or system_ca")
        if self.ca_file and self.system_ca:
            raise Invalid("system_ca", "give ca_file or system_ca = true, not both")

    @property
    def enabled(self) -> bool:
        return bool(self.ca_file) or self.system_ca


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def require_tls(host: str, tls: TlsConfig, insecure: bool) -> None:
    """Secure by default: plain MQTT only to this machine, or with ``insecure = true``.
    Raises :class:`Invalid` (key ``insecure``)."""
    if not tls.enabled and not insecure and not is_loopback(host):
        raise Invalid(
            "insecure",
            f"plain MQTT to {host}: set tls.ca_file to encrypt the link, or insecure = true "
            "to send readings and credentials in clear",
        )


def ssl_context(tls: TlsConfig) -> ssl.SSLContext | None:
    """The client SSL context for ``tls``, or None when TLS is off."""
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca_file or None)
    if tls.cert_file:
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
    return ctx


def server_certificate_expiry(
    host: str, port: int, tls: TlsConfig, timeout_s: float = 5.0
) -> float:
    """Seconds since the epoch at which the broker's certificate expires (verifies it)."""
    ctx = ssl_context(tls)
    if ctx is None:
        raise ValueError("TLS is not configured")
    with (
        socket.create_connection((host, port), timeout=timeout_s) as raw,
        ctx.wrap_socket(raw, server_hostname=host) as conn,
    ):
        cert = conn.getpeercert()
    if not cert or "notAfter" not in cert:
        raise ssl.SSLError("the broker sent no certificate")
    return float(ssl.cert_time_to_seconds(str(cert["notAfter"])))
