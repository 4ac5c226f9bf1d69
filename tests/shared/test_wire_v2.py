"""Wire format v2 (docs/wire-format.md §2.14): the same batch as v1, fewer bytes.

v2 leaves out ``mean`` (it is ``sum / count``) and sends the sketches as varints
under one α; a v2 decoder gives back the batch a v1 decoder gives, bit for bit,
sketch bytes included. Hostile bytes fail with a reason, and nothing else.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.pipeline.kernels import segment_windows, window_stats
from shared import varint
from shared.errors import WireError
from shared.sketch import DDSketch, encode_windows
from shared.wire import (
    COLUMNS,
    Batch,
    SensorRef,
    WindowSpec,
    decode_batch,
    encode_batch,
    make_batch,
    peek_ids,
)
from tests.shared.test_fuzz import total
from tests.shared.test_wire import assert_same, sample_batch

W = 10_000_000_000
T0 = 1_790_000_000 * 10**9
BOTH = (1, 2)
LONG = [1] * 70_000  # a run of more counts than v1's u16 allows


def agent_batch(seed: int, rows: int, readings: int = 10, bad: float = 0.0) -> Batch:
    """Windows as the agent makes them: the kernel's statistics, encode_windows'
    sketches (so ``mean`` is ``sum / count``, and a window of NaN has neither)."""
    rng = np.random.default_rng(seed)
    n = rows * readings
    ts = T0 + np.arange(n, dtype=np.int64) * (W // readings)
    v = np.round(rng.normal(20, 3, n) * 16) / 16
    v[rng.random(n) < bad] = np.nan
    starts, segs = segment_windows(ts, W)
    stats = window_stats(v, segs).columns()
    return make_batch(
        device_id="pi-0042",
        seq=int(rng.integers(1, 2**62)),
        created_ns=T0,
        window=WindowSpec("tumbling", W),
        sensors=(SensorRef("n1", "t", "degC"),),
        columns={"sensor": np.zeros(len(starts)), "start_ns": starts, **stats},
        sketch=tuple(encode_windows(v, segs)),
        generation=int(rng.integers(1, 2**62)),
    )


def same(a: Batch, b: Batch) -> None:
    assert_same(a, b)
    assert a.sketch == b.sketch and a.generation == b.generation
    for name in COLUMNS:
        assert getattr(a, name).tobytes() == getattr(b, name).tobytes(), name


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(0, 40),
    readings=st.integers(1, 300),
    bad=st.sampled_from([0.0, 0.1, 1.0]),
)
def test_v2_gives_back_the_batch_v1_gives(seed: int, rows: int, readings: int, bad: float) -> None:
    b = agent_batch(seed, rows, readings, bad)
    v2 = encode_batch(b, version=2)
    assert v2[4] == 2
    same(decode_batch(v2, versions=(2,)), b)
    same(decode_batch(encode_batch(b), versions=BOTH), b)


def test_v2_is_smaller() -> None:
    b = agent_batch(1, 20)
    assert len(encode_batch(b, version=2)) < 0.9 * len(encode_batch(b))


def test_what_v2_cannot_carry_goes_as_v1() -> None:
    """A mean that is not sum / count, or sketches of two accuracies: v1, exactly."""
    b = sample_batch()
    b = dataclasses.replace(b, sum=b.sum + 1.0)  # a mean that is not sum / count
    payload = encode_batch(b, version=2)
    assert payload[4] == 1
    same(decode_batch(payload), b)
    mixed = agent_batch(2, 2)
    other = DDSketch.from_values(np.array([1.0, 2.0]), alpha=0.02).encode()
    mixed = dataclasses.replace(mixed, sketch=(mixed.sketch[0], other))
    assert encode_batch(mixed, version=2)[4] == 1


def test_each_version_on_its_own_topic() -> None:
    """docs/wire-format.md §2.6: a receiver reads v2 on v2's topic only, and v1 on v1's."""
    b = agent_batch(3, 4)
    for payload, wrong in ((encode_batch(b, version=2), (1,)), (encode_batch(b), (2,))):
        with pytest.raises(WireError) as err:
            decode_batch(payload, versions=wrong)
        assert err.value.reason == "unsupported-version"
    assert peek_ids(encode_batch(b, version=2)) == (b.seq, b.generation)


def v2_with(
    b: Batch, header: dict[str, Any] | None = None, sketch: bytes | None = None, **columns: Any
) -> bytes:
    """A v2 payload of ``b`` with its header keys or sketch column replaced."""
    payload = encode_batch(b, version=2, compress=False)
    (hlen,) = struct.unpack_from("<I", payload, 10)
    head = json.loads(payload[14 : 14 + hlen])
    data = payload[14 + hlen :]
    blobs, at = {}, 0
    for meta in head["columns"]:
        blobs[meta["name"]] = data[at : at + meta["bytes"]]
        at += meta["bytes"]
    if sketch is not None:
        blobs["sketch"] = sketch
    for name, value in columns.items():
        if value is None:
            blobs.pop(name)
        else:
            blobs[name] = value
    head["columns"] = [
        {**next((m for m in head["columns"] if m["name"] == n), {}), "name": n, "bytes": len(x)}
        | ({"type": "float64", "encoding": "plain"} if n == "mean" else {})
        for n, x in blobs.items()
    ]
    head |= header or {}
    head = {k: v for k, v in head.items() if v is not None}
    raw = json.dumps(head).encode()
    body = struct.pack("<I", len(raw)) + raw + b"".join(blobs.values())
    return struct.pack("<4sBBI", b"TLMB", 2, 0, len(body)) + body


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda b: v2_with(b, mean=b.mean.tobytes()), "bad-column"),  # v2 has no mean
        (lambda b: v2_with(b, sum=None), "bad-column"),  # sum is required
        (lambda b: v2_with(b, {"sketch_alpha": None}), "bad-header"),
        (lambda b: v2_with(b, {"sketch_alpha": 1.5}), "bad-header"),
        (lambda b: v2_with(b, sketch=b"\x80"), "bad-column"),  # ends inside a varint
        (lambda b: v2_with(b, sketch=varint.encode([0, 0, 0])), "bad-column"),  # too few rows
        (lambda b: v2_with(b, sketch=varint.encode([0, 0, 0] * 3)), "bad-column"),  # too many
        (lambda b: v2_with(b, sketch=varint.encode([2**63, 0, 0] * 2)), "bad-column"),
        (lambda b: v2_with(b, sketch=varint.encode([0, 1, 2**33, 1, 0] * 2)), "bad-column"),
        (lambda b: v2_with(b, sketch=varint.encode([0, 1, 0, 2**32, 0] * 2)), "bad-column"),
        (lambda b: v2_with(b, sketch=varint.encode([0, 70000, 0, *LONG, 0] * 2)), "bad-column"),
        (lambda b: v2_with(b, sketch=b"\xff" * 11 + b"\x01"), "bad-column"),
    ],
)  # fmt: skip
def test_bad_v2_is_rejected_with_a_reason(make: Any, reason: str) -> None:
    b = agent_batch(4, 2)
    assert decode_batch(v2_with(b), versions=(2,)).rows == 2  # the helper's own payload is good
    with pytest.raises(WireError) as err:
        decode_batch(make(b), versions=(2,))
    assert err.value.reason == reason


V2 = encode_batch(agent_batch(5, 6, 50), version=2, compress=False)
V2_ZSTD = encode_batch(agent_batch(5, 6, 50), version=2)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_damage_to_v2_decodes_or_fails_with_a_reason(data: st.DataObject) -> None:
    payload = bytearray(V2)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(payload) - 1))
        payload[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(payload)))
    zstd = bytearray(V2_ZSTD)
    zstd[data.draw(st.integers(0, len(zstd) - 1))] ^= data.draw(st.integers(1, 255))
    for p in (bytes(payload), bytes(payload[:cut]), bytes(zstd)):
        total(lambda x: decode_batch(x, versions=(2,)), p)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2**64 - 1), max_size=40))
def test_varints_round_trip(values: list[int]) -> None:
    assert varint.decode(varint.encode(values)).tolist() == values


def test_a_v2_batch_without_its_count_column_is_refused_not_a_crash() -> None:
    """Found by the spec decoder's agreement test (seed 3584): the mean was derived
    before the required columns were checked, and a KeyError left the decoder."""
    b = agent_batch(6, 2)
    with pytest.raises(WireError) as err:
        decode_batch(v2_with(b, count=None), versions=(2,))
    assert err.value.reason == "bad-column"
