"""Pull: the gateway's own health as readings (``[intake.host]``).

A thread samples the machine every ``interval_s`` and commits one message of
readings on node ``node``, windowed like any sensor's: the load, CPU use and
temperature, memory, the buffer's file system (use, and the I/O of its disk),
the network, the uptime, and on a Raspberry Pi the firmware's throttling flags.
What a platform does not expose is left out without an error (a VM has no CPU
temperature, only a Pi has throttling flags); a metric that fails to read counts
``source_<name>_errors`` and the others go on. psutil reads most of it (the
``host`` extra installs it, and it is imported only when the source is on).

The sensors (unit): ``load_1m``, ``cpu_percent`` (%, since the previous sample),
``cpu_temp`` (degC), ``mem_used_percent`` (%), ``mem_available`` (bytes),
``disk_used_percent`` (%), ``disk_free`` (bytes), ``disk_read_rate`` and
``disk_write_rate`` (bytes/s, the disk that holds the buffer), ``net_rx_rate``
and ``net_tx_rate`` (bytes/s, every interface but loopback), ``uptime`` (s), and
from the Pi's ``get_throttled`` the flags (0 or 1) ``under_voltage``,
``freq_capped``, ``throttled``, ``soft_temp_limit`` and each one's
``…_occurred`` since boot. Rates need two samples: the first has none.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edge_agent import counters
from edge_agent.sources.config import HostConfig
from edge_agent.sources.contract import Builder, Decoded
from edge_agent.sources.counts import PendingCounts, run_every
from shared.errors import StorageError, WireError

if TYPE_CHECKING:
    from edge_agent.pipeline.intake import Intake

log = logging.getLogger(__name__)

#: the bits of the Raspberry Pi firmware's get_throttled word (Raspberry Pi
#: documentation, "vcgencmd": get_throttled): now, and since boot (bit + 16)
THROTTLE_BITS = {
    0: "under_voltage",
    1: "freq_capped",
    2: "throttled",
    3: "soft_temp_limit",
}
#: CPU temperature sensors by the names psutil gives them, most likely first
TEMP_SENSORS = ("cpu_thermal", "coretemp", "k10temp", "cpu-thermal", "soc_thermal", "acpitz")


def parse_throttled(text: str) -> dict[str, float]:
    """The flags of a get_throttled word: sysfs prints it in hex (``50005``),
    ``vcgencmd get_throttled`` as ``throttled=0x50005``. Raises ValueError for
    anything else."""
    word = int(text.strip().rpartition("=")[2], 16)
    if not 0 <= word < 2**32:
        raise ValueError(f"get_throttled {text!r} is not a 32-bit word")
    flags = {}
    for bit, name in THROTTLE_BITS.items():
        flags[name] = float(word >> bit & 1)
        flags[f"{name}_occurred"] = float(word >> (bit + 16) & 1)
    return flags


@dataclass
class HostState:
    """What a rate needs from the sample before (counters and when they were read)."""

    at: float = 0.0
    disk: tuple[int, int] | None = None
    net: tuple[int, int] | None = None
    errors: list[str] = field(default_factory=list)


def _disk_of(path: str, psutil: Any) -> str | None:
    """The name psutil's per-disk I/O counters give the device that holds ``path``
    (its mount with the longest matching mount point), or None."""
    real = os.path.realpath(path)
    best, device = -1, None
    for part in psutil.disk_partitions(all=True):
        mount = part.mountpoint.rstrip("/") or "/"
        if (real == mount or real.startswith(mount.rstrip("/") + "/")) and len(mount) > best:
            best, device = len(mount), part.device
    return os.path.basename(device) if device and device.startswith("/dev/") else None


class HostReader:
    """Reads the metrics; each source of them is guarded on its own."""

    def __init__(self, cfg: HostConfig, storage_path: str) -> None:
        import psutil

        self.psutil = psutil
        self.cfg = cfg
        self.folder = str(Path(storage_path).resolve().parent)
        self.disk = _disk_of(self.folder, psutil)
        self.state = HostState()
        psutil.cpu_percent(interval=None)  # the first call only starts the count

    def read(self) -> dict[str, tuple[float, str]]:
        """The metrics now: sensor -> (value, unit). Errors go to ``state.errors``."""
        out: dict[str, tuple[float, str]] = {}
        now = time.monotonic()
        self.state.errors = []
        for part in (self._cpu, self._memory, self._storage, self._network, self._throttled):
            try:
                part(out, now)
            except Exception as exc:  # noqa: BLE001 (one metric's failure costs only it)
                self.state.errors.append(f"{part.__name__.strip('_')}: {exc}")
        self.state.at = now
        return out

    def _cpu(self, out: dict[str, tuple[float, str]], _now: float) -> None:
        ps = self.psutil
        out["load_1m"] = (os.getloadavg()[0], "")
        busy = float(ps.cpu_percent(interval=None))  # since the call before
        if self.state.at:  # the first is since this reader was made: not a sample's
            out["cpu_percent"] = (busy, "%")
        out["uptime"] = (max(0.0, time.time() - ps.boot_time()), "s")
        temps = ps.sensors_temperatures() if hasattr(ps, "sensors_temperatures") else {}
        for name in (*TEMP_SENSORS, *temps):
            if temps.get(name):
                out["cpu_temp"] = (float(temps[name][0].current), "degC")
                return
        zone = Path("/sys/class/thermal/thermal_zone0/temp")
        if zone.exists():
            out["cpu_temp"] = (int(zone.read_text()) / 1000.0, "degC")

    def _memory(self, out: dict[str, tuple[float, str]], _now: float) -> None:
        mem = self.psutil.virtual_memory()
        out["mem_used_percent"] = (float(mem.percent), "%")
        out["mem_available"] = (float(mem.available), "bytes")

    def _storage(self, out: dict[str, tuple[float, str]], now: float) -> None:
        usage = shutil.disk_usage(self.folder)
        out["disk_used_percent"] = (100.0 * usage.used / (usage.used + usage.free), "%")
        out["disk_free"] = (float(usage.free), "bytes")
        if self.disk is None:
            return
        io = self.psutil.disk_io_counters(perdisk=True).get(self.disk)
        if io is None:
            return
        counts = (io.read_bytes, io.write_bytes)
        before, self.state.disk = self.state.disk, counts
        if before is not None and now > self.state.at:
            dt = now - self.state.at
            out["disk_read_rate"] = (max(0, counts[0] - before[0]) / dt, "bytes/s")
            out["disk_write_rate"] = (max(0, counts[1] - before[1]) / dt, "bytes/s")

    def _network(self, out: dict[str, tuple[float, str]], now: float) -> None:
        per = self.psutil.net_io_counters(pernic=True)
        rx = sum(c.bytes_recv for nic, c in per.items() if nic != "lo")
        tx = sum(c.bytes_sent for nic, c in per.items() if nic != "lo")
        before, self.state.net = self.state.net, (rx, tx)
        if before is not None and now > self.state.at:
            dt = now - self.state.at
            out["net_rx_rate"] = (max(0, rx - before[0]) / dt, "bytes/s")
            out["net_tx_rate"] = (max(0, tx - before[1]) / dt, "bytes/s")

    def _throttled(self, out: dict[str, tuple[float, str]], _now: float) -> None:
        path = Path(self.cfg.throttled_path) if self.cfg.throttled_path else None
        if path is not None and path.exists():
            text = path.read_text()
        elif self.cfg.vcgencmd and shutil.which(self.cfg.vcgencmd):
            text = subprocess.run(
                [self.cfg.vcgencmd, "get_throttled"],
                capture_output=True,
                text=True,
                timeout=2.0,
                check=True,
            ).stdout
        else:
            return  # not a Raspberry Pi (or its firmware does not say): no flags
        for name, value in parse_throttled(text).items():
            out[name] = (value, "")


class HostSampler:
    """The thread that samples the host and commits each sample as one message."""

    label = "host metrics"

    def __init__(self, cfg: HostConfig, storage_path: str, intake: Intake) -> None:
        self.cfg = cfg
        self.intake = intake
        self.reader = HostReader(cfg, storage_path)
        self.counts = PendingCounts()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"host-{cfg.name}", daemon=True)
        self._failing = False

    def start(self) -> None:
        self.thread.start()
        log.info(
            "host %s: sampling this machine every %.1f s (node %s, disk %s)",
            self.cfg.name,
            self.cfg.interval_s,
            self.cfg.node,
            self.reader.disk or "unknown",
        )

    def stop(self) -> None:
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(10)

    def _run(self) -> None:
        run_every(self.cfg.interval_s, self.stopping, self.sample_once, self._failed)

    def _failed(self) -> None:
        log.exception("host %s: a sample failed", self.cfg.name)
        self.counts.add(counters.source(self.cfg.name, "errors"))

    def sample_once(self) -> Decoded | WireError:
        """Read the metrics and commit them as one message; returns what was committed."""
        from edge_agent.pipeline.intake import Arrival

        name = self.cfg.name
        now = self.intake.stamp_ns()  # the device's clock, corrected when known to be off
        metrics = self.reader.read()
        errors = self.reader.state.errors
        if errors:
            self.counts.add(counters.source(name, "errors"), len(errors))
            if not self._failing:
                why = "; ".join(errors)
                log.warning("host %s: %s (counted; the other metrics go on)", name, why)
        self._failing = bool(errors)
        builder = Builder(self.intake.transforms, now)
        for sensor, (value, unit) in sorted(metrics.items()):
            builder.add(self.cfg.node, sensor, unit, None, value, b"")
        item: Decoded | WireError = builder.done()
        payload = json.dumps({k: v for k, (v, _) in sorted(metrics.items())}).encode()
        try:
            self.intake.commit_now(Arrival(f"host {name}", payload, name, item))
        except (sqlite3.Error, StorageError) as exc:
            # the sample is lost: this machine has no queue to resend it from
            self.counts.add(counters.DROPPED_STORE_UNAVAILABLE, len(metrics))
            log.error("host %s: the buffer cannot take the sample (%s); counted", name, exc)
        return item
