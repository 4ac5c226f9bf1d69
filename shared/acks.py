"""End-to-end acknowledgements: cloud ingest tells a device what became of a batch.

Published at QoS 1 on ``<prefix>/<device_id>/ack`` once the outcome is durable,
as a small JSON object (content type ``application/json``)::

    {"seq": 17, "status": "stored"}
    {"seq": 18, "status": "rejected", "reason": "sink-rejected"}

``stored``: InfluxDB and the archive both hold the batch; the device may delete
it. ``rejected``: the cloud will never store it as a batch (it is kept in the
cloud's quarantine with the reason); the device stops resending it and counts it.

**Acks a device can verify.** The broker's ACL lets only the ingestor publish
acks, but a misconfigured or compromised broker could still deliver a fake
``stored``, and the device would delete a batch the cloud never received. With a
key, each ack carries ``"mac"``: HMAC-SHA256 over (device id, seq, status,
reason), its first 16 bytes in hex, under the device's own key. The ingestors
hold one master key; a device's key is derived from it
(:func:`device_key`, ``cloud-ingest device-key``), so the ingestors need no key
list and a device's key tells nothing about another's. An agent with a key
acts only on acks that verify; any other is ignored (the batch stays and is
sent again) and counted as ``acks_unverified``.

**Generations.** A batch from an agent whose buffer has a generation (a random
number drawn when the buffer was made, docs/wire-format.md §2.3) is answered
with that ``"generation"`` in the ack, and the MAC covers it: an ack meant for
seq 5 of a buffer that has since been re-created cannot delete the new buffer's
seq 5. Such an ack's MAC covers ``generation`` and ``ts_ns`` as well; an ack
without ``generation`` (for a batch without one) has the MAC it always had.

**The cloud's clock.** An ack may carry ``"ts_ns"``, the ingestor's clock when it
sent the ack. The agent estimates its own clock offset from it (shared/health.py),
and uses that offset to place readings stamped ahead of its own clock only when
the value is authenticated (the MAC covers it, or the agent verifies no acks at
all); an ack without ``generation`` does not cover it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any, Literal

from shared import jsonwire
from shared.errors import WireError

Status = Literal["stored", "rejected"]
CONTENT_TYPE = "application/json"


MAC_BYTES = 16


def device_key(master: bytes, device_id: str) -> bytes:
    """A device's ack key, derived from the ingestors' master key."""
    return hmac.new(master, b"telemetry ack key\0" + device_id.encode(), hashlib.sha256).digest()


@dataclass(frozen=True)
class Ack:
    seq: int
    status: Status
    reason: str = ""
    #: hex HMAC (see the module doc); "" when unsigned
    mac: str = ""
    #: the cloud's clock when the ack was sent; 0 when not given
    ts_ns: int = 0
    #: the generation of the batch it answers (the module doc); 0 when it had none
    generation: int = 0

    def signed(self, device_id: str, key: bytes) -> Ack:
        return dataclasses.replace(self, mac=self._mac(device_id, key))

    def at(self, ts_ns: int) -> Ack:
        """This ack, stamped with the cloud's clock."""
        return dataclasses.replace(self, ts_ns=ts_ns)

    def verify(self, device_id: str, key: bytes) -> bool:
        return hmac.compare_digest(self.mac, self._mac(device_id, key))

    @property
    def covers_time(self) -> bool:
        """The MAC covers ``ts_ns`` too (an ack with a generation): a device may then
        trust the cloud's clock as much as the ack itself."""
        return bool(self.generation)

    def _mac(self, device_id: str, key: bytes) -> str:
        text = f"{device_id}\n{self.seq}\n{self.status}\n{self.reason}"
        if self.generation:
            text += f"\n{self.generation}\n{self.ts_ns}"
        return hmac.new(key, text.encode(), hashlib.sha256).digest()[:MAC_BYTES].hex()

    def encode(self) -> bytes:
        obj: dict[str, Any] = {"seq": self.seq, "status": self.status}
        if self.reason:
            obj["reason"] = self.reason
        if self.generation:
            obj["generation"] = self.generation
        if self.mac:
            obj["mac"] = self.mac
        if self.ts_ns:
            obj["ts_ns"] = self.ts_ns
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
    mac = obj.get("mac", "")
    if not isinstance(mac, str) or len(mac) > 2 * MAC_BYTES:
        raise WireError("bad-ack", f"mac must be a string of at most {2 * MAC_BYTES} characters")
    ts_ns, generation = obj.get("ts_ns", 0), obj.get("generation", 0)
    if type(ts_ns) is not int or not 0 <= ts_ns < 2**63:
        raise WireError("bad-ack", "ts_ns must be an integer in [0, 2^63)")
    if type(generation) is not int or not 0 <= generation < 2**63:
        raise WireError("bad-ack", "generation must be an integer in [0, 2^63)")
    return Ack(seq, status, reason, mac, ts_ns, generation)
