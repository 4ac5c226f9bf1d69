"""DDSketch: the relative-error guarantee, merging, encoding, and the sketches a batch carries."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.pipeline import buffer, window
from edge_agent.store import Store
from shared.errors import WireError
from shared.readings import ReadingChunk
from shared.sketch import ALPHA, MAX_BINS, MIN_MAGNITUDE, DDSketch
from shared.wire import decode_batch

QS = (0.0, 0.1, 0.5, 0.9, 0.99, 1.0)


def assert_within_alpha(sk: DDSketch, values: np.ndarray) -> None:
    ordered = np.sort(values)
    for q in QS:
        true = ordered[math.floor(q * (len(ordered) - 1))]
        got = sk.quantile(q)
        if abs(true) < MIN_MAGNITUDE:
            assert got == 0.0
        else:
            assert abs(got - true) <= ALPHA * abs(true) * (1 + 1e-12), (q, got, true)


magnitudes = st.floats(1e-6, 1e9)
signed = st.tuples(st.sampled_from([-1.0, 1.0]), magnitudes).map(lambda t: t[0] * t[1])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(signed, st.just(0.0)), min_size=1, max_size=300))
def test_quantiles_within_the_relative_accuracy(values: list[float]) -> None:
    v = np.array(values)
    assert_within_alpha(DDSketch.from_values(v), v)


@settings(max_examples=100, deadline=None)
@given(st.lists(signed, min_size=1, max_size=200), st.lists(signed, min_size=1, max_size=200))
def test_merge_is_the_sketch_of_the_union(a: list[float], b: list[float]) -> None:
    merged = DDSketch.from_values(np.array(a)).merge(DDSketch.from_values(np.array(b)))
    assert merged == DDSketch.from_values(np.array(a + b))
    assert_within_alpha(merged, np.array(a + b))


def test_encode_round_trip_and_bad_bytes() -> None:
    sk = DDSketch.from_values(np.random.default_rng(3).normal(0, 1, 5000))
    assert DDSketch.decode(sk.encode()) == sk
    assert DDSketch.decode(DDSketch().encode()) == DDSketch()
    with pytest.raises(WireError):
        DDSketch.decode(sk.encode()[:-3])
    with pytest.raises(WireError):
        DDSketch.decode(sk.encode() + b"x")


def test_nan_is_ignored_and_empty_is_nan() -> None:
    sk = DDSketch.from_values(np.array([np.nan, np.inf, 2.0]))
    assert sk.count == 1 and math.isnan(DDSketch().quantile(0.5))


def test_collapsing_bounds_the_size_and_keeps_upper_quantiles() -> None:
    v = np.geomspace(1e-9, 1e12, 20000)  # ~2400 bins at 1 %: more than MAX_BINS
    sk = DDSketch.from_values(v)
    assert max(sk.pos) - min(sk.pos) + 1 <= MAX_BINS and sk.count == len(v)
    ordered = np.sort(v)
    for q in (0.9, 0.99, 1.0):
        true = ordered[math.floor(q * (len(v) - 1))]
        assert abs(sk.quantile(q) - true) <= ALPHA * true


def test_every_window_carries_a_sketch_that_merges_into_longer_periods(tmp_path: Path) -> None:
    s = Store(tmp_path / "a.sqlite")
    reg = buffer.SensorRegistry(s)
    w = 10**10
    t0 = 1_800_000_000 * 10**9
    rng = np.random.default_rng(5)
    values = rng.lognormal(0, 1, 6000)
    ts = t0 + np.arange(6000, dtype=np.int64) * 10**7  # 100 Hz for a minute: 6 windows
    buffer.store_chunk(s, reg, ReadingChunk("n", "vib", "g", ts, values))
    window.close_until(s, device_id="d", width_ns=w, upto_ns=t0 + 6 * w, max_rows=100)
    (payload,) = s.conn.execute("SELECT payload FROM outbox").fetchone()
    b = decode_batch(bytes(payload))
    sketches = [DDSketch.decode(x) for x in b.sketch]
    assert [sk.count for sk in sketches] == b.count.tolist()
    hour = sketches[0]
    for sk in sketches[1:]:
        hour = hour.merge(sk)
    assert_within_alpha(hour, values)  # the minute's p99 from six 10 s sketches


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    shape=st.sampled_from(["normal", "zeros-and-signs", "with-nan", "collapsing"]),
    sizes=st.lists(st.integers(1, 2000), min_size=1, max_size=6),
)
def test_encode_windows_gives_each_windows_own_bytes(
    seed: int, shape: str, sizes: list[int]
) -> None:
    """The agent's batched sketch encoder equals DDSketch.from_values(window).encode(),
    byte for byte, window by window (a window whose bins collapse included)."""
    from shared.sketch import encode_windows

    rng = np.random.default_rng(seed)
    n = sum(sizes)
    if shape == "normal":
        v = rng.normal(20.0, 3.0, n)
    elif shape == "zeros-and-signs":
        v = rng.choice([0.0, 1e-12, -3.0, 5.0, -0.0], n)
    elif shape == "with-nan":
        v = np.where(rng.random(n) < 0.2, np.nan, rng.normal(0.0, 1e6, n))
    else:
        v = rng.choice([1e-300, 1e300, -1e300, 2.0], n)
    seg = np.cumsum([0, *sizes[:-1]]).astype(np.int64)
    ends = np.append(seg[1:], n)
    want = [DDSketch.from_values(v[a:b]).encode() for a, b in zip(seg, ends, strict=True)]
    assert encode_windows(v, seg) == want


def test_on_bimodal_data_the_sketch_answers_at_rank_and_the_window_interpolates() -> None:
    """An appliance's power, off (0 W) for half the window and on (1,000 W) for the
    other half: the window's p50 column interpolates between the two readings
    around rank q·(n−1), numpy's default (500 W, a value no reading had); the
    sketch's p50 is within 1 % of the reading at rank ⌊q·(n−1)⌋ (0 W), numpy's
    method="lower". docs/wire-format.md §2.4 defines both."""
    from shared.wire import WindowSpec

    values = np.array([0.0] * 50 + [1000.0] * 50)
    ts = np.arange(100, dtype=np.int64) * 10**8
    _, st, _, _ = window.sensor_windows(ts, values, WindowSpec("tumbling", 10**10), 0, 0)
    cols = st.columns()
    assert cols["p50"][0] == np.quantile(values, 0.5) == 500.0
    sk = DDSketch.from_values(values)
    for q in (0.5, 0.9, 0.99):
        at_rank = float(np.quantile(values, q, method="lower"))
        assert abs(sk.quantile(q) - at_rank) <= ALPHA * abs(at_rank)
    assert sk.quantile(0.5) == 0.0  # 500 W away from the window's p50
