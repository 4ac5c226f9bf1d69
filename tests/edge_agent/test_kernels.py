"""Window kernels: edge cases, and hypothesis properties against a plain-numpy reference.

The reference below computes each window on its own with numpy's own
functions (np.min, np.mean, np.std ...), so it shares no code with the kernels.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.pipeline import kernels
from edge_agent.pipeline.kernels import segment_windows, window_stats_numba, window_stats_numpy

IMPLS = [pytest.param(window_stats_numpy, id="numpy")]
if kernels.numba_available():
    IMPLS.append(pytest.param(window_stats_numba, id="numba"))

FIELDS = ("min", "max", "mean", "stddev", "first", "last", "sum", "p50", "p90", "p99")
ARITH = ("mean", "stddev", "sum", "p50", "p90", "p99")  # computed, so compared with a tolerance


def reference(values: np.ndarray, seg_starts: np.ndarray) -> dict[str, np.ndarray]:
    ends = np.append(seg_starts[1:], len(values))
    out: dict[str, list[float]] = {k: [] for k in ("count", "invalid", *FIELDS)}
    for a, b in zip(seg_starts, ends, strict=True):
        seg = values[a:b]
        fin = seg[np.isfinite(seg)]
        out["count"].append(len(fin))
        out["invalid"].append(len(seg) - len(fin))
        if len(fin):
            q50, q90, q99 = np.quantile(fin, [0.5, 0.9, 0.99])
            for k, v in (
                ("sum", fin.sum()),
                ("p50", q50),
                ("p90", q90),
                ("p99", q99),
                ("min", fin.min()),
                ("max", fin.max()),
                ("mean", fin.mean()),
                ("stddev", fin.std()),
                ("first", fin[0]),
                ("last", fin[-1]),
            ):
                out[k].append(float(v))
        else:
            for k in FIELDS:
                out[k].append(np.nan)
    return {k: np.array(v) for k, v in out.items()}


def check(impl, values: np.ndarray, seg_starts: np.ndarray) -> None:  # type: ignore[no-untyped-def]
    got = impl(values, seg_starts)
    ref = reference(values, seg_starts)
    np.testing.assert_array_equal(got.count, ref["count"])
    np.testing.assert_array_equal(got.invalid, ref["invalid"])
    for k in ("min", "max", "first", "last"):
        np.testing.assert_array_equal(getattr(got, k), ref[k], err_msg=k)  # exact: no arithmetic
    ends = np.append(seg_starts[1:], len(values))
    for i, (a, b) in enumerate(zip(seg_starts, ends, strict=True)):
        fin = values[a:b][np.isfinite(values[a:b])]
        scale = float(np.abs(fin).max()) if len(fin) else 0.0
        for k in ARITH:
            g, r = getattr(got, k)[i], ref[k][i]
            if np.isnan(r):
                assert np.isnan(g), (k, i)
            else:
                assert abs(g - r) <= 1e-9 * max(abs(r), scale * 1e-3) + 1e-300, (k, i, g, r)


@pytest.mark.parametrize("impl", IMPLS)
def test_no_windows(impl) -> None:  # type: ignore[no-untyped-def]
    out = impl(np.empty(0), np.empty(0, dtype=np.int64))
    assert len(out.count) == 0 and len(out.mean) == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_single_reading(impl) -> None:  # type: ignore[no-untyped-def]
    out = impl(np.array([3.25]), np.array([0]))
    assert out.count.tolist() == [1] and out.stddev.tolist() == [0.0]
    assert out.min[0] == out.max[0] == out.mean[0] == out.first[0] == out.last[0] == 3.25


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_and_inf_are_counted_invalid_and_excluded(impl) -> None:  # type: ignore[no-untyped-def]
    v = np.array([np.nan, 1.0, np.inf, 3.0, -np.inf, np.nan, np.nan])
    out = impl(v, np.array([0, 5]))
    assert out.count.tolist() == [2, 0] and out.invalid.tolist() == [3, 2]
    assert out.first[0] == 1.0 and out.last[0] == 3.0 and out.mean[0] == 2.0
    assert out.stddev[0] == 1.0
    assert all(np.isnan(getattr(out, k)[1]) for k in FIELDS)  # all-invalid window


@pytest.mark.parametrize("impl", IMPLS)
def test_numerically_stable_variance(impl) -> None:  # type: ignore[no-untyped-def]
    """A large offset must not destroy a small spread (naive sum of squares would)."""
    v = 1e9 + np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    out = impl(v, np.array([0]))
    assert out.stddev[0] == pytest.approx(np.sqrt(2.0), rel=1e-9)


def test_windows_spanning_gaps() -> None:
    w = 10
    ts = np.array([-15, -11, 0, 9, 10, 45, 49, 1000], dtype=np.int64)
    starts, segs = segment_windows(ts, w)
    assert starts.tolist() == [-20, 0, 10, 40, 1000]
    assert segs.tolist() == [0, 2, 4, 5, 7]
    assert segment_windows(np.empty(0, dtype=np.int64), w)[0].size == 0


values_st = st.lists(
    st.one_of(st.floats(-1e6, 1e6), st.sampled_from([np.nan, np.inf, -np.inf])),
    min_size=1,
    max_size=400,
)


@settings(max_examples=200, deadline=None)
@given(values=values_st, data=st.data())
def test_property_matches_reference(values: list[float], data: st.DataObject) -> None:
    v = np.array(values, dtype=np.float64)
    cuts = data.draw(st.sets(st.integers(1, max(1, len(v) - 1)), max_size=20))
    seg_starts = np.array(sorted({0, *(c for c in cuts if c < len(v))}), dtype=np.int64)
    for impl in (p.values[0] for p in IMPLS):
        check(impl, v, seg_starts)


@settings(max_examples=100, deadline=None)
@given(
    ts=st.lists(st.integers(-(10**12), 10**12), min_size=1, max_size=300),
    width=st.integers(1, 10**10),
)
def test_property_segments_partition_sorted_times(ts: list[int], width: int) -> None:
    t = np.sort(np.array(ts, dtype=np.int64))
    starts, segs = segment_windows(t, width)
    ends = np.append(segs[1:], len(t))
    assert np.all(np.diff(starts) > 0)
    for s, a, b in zip(starts, segs, ends, strict=True):
        assert np.all((t[a:b] >= s) & (t[a:b] < s + width))
        assert s % width == 0


PROBE = """
import sys
import numpy as np
from edge_agent.pipeline import kernels
n = kernels.NUMBA_MIN_READINGS
def step(mode):
    if mode != "-":
        kernels.configure(mode)
    kernels.warm_up()
    out = kernels.window_stats(np.arange(10.0), np.array([0, 5]))
    print(kernels.backend(), "numba" in sys.modules, int(out.count.sum()), end=" / ")
    out = kernels.window_stats(np.arange(float(n)), np.arange(0, n, 1000))
    print(kernels.backend(), "numba" in sys.modules, int(out.count.sum()), end=" / ")
for mode in sys.argv[1:]:
    step(mode)
"""


@pytest.mark.parametrize(
    ("modes", "no_numba", "expect"),
    [
        # auto (the default): numba is not even imported until a call is large enough
        # to pay for it; from then on it serves every call
        (
            ["-", "auto"],
            False,
            "numpy (numba on demand) False 10 / numba True 10000000 / "
            "numba True 10 / numba True 10000000 /",
        ),
        # numpy: never loaded; numba: loaded at once (warm_up)
        (
            ["numpy", "numba"],
            False,
            "numpy False 10 / numpy False 10000000 / numba True 10 / numba True 10000000 /",
        ),
        # without numba (TELEMETRY_NO_NUMBA, or no wheel), every mode runs numpy
        (
            ["-", "numba"],
            True,
            "numpy False 10 / numpy False 10000000 / numpy False 10 / numpy False 10000000 /",
        ),
    ],
)
def test_kernel_choice_and_when_numba_is_loaded(
    modes: list[str], no_numba: bool, expect: str
) -> None:
    assert kernels.numba_available(), "the dev install has numba: this test needs it"
    env = {k: v for k, v in os.environ.items() if k != "TELEMETRY_NO_NUMBA"}
    if no_numba:
        env["TELEMETRY_NO_NUMBA"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *modes], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == expect


def test_a_bad_kernel_choice_names_the_key(tmp_path) -> None:  # type: ignore[no-untyped-def]
    cfg = tmp_path / "agent.toml"
    cfg.write_text('device_id = "d"\n[window]\nkernel = "fast"\n')
    out = subprocess.run(
        [str(Path(sys.executable).with_name("edge-agent")), "config", "check", str(cfg)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "window.kernel" in out.stderr and str(cfg) in out.stderr, out.stderr
    with pytest.raises(ValueError, match="kernel must be one of"):
        kernels.configure("fast")


@settings(max_examples=100, deadline=None)
@given(
    ts=st.lists(st.integers(0, 10**6), min_size=1, max_size=200),
    hop=st.sampled_from([1000, 2500, 5000]),
    m=st.integers(1, 4),
    lo=st.integers(-(10**4), 10**6),
    span=st.integers(0, 10**6),
)
def test_property_hopping_windows_match_brute_force(
    ts: list[int], hop: int, m: int, lo: int, span: int
) -> None:
    t = np.sort(np.array(ts, dtype=np.int64))
    v = np.arange(len(t), dtype=np.float64)  # value = time rank: order is checkable
    width = hop * m
    lo_s, hi_s = (lo // hop) * hop, (lo // hop) * hop + (span // hop) * hop
    starts, segs, vals = kernels.hopping_windows(t, v, width, hop, lo_s, hi_s)
    ends = np.append(segs[1:], len(vals))[: len(segs)]
    got = {int(s): vals[a:b].tolist() for s, a, b in zip(starts, segs, ends, strict=True)}
    want = {}
    for s in range(lo_s, hi_s + 1, hop):
        inside = v[(t >= s) & (t < s + width)].tolist()
        if inside:
            want[s] = inside
    assert got == want


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    shape=st.sampled_from(
        ["normal", "few-values", "outlier", "tiny-range", "huge-range", "subnormal", "with-nan"]
    ),
    sizes=st.lists(st.integers(1, 3000), min_size=1, max_size=6),
)
def test_property_large_windows_select_the_exact_ranks(
    seed: int, shape: str, sizes: list[int]
) -> None:
    """Windows over SMALL_WINDOW readings take the bucket selection path: the order
    statistics must be exact whatever the distribution (duplicates, one far outlier,
    a range of a few ulps, a range that overflows, subnormals, NaN among them)."""
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    if shape == "normal":
        v = rng.normal(20.0, 3.0, n)
    elif shape == "few-values":
        v = rng.choice([-1.5, 0.0, 2.25, 7.0], n)
    elif shape == "outlier":
        v = rng.normal(0.0, 1.0, n)
        v[rng.integers(0, n)] = 1e300
    elif shape == "tiny-range":
        v = 1.0 + rng.integers(0, 5, n) * np.finfo(float).eps
    elif shape == "huge-range":
        v = rng.choice([-1.7e308, 1.7e308, 0.0, 1.0], n)
    elif shape == "subnormal":
        v = rng.integers(-50, 50, n) * 5e-324
    else:
        v = rng.normal(0.0, 1.0, n)
        v[rng.random(n) < 0.2] = np.nan
    seg_starts = np.cumsum([0, *sizes[:-1]]).astype(np.int64)
    for impl in (p.values[0] for p in IMPLS):
        before = v.copy()
        with np.errstate(over="ignore", invalid="ignore"):  # stddev of 1e300 overflows
            got = impl(v, seg_starts)
        np.testing.assert_array_equal(v, before)  # the input is read, never sorted in place
        ends = np.append(seg_starts[1:], n)
        for i, (a, b) in enumerate(zip(seg_starts, ends, strict=True)):
            fin = v[a:b][np.isfinite(v[a:b])]
            if not len(fin):
                assert np.isnan(got.p50[i])
                continue
            srt = np.sort(fin)
            for q, name in ((0.5, "p50"), (0.9, "p90"), (0.99, "p99")):
                idx = q * (len(fin) - 1)
                lo = int(np.floor(idx))
                hi = min(lo + 1, len(fin) - 1)
                with np.errstate(over="ignore", invalid="ignore"):  # a range over 1.7e308
                    want = np.quantile(fin, q)
                g = getattr(got, name)[i]
                assert srt[lo] <= g <= srt[hi] or g == want, (shape, name, g, srt[lo], srt[hi])
                with np.errstate(over="ignore", invalid="ignore"):
                    assert g == want or abs(g - want) <= 1e-12 * abs(want), (shape, name, g, want)


def test_numba_is_ready_for_read_only_input_once_loaded() -> None:
    """The buffer's readings are read-only arrays (np.frombuffer), a type of their own
    to numba: loading the kernel prepares both, so no window close compiles."""
    code = (
        "import numpy as np\n"
        "from edge_agent.pipeline import kernels\n"
        "kernels.configure('numba'); kernels.warm_up()\n"
        "before = len(kernels._numba_kernel.signatures)\n"
        "v = np.frombuffer(np.arange(10.0).tobytes())\n"
        "kernels.window_stats(v, np.array([0, 5]))\n"
        "kernels.window_stats(np.arange(10.0), np.array([0, 5]))\n"
        "print(before, len(kernels._numba_kernel.signatures))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["2", "2"]


@pytest.mark.skipif(not kernels.numba_available(), reason="numba is not installed")
@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    sizes=st.lists(st.integers(1, 300), min_size=1, max_size=40),
    equal=st.booleans(),
    bad_share=st.sampled_from([0.0, 0.0, 0.05, 0.5, 1.0]),
)
def test_property_numpy_kernel_equals_numba_kernel(
    seed: int, sizes: list[int], equal: bool, bad_share: float
) -> None:
    """The default kernel ("auto" runs numpy's) against numba's on the window shapes
    its sort takes apart: windows of one length (one block, one set of ranks),
    up to eight lengths (a block each), more (padded blocks by powers of two),
    with NaN and infinities among the readings or filling whole windows."""
    rng = np.random.default_rng(seed)
    if equal:
        sizes = [sizes[0]] * len(sizes)
    n = sum(sizes)
    v = np.round(rng.normal(20.0, 3.0, n), int(rng.integers(0, 4)))  # ties, as real sensors give
    bad = rng.random(n) < bad_share
    v[bad] = rng.choice([np.nan, np.inf, -np.inf], int(bad.sum()))
    seg_starts = np.cumsum([0, *sizes[:-1]]).astype(np.int64)
    a, b = window_stats_numpy(v, seg_starts), window_stats_numba(v, seg_starts)
    for name in ("count", "invalid", "min", "max", "first", "last", "p50", "p90", "p99"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    for name in ("mean", "stddev", "sum"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-12, atol=1e-12)
