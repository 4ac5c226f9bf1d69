"""[intake.host]: this machine's own metrics as readings, windowed like any sensor's.

The metrics are read on this machine (psutil, /proc, the buffer's file system)
and held to independent readings of the same facts; the Raspberry Pi's
throttling word is fed from files, with the bits the Raspberry Pi documentation
gives for ``vcgencmd get_throttled`` (this machine is no Pi, and a missing word
must cost nothing).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from devstack.stubs import StubPahoClient
from edge_agent.config import AgentConfig
from edge_agent.pipeline import buffer
from edge_agent.pipeline.intake import Intake
from edge_agent.sources.config import HostConfig
from edge_agent.sources.host import HostReader, HostSampler, parse_throttled
from shared.config import from_dict
from shared.errors import ConfigError
from tests.helpers import windows_hold_their_readings

W = 10_000_000_000
#: what any Linux machine has (a CPU temperature and disk rates need more)
EVERYWHERE = (
    "load_1m", "cpu_percent", "mem_used_percent", "mem_available", "disk_used_percent",
    "disk_free", "net_rx_rate", "net_tx_rate", "uptime",
)  # fmt: skip


def reader(tmp_path: Path, throttled: Path | None = None) -> HostReader:
    word = throttled or tmp_path / "none"
    cfg = HostConfig(enabled=True, throttled_path=str(word), vcgencmd="")
    return HostReader(cfg, str(tmp_path / "a.sqlite"))


def test_the_metrics_of_this_machine(tmp_path: Path) -> None:
    r = reader(tmp_path)
    first = r.read()
    assert "cpu_percent" not in first and "net_rx_rate" not in first  # rates: two samples
    m = r.read()
    assert not r.state.errors
    values = {k: v for k, (v, _) in m.items()}
    units = {k: u for k, (_, u) in m.items()}
    for name in EVERYWHERE:
        assert name in values, name
    assert 0 <= values["cpu_percent"] <= 100 and units["cpu_percent"] == "%"
    assert 0 < values["mem_used_percent"] < 100
    # the buffer's file system, against the standard library's reading of it
    usage = shutil.disk_usage(tmp_path)
    assert values["disk_free"] == pytest.approx(usage.free, rel=0.01)
    assert values["disk_used_percent"] == pytest.approx(
        100 * usage.used / (usage.used + usage.free), abs=0.5
    )
    assert values["load_1m"] == pytest.approx(os.getloadavg()[0], abs=1.0)
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    assert values["uptime"] == pytest.approx(uptime, abs=5.0)
    assert values["net_rx_rate"] >= 0 and units["net_rx_rate"] == "bytes/s"
    if r.disk is not None:  # the disk that holds the buffer, when /proc names it
        assert values["disk_write_rate"] >= 0
    assert not any(k.startswith(("under_voltage", "throttled")) for k in values)  # no Pi


@pytest.mark.parametrize(
    ("text", "now", "occurred"),
    [
        # the Raspberry Pi documentation's example of an under-voltage that throttled
        ("throttled=0x50005\n", {"under_voltage", "throttled"}, {"under_voltage", "throttled"}),
        ("50000\n", set(), {"under_voltage", "throttled"}),  # sysfs: hex, no 0x
        ("0x0", set(), set()),
        ("80008", {"soft_temp_limit"}, {"soft_temp_limit"}),
        ("0x2\n", {"freq_capped"}, set()),
    ],
)
def test_the_throttling_flags(text: str, now: set[str], occurred: set[str]) -> None:
    flags = parse_throttled(text)
    assert len(flags) == 8
    assert {k for k, v in flags.items() if v and not k.endswith("_occurred")} == now
    assert {
        k[: -len("_occurred")] for k, v in flags.items() if v and k.endswith("_occurred")
    } == occurred


def test_a_pi_word_is_read_from_sysfs_and_a_bad_one_is_an_error(tmp_path: Path) -> None:
    word = tmp_path / "get_throttled"
    word.write_text("50005\n")
    r = reader(tmp_path, word)
    m = r.read()
    assert m["under_voltage"] == (1.0, "") and m["freq_capped_occurred"] == (0.0, "")
    word.write_text("not a word\n")
    m = r.read()
    assert "under_voltage" not in m and "mem_available" in m  # the others go on
    assert len(r.state.errors) == 1 and "throttled" in r.state.errors[0]


def test_a_bad_host_config_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"intake\.host\.interval_s"):
        from_dict(AgentConfig, {"intake": {"host": {"enabled": True, "interval_s": 0.01}}})
    with pytest.raises(ConfigError, match="named 'sensors'"):
        from_dict(AgentConfig, {"intake": {"host": {"enabled": True, "name": "sensors"}}})
    # the host alone is an input
    cfg = from_dict(AgentConfig, {"intake": {"topic_prefix": "", "host": {"enabled": True}}})
    assert cfg.intake.host.enabled


def test_samples_are_stored_and_windowed_as_they_were_read(tmp_path: Path) -> None:
    """Every sample's readings reach the buffer, and each window's statistics are
    those of the readings it holds."""
    cfg = from_dict(AgentConfig, {"storage": {"path": str(tmp_path / "b.sqlite")}})
    intake = Intake(cfg, client=StubPahoClient())  # type: ignore[arg-type]
    host = HostConfig(enabled=True, node="gw", throttled_path="", vcgencmd="")
    sampler = HostSampler(host, cfg.storage.path, intake)
    read: dict[str, list[float]] = {}
    real = sampler.reader.read

    def recorded() -> dict[str, tuple[float, str]]:
        out = real()
        for k, (v, _) in out.items():
            read.setdefault(k, []).append(v)
        return out

    sampler.reader.read = recorded  # type: ignore[method-assign]
    try:
        for _ in range(6):
            sampler.sample_once()
        c = intake.store.counters()
        assert c["readings_stored"] == sum(len(v) for v in read.values())
        assert c["source_host_messages"] == 6 and sampler.counts.take() == {}
        sensors = {r.name: sid for sid, r in buffer.load_sensors(intake.store).items()}
        data = buffer.read_range(intake.store, 0, 2**62)
        for name, values in read.items():
            _ts, got = data[sensors[name]]
            assert got.tolist() == values, name  # in order, bit for bit
        assert windows_hold_their_readings(intake.store, W) == c["readings_stored"]
    finally:
        sampler.stop()
        intake.store.close()
