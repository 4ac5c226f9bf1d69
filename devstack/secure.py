"""A cloud broker as the project ships it: TLS, client certificates from
``cloud-ingest pki`` (CN = identity), the per-device ACL, and signed acks.

:func:`secure_cloud` sets it all up in one folder and gives the config tables
that an agent and an ingestor need to use it (the demo and the tests use it).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloud_ingest.ops import pki
from devstack import services
from devstack.services import Service
from shared.acks import device_key


@dataclass
class SecureCloud:
    broker: Service
    folder: Path
    master_key: Path
    device_keys: dict[str, Path] = field(default_factory=dict)

    def agent_broker(self, device: str) -> dict[str, Any]:
        """The agent's [forward.broker] keys (port and TLS with its certificate)."""
        issued = self.folder / "issued"
        return {
            "port": self.broker.port,
            "tls": {
                "ca_file": str(self.folder / "ca.pem"),
                "cert_file": str(issued / f"{device}.pem"),
                "key_file": str(issued / f"{device}.key"),
            },
        }

    def agent_forward(self, device: str) -> dict[str, Any]:
        """The agent's [forward] keys: the broker above and its ack key."""
        return {"broker": self.agent_broker(device), "ack_key_file": str(self.device_keys[device])}

    def ingestor_mqtt(self, identity: str) -> dict[str, Any]:
        """An ingestor's [mqtt] keys."""
        return {**self.agent_broker(identity), "client_id": identity}

    def ingestor_acks(self) -> dict[str, Any]:
        return {"key_file": str(self.master_key)}


def _private(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def secure_cloud(folder: Path, devices: list[str], ingestors: list[str]) -> SecureCloud:
    """Issue certificates (the broker's for 127.0.0.1, one per device and ingestor),
    make the ack keys, and start the broker with the shipped rules."""
    ca = folder / "pki"
    pki.init(ca)
    server = pki.issue(ca, "127.0.0.1", server=True)
    for name in [*devices, *ingestors]:
        pki.issue(ca, name)
    master = secrets.token_bytes(32)
    keys = folder / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    cloud = SecureCloud(
        services.mosquitto(
            folder / "mosquitto-cloud",
            tls=(ca / "ca.pem", server.cert, server.key),
            ingestors=ingestors,
            crl=ca / "crl.pem",
        ),
        ca,
        _private(keys / "master.key", master.hex() + "\n"),
    )
    for device in devices:
        cloud.device_keys[device] = _private(
            keys / f"{device}.key", device_key(master, device).hex() + "\n"
        )
    return cloud
