"""DDSketch: a mergeable quantile sketch with a relative-error guarantee.

Every window carries one, so that the cloud can merge windows into hours and
days and still answer p50/p99 correctly, which averaging per-window quantiles
cannot do. Reference: Masson, Rim and Lee, "DDSketch: A Fast and Fully-Mergeable
Quantile Sketch with Relative-Error Guarantees", VLDB 2019.

Guarantee: for relative accuracy α (here 1 %), the q-quantile the sketch returns
is within α · |x| of x, the value at rank ⌊q·(n−1)⌋ of the n values it was built
from (or merged from) in sorted order, as long as no bins were collapsed. That
is numpy's ``method="lower"``, not its default: a window's own p50/p90/p99
interpolate linearly between the two values around rank q·(n−1), and on bimodal
data (an appliance that is on or off) the two can be far apart, the interpolated
one between the modes where no reading is (tests/shared/test_sketch.py). Values are mapped to bins
``k = ceil(log_γ |x|)`` with ``γ = (1 + α) / (1 − α)``; a bin answers with
``2γᵏ / (γ + 1)``. Positive and negative values have separate bins; values with
``|x| < MIN_MAGNITUDE`` count as zero. To bound the size, each sign keeps a key
range of at most ``MAX_BINS`` (2048, a span of 10^17 in magnitude at 1 %): beyond
that the bins of the *smallest magnitudes* (the values nearest zero, of that
sign) are merged into one, and quantiles that fall in them lose the guarantee.
Real sensor data rarely spans more than a few decades; the dense encoding then
costs 4 bytes per bin over the span actually used.

Encoding (little-endian; the ``sketch`` column of wire format v1, see
docs/wire-format.md): u8 version (1), f64 α, u64 zero count, then for the
positive and then the negative bins: i32 lowest key k₀, u16 n, and n u32 counts
for the keys k₀ … k₀+n−1 (dense: zeros included; n = 0 for no bins). Dense runs
of small counts compress well under the batch's zstd.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from shared import varint
from shared.errors import WireError

ALPHA = 0.01
MIN_MAGNITUDE = 1e-9
MAX_BINS = 2048
#: log of the largest float64 (with a margin): a bin's value γᵏ must stay finite
_MAX_LOG_VALUE = 700.0
_HEAD = struct.Struct("<BdQ")
_RUN = struct.Struct("<iH")


@dataclass
class DDSketch:
    alpha: float = ALPHA
    zero: int = 0
    pos: dict[int, int] = field(default_factory=dict)
    neg: dict[int, int] = field(default_factory=dict)

    @property
    def gamma(self) -> float:
        return (1 + self.alpha) / (1 - self.alpha)

    @property
    def count(self) -> int:
        return self.zero + sum(self.pos.values()) + sum(self.neg.values())

    @classmethod
    def from_values(cls, values: npt.NDArray[np.float64], alpha: float = ALPHA) -> DDSketch:
        sk = cls(alpha=alpha)
        v = values[np.isfinite(values)]
        mag = np.abs(v)
        small = mag < MIN_MAGNITUDE
        sk.zero = int(small.sum())
        log_gamma = math.log(sk.gamma)
        for sign, store in ((1, sk.pos), (-1, sk.neg)):
            sel = ~small & (np.sign(v) == sign)
            if sel.any():
                keys = np.ceil(np.log(mag[sel]) / log_gamma).astype(np.int64)
                uk, counts = np.unique(keys, return_counts=True)
                store.update(zip(uk.tolist(), counts.tolist(), strict=True))
        sk._collapse()
        return sk

    def merge(self, other: DDSketch) -> DDSketch:
        if other.alpha != self.alpha:
            raise ValueError("cannot merge sketches of different accuracy")
        out = DDSketch(self.alpha, self.zero + other.zero, dict(self.pos), dict(self.neg))
        for mine, theirs in ((out.pos, other.pos), (out.neg, other.neg)):
            for k, c in theirs.items():
                mine[k] = mine.get(k, 0) + c
        out._collapse()
        return out

    def _collapse(self) -> None:
        """Keep every store's key range within MAX_BINS by merging its lowest keys."""
        for store in (self.pos, self.neg):
            if store and max(store) - min(store) + 1 > MAX_BINS:
                floor = max(store) - MAX_BINS + 1
                low = [k for k in store if k <= floor]
                store[floor] = sum(store.pop(k) for k in low)

    def _value(self, key: int) -> float:
        return 2 * self.gamma**key / (self.gamma + 1)

    def quantile(self, q: float) -> float:
        """The q-quantile (0 ≤ q ≤ 1) of the values seen, NaN if there were none."""
        n = self.count
        if n == 0:
            return math.nan
        rank = q * (n - 1)
        seen = 0
        for k in sorted(self.neg, reverse=True):  # most negative first
            seen += self.neg[k]
            if seen > rank:
                return -self._value(k)
        seen += self.zero
        if seen > rank:
            return 0.0
        for k in sorted(self.pos):
            seen += self.pos[k]
            if seen > rank:
                return self._value(k)
        return self._value(max(self.pos)) if self.pos else 0.0

    def encode(self) -> bytes:
        parts = [_HEAD.pack(1, self.alpha, self.zero)]
        for store in (self.pos, self.neg):
            if not store:
                parts.append(_RUN.pack(0, 0))
                continue
            lo, hi = min(store), max(store)
            dense = np.zeros(hi - lo + 1, dtype="<u4")
            for k, c in store.items():
                dense[k - lo] = c
            parts.append(_RUN.pack(lo, len(dense)) + dense.tobytes())
        return b"".join(parts)

    @classmethod
    def decode(cls, data: bytes) -> DDSketch:
        try:
            version, alpha, zero = _HEAD.unpack_from(data)
            if version != 1 or not 0 < alpha < 1:
                raise WireError("bad-sketch", f"sketch version {version}, alpha {alpha}")
            off = _HEAD.size
            stores: list[dict[int, int]] = []
            for _ in range(2):
                lo, n = _RUN.unpack_from(data, off)
                off += _RUN.size
                counts = np.frombuffer(data, dtype="<u4", count=n, offset=off)
                off += 4 * n
                stores.append({lo + int(i): int(c) for i, c in enumerate(counts.tolist()) if c})
        except (struct.error, ValueError) as exc:
            raise WireError("bad-sketch", f"truncated sketch: {exc}") from None
        if off != len(data):
            raise WireError("bad-sketch", "bytes after the sketch")
        limit = _key_limit(alpha, int(zero))
        if any(abs(k) > limit for store in stores if store for k in (min(store), max(store))):
            raise WireError("bad-sketch", "a bin beyond the range of a float64")
        return cls(alpha, int(zero), stores[0], stores[1])


#: the largest |key| of a bin: an i32 (the lake's keys are int32)
_MAX_KEY = 2**31 - 1


def _key_limit(alpha: float, zero: int) -> float:
    """The largest |key| a decoded sketch's bins may have: γᵏ a finite float64, and
    k an i32. Raises WireError where γ rounds to 1 (an α below ~1e-16 has no bins:
    every key would be infinite) or where the zero count is beyond the lake's int64
    counts."""
    log_gamma = math.log((1 + alpha) / (1 - alpha))
    if log_gamma <= 0:
        raise WireError("bad-sketch", f"alpha {alpha} is too small to make bins")
    if zero >= 2**63:
        raise WireError("bad-sketch", "a zero count beyond 2^63 - 1")
    return min(_MAX_LOG_VALUE / log_gamma, _MAX_KEY)


def bins_of(data: bytes) -> tuple[list[int], list[int], list[int]]:
    """An encoded sketch's non-empty bins as (sign, key, count) lists, in value order:
    negative bins from the most negative, the zero bin (sign 0, key 0), the positive
    bins. A bin's value is ``sign · 2γᵏ / (γ + 1)`` (0 for the zero bin): the lake's
    ``sketch_bins`` column, which SQL merges (docs/lake-sql.md). Raises WireError as
    :meth:`DDSketch.decode` does for bytes that are not a sketch. Plain Python: a
    window's few dozen bins cost less so than through numpy (it runs per window in
    the ingestor)."""
    try:
        version, alpha, zero = _HEAD.unpack_from(data)
        if version != 1 or not 0 < alpha < 1:
            raise WireError("bad-sketch", f"sketch version {version}, alpha {alpha}")
        off = _HEAD.size
        runs = []
        for _ in range(2):
            lo, n = _RUN.unpack_from(data, off)
            off += _RUN.size
            if n > 64:  # a wide run (a noisy sensor's): numpy finds its few bins
                dense = np.frombuffer(data, dtype="<u4", count=n, offset=off)
                at = np.flatnonzero(dense)
                runs.append(list(zip((at + lo).tolist(), dense[at].tolist(), strict=True)))
            else:
                counts = struct.unpack_from(f"<{n}I", data, off)
                runs.append([(lo + i, c) for i, c in enumerate(counts) if c])
            off += 4 * n
    except (struct.error, ValueError) as exc:
        raise WireError("bad-sketch", f"truncated sketch: {exc}") from None
    if off != len(data):
        raise WireError("bad-sketch", "bytes after the sketch")
    limit = _key_limit(alpha, zero)
    if any(abs(k) > limit for run in runs if run for k in (run[0][0], run[-1][0])):
        raise WireError("bad-sketch", "a bin beyond the range of a float64")
    pos, neg = runs
    bins = [(-1, k, c) for k, c in reversed(neg)]
    if zero:
        bins.append((0, 0, int(zero)))
    bins += [(1, k, c) for k, c in pos]
    return [b[0] for b in bins], [b[1] for b in bins], [b[2] for b in bins]


@dataclass(frozen=True)
class BinsColumn:
    """The bins of many encoded sketches (:func:`bins_many`): sketch ``i``'s bins are
    ``sign[offsets[i]:offsets[i+1]]`` (and ``key``, ``count``), as :func:`bins_of`
    gives them; ``valid[i]`` is False where the bytes are not a sketch (or None)."""

    offsets: npt.NDArray[np.int64]
    valid: npt.NDArray[np.bool_]
    sign: npt.NDArray[np.int8]
    key: npt.NDArray[np.int64]
    count: npt.NDArray[np.int64]


def _read(u8: npt.NDArray[np.uint8], at: npt.NDArray[np.int64], dtype: str) -> npt.NDArray[Any]:
    """The ``dtype`` value at each byte offset ``at`` of ``u8`` (unaligned)."""
    width = np.dtype(dtype).itemsize
    out: npt.NDArray[Any] = u8[at[:, None] + np.arange(width)].copy().view(dtype).ravel()
    return out


def bins_many(sketches: Sequence[bytes | None]) -> BinsColumn:
    """:func:`bins_of` for every sketch at once, in a few passes of numpy instead of a
    loop in Python per sketch (the ingestor's lake rows: it was 7 % of its CPU per
    batch). A sketch is valid where :func:`bins_of` returns its bins, and also needs
    its zero count below 2^63 (the lake's counts are int64). The same checks, the
    same bins (tests/shared/test_fuzz.py holds the two to each other)."""
    m = len(sketches)
    lengths = np.array([-1 if b is None else len(b) for b in sketches], dtype=np.int64)
    buf = b"".join(b for b in sketches if b is not None)
    u8 = np.frombuffer(buf, dtype=np.uint8)
    start = np.zeros(m, dtype=np.int64)
    start[1:] = np.cumsum(np.maximum(lengths, 0))[:-1]
    first = _HEAD.size + _RUN.size
    ok = lengths >= first + _RUN.size  # the header and both runs' headers fit
    idx = np.flatnonzero(ok)
    at = start[idx]
    version = u8[at]
    alpha = _read(u8, at + 1, "<f8")
    zero = _read(u8, at + 9, "<u8")
    lo1 = _read(u8, at + _HEAD.size, "<i4").astype(np.int64)
    n1 = _read(u8, at + _HEAD.size + 4, "<u2").astype(np.int64)
    with np.errstate(invalid="ignore"):
        good = (version == 1) & (alpha > 0) & (alpha < 1) & (zero < 2**63)
    good &= first + 4 * n1 + _RUN.size <= lengths[idx]
    idx, at, alpha, zero, lo1, n1 = (x[good] for x in (idx, at, alpha, zero, lo1, n1))
    second = at + first + 4 * n1
    lo2 = _read(u8, second, "<i4").astype(np.int64)
    n2 = _read(u8, second + 4, "<u2").astype(np.int64)
    good = first + 4 * n1 + _RUN.size + 4 * n2 == lengths[idx]  # nothing after the sketch
    idx, at, alpha, zero, lo1, n1, lo2, n2, second = (
        x[good] for x in (idx, at, alpha, zero, lo1, n1, lo2, n2, second)
    )
    # every count of every run: (which sketch, sign, key, count)
    parts = []
    for sgn, lo, n, counts_at in ((1, lo1, n1, at + first), (-1, lo2, n2, second + _RUN.size)):
        total = int(n.sum())
        owner = np.repeat(np.arange(len(idx)), n)
        within = np.arange(total) - np.repeat(np.cumsum(n) - n, n)
        count = _read(u8, np.repeat(counts_at, n) + 4 * within, "<u4").astype(np.int64)
        keep = count > 0
        parts.append(
            (
                owner[keep],
                np.full(int(keep.sum()), sgn),
                (np.repeat(lo, n) + within)[keep],
                count[keep],
            )
        )
    has_zero = np.flatnonzero(zero > 0)
    parts.append(
        (
            has_zero,
            np.zeros(len(has_zero), dtype=np.int64),
            np.zeros(len(has_zero), dtype=np.int64),
            zero[has_zero].astype(np.int64),
        )
    )
    owner = np.concatenate([p[0] for p in parts])
    sign = np.concatenate([p[1] for p in parts])
    key = np.concatenate([p[2] for p in parts])
    count = np.concatenate([p[3] for p in parts])
    # a bin's value must be a finite float64 and its key an i32 (_key_limit)
    log_gamma = np.log((1 + alpha) / (1 - alpha))
    with np.errstate(divide="ignore"):
        limit = np.minimum(_MAX_LOG_VALUE / log_gamma, _MAX_KEY)
    beyond = (sign != 0) & (np.abs(key) > limit[owner])
    bad = log_gamma <= 0
    bad[owner[beyond]] = True
    keep = ~bad[owner]
    owner, sign, key, count = owner[keep], sign[keep], key[keep], count[keep]
    # value order: negative bins from the most negative (highest key), zero, positive
    order = np.lexsort((np.where(sign < 0, -key, key), sign, owner))
    owner, sign, key, count = owner[order], sign[order], key[order], count[order]
    valid = np.zeros(m, dtype=bool)
    valid[idx[~bad]] = True
    per = np.zeros(m, dtype=np.int64)
    per[idx] = np.bincount(owner, minlength=len(idx))
    offsets = np.zeros(m + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(per)
    return BinsColumn(offsets, valid, sign.astype(np.int8), key, count)


def encode_windows(
    values: npt.NDArray[np.float64], seg_starts: npt.NDArray[np.int64]
) -> list[bytes]:
    """``DDSketch.from_values(window).encode()`` for every window at once (segments as
    in edge_agent/pipeline/kernels.py), the same bytes without a sort or a dict per
    window: the bins' keys of all the windows in one pass of numpy, then each
    window's dense counts from one ``bincount`` over per-window key ranges laid end
    to end. A window whose keys span more than MAX_BINS (which collapses bins) is
    built by :meth:`DDSketch.from_values`, as before. Closing windows spent most of
    its time in the per-window sketches (docs/benchmarks.md)."""
    values = np.asarray(values, dtype=np.float64)
    seg_starts = np.asarray(seg_starts, dtype=np.int64)
    n, nseg = len(values), len(seg_starts)
    if nseg == 0:
        return []
    lengths = np.diff(np.append(seg_starts, n))
    wid = np.repeat(np.arange(nseg), lengths)
    finite = np.isfinite(values)
    mag = np.abs(np.where(finite, values, 0.0))
    small = finite & (mag < MIN_MAGNITUDE)
    zeros = np.bincount(wid[small], minlength=nseg).tolist()
    big = finite & ~small
    log_gamma = math.log((1 + ALPHA) / (1 - ALPHA))
    keys = np.ceil(np.log(mag[big]) / log_gamma).astype(np.int64)
    bw = wid[big]
    positive = values[big] > 0
    runs: list[list[bytes | None]] = []  # per sign, per window: the run's bytes
    for sel in (positive, ~positive):
        k, w = keys[sel], bw[sel]
        out: list[bytes | None] = [_RUN.pack(0, 0)] * nseg
        if len(k):
            first = np.flatnonzero(np.r_[True, w[1:] != w[:-1]])
            present = w[first]
            kmin = np.minimum.reduceat(k, first)
            span = np.maximum.reduceat(k, first) - kmin + 1
            base = np.concatenate(([0], np.cumsum(span)[:-1]))
            lo = np.repeat(kmin, np.diff(np.append(first, len(k))))
            at = np.repeat(base, np.diff(np.append(first, len(k))))
            counts = np.bincount(at + (k - lo), minlength=int(span.sum())).astype("<u4")
            for i, win in enumerate(present.tolist()):
                sp, b0 = int(span[i]), int(base[i])
                if sp > MAX_BINS:
                    out[win] = None  # collapses: built the slow way below
                else:
                    out[win] = _RUN.pack(int(kmin[i]), sp) + counts[b0 : b0 + sp].tobytes()
        runs.append(out)
    result = []
    ends = np.append(seg_starts[1:], n).tolist()
    for i, (a, b) in enumerate(zip(seg_starts.tolist(), ends, strict=True)):
        pos, neg = runs[0][i], runs[1][i]
        if pos is None or neg is None:
            result.append(DDSketch.from_values(values[a:b]).encode())
        else:
            result.append(_HEAD.pack(1, ALPHA, zeros[i]) + pos + neg)
    return result


# ---- wire format v2's sketch column (docs/wire-format.md §2.14) ---------------------


def _unzigzag(z: int) -> int:
    return (z >> 1) ^ -(z & 1)


def sketches_to_varints(sketches: Sequence[bytes]) -> tuple[float, bytes] | None:
    """The sketches of a batch as v2's ``varint`` column: per sketch the zero count,
    then for the positive and the negative bins n and, if n > 0, the zigzag lowest
    key and the n counts, all as varints. Returns (α, bytes), or None where the
    sketches do not share one α or one is not a sketch (the batch then goes as v1)."""
    ints: list[npt.NDArray[np.uint64]] = []
    alpha = None
    try:
        for data in sketches:
            version, a, zero = _HEAD.unpack_from(data)
            if version != 1 or (alpha is not None and a != alpha):
                return None
            alpha = a
            off = _HEAD.size
            row = [zero]
            for _ in range(2):
                lo, n = _RUN.unpack_from(data, off)
                off += _RUN.size
                row.append(n)
                if n:
                    row.append((lo << 1) ^ (lo >> 31))
                ints.append(np.array(row, dtype=np.uint64))
                ints.append(np.frombuffer(data, dtype="<u4", count=n, offset=off).astype(np.uint64))
                off += 4 * n
                row = []
            if off != len(data):
                return None
    except (struct.error, ValueError):
        return None
    if alpha is None:
        return None
    return alpha, varint.encode(np.concatenate(ints) if ints else np.zeros(0, np.uint64))


def varints_to_sketches(data: bytes, rows: int, alpha: float) -> tuple[bytes, ...]:
    """v2's ``varint`` sketch column back to one v1 sketch per row (the bytes
    :meth:`DDSketch.encode` makes); raises WireError ``bad-column`` for a column
    that is not ``rows`` sketches within v1's bounds."""
    if not 0 < alpha < 1:
        raise WireError("bad-header", "sketch_alpha must be a number in (0, 1)")
    values = varint.decode(data).tolist()
    out = []
    i = 0
    try:
        for _ in range(rows):
            zero = values[i]
            i += 1
            if zero >= 2**63:
                raise WireError("bad-column", "a sketch's zero count beyond 2^63 - 1")
            runs = []
            for _sign in range(2):
                n = values[i]
                i += 1
                if n == 0:
                    runs.append(_RUN.pack(0, 0))
                    continue
                lo = _unzigzag(values[i])
                i += 1
                counts = values[i : i + n]
                i += n
                if n > 65535 or len(counts) != n:
                    raise WireError("bad-column", "a sketch's run is longer than the column")
                if not (lo >= -(2**31) and lo + n - 1 <= _MAX_KEY):
                    raise WireError("bad-column", "a sketch's keys beyond an i32")
                try:  # plain struct, not numpy: a window's few bins cost less so
                    runs.append(struct.pack(f"<iH{n}I", lo, n, *counts))
                except struct.error:
                    raise WireError("bad-column", "a sketch's count beyond a u32") from None
            out.append(_HEAD.pack(1, alpha, zero) + runs[0] + runs[1])
    except IndexError:
        raise WireError("bad-column", "the sketch column ends before its last row") from None
    if i != len(values):
        raise WireError("bad-column", "values after the last row's sketch")
    return tuple(out)
