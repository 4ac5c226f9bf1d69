"""Every decoder is total: any bytes become a valid message or a WireError with a
reason, never another exception. Property-based (hypothesis, bounded example counts),
plus the crashers found so far as regression tests."""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from devstack import hostile
from devstack.hostile import split, valid_batch
from shared.acks import decode_ack
from shared.alerts import decode_alert
from shared.errors import WireError
from shared.readings import decode_chunk, encode_chunk
from shared.sketch import DDSketch, bins_many, bins_of
from shared.topics import is_valid_id
from shared.wire import (
    STAT_FIELDS,
    SensorRef,
    check_ranges,
    decode_batch,
    encode_batch,
    make_batch,
    peek_ids,
    peek_seq,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
W = 10_000_000_000


VALID = valid_batch()
VALID_ZSTD = encode_batch(decode_batch(VALID))
HEADER, COLUMN_BYTES = split(VALID)

#: JSON values of every kind, with integers well beyond 64 bits
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.sampled_from([2**63, 2**64, -(2**63) - 1, 10**19])
    | st.floats()
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)


def total(decode: Any, payload: bytes) -> Any:
    """``decode(payload)``: its value, or None for a WireError; anything else fails."""
    try:
        return decode(payload)
    except WireError as exc:
        assert exc.reason and " " not in exc.reason
        return None


def with_header(header: dict[str, Any]) -> bytes:
    return hostile.with_header(header, COLUMN_BYTES)


@FUZZ
@given(st.binary(max_size=300))
def test_any_bytes_decode_or_fail_with_a_reason(data: bytes) -> None:
    for decode in (decode_batch, decode_alert, decode_ack, DDSketch.decode):
        total(decode, data)
    total(lambda p: decode_chunk("sensors/n1/t", p, "sensors"), data)
    total(lambda p: decode_batch(b"TLMB\x01\x00" + struct.pack("<I", len(p)) + p), data)
    seq = peek_seq(data)
    assert seq is None or 0 <= seq < 2**63


@FUZZ
@given(
    st.lists(st.tuples(st.integers(0, len(VALID_ZSTD) - 1), st.integers(0, 255)), max_size=6),
    st.booleans(),
    st.integers(0, len(VALID) + 8),
)
def test_mutated_batches_decode_or_fail_with_a_reason(
    flips: list[tuple[int, int]], compressed: bool, cut: int
) -> None:
    raw = bytearray(VALID_ZSTD if compressed else VALID)
    for pos, value in flips:
        raw[pos % len(raw)] = value
    for payload in (bytes(raw), bytes(raw[:cut]), bytes(raw) + b"\0" * (cut % 7)):
        b = total(decode_batch, payload)
        if b is not None:
            total(lambda _p, b=b: check_ranges(b), b"")  # decoded: checkable too


@FUZZ
@given(st.sampled_from(sorted(HEADER)), json_values, st.sampled_from(["window", "columns", None]))
def test_batch_headers_with_any_values_decode_or_fail(
    key: str, value: Any, nested: str | None
) -> None:
    header = json.loads(json.dumps(HEADER))
    if nested == "window":
        header["window"][key if key in ("kind", "width_ns", "hop_ns") else "width_ns"] = value
        header["window"]["kind"] = header["window"].get("kind", "hopping")
    elif nested == "columns":
        header["columns"][0][("name", "type", "bytes", "encoding")[len(key) % 4]] = value
    else:
        header[key] = value
    total(decode_batch, with_header(header))


huge_ints = st.integers(-(2**80), 2**80) | st.sampled_from(
    [2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**19, 0, -1]
)


@FUZZ
@given(
    st.sampled_from(["created_ns", "seq", "rows", "width_ns", "hop_ns", "bytes", "generation"]),
    huge_ints,
)
def test_every_integer_of_a_batch_header_is_bounded(field: str, value: int) -> None:
    header = json.loads(json.dumps(HEADER))
    if field in ("width_ns", "hop_ns"):
        header["window"] = {"kind": "hopping", "width_ns": W, "hop_ns": W, field: value}
    elif field == "bytes":
        header["columns"][1]["bytes"] = value
    else:
        header[field] = value
    b = total(decode_batch, with_header(header))
    if b is not None:  # what downstream code stores as int64 fits one
        for v in (b.seq, b.created_ns, b.window.width_ns, b.window.hop_ns, b.generation):
            assert -(2**63) <= v < 2**63
        assert b.generation >= 0
    seq, gen = peek_ids(with_header(header))  # what a rejected ack names
    assert seq is None or 0 <= seq < 2**63
    assert 0 <= gen < 2**63


ALERT = hostile.ALERT


@FUZZ
@given(st.sampled_from([*sorted(ALERT), "generation", "capture"]), json_values | st.just(...))
def test_alerts_with_any_field_decode_or_fail(key: str, value: Any) -> None:
    obj = dict(ALERT)
    if value is ...:
        obj.pop(key, None)
    else:
        obj[key] = value
    alert = total(decode_alert, json.dumps(obj).encode())
    if alert is not None:
        assert 0 <= alert.seq < 2**63 and 0 <= alert.ts_ns < 2**63
        assert alert.value is None or math.isfinite(alert.value)
        assert alert.capture == "" or is_valid_id(alert.capture)


@FUZZ
@given(st.sampled_from(["seq", "ts_ns", "value", "generation"]), huge_ints)
def test_every_integer_of_an_alert_is_bounded(key: str, value: int) -> None:
    alert = total(decode_alert, json.dumps({**ALERT, key: value}).encode())
    if alert is not None:
        assert 0 <= alert.seq < 2**63 and 0 <= alert.ts_ns < 2**63
        assert 0 <= alert.generation < 2**63


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(["seq", "status", "reason", "generation", "ts_ns", "mac", "x"]),
        json_values | huge_ints,
    )
)
def test_acks_with_any_fields_decode_or_fail(obj: dict[str, Any]) -> None:
    ack = total(decode_ack, json.dumps(obj).encode())
    if ack is not None:
        assert 0 <= ack.seq < 2**63 and ack.status in ("stored", "rejected")
        assert 0 <= ack.generation < 2**63 and 0 <= ack.ts_ns < 2**63
        assert not ack.verify("dev-1", b"k" * 32) or ack.mac  # no MAC: never verified


@FUZZ
@given(
    st.dictionaries(st.sampled_from(["ts", "values", "unit", "x"]), json_values),
    st.sampled_from(["sensors/n1/t", "sensors/n1", "sensors/n 1/t", "other/n1/t", "sensors/+/t"]),
)
def test_reading_chunks_with_any_fields_decode_or_fail(obj: dict[str, Any], topic: str) -> None:
    chunk = total(lambda p: decode_chunk(topic, p, "sensors"), json.dumps(obj).encode())
    if chunk is not None:
        assert len(chunk.ts) == len(chunk.values) > 0
        assert chunk.ts.dtype == np.int64 and chunk.unit.isprintable()


@FUZZ
@given(st.binary(max_size=64), st.integers(-(2**31), 2**31 - 1))
def test_decoded_sketches_answer_quantiles(tail: bytes, lo: int) -> None:
    data = struct.pack("<BdQ", 1, 0.01, 3) + struct.pack("<iH", lo, 1) + b"\1\0\0\0" + tail
    sk = total(DDSketch.decode, data)
    if sk is not None:
        for q in (0.0, 0.5, 0.99, 1.0):
            assert not math.isnan(sk.quantile(q))


@FUZZ
@given(st.binary(max_size=64), st.integers(-(2**31), 2**31 - 1), st.integers(0, 300))
def test_sketch_bins_are_the_decoded_sketch_or_a_reason(tail: bytes, lo: int, n: int) -> None:
    """The lake's sketch_bins (bins_of) and DDSketch.decode agree on any bytes."""
    data = struct.pack("<BdQ", 1, 0.01, 3) + struct.pack("<iH", lo, n) + tail
    for payload in (data, tail):
        bins = total(bins_of, payload)
        sk = total(DDSketch.decode, payload)
        assert (bins is None) == (sk is None)
        if bins is None or sk is None:
            continue
        signs, keys, counts = bins
        assert sum(counts) == sk.count
        assert {k: c for s, k, c in zip(signs, keys, counts, strict=True) if s > 0} == sk.pos


@FUZZ
@given(
    st.lists(
        st.one_of(
            st.none(),
            st.binary(max_size=80),
            st.builds(
                lambda alpha, zero, lo, n, tail: (
                    struct.pack("<BdQ", 1, alpha, zero) + struct.pack("<iH", lo, n) + tail
                ),
                st.sampled_from([0.01, 0.5, 1e-15, 5e-324, 1.0, -0.01]),
                st.sampled_from([0, 3, 2**63 - 1, 2**63, 2**64 - 1]),
                st.integers(-(2**31), 2**31 - 1),
                st.integers(0, 20),
                st.binary(max_size=90),
            ),
        ),
        max_size=12,
    )
)
def test_bins_of_many_sketches_at_once_are_each_ones_bins(sketches: list[bytes | None]) -> None:
    """The ingestor's lake rows take every sketch's bins at once (bins_many): the
    same bins as bins_of one by one, and null where bins_of finds a reason."""
    many = bins_many(sketches)
    for i, data in enumerate(sketches):
        one = None if data is None else total(bins_of, data)
        assert bool(many.valid[i]) == (one is not None), data
        a, b = int(many.offsets[i]), int(many.offsets[i + 1])
        got = (many.sign[a:b].tolist(), many.key[a:b].tolist(), many.count[a:b].tolist())
        assert got == (one if one is not None else ([], [], []))


@pytest.mark.parametrize(
    "data",
    [
        # alpha so small that gamma rounds to 1: ZeroDivisionError escaped bins_of and
        # decode (and with it the ingestor's lake rows: a poison batch)
        struct.pack("<BdQ", 1, 5e-324, 0) + struct.pack("<iHI", 3, 1, 3) + struct.pack("<iH", 0, 0),
        # a zero count beyond int64: OverflowError out of the lake's sketch_bins
        struct.pack("<BdQ", 1, 0.01, 2**63) + struct.pack("<iH", 0, 0) * 2,
        # keys beyond int32 (lo + n): OverflowError out of the lake's sketch_bins
        struct.pack("<BdQ", 1, 1e-15, 0) + struct.pack("<iHII", 2**31 - 1, 2, 3, 4)
        + struct.pack("<iH", 0, 0),
    ],
)  # fmt: skip
def test_sketches_the_lake_cannot_hold_are_not_sketches(data: bytes) -> None:
    from cloud_ingest.lake.schema import sketch_bins_array

    for decode in (bins_of, DDSketch.decode):
        with pytest.raises(WireError) as err:
            decode(data)
        assert err.value.reason == "bad-sketch"
    assert sketch_bins_array([data, None]).to_pylist() == [None, None]


# ---- the crashers found so far (issue 9), one test each --------------------------------


@pytest.mark.parametrize(
    ("where", "value"),
    [
        ("width_ns", 2**63),
        ("width_ns", 10**19),
        ("created_ns", 2**63),
        ("created_ns", -1),
        ("hop_ns", 2**63),
        ("seq", 2**64),
    ],
)
def test_a_header_integer_beyond_64_bits_is_quarantined(where: str, value: int) -> None:
    header = json.loads(json.dumps(HEADER))
    if where in ("width_ns", "hop_ns"):
        header["window"] = {"kind": "hopping", "width_ns": W, "hop_ns": W, where: value}
    else:
        header[where] = value
    with pytest.raises(WireError) as info:
        decode_batch(with_header(header))
    assert info.value.reason in ("bad-window", "bad-header", "bad-seq")


def test_the_known_poison_messages_are_quarantined_with_their_reasons() -> None:
    for payload, reason in hostile.poison_batches("dev-1", 3):
        with pytest.raises(WireError) as info:
            decode_batch(payload)
        assert info.value.reason == reason
    for payload in hostile.poison_alerts(4):
        with pytest.raises(WireError, match="bad-alert"):
            decode_alert(payload)
    for payload, reason in hostile.poison_chunks():
        with pytest.raises(WireError) as info:
            decode_chunk("sensors/n1/t", payload, "sensors")
        assert info.value.reason == reason


@pytest.mark.parametrize(("key", "value"), [("seq", 2**64), ("ts_ns", 2**63), ("seq", 2**63)])
def test_an_alert_integer_beyond_the_spec_is_quarantined(key: str, value: int) -> None:
    with pytest.raises(WireError, match="bad-alert"):
        decode_alert(json.dumps({**ALERT, key: value}).encode())


def test_an_alert_without_value_or_with_a_control_character_is_quarantined() -> None:
    without = {k: v for k, v in ALERT.items() if k != "value"}
    with pytest.raises(WireError, match="missing value"):
        decode_alert(json.dumps(without).encode())
    for key in ("rule", "message"):
        with pytest.raises(WireError, match="bad-alert"):
            decode_alert(json.dumps({**ALERT, key: "a\nb"}).encode())
    assert decode_alert(json.dumps({**ALERT, "value": None}).encode()).value is None


@pytest.mark.parametrize(
    "payload",
    [
        b'{"ts": [' + b"9" * 5000 + b'], "values": [1.0]}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"ts": [1], "values": [' * 50_000,
        b'{"ts": [1], "values": [1], "unit": "deg\\nC"}',
        b'{"ts": [1], "values": [1], "unit": "' + b"\xff\xfe" + b'"}',
    ],
)
def test_hostile_reading_chunks_are_quarantined(payload: bytes) -> None:
    with pytest.raises(WireError) as info:
        decode_chunk("sensors/n1/t", payload, "sensors")
    assert info.value.reason in ("bad-json", "bad-chunk")


def test_a_unit_the_cloud_cannot_store_is_refused_at_both_ends() -> None:
    with pytest.raises(WireError, match="bad-chunk"):
        decode_chunk("sensors/n1/t", encode_chunk("deg\nC", [1], [1.0]), "sensors")
    with pytest.raises(WireError, match="bad-sensor"):
        SensorRef("n1", "t", "deg\nC")


def test_a_window_with_readings_and_a_nan_sum_is_out_of_range() -> None:
    b = decode_batch(VALID)
    bad = make_batch(
        device_id=b.device_id,
        seq=b.seq,
        created_ns=0,
        window=b.window,
        sensors=b.sensors,
        columns={
            **{name: getattr(b, name) for name in ("sensor", "start_ns", "count", "invalid")},
            **{f: getattr(b, f) for f in STAT_FIELDS},
            "sum": np.full(b.rows, math.nan),
        },
    )
    with pytest.raises(WireError, match="bad-range"):
        check_ranges(bad)


def test_a_sketch_with_a_bin_beyond_float64_is_refused() -> None:
    data = struct.pack("<BdQ", 1, 0.01, 0) + struct.pack("<iH", 2**31 - 1, 1) + b"\1\0\0\0"
    with pytest.raises(WireError, match="bad-sketch"):
        DDSketch.decode(data + struct.pack("<iH", 0, 0))


def test_every_bit_flip_in_a_compressed_batch_is_caught_or_harmless() -> None:
    """The zstd frame carries its content checksum: a flipped bit anywhere in it fails
    the decode, or (in a field that does not matter) changes nothing. Before, 309 of
    the bit-flipped batches of a fuzz run decoded as valid, different batches."""
    original = decode_batch(VALID_ZSTD)
    for i in range(10, len(VALID_ZSTD)):  # every byte after the preamble
        for bit in (0, 5):
            damaged = bytearray(VALID_ZSTD)
            damaged[i] ^= 1 << bit
            b = total(decode_batch, bytes(damaged))
            if b is not None:
                for name in ("start_ns", "count", "mean", "sum", "revision"):
                    assert getattr(b, name).tobytes() == getattr(original, name).tobytes(), i
                assert b.seq == original.seq and b.sketch == original.sketch, i


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["p", "u", "%70", "db", "token", "password", "precision", "p%3D", ""]),
            st.sampled_from(["=", "", "=="]),
            st.text(alphabet="ab=&%+ 3D;", max_size=12),
        ),
        max_size=6,
    )
)
def test_a_redacted_query_keeps_no_secret(parts: list[tuple[str, str, str]]) -> None:
    """The HTTP intake masks InfluxDB 1.x's u= and p= (and token=, password=) in every
    query it keeps or logs (edge_agent/sources/http.py), whatever the query looks like."""
    import urllib.parse

    from edge_agent.sources.http import SECRET_PARAMS, redact, redact_line

    query = "&".join(f"{k}{eq}{v}" for k, eq, v in parts)
    masked = redact(query)
    for key, value in urllib.parse.parse_qsl(masked, keep_blank_values=True):
        if key in SECRET_PARAMS:
            assert value in ("***", "")  # masked, or empty: nothing to leak
    assert redact_line(f"POST /write?{query} HTTP/1.1").endswith(" HTTP/1.1")


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c", "d", "e"]),  # sensor
            st.sampled_from(["", "C", "V", "%"]),  # unit
            st.integers(-(2**62), 2**62),  # window start
        ),
        min_size=1,
        max_size=12,
        unique_by=lambda t: (t[0], t[2] // W),
    ),
    st.integers(1, 4),
)
def test_quotas_take_any_batch_whole_in_part_or_not(
    rows: list[tuple[str, str, int]], limit: int
) -> None:
    """Whatever windows a batch holds, the quotas (cloud_ingest/ingest/quotas.py) give back
    all of it, a part of it with a reason, or none of it with one; never an error,
    and the part is exactly the windows of the series within the bound."""
    from cloud_ingest.config import QuotasConfig
    from cloud_ingest.ingest.quotas import Quotas
    from shared.wire import STAT_FIELDS, SensorRef, WindowSpec, make_batch

    refs = sorted({(s, u) for s, u, _ in rows})
    index = {r: i for i, r in enumerate(refs)}
    batch = make_batch(
        device_id="d",
        seq=1,
        created_ns=0,
        window=WindowSpec("tumbling", W),
        sensors=tuple(SensorRef("n", s, u) for s, u in refs),
        columns={
            "sensor": [index[(s, u)] for s, u, _ in rows],
            "start_ns": [t // W * W for _, _, t in rows],
            "count": [1] * len(rows),
            "invalid": [0] * len(rows),
            **{f: [1.0] * len(rows) for f in STAT_FIELDS},
        },
    )
    now = 1_800_000_000 * 10**9
    q = Quotas(
        QuotasConfig(max_series_per_device=limit, max_past_s=1e12, max_batch_span_s=1e12),
        frozenset(),
        wall=lambda: now / 1e9,
    )
    got = q.check_batch(batch, now)
    if got.batch is None:
        assert got.error is not None or got.defer is not None
        return
    assert got.batch.rows + got.refused_rows == batch.rows
    assert len(set(got.batch.sensor.tolist())) <= limit
    assert (got.error is None) == (got.refused_rows == 0)
