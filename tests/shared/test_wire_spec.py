"""docs/wire-format.md is true of the code: a batch decoder written from the page
alone (tests/shared/wire_spec.py) gives the same reason as cloud-ingest for every payload,
valid, damaged or built to break one rule of §2.5 after another."""

from __future__ import annotations

import copy
import json
import random
import struct
from typing import Any

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud_ingest.config import IngestConfig
from cloud_ingest.ingest.decode import decode_group
from devstack import hostile
from shared.config import from_dict
from shared.errors import CLOUD_QUARANTINE_REASONS
from shared.sketch import DDSketch
from shared.wire import STAT_FIELDS, SensorRef, WindowSpec, encode_batch, make_batch
from tests.shared import wire_spec

CFG = from_dict(IngestConfig, {"mqtt": {"host": "127.0.0.1"}})
TOPIC = "telemetry/v1/dev-1/batch"
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
W = 10_000_000_000


def code_reason(topic: str, payload: bytes) -> str | None:
    """What cloud-ingest makes of it (decode, then the range check, as it runs)."""
    (decoded,) = decode_group([(topic, payload)], CFG)
    return None if decoded.error is None else decoded.error.reason


def agree(topic: str, payload: bytes) -> str | None:
    """The code's reason, having checked that the page gives the same, and for a
    refused batch the same seq to ack (§2.7), or none."""
    (decoded,) = decode_group([(topic, payload)], CFG)
    got = None if decoded.error is None else decoded.error.reason
    spec = wire_spec.reason(topic, payload)
    assert got == spec, f"code says {got!r}, the page says {spec!r}"
    if got is not None:
        acked = decoded.seq if decoded.device is not None else None
        assert acked == wire_spec.acked_seq(topic, payload), (got, acked)
    return got


# ---- payloads ---------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.sampled_from([0, 1, -1, 2**63 - 1, 2**63, 2**64, 10**20, 10**21, 3, 65536, 65537])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(["", "x", "dev-1", "n1", "tumbling", "hopping", "a/b", "é" * 40, "\n"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=8,
)


@st.composite
def batches(draw: st.DrawFn) -> bytes:
    """A valid batch of a few sensors and rows, or one a little off (bad values)."""
    rows = draw(st.integers(0, 4))
    hopping = draw(st.booleans())
    window = WindowSpec("hopping", 6 * W, 2 * W) if hopping else WindowSpec("tumbling", W)
    step = window.step_ns
    n_sensors = draw(st.integers(1, 3))
    sensors = tuple(
        SensorRef(f"n{i}", "t", "degC", (("site", "b1"),) if i == 2 else ())
        for i in range(n_sensors)
    )
    values = draw(st.lists(st.floats(-1e6, 1e6), min_size=rows, max_size=rows))
    count = draw(st.lists(st.integers(0, 3), min_size=rows, max_size=rows))
    pairs = list(zip(values, count, strict=True))
    cols: dict[str, Any] = {
        "sensor": [i % n_sensors for i in range(rows)],
        "start_ns": [1_700_000_000 * 10**9 // step * step + i * step for i in range(rows)],
        "count": count,
        "invalid": [0 if c else 1 for c in count],
        **{f: [v if c else np.nan for v, c in pairs] for f in STAT_FIELDS},
        "sum": [v * c if c else np.nan for v, c in pairs],
        "p50": [v if c else np.nan for v, c in pairs],
        "revision": [0] * rows,
    }
    cols["stddev"] = [0.0 if c else np.nan for c in count]
    if draw(st.booleans()):  # one statistic off: too big, NaN, infinite, negative
        name = draw(st.sampled_from(["min", "max", "mean", "stddev", "p50", "sum", "first"]))
        if rows:
            i = draw(st.integers(0, rows - 1))
            cols[name][i] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e7, -1e7, -1.0]))
    sketch = ()
    if draw(st.booleans()):
        sketch = tuple(DDSketch.from_values(np.array([1.5])).encode() for _ in range(rows))
    batch = make_batch(
        device_id="dev-1",
        seq=draw(st.integers(0, 2**63 - 1)),
        created_ns=1,
        window=window,
        sensors=sensors,
        columns=cols,
        sketch=sketch,
        generation=draw(st.sampled_from([0, 1, 2**63 - 1])),
    )
    return encode_batch(batch, compress=False)


def _rebuild(header: dict[str, Any], columns: bytes, codec: int) -> bytes:
    hb = json.dumps(header).encode()
    body = struct.pack("<I", len(hb)) + hb + columns
    data = zstandard.ZstdCompressor().compress(body) if codec == 1 else body
    return struct.pack("<4sBBI", b"TLMB", 1, codec, len(body)) + data


#: where in a header a value can be put
_PATHS = [
    ("rows",), ("window",), ("window", "kind"), ("window", "width_ns"), ("window", "hop_ns"),
    ("sensors",), ("sensors", 0), ("sensors", 0, "node"), ("sensors", 0, "name"),
    ("sensors", 0, "unit"), ("sensors", 0, "tags"), ("sensors", 0, "tags", "room"),
    ("sensors", -1, "node"), ("columns",), ("columns", 0), ("columns", 0, "name"),
    ("columns", 0, "bytes"), ("columns", 0, "type"), ("columns", 1, "encoding"),
    ("columns", -1, "bytes"), ("columns", -1, "name"), ("columns", 2, "bytes"),
    ("device_id",), ("seq",), ("created_ns",), ("generation",), ("extra",),
]  # fmt: skip


def _put(header: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    node: Any = header
    for key in path[:-1]:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return
    if isinstance(node, dict) or (isinstance(node, list) and isinstance(path[-1], int)):
        try:
            node[path[-1]] = value
        except IndexError:
            return


def _drop(header: dict[str, Any], path: tuple[Any, ...]) -> None:
    node: Any = header
    for key in path[:-1]:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return
    if isinstance(node, dict):
        node.pop(path[-1], None)


#: one value that breaks one rule of §2.5 each
_TARGETED = [
    (("device_id",), "a/b"), (("device_id",), "dev-2"), (("device_id",), ""),
    (("device_id",), 7), (("seq",), -1), (("seq",), 2**63), (("seq",), "7"),
    (("seq",), True), (("created_ns",), -1), (("created_ns",), 2**63), (("generation",), -5),
    (("generation",), True), (("generation",), None), (("window", "kind"), "sliding"),
    (("window", "width_ns"), 0), (("window", "width_ns"), 2**63), (("window", "hop_ns"), 7),
    (("window", "hop_ns"), 0), (("window", "kind"), "hopping"), (("window", "kind"), "tumbling"),
    (("sensors", 0, "node"), "a b"), (("sensors", 0, "name"), "x" * 65),
    (("sensors", 0, "unit"), "x" * 33), (("sensors", 0, "unit"), "deg\tC"),
    (("sensors", 0, "unit"), None), (("sensors", 0, "tags"), {"Room": "x"}),
    (("sensors", 0, "tags"), {"room": "a b"}), (("sensors", 0, "tags"), {"node": "x"}),
    (("sensors", 0, "tags"), {f"k{i}": "v" for i in range(9)}),
    (("sensors", 0, "tags"), None), (("sensors", 0, "tags"), {"room": 1}),
    (("sensors", -1, "node"), "ok.node"), (("sensors",), []),
    (("rows",), 0), (("rows",), 1), (("rows",), 2**40), (("rows",), -1),
    (("columns", 0, "bytes"), -1), (("columns", 0, "bytes"), 0), (("columns", 1, "type"), "int32"),
    (("columns", 2, "name"), "sum"), (("columns", -1, "name"), "p99"), (("columns",), []),
]  # fmt: skip


@st.composite
def damaged(draw: st.DrawFn) -> bytes:
    """A batch with one to three things wrong with its header, columns or preamble."""
    header, columns = hostile.split(draw(batches()))
    header = copy.deepcopy(header)
    for _ in range(draw(st.integers(1, 3))):
        what = draw(st.integers(0, 5))
        path = draw(st.sampled_from(_PATHS))
        if what == 5:
            path, value = draw(st.sampled_from(_TARGETED))
            _put(header, path, copy.deepcopy(value))
        elif what == 0:
            _put(header, path, draw(json_values))
        elif what == 1:
            _drop(header, path)
        elif what == 2 and columns:  # a byte of the column data
            data = bytearray(columns)
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
            columns = bytes(data)
        elif what == 3:  # columns cut or grown
            cut = draw(st.integers(-16, 16))
            columns = columns[:cut] if cut < 0 else columns + bytes(cut)
        else:  # a column listed twice, or one the page does not know
            extra = draw(st.sampled_from([
                {"name": "sensor", "type": "uint16", "encoding": "plain", "bytes": 0},
                {"name": "future", "type": "whatever", "bytes": 0},
                {"name": "sketch", "type": "bytes", "encoding": "offsets", "bytes": 0},
            ]))  # fmt: skip
            if isinstance(header.get("columns"), list):
                header["columns"].append(extra)
    payload = _rebuild(header, columns, draw(st.sampled_from([0, 1])))
    if draw(st.integers(0, 9)) == 9:  # the preamble
        data = bytearray(payload)
        at = draw(st.integers(0, 9))
        data[at] = draw(st.integers(0, 255))
        payload = bytes(data)
    return payload


# ---- the tests ----------------------------------------------------------------------


@FUZZ
@given(batches())
def test_the_page_and_the_code_agree_on_batches_valid_and_off_range(payload: bytes) -> None:
    agree(TOPIC, payload)


@FUZZ
@given(damaged())
def test_the_page_and_the_code_agree_on_damaged_batches(payload: bytes) -> None:
    agree(TOPIC, payload)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.integers(0, 2**32 - 1))
def test_the_page_and_the_code_agree_on_random_bytes(payload: bytes, seed: int) -> None:
    agree(TOPIC, payload)
    agree(TOPIC, hostile.mutate(hostile.valid_batch(), random.Random(seed)))


@pytest.mark.parametrize(
    "topic",
    [TOPIC, "telemetry/v1/dev-2/batch", "telemetry/v1/de v/batch", "telemetry/v1//batch",
     "telemetry/v2/dev-1/batch", "telemetry/v1/dev-1/batch/x"],
)  # fmt: skip
def test_the_page_and_the_code_agree_on_topics(topic: str) -> None:
    agree(topic, hostile.valid_batch())


def test_every_reason_the_page_gives_is_one_the_code_counts() -> None:
    """The spec decoder's reasons are cloud-ingest's (shown on /metrics from 0)."""
    import re
    from pathlib import Path

    spec = Path(wire_spec.__file__).read_text()
    reasons = set(re.findall(r'Refused\("([a-z-]+)"\)', spec))
    assert len(reasons) == 15, reasons
    assert reasons <= set(CLOUD_QUARANTINE_REASONS)


def test_seen_reasons_cover_section_2_5() -> None:
    """The generators reach every reason of §2.5 (else an agreement proves little)."""
    rng = random.Random(7)
    seen: set[str | None] = set()
    builders = [
        lambda: hostile.mutate(hostile.valid_batch(), rng),
        lambda: hostile.mutate(encode_batch_zstd(), rng),
    ]
    for payload, _ in hostile.poison_batches("dev-1", 9):
        seen.add(agree(TOPIC, payload))
    for _ in range(3000):
        seen.add(agree(TOPIC, rng.choice(builders)()))
    seen.add(agree("telemetry/v1/dev-2/batch", hostile.valid_batch()))
    seen.add(agree("nope", hostile.valid_batch()))
    expected = {
        None, "bad-topic", "too-large", "truncated", "bad-magic", "unsupported-version",
        "unsupported-codec", "bad-compression", "bad-header", "bad-column", "device-mismatch",
        "bad-range",
    }  # fmt: skip
    assert expected <= seen, expected - seen


def encode_batch_zstd() -> bytes:
    h, c = hostile.split(hostile.valid_batch())
    return _rebuild(h, c, 1)


# ---- version 2 (§2.14) --------------------------------------------------------------

V2_TOPIC = "telemetry/v2/pi-0042/batch"


def _v2_payloads() -> list[bytes]:
    from shared import varint
    from tests.shared.test_wire_v2 import LONG, agent_batch, v2_with

    b = agent_batch(11, 3, readings=30, bad=0.1)
    sketches = [
        b"", b"\x80", b"\xff" * 11 + b"\x01", varint.encode([0, 0, 0] * 2),
        varint.encode([0, 0, 0] * 4), varint.encode([2**63, 0, 0] * 3),
        varint.encode([0, 1, 2**33, 1, 0] * 3), varint.encode([0, 1, 0, 2**32, 0] * 3),
        varint.encode([0, 70000, 0, *LONG, 0] * 3), varint.encode([5, 2, 7, 1, 2, 0] * 3),
    ]  # fmt: skip
    return [
        encode_batch(b, version=2),
        encode_batch(b, version=2, compress=False),
        v2_with(b),
        v2_with(b, mean=b.mean.tobytes()),
        v2_with(b, sum=None),
        v2_with(b, {"sketch_alpha": None}),
        v2_with(b, {"sketch_alpha": 1.5}),
        v2_with(b, {"sketch_alpha": 1}),
        *(v2_with(b, sketch=s) for s in sketches),
    ]


def test_the_page_and_the_code_agree_on_version_2() -> None:
    """§2.14 read by the spec decoder, against the code: valid v2 batches, each
    malformed sketch column and header, and either version on the other's topic."""
    payloads = _v2_payloads()
    reasons = {agree(V2_TOPIC, p) for p in payloads}
    assert {None, "bad-column", "bad-header"} <= reasons
    assert agree("telemetry/v1/pi-0042/batch", payloads[0]) == "unsupported-version"


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(range(3)))
def test_the_page_and_the_code_agree_on_damaged_version_2(seed: int, which: int) -> None:
    payload = _V2[which]
    agree(V2_TOPIC, hostile.mutate(payload, random.Random(seed)))


_V2 = _v2_payloads()[:3]
