"""Raw readings on the wire (shared/rawdata.py, docs/wire-format.md §2.13): values
round-trip bit for bit, and any bytes decode or fail with a reason."""

from __future__ import annotations

import contextlib
import json
import struct

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.errors import WireError
from shared.rawdata import (
    DAY_NS,
    MAGIC,
    RawReadings,
    day_spans,
    decode_raw,
    peek_raw_ids,
    readings_per_message,
)
from shared.wire import frame

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
T = 1_790_000_000 * 10**9


def raw(n: int = 5, **kw: object) -> RawReadings:
    base: dict[str, object] = {
        "device_id": "dev-1", "seq": 7, "request": "c-1", "part": 0, "node": "n1",
        "sensor": "temp", "unit": "°C", "created_ns": T,
        "ts": T + np.arange(n, dtype=np.int64) * 10**9,
        "values": np.linspace(-1.5, 2.5, n), "generation": 3,
    }  # fmt: skip
    return RawReadings(**(base | kw))  # type: ignore[arg-type]


def test_values_round_trip_bit_for_bit_nan_and_infinity_included() -> None:
    values = np.array([0.1, -0.0, np.nan, np.inf, -np.inf, 5e-324, 1.7976931348623157e308])
    ts = T + np.array([0, 0, 1, 2, 3, 10**9, 2 * 10**9], dtype=np.int64)  # equal times too
    got = decode_raw(raw(ts=ts, values=values).encode())
    assert got.ts.tobytes() == ts.tobytes() and got.values.tobytes() == values.tobytes()
    assert (got.device_id, got.seq, got.request, got.part, got.unit, got.generation) == (
        "dev-1", 7, "c-1", 0, "°C", 3,
    )  # fmt: skip
    assert decode_raw(raw(0).encode()).n == 0


def test_a_message_of_the_most_readings_fits_its_limit_even_when_nothing_compresses() -> None:
    limit = 64 * 1024
    n = readings_per_message(limit)
    rng = np.random.default_rng(1)
    r = raw(n, ts=np.sort(rng.integers(0, 2**62, n)), values=rng.random(n), request="c" * 64)
    assert len(r.encode()) <= limit and n > 3000


def test_day_spans_split_at_utc_midnight_and_at_the_most() -> None:
    ts = np.array([DAY_NS - 2, DAY_NS - 1, DAY_NS, DAY_NS + 1, DAY_NS + 2, 3 * DAY_NS])
    assert day_spans(ts) == [(0, 2), (2, 5), (5, 6)]
    assert day_spans(ts, 2) == [(0, 2), (2, 4), (4, 5), (5, 6)]
    assert day_spans(np.array([], dtype=np.int64)) == []


def _body(header: dict[str, object], columns: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<I", len(h)) + h + columns


GOOD = {
    "device_id": "d", "seq": 1, "request": "r", "part": 0, "node": "n", "sensor": "s",
    "unit": "", "created_ns": 0, "n": 1,
}  # fmt: skip
ONE = struct.pack("<qd", 5, 1.0)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"TLMR", "truncated"),
        (frame(b"TLMB", 1, _body(GOOD, ONE)), "bad-magic"),
        (frame(MAGIC, 2, _body(GOOD, ONE)), "unsupported-version"),
        (frame(MAGIC, 1, b"\x00" * 64 + _body(GOOD, ONE))[:16], "truncated"),
        (frame(MAGIC, 1, b"\x01\x00"), "truncated"),
        (frame(MAGIC, 1, _body(GOOD, ONE)[:-1]), "bad-raw"),
        (frame(MAGIC, 1, _body(GOOD | {"n": -1}, b"")), "bad-raw"),
        (frame(MAGIC, 1, _body(GOOD | {"seq": 2**63}, ONE)), "bad-raw"),
        (frame(MAGIC, 1, _body(GOOD | {"node": "a/b"}, ONE)), "bad-raw"),
        (frame(MAGIC, 1, _body(GOOD | {"unit": 5}, ONE)), "bad-raw"),
        (frame(MAGIC, 1, _body(GOOD | {"request": "x" * 65}, ONE)), "bad-raw"),
        (frame(MAGIC, 1, b"\x02\x00\x00\x00[]"), "bad-header"),
        (frame(MAGIC, 1, b"\x03\x00\x00\x00NaN"), "bad-header"),
        # ts decreasing, and a sum of deltas past 2^63
        (frame(MAGIC, 1, _body(GOOD | {"n": 2}, struct.pack("<qqdd", 5, -1, 0, 0))), "bad-raw"),
        (
            frame(MAGIC, 1, _body(GOOD | {"n": 2}, struct.pack("<qqdd", 2**62, 2**63 - 1, 0, 0))),
            "bad-raw",
        ),
    ],
)
def test_damaged_messages_fail_with_their_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(WireError) as err:
        decode_raw(payload)
    assert err.value.reason == reason


def test_the_size_limits_hold_before_anything_is_inflated() -> None:
    big = raw(1000).encode()
    with pytest.raises(WireError, match="too-large"):
        decode_raw(big, max_payload_bytes=len(big) - 1)
    bomb = frame(MAGIC, 1, b"\x00" * 10_000_000)
    with pytest.raises(WireError, match="too-large"):
        decode_raw(bomb, max_body_bytes=1 << 20)
    # a frame that claims a small body and inflates to more stops at the claim
    lie = bytearray(frame(MAGIC, 1, b"\x00" * 100_000))
    lie[6:10] = struct.pack("<I", 100)
    with pytest.raises(WireError, match="too-large"):
        decode_raw(bytes(lie))


def test_a_refused_message_still_names_its_seq_for_the_ack() -> None:
    bad = frame(MAGIC, 1, _body(GOOD | {"seq": 42, "generation": 9, "node": "a b"}, ONE))
    assert peek_raw_ids(bad) == (42, 9)
    assert peek_raw_ids(b"junk") == (None, 0)


@FUZZ
@given(st.binary(max_size=400))
def test_any_bytes_decode_or_fail_with_a_reason(data: bytes) -> None:
    for payload in (data, MAGIC + b"\x01\x00" + data, frame(MAGIC, 1, data, compress=False)):
        with contextlib.suppress(WireError):
            decode_raw(payload)
        peek_raw_ids(payload)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=6,
)


@FUZZ
@given(st.sampled_from(sorted(GOOD)), JSON, st.binary(max_size=40))
def test_headers_with_any_values_decode_or_fail(key: str, value: object, columns: bytes) -> None:
    for cols in (ONE, columns):
        payload = frame(MAGIC, 1, _body(GOOD | {key: value}, cols))
        try:
            r = decode_raw(payload)
        except WireError:
            continue
        assert r.n == len(cols) // 16 and np.all(np.diff(r.ts) >= 0)


def test_the_zstd_frame_checksum_catches_a_flipped_bit() -> None:
    good = raw(100).encode()
    assert zstandard.get_frame_parameters(good[10:]).has_checksum
    bad = bytearray(good)
    bad[-6] ^= 0x10
    with pytest.raises(WireError, match="bad-compression"):
        decode_raw(bytes(bad))
