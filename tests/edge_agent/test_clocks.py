"""Clocks that lie: the agent's wall clock an hour behind or ahead (libfaketime, from
Debian's faketime package), stepped right while readings flow and batches wait for
their acks, as NTP does on a Raspberry Pi that booted without a real-time clock.
The sensor nodes (firmware-sim) and the cloud keep the right time.

Before issue 20: an hour behind, every correctly stamped reading more than
window.max_future_s ahead of the agent's clock was dropped after its PUBACK; an hour
ahead and stepped back, the resends of unacknowledged batches waited the hour
(their times were on the wall clock); and the reported offset stayed stale for
minutes after the step."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from devstack import influxq
from devstack.pipeline import (
    BIN,
    IngestTarget,
    Pipeline,
    lost_readings,
    truth_window_counts,
)
from devstack.services import Service, wait_until
from edge_agent import counters
from tests.conftest import SpecFactory

pytestmark = pytest.mark.integration

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1")
W = 10 * 10**9


def faketime(rc: Path) -> dict[str, str]:
    """libfaketime, its offset read from ``rc`` at every call (so that a test can step
    it), the monotonic clock left alone (as NTP leaves it)."""
    if not LIBFAKETIME.exists():
        pytest.fail(f"{LIBFAKETIME} is missing: the dev setup installs Debian's faketime")
    return {
        "LD_PRELOAD": str(LIBFAKETIME),
        "FAKETIME_TIMESTAMP_FILE": str(rc),
        "FAKETIME_NO_CACHE": "1",
        "DONT_FAKE_MONOTONIC": "1",
    }


def status(pipe: Pipeline) -> dict[str, Any]:
    res = subprocess.run(
        [str(BIN / "edge-agent"), "status", "--json", "-c", str(pipe.dir / "edge-agent.toml")],
        capture_output=True,
        timeout=60,
        check=True,
    )
    out: dict[str, Any] = json.loads(res.stdout)
    return out


@pytest.mark.parametrize("offset_s", [-3600, 3600], ids=["an-hour-behind", "an-hour-ahead"])
def test_a_clock_an_hour_off_then_stepped_right_loses_and_doubles_nothing(
    pipeline_spec: SpecFactory, offset_s: int, fresh: Callable[[str], Service], tmp_path: Path
) -> None:
    broker, influx = fresh("mosquitto"), fresh("influxdb")
    influxq.create_database(influx.url, "clock")
    pipe = Pipeline(
        pipeline_spec(
            broker=broker,
            duration_s=24.0,
            ack_timeout_s=2.0,
            agent_tables={"health": {"interval_s": 1}},
            targets=[
                IngestTarget(
                    "i1",
                    {"url": influx.url, "database": "clock"},
                    {"url": f"file://{tmp_path / 'lake'}"},
                    # no session kept while it is down: what the agent published then
                    # reaches the cloud only by the agent's resends
                    mqtt={"session_expiry_s": 0},
                )
            ],
        )
    )
    rc = tmp_path / "faketime.rc"
    rc.write_text(f"{offset_s:+d}\n")
    try:
        pipe.start_agent(env=faketime(rc))
        sim = pipe.start_sim()  # 24 s of readings, stamped with the right time
        if offset_s < 0:  # stamped an hour ahead of the agent's clock: held, not dropped
            wait_until(lambda: status(pipe)["held_readings"] > 0, 20, "readings held")
        (ingestor,) = pipe.start_ingestors()  # the cloud: acks, with its clock

        def offset() -> float | None:
            value = status(pipe)["clock_offset_s"]
            return None if value is None else float(value)

        # the agent says how far off it is (the cloud's clock minus its own); once it
        # knows, the held readings go into the buffer
        wait_until(lambda: (o := offset()) is not None and abs(o + offset_s) < 2, 20, "offset")
        # seen from a process with the right time, as a technician's status would be:
        # healthy, both links up (its heartbeat is on the monotonic clock)
        st = status(pipe)
        assert st["healthy"] and st["intake_connected"] and st["forward_connected"], st
        # batches are sent; then the cloud goes away, and batches wait for their acks
        wait_until(lambda: status(pipe)["counters"].get("batches_sent", 0) >= 1, 30, "a batch")
        assert ingestor.terminate() == 0
        wait_until(
            lambda: status(pipe)["outbox"].get("sent", 0) >= 1, 30, "a batch awaiting its ack"
        )
        rc.write_text("+0\n")  # NTP steps the clock right
        stepped = time.monotonic()
        pipe.start_ingestors()
        # the offset is measured again at the next ack, not minutes later
        wait_until(lambda: (o := offset()) is not None and abs(o) < 2, 30, "the new offset")
        offset_after_s = time.monotonic() - stepped
        produced = int(pipe.finish_sim(sim, 120)["produced"])
        pipe.wait_agent_has(produced, 60)
        truth = truth_window_counts(pipe.truth, W)

        def arrived() -> bool:
            subprocess.run(
                [str(BIN / "edge-agent"), "flush", "--timeout", "5", "-c",
                 str(pipe.dir / "edge-agent.toml")],
                capture_output=True, timeout=60, check=False,
            )  # fmt: skip
            return lost_readings(truth, pipe.spec.device_id, windows()) == 0

        def windows() -> dict[tuple[str, str, str, int], dict[str, Any]]:
            return influxq.v1_windows(influx.url, "clock")

        # every resend waited its ack timeout, not the hour the wall clock moved
        wait_until(arrived, 60, "every reading in InfluxDB")
        got = {
            (node, sensor, start): int(w["count"])
            for (dev, node, sensor, start), w in windows().items()
            if dev == pipe.spec.device_id
        }
        assert got == truth  # every window once, with every reading once
        st = status(pipe)
        c = st["counters"]
        assert c.get("dropped_future", 0) == 0 and st["held_readings"] == 0
        assert not [n for n in c if not counters.is_registered(n)], c
        if offset_s < 0:  # stamped an hour ahead of the agent's clock: held, not dropped
            assert c.get("readings_held", 0) >= 1
            assert c["readings_released"] == c["readings_held"]
        assert offset_after_s < 20, offset_after_s
        print(f"[clock {offset_s:+d} s] offset right again {offset_after_s:.1f} s after the step")
    finally:
        pipe.stop_all()
