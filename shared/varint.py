"""Unsigned LEB128 varints, many at once with numpy (wire format v2's sketch column).

A value is written 7 bits at a time, lowest first; every byte but the last of a
value has its high bit set. Values are below 2^64, so a varint has at most 10
bytes, and the tenth holds at most the value's top bit.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from shared.errors import WireError

U64 = npt.NDArray[np.uint64]
#: the most bytes a varint of a u64 takes
MAX_BYTES = 10


def encode(values: npt.ArrayLike) -> bytes:
    """The varints of ``values`` (non-negative integers below 2^64), back to back."""
    v = np.asarray(values, dtype=np.uint64)
    if not len(v):
        return b""
    # bytes per value: 1 + the number of further 7-bit groups its bits need
    nbytes = np.ones(len(v), dtype=np.int64)
    for k in range(1, MAX_BYTES):
        nbytes += v >= np.uint64(1) << np.uint64(7 * k)
    owner = np.repeat(np.arange(len(v)), nbytes)
    within = np.arange(int(nbytes.sum())) - np.repeat(np.cumsum(nbytes) - nbytes, nbytes)
    group = (v[owner] >> (np.uint64(7) * within.astype(np.uint64))) & np.uint64(0x7F)
    more = within < nbytes[owner] - 1
    return (group | (more.astype(np.uint64) << np.uint64(7))).astype(np.uint8).tobytes()


def decode(data: bytes, reason: str = "bad-column") -> U64:
    """Every varint in ``data``; raises WireError(``reason``) when the data ends inside
    one, or one is longer than a u64 allows."""
    b = np.frombuffer(data, dtype=np.uint8)
    if not len(b):
        return np.zeros(0, dtype=np.uint64)
    last = (b & 0x80) == 0
    if not last[-1]:
        raise WireError(reason, "the varints end inside a value")
    ends = np.flatnonzero(last)
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if int(lengths.max()) > MAX_BYTES:
        raise WireError(reason, "a varint longer than 10 bytes")
    within = np.arange(len(b)) - np.repeat(starts, lengths)
    if np.any((within == MAX_BYTES - 1) & (b > 1)):
        raise WireError(reason, "a varint beyond 2^64 - 1")
    parts = (b & 0x7F).astype(np.uint64) << (np.uint64(7) * within.astype(np.uint64))
    return np.add.reduceat(parts, starts).astype(np.uint64)
