"""The simulator's readings are at the resolution of the part each kind stands for."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from firmware_sim.config import SensorSpec
from firmware_sim.fleet import FLEET_KINDS, FleetSpec, build_batches
from firmware_sim.parts import PARTS, quantize
from firmware_sim.sensors import chunk_times, chunk_values
from shared.config import Invalid
from shared.wire import decode_batch

T0 = 1_790_000_000 * 10**9


@pytest.mark.parametrize("kind", sorted(PARTS))
def test_each_kind_reports_whole_steps_of_its_part(kind: str) -> None:
    spec = SensorSpec("s", kind, rate_hz=10.0, chunk=500)  # type: ignore[arg-type]
    v = chunk_values(spec, chunk_times(spec, T0, 3), 7, 0, 0, 3)
    part = PARTS[kind]
    steps = v / part.step
    # a whole number of steps (a decimal step is the float nearest the decimal)
    assert np.all(np.abs(steps - np.round(steps)) < 1e-6), kind
    assert np.all((v >= part.low) & (v <= part.high))
    assert len(np.unique(v)) < len(v)  # rounded: repeated values, as real parts give
    if part.step in (1 / 16, 1 / 256, 1 / 1024, 1.0):  # binary steps are exact
        assert np.array_equal(steps, np.round(steps))
    full = dataclasses.replace(spec, resolution=0.0)
    raw = chunk_values(full, chunk_times(spec, T0, 3), 7, 0, 0, 3)
    assert len(np.unique(raw)) == len(raw)  # full precision: the noise as drawn
    assert np.all(np.abs(raw - v) <= part.step / 2 + 1e-9)


def test_decimal_steps_are_what_parsing_the_decimal_gives() -> None:
    got = quantize(np.array([1013.254999, 1013.2551, 999.999]), "pressure")
    assert got.tolist() == [float("1013.25"), float("1013.26"), float("1000.0")]
    assert repr(float(got[0])) == "1013.25"  # what a node's payload carries


def test_a_negative_resolution_is_refused() -> None:
    with pytest.raises(Invalid) as err:
        SensorSpec("s", "adc", rate_hz=1.0, resolution=-1.0)
    assert err.value.key == "resolution"


def test_the_fleet_sends_part_resolution_unless_told_otherwise() -> None:
    spec = FleetSpec(devices=1, batches=3, sensors=10, start_ns=T0)
    for full in (False, True):
        work, _ = build_batches(dataclasses.replace(spec, full_precision=full))
        whole = []
        for _, pending in work:
            b = decode_batch(pending.payload)
            for i in range(len(b.sensors)):
                step = PARTS[FLEET_KINDS[i % len(FLEET_KINDS)]].step
                for name in ("min", "max", "first", "last", "p50"):
                    x = float(getattr(b, name)[i]) / step
                    whole.append(abs(x - round(x)) < 1e-6)
        if full:
            assert sum(whole) < len(whole) * 0.1
        else:
            assert all(whole[j] for j in range(len(whole)) if j % 5 != 4) and any(whole[4::5])
