"""Wire format v1: round trips, an independent decoder written from the spec, bad input."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import WireError
from shared.wire import (
    COLUMNS,
    STAT_FIELDS,
    Batch,
    SensorRef,
    WindowSpec,
    check_ranges,
    check_ranges_many,
    decode_batch,
    encode_batch,
    make_batch,
)
from tests.shared import wire_spec

W = 10_000_000_000


def sample_batch(rows: int = 4, seq: int = 7, device: str = "dev-1") -> Batch:
    rng = np.random.default_rng(rows)
    return make_batch(
        device_id=device,
        seq=seq,
        created_ns=1_700_000_000_123_456_789,
        window=WindowSpec("tumbling", W),
        sensors=(SensorRef("env-1", "temperature", "degC"), SensorRef("motor-1", "vib", "g")),
        columns={
            "sensor": np.arange(rows) % 2,
            "start_ns": 1_700_000_000 * 10**9 + (np.arange(rows) // 2) * W,
            "count": np.full(rows, 10),
            "invalid": np.zeros(rows),
            **{f: rng.normal(size=rows) for f in STAT_FIELDS},
        },
    )


def assert_same(a: Batch, b: Batch) -> None:
    assert (a.device_id, a.seq, a.created_ns, a.window, a.sensors) == (
        b.device_id,
        b.seq,
        b.created_ns,
        b.window,
        b.sensors,
    )
    for name in COLUMNS:
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), strict=True)


@pytest.mark.parametrize("compress", [True, False])
def test_round_trip(compress: bool) -> None:
    b = sample_batch()
    assert_same(decode_batch(encode_batch(b, compress=compress)), b)


def test_empty_batch_round_trips() -> None:
    assert decode_batch(encode_batch(sample_batch(rows=0))).rows == 0


finite = st.floats(allow_nan=True, allow_infinity=True, width=64)


@settings(max_examples=100, deadline=None)
@given(
    rows=st.integers(0, 50),
    seq=st.integers(0, 2**63 - 1),
    base=st.integers(-(2**29), 2**29),  # keeps base * width within int64
    values=st.lists(finite, min_size=6 * 50, max_size=6 * 50),
)
def test_round_trip_property(rows: int, seq: int, base: int, values: list[float]) -> None:
    arr = np.array(values).reshape(6, 50)[:, :rows]
    b = make_batch(
        device_id="d",
        seq=seq,
        created_ns=0,
        window=WindowSpec("tumbling", W),
        sensors=(SensorRef("n", "s"),),
        columns={
            "sensor": np.zeros(rows),
            "start_ns": (base + np.arange(rows) * 3) * W,
            "count": np.arange(rows) + 1,
            "invalid": np.zeros(rows),
            **{f: arr[i] for i, f in enumerate(STAT_FIELDS)},
        },
    )
    out = decode_batch(encode_batch(b))
    for name in COLUMNS:  # bit-exact, NaN payloads included
        assert getattr(out, name).tobytes() == getattr(b, name).tobytes()


def test_independent_decoder_from_the_spec_agrees() -> None:
    """tests/shared/wire_spec.py, written from docs/wire-format.md alone, reads the
    values the encoder wrote (the same decoder checks the reasons: test_wire_spec.py)."""
    b = sample_batch(rows=6)
    for compress in (True, False):
        header, cols = wire_spec.decode(encode_batch(b, compress=compress), ranges=False)
        assert header["device_id"] == "dev-1" and header["seq"] == 7
        assert header["window"] == {"kind": "tumbling", "width_ns": W}
        for name in COLUMNS:
            np.testing.assert_array_equal(np.array(cols[name]), getattr(b, name))


def test_unknown_columns_and_header_keys_are_ignored() -> None:
    """The minor-version rule: a v1 decoder skips what it does not know."""
    b = sample_batch(rows=2)
    body = zstandard.ZstdDecompressor().decompress(encode_batch(b)[10:], max_output_size=1 << 20)
    (hlen,) = struct.unpack_from("<I", body)
    header = json.loads(body[4 : 4 + hlen])
    header["future_key"] = {"x": 1}
    extra = np.array([1.5, 2.5], dtype="<f8").tobytes()
    header["columns"].insert(
        1, {"name": "p99", "type": "float64", "encoding": "plain", "bytes": len(extra)}
    )
    cols = body[4 + hlen :]
    first = header["columns"][0]["bytes"]
    hb = json.dumps(header).encode()
    new_body = struct.pack("<I", len(hb)) + hb + cols[:first] + extra + cols[first:]
    payload = struct.pack("<4sBBI", b"TLMB", 1, 0, len(new_body)) + new_body
    assert_same(decode_batch(payload), b)


def _corrupt(payload: bytes, **changes: object) -> bytes:
    body = zstandard.ZstdDecompressor().decompress(payload[10:], max_output_size=1 << 20)
    (hlen,) = struct.unpack_from("<I", body)
    header = json.loads(body[4 : 4 + hlen])
    header.update(changes)
    hb = json.dumps(header).encode()
    nb = struct.pack("<I", len(hb)) + hb + body[4 + hlen :]
    return struct.pack("<4sBBI", b"TLMB", 1, 0, len(nb)) + nb


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: b"XXXX" + p[4:], "bad-magic"),
        (lambda p: p[:4] + b"\x02" + p[5:], "unsupported-version"),
        (lambda p: p[:5] + b"\x07" + p[6:], "unsupported-codec"),
        (lambda p: p[:7], "truncated"),
        (lambda p: p[:-5], "truncated"),
        (lambda p: p[:10] + b"\x00" * 20, "bad-compression"),
        (lambda p: p + b"\x00" * 2_000_000, "too-large"),
        (lambda p: _corrupt(p, seq=-1), "bad-seq"),
        (lambda p: _corrupt(p, seq="7"), "bad-header"),
        (lambda p: _corrupt(p, device_id="a/b"), "bad-device-id"),
        (lambda p: _corrupt(p, rows=3), "bad-column"),
        (lambda p: _corrupt(p, window={"kind": "session", "width_ns": 1}), "bad-window"),
        (lambda p: _corrupt(p, sensors=[{"node": "n"}]), "bad-header"),
    ],
)
def test_bad_input_is_rejected_with_a_reason(make, reason: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(WireError) as e:
        decode_batch(make(encode_batch(sample_batch())))
    assert e.value.reason == reason


def test_zip_bomb_is_bounded() -> None:
    """A tiny payload that inflates beyond the limit is refused without inflating it all."""
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\x00" * (64 << 20))
    assert len(bomb) < 1 << 20
    payload = struct.pack("<4sBBI", b"TLMB", 1, 1, 64 << 20) + bomb
    with pytest.raises(WireError) as e:
        decode_batch(payload)
    assert e.value.reason == "too-large"
    # and one that lies about its size in the preamble: stopped after 1001 bytes
    payload = struct.pack("<4sBBI", b"TLMB", 1, 1, 1000) + bomb
    with pytest.raises(WireError) as e:
        decode_batch(payload)
    assert e.value.reason == "too-large"


@pytest.mark.parametrize(
    ("sensor", "start", "match"), [(0, 5, "not aligned"), (1, 0, "out of range")]
)
def test_batch_checks_itself_when_built(sensor: int, start: int, match: str) -> None:
    cols = {"sensor": [sensor], "start_ns": [start], "count": [1], "invalid": [0]}
    with pytest.raises(WireError, match=match):
        make_batch(
            device_id="d",
            seq=1,
            created_ns=0,
            window=WindowSpec("tumbling", W),
            sensors=(SensorRef("n", "s"),),
            columns={**cols, **{f: [1.0] for f in STAT_FIELDS}},
        )


def test_compact_on_the_wire() -> None:
    """Bytes per window point for a realistic batch (reported in docs/benchmarks.md)."""
    b = sample_batch(rows=300)
    size = len(encode_batch(b))
    assert size / b.rows < 92  # line protocol took 92 bytes per point for such rows


def test_batch_from_an_older_v1_encoder_without_the_added_columns() -> None:
    """sum and the quantiles were added within v1: a batch without them still decodes."""
    b = sample_batch(rows=3)
    body = zstandard.ZstdDecompressor().decompress(encode_batch(b)[10:], max_output_size=1 << 20)
    (hlen,) = struct.unpack_from("<I", body)
    header = json.loads(body[4 : 4 + hlen])
    off = 4 + hlen
    kept_cols, kept_bytes = [], b""
    for c in header["columns"]:
        if c["name"] not in ("sum", "p50", "p90", "p99"):
            kept_cols.append(c)
            kept_bytes += body[off : off + c["bytes"]]
        off += c["bytes"]
    header["columns"] = kept_cols
    hb = json.dumps(header).encode()
    nb = struct.pack("<I", len(hb)) + hb + kept_bytes
    out = decode_batch(struct.pack("<4sBBI", b"TLMB", 1, 0, len(nb)) + nb)
    np.testing.assert_array_equal(out.mean, b.mean)
    assert np.isnan(out.p99).all()
    np.testing.assert_array_equal(out.sum, b.mean * b.count)  # sum: count x mean


def _ranged(**overrides: list[float]) -> Batch:
    cols: dict[str, list[float]] = {
        "sensor": [0, 0],
        "start_ns": [0, 10**10],
        "count": [3, 0],
        "invalid": [0, 2],
        "min": [1.0, math.nan],
        "max": [3.0, math.nan],
        "mean": [2.0, math.nan],
        "stddev": [0.8, math.nan],
        "first": [1.0, math.nan],
        "last": [3.0, math.nan],
        "sum": [6.0, math.nan],
        "p50": [2.0, math.nan],
        "p90": [2.8, math.nan],
        "p99": [2.98, math.nan],
    }
    cols.update(overrides)
    return make_batch(
        device_id="d",
        seq=1,
        created_ns=0,
        window=WindowSpec("tumbling", 10**10),
        sensors=(SensorRef("n", "s"),),
        columns=cols,
    )


def test_range_check_accepts_consistent_windows_and_absent_extras() -> None:
    check_ranges(_ranged())
    nan2 = [math.nan, math.nan]
    check_ranges(_ranged(p50=nan2, p90=nan2, p99=nan2))  # no quantiles


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        ({"max": [math.inf, math.nan]}, "infinite"),
        ({"mean": [math.nan, math.nan]}, "NaN statistic"),
        ({"sum": [math.nan, math.nan]}, "NaN statistic"),
        ({"sum": [6.0, 0.0]}, "without finite readings"),
        ({"mean": [3.5, math.nan]}, "mean outside"),
        ({"first": [0.5, math.nan]}, "first outside"),
        ({"stddev": [-0.1, math.nan]}, "negative stddev"),
        ({"p99": [9.0, math.nan]}, "p99 outside"),
        ({"p50": [2.9, math.nan]}, "out of order"),
    ],
)
def test_range_check_rejects(overrides: dict[str, list[float]], why: str) -> None:
    with pytest.raises(WireError, match=why) as info:
        check_ranges(_ranged(**overrides))
    assert info.value.reason == "bad-range"


def test_range_check_of_a_group_finds_the_batch_at_fault() -> None:
    good, bad = _ranged(), _ranged(mean=[3.5, math.nan])
    assert check_ranges_many([good, good, good]) == [None, None, None]
    verdicts = check_ranges_many([good, bad, good])
    assert verdicts[0] is None and verdicts[2] is None
    assert isinstance(verdicts[1], WireError) and "mean outside" in str(verdicts[1])
    assert check_ranges_many([]) == []
