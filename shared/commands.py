"""Commands from the operators to a device, and the device's results
(docs/wire-format.md §2.11 and §2.12).

A command is signed with Ed25519 by a key whose private half only the operators
hold; a device holds the public halves (``[commands] public_key_files``). The
ingestors hold neither, so a compromised ingestor, or anyone the broker lets
publish, cannot make a device do anything: it can only drop commands.

The signature covers the exact bytes of the command's body, which travel in the
envelope as base64 (as JWS does), so that no JSON canonical form is needed and
any language can verify it::

    {"v": 1, "key": "ops-2026", "body": "<base64 of the body's JSON>", "sig": "<base64, 64 bytes>"}

    body: {"id": "c-7f3a", "device_id": "pi-0042", "kind": "ping", "args": {},
           "issued_ns": 1790000000000000000, "expires_ns": 1790086400000000000}

Every check here is about the message alone; whether a device has run that id
before, and what its clock says of ``expires_ns``, is the device's
(edge_agent/pipeline/commands.py).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared import jsonwire
from shared.errors import COMMAND_REFUSALS, WireError
from shared.jsonwire import printable
from shared.topics import is_valid_id

VERSION: Final = 1
#: a command message at most (the device's forward link takes packets this large)
MAX_COMMAND_BYTES: Final = 16 * 1024
#: a result message at most
MAX_RESULT_BYTES: Final = 16 * 1024
#: the longest a command may be valid: a device remembers ids this long
MAX_LIFETIME_NS: Final = 30 * 86_400 * 10**9
#: what a device signs the body's bytes under (so that no other signed message of
#: the operators' key can pass for a command)
CONTEXT: Final = b"telemetry command v1\0"

#: why a device refuses a command (counted as ``commands_refused_<reason>``)
REFUSALS = COMMAND_REFUSALS
Status = Literal["done", "refused", "failed"]


@dataclass(frozen=True)
class Command:
    id: str
    device_id: str
    kind: str
    issued_ns: int
    expires_ns: int
    args: Mapping[str, Any] = field(default_factory=dict)
    #: the key that signed it (its id in the device's config)
    key: str = ""

    def body(self) -> bytes:
        return json.dumps(
            {
                "id": self.id,
                "device_id": self.device_id,
                "kind": self.kind,
                "args": dict(self.args),
                "issued_ns": self.issued_ns,
                "expires_ns": self.expires_ns,
            },
            separators=(",", ":"),
            ensure_ascii=False,
        ).encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise WireError("bad-command", f"{what} must be a base64 string")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise WireError("bad-command", f"{what} is not base64") from None


def sign(command: Command, key_id: str, private: Ed25519PrivateKey) -> bytes:
    """The command's message, signed with ``private`` under the name ``key_id``."""
    body = command.body()
    sig = private.sign(CONTEXT + body)
    envelope = {"v": VERSION, "key": key_id, "body": _b64(body), "sig": _b64(sig)}
    data = json.dumps(envelope, separators=(",", ":")).encode()
    if len(data) > MAX_COMMAND_BYTES:
        raise ValueError(f"the command is {len(data)} bytes, more than {MAX_COMMAND_BYTES}")
    return data


def verify(payload: bytes, keys: Mapping[str, Ed25519PublicKey]) -> Command:
    """The command in ``payload`` if one of ``keys`` (key id → public key) signed
    it; :class:`WireError` with a reason of :data:`REFUSALS` otherwise. Checks
    nothing that needs the device's state (expiry, replay, kind)."""
    if len(payload) > MAX_COMMAND_BYTES:
        raise WireError("too-large", f"a command of {len(payload)} bytes")
    env = jsonwire.loads(
        payload, reason="bad-command", what="a command", max_bytes=MAX_COMMAND_BYTES, strict=True
    )
    if not isinstance(env, dict) or env.get("v") != VERSION:
        raise WireError("bad-command", f"not a version {VERSION} command envelope")
    key_id = env.get("key")
    if not isinstance(key_id, str) or not is_valid_id(key_id):
        raise WireError("bad-command", "key must be an id")
    body, sig = _unb64(env.get("body"), "body"), _unb64(env.get("sig"), "sig")
    public = keys.get(key_id)
    if public is None:
        raise WireError("unknown-key", f"signed by {key_id!r}, which this device does not hold")
    try:
        public.verify(sig, CONTEXT + body)
    except InvalidSignature:
        raise WireError(
            "bad-signature", f"the signature of key {key_id!r} does not verify"
        ) from None
    return _body(body, key_id)


def _body(raw: bytes, key_id: str) -> Command:
    """The signed body: its own checks (a signed body can still be malformed)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise WireError("bad-command", "the body is not UTF-8") from None
    obj = jsonwire.loads(
        text, reason="bad-command", what="a command body", max_bytes=len(raw), strict=True
    )
    if not isinstance(obj, dict):
        raise WireError("bad-command", "the body is not a JSON object")
    cid, device, kind, args = obj.get("id"), obj.get("device_id"), obj.get("kind"), obj.get("args")
    issued, expires = obj.get("issued_ns"), obj.get("expires_ns")
    for name, value in (("id", cid), ("device_id", device), ("kind", kind)):
        if not isinstance(value, str) or not is_valid_id(value):
            raise WireError("bad-command", f"{name} must be an id")
    if not isinstance(args, dict):
        raise WireError("bad-command", "args must be an object")
    for name, value in (("issued_ns", issued), ("expires_ns", expires)):
        if type(value) is not int or not 0 <= value < 2**63:
            raise WireError("bad-command", f"{name} must be an integer in [0, 2^63)")
    assert isinstance(issued, int) and isinstance(expires, int)
    if not issued < expires <= issued + MAX_LIFETIME_NS:
        raise WireError("bad-command", "expires_ns must be after issued_ns, by at most 30 days")
    assert isinstance(cid, str) and isinstance(device, str) and isinstance(kind, str)
    return Command(cid, device, kind, issued, expires, args, key_id)


@dataclass(frozen=True)
class Result:
    """A device's answer to a command it verified (§2.12): sent like an alert, with a
    seq of the device's counter, until the cloud acks it."""

    seq: int
    id: str
    status: Status
    reason: str = ""
    ts_ns: int = 0
    result: Mapping[str, Any] = field(default_factory=dict)
    generation: int = 0
    #: the command's kind ("" when the command could not be read)
    kind: str = ""

    def encode(self) -> bytes:
        obj: dict[str, Any] = {
            "seq": self.seq,
            "id": self.id,
            "status": self.status,
            "reason": self.reason,
            "ts_ns": self.ts_ns,
            "result": dict(self.result),
        }
        if self.kind:
            obj["kind"] = self.kind
        if self.generation:
            obj["generation"] = self.generation
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def decode_result(payload: bytes) -> Result:
    """Parse untrusted bytes; :class:`WireError` (``bad-result``, ``too-large``)."""
    obj = jsonwire.loads(
        payload, reason="bad-result", what="a result", max_bytes=MAX_RESULT_BYTES, strict=True
    )
    if not isinstance(obj, dict):
        raise WireError("bad-result", "not a JSON object")
    seq, cid, status = obj.get("seq"), obj.get("id"), obj.get("status")
    reason, ts_ns, result = obj.get("reason", ""), obj.get("ts_ns", 0), obj.get("result", {})
    generation, kind = obj.get("generation", 0), obj.get("kind", "")
    if not isinstance(kind, str) or (kind and not is_valid_id(kind)):
        raise WireError("bad-result", "kind must be an id")
    for name, value in (("seq", seq), ("ts_ns", ts_ns), ("generation", generation)):
        if type(value) is not int or not 0 <= value < 2**63:
            raise WireError("bad-result", f"{name} must be an integer in [0, 2^63)")
    if not isinstance(cid, str) or not is_valid_id(cid):
        raise WireError("bad-result", "id must be an id")
    if status not in ("done", "refused", "failed"):
        raise WireError("bad-result", f"status {status!r} is not done, refused or failed")
    if not isinstance(reason, str) or len(reason) > 200 or not printable(reason):
        raise WireError("bad-result", "reason must be printable text of at most 200 characters")
    if not isinstance(result, dict):
        raise WireError("bad-result", "result must be an object")
    assert isinstance(seq, int) and isinstance(ts_ns, int) and isinstance(generation, int)
    return Result(seq, cid, status, reason, ts_ns, result, generation, kind)


# ---- keys ---------------------------------------------------------------------------


def new_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_private(path: Path) -> Ed25519PrivateKey:
    """An operator's signing key (PEM, PKCS#8); ValueError saying why not."""
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


def load_public(path: Path) -> Ed25519PublicKey:
    """A command key's public half (PEM); ValueError saying why not."""
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")
    return key
