"""Raw readings on demand (docs/wire-format.md §2.13): one sensor's readings, as the
device's buffer holds them, in one message.

A device sends them when an operator's ``raw`` command asks (docs/commands.md);
the cloud writes them to the lake's ``raw`` table. The framing is the batch's
(§2.2: preamble, zstd body) with its own magic, so the same bounded decoder
(no zip bomb, no allocation the payload does not pay for) reads both::

    preamble  "TLMR", u8 version (1), u8 codec (0 none, 1 zstd), u32 LE body length
    body      u32 LE header length, header (UTF-8 JSON),
              ts: n int64 LE, delta-encoded (the first is absolute), non-decreasing
              value: n float64 LE (NaN and ±inf as the device received them)
"""

from __future__ import annotations

import itertools
import json
import struct
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from shared.errors import WireError
from shared.topics import is_valid_id, is_valid_unit
from shared.wire import MAX_BODY_BYTES, MAX_PAYLOAD_BYTES, body_header, frame, unframe

MAGIC: Final = b"TLMR"
VERSION: Final = 1
CONTENT_TYPE: Final = "application/vnd.telemetry.raw.v1"
#: bytes of one reading in the body (its ts and its value)
READING_BYTES: Final = 16
#: what a header may take at most: a sender keeps a message within its limit with
#: this much room besides the readings
MAX_HEADER_BYTES: Final = 2048
DAY_NS: Final = 86_400 * 10**9
_U32 = struct.Struct("<I")
_I64 = np.dtype("<i8")
_F64 = np.dtype("<f8")


@dataclass(frozen=True, eq=False)
class RawReadings:
    """Readings of one sensor of ``device_id``, sorted by time: part ``part`` of
    what the command ``request`` asked for. ``seq`` and ``generation`` are the
    device's, as a batch's (§2.3), and the cloud acks it the same way."""

    device_id: str
    seq: int
    request: str
    part: int
    node: str
    sensor: str
    unit: str
    created_ns: int
    ts: npt.NDArray[np.int64]
    values: npt.NDArray[np.float64]
    generation: int = 0

    def __post_init__(self) -> None:
        _check(self)

    @property
    def n(self) -> int:
        return len(self.ts)

    def encode(self, *, level: int = 3) -> bytes:
        header: dict[str, Any] = {
            "device_id": self.device_id,
            "seq": self.seq,
            "request": self.request,
            "part": self.part,
            "node": self.node,
            "sensor": self.sensor,
            "unit": self.unit,
            "created_ns": self.created_ns,
            "n": self.n,
        }
        if self.generation:
            header["generation"] = self.generation
        hbytes = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        deltas = np.diff(self.ts, prepend=np.int64(0)) if self.n else self.ts
        body = b"".join(
            (
                _U32.pack(len(hbytes)),
                hbytes,
                np.ascontiguousarray(deltas, dtype=_I64).tobytes(),
                np.ascontiguousarray(self.values, dtype=_F64).tobytes(),
            )
        )
        return frame(MAGIC, VERSION, body, level=level)


def day_spans(ts: npt.NDArray[np.int64], most: int = 2**63) -> list[tuple[int, int]]:
    """[a, b) index ranges of sorted ``ts``, each within one UTC day and of at most
    ``most`` readings."""
    days = ts // DAY_NS
    edges = [0, *(np.flatnonzero(np.diff(days)) + 1).tolist(), len(ts)]
    return [
        (at, min(at + most, b)) for a, b in itertools.pairwise(edges) if b > a
        for at in range(a, b, most)
    ]  # fmt: skip


def readings_per_message(max_bytes: int) -> int:
    """The most readings a message of at most ``max_bytes`` can hold, whatever the
    compression does (random values do not compress)."""
    return max(1, (max_bytes - MAX_HEADER_BYTES - 64) // READING_BYTES)


def _int(obj: dict[str, Any], key: str, *, optional: bool = False) -> int:
    value = obj.get(key, 0) if optional else obj.get(key)
    if type(value) is not int or not 0 <= value < 2**63:
        raise WireError("bad-raw", f"{key!r} must be an integer in [0, 2^63)")
    return value


def _str(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise WireError("bad-raw", f"{key!r} must be a string")
    return value


def _check(r: RawReadings) -> None:
    for key in ("device_id", "request", "node", "sensor"):
        if not is_valid_id(getattr(r, key)):
            raise WireError("bad-raw", f"{key} {getattr(r, key)[:70]!r} is not an id")
    if not is_valid_unit(r.unit):
        raise WireError("bad-raw", "unit is longer than 32 characters or has a control one")
    for key in ("seq", "part", "created_ns", "generation"):
        value = getattr(r, key)
        if type(value) is not int or not 0 <= value < 2**63:
            raise WireError("bad-raw", f"{key} must be an integer in [0, 2^63)")
    if r.ts.shape != r.values.shape or r.ts.ndim != 1:
        raise WireError("bad-raw", "ts and value differ in length")
    if r.n and np.any(np.diff(r.ts) < 0):
        raise WireError("bad-raw", "ts decreases")
    if r.n and r.ts[0] < 0:
        raise WireError("bad-raw", "a ts before 1970")


def decode_raw(
    payload: bytes,
    *,
    max_payload_bytes: int = MAX_PAYLOAD_BYTES,
    max_body_bytes: int = MAX_BODY_BYTES,
) -> RawReadings:
    """Parse and validate untrusted bytes (§2.13); raise :class:`WireError`."""
    body = unframe(
        payload,
        MAGIC,
        VERSION,
        max_payload_bytes=max_payload_bytes,
        max_body_bytes=max_body_bytes,
    )
    header, start = body_header(body)
    n = _int(header, "n")
    if len(body) - start != n * READING_BYTES:
        raise WireError(
            "bad-raw", f"{len(body) - start} bytes of columns for {n} readings (16 each)"
        )
    with np.errstate(over="ignore"):
        ts = np.cumsum(np.frombuffer(body, _I64, n, start), dtype=np.int64)
    values = np.frombuffer(body, _F64, n, start + 8 * n).astype(np.float64)
    deltas = np.frombuffer(body, _I64, n, start)
    if n > 1 and np.any(deltas[1:] < 0):
        raise WireError("bad-raw", "ts decreases")
    if n and (deltas[0] < 0 or np.any(ts < deltas[0])):  # a sum that wrapped
        raise WireError("bad-raw", "a ts outside [0, 2^63)")
    return RawReadings(
        device_id=_str(header, "device_id"),
        seq=_int(header, "seq"),
        request=_str(header, "request"),
        part=_int(header, "part"),
        node=_str(header, "node"),
        sensor=_str(header, "sensor"),
        unit=_str(header, "unit"),
        created_ns=_int(header, "created_ns"),
        ts=ts,
        values=values,
        generation=_int(header, "generation", optional=True),
    )


def peek_raw_ids(payload: bytes, *, max_body_bytes: int = MAX_BODY_BYTES) -> tuple[int | None, int]:
    """Best effort: (seq, generation) of a raw message that failed to decode, so that
    the device is told it was rejected (as wire.peek_ids for batches)."""
    try:
        body = unframe(payload, MAGIC, VERSION, max_payload_bytes=len(payload),
                       max_body_bytes=max_body_bytes)  # fmt: skip
        obj, _ = body_header(body)
        seq, gen = obj["seq"], obj.get("generation", 0)
    except (struct.error, WireError, KeyError, TypeError, AttributeError):
        return None, 0
    gen = gen if type(gen) is int and 0 <= gen < 2**63 else 0
    return (seq if type(seq) is int and 0 <= seq < 2**63 else None), gen
