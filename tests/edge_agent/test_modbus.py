"""Modbus RTU on a real serial line: socat's pty pair, pymodbus's server as the meter
on one end, the agent's poller on the other. (Modbus TCP runs end to end in
tests/edge_agent/test_devices.py, with docs/devices.md's meter.)"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.modbus_meter import METER
from devstack.services import wait_until
from devstack.stubs import StubPahoClient
from edge_agent.config import AgentConfig
from edge_agent.pipeline import buffer
from edge_agent.pipeline.intake import Intake
from edge_agent.sources.config import ModbusConfig
from edge_agent.sources.modbus import ModbusPoller
from shared.config import from_dict

# socat comes with scripts/setup.sh (dev); without it the fixture fails, not skips
pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SDM120 = {0: "voltage", 6: "current", 12: "active_power", 70: "frequency", 342: "total_energy"}


@pytest.fixture
def serial_pair(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    meter, agent = tmp_path / "ttyMeter", tmp_path / "ttyAgent"
    socat = shutil.which("socat")
    assert socat, "socat is missing: scripts/setup.sh dev installs it"
    proc = subprocess.Popen(
        [socat, f"pty,raw,echo=0,link={meter}", f"pty,raw,echo=0,link={agent}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_until(lambda: meter.exists() and agent.exists(), 10, "socat's ptys")
        yield meter, agent
    finally:
        proc.terminate()
        proc.wait(10)


def start_meter(tty: Path, tmp_path: Path) -> subprocess.Popen[bytes]:
    ready = tmp_path / "meter.ready"
    ready.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "devstack.modbus_meter", "--serial", str(tty),
         "--ready-file", str(ready)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_until(ready.exists, 20, "the RTU meter")
    return proc


def test_rtu_polls_count_exactly_and_a_silent_meter_is_an_error(
    serial_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    meter_tty, agent_tty = serial_pair
    cfg = from_dict(AgentConfig, {"storage": {"path": str(tmp_path / "b.sqlite")}})
    intake = Intake(cfg, client=StubPahoClient())  # type: ignore[arg-type]
    poller = ModbusPoller(
        ModbusConfig(
            name="meter", node="meter-rtu", serial_port=str(agent_tty), baudrate=19200,
            interval_s=1.0, timeout_s=0.5, read_gap=8,
            register_map=str(ROOT / "docs/examples/modbus-sdm120.toml"),
        ),
        intake,
    )  # fmt: skip
    meter = start_meter(meter_tty, tmp_path)
    try:
        for _ in range(5):
            poller.poll_once()
        counters = intake.store.counters()
        assert counters["readings_stored"] == 5 * 10
        assert counters["source_meter_messages"] == 5 and poller.counts.take() == {}
        meter.terminate()
        meter.wait(10)
        poller.poll_once()  # nobody answers on the line: an error, counted, nothing stored
        assert poller.counts.take() == {"source_meter_errors": 1}
        assert intake.store.counters()["readings_stored"] == 50
        meter = start_meter(meter_tty, tmp_path)
        poller.poll_once()  # the meter is back: the next poll reads again
        assert intake.store.counters()["readings_stored"] == 60
    finally:
        poller.stop()
        meter.kill()
        meter.wait()
    sensors = {r.name: sid for sid, r in buffer.load_sensors(intake.store).items()}
    data = buffer.read_range(intake.store, 0, 2**62)
    for address, name in SDM120.items():
        ts, vals = data[sensors[name]]
        assert len(ts) == 6 and set(vals.tolist()) == {METER[address]}
    intake.store.close()
