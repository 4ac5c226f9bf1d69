"""End-to-end acknowledgements: cloud ingest tells a device what became of a batch.

Published at QoS 1 on ``<prefix>/<device_id>/ack`` once the outcome is durable,
as a small JSON object (content type ``application/json``)::

    {"seq": 17, "status": "stored"}
    {"seq": 18, "status": "rejected", "reason": "sink-rejected"}

``stored``: InfluxDB and the archive both hold the batch; the device may delete
it. ``rejected``: the cloud will never store it as a batch (it is kept in the
cloud's quarantine with the reason); the device stops resending it and counts it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from shared import jsonwire
from shared.errors import WireError

Status = Literal["stored", "rejected"]
CONTENT_TYPE = "application/json"


@dataclass(frozen=True)
class Ack:
    seq: int
    status: Status
    reason: str = ""

    def encode(self) -> bytes:
        obj: dict[str, Any] = {"seq": self.seq, "status": self.status}
        if self.reason:
            obj["reason"] = self.reason
        return json.dumps(obj, separators=(",", ":")).encode()


MAX_ACK_BYTES = 1024


def decode_ack(payload: bytes) -> Ack:
    """Parse untrusted bytes; raise :class:`WireError` (``bad-ack``, ``too-large``)."""
    obj = jsonwire.loads(payload, reason="bad-ack", what="an ack", max_bytes=MAX_ACK_BYTES)
    if not isinstance(obj, dict):
        raise WireError("bad-ack", "not a JSON object")
    seq, status, reason = obj.get("seq"), obj.get("status"), obj.get("reason", "")
    if type(seq) is not int or not 0 <= seq < 2**63:
        raise WireError("bad-ack", "seq must be an integer in [0, 2^63)")
    if status not in ("stored", "rejected"):
        raise WireError("bad-ack", f"status {status!r} is not 'stored' or 'rejected'")
    if not isinstance(reason, str):
        raise WireError("bad-ack", "reason must be a string")
    return Ack(seq, status, reason)
