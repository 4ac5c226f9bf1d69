"""What the ingestor knows of each device: when it was last heard, and its latest health.

Every message that decodes (a batch, an alert or a health report, written or a
resend) marks its device as heard at the ingestor's clock; a health report also
replaces the device's latest health. At most ``fleet.max_devices`` devices are
kept: beyond that the one heard from least recently is forgotten and counted
(``fleet_devices_forgotten``), so a flood of made-up device ids on an open broker
costs bounded memory. With the broker's ACL (cloud_ingest/ops/broker.py) only real
identities can publish at all.

The processor's thread writes; the metrics thread reads a snapshot. Both hold the
lock only to copy.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from shared.health import HealthReport


@dataclass(frozen=True)
class DeviceSeen:
    device: str
    last_heard_ns: int
    health: HealthReport | None
    #: the ingestor's clock when ``health`` arrived
    health_received_ns: int = 0
    #: the newest desired config version the device accepted (a ``config``
    #: command's result, docs/commands.md); 0 = none seen by this ingestor
    desired_version: int = 0


class DeviceRegistry:
    """The devices this ingestor has heard from and the latest health report of each
    (at most ``max_devices``, the least recently heard forgotten first)."""

    def __init__(self, max_devices: int, health_fresh_s: float = 900.0) -> None:
        self.max_devices = max_devices
        #: a device's health is shown (on /metrics) this long after its report arrived
        self.health_fresh_s = health_fresh_s
        self.forgotten = 0
        self._lock = threading.Lock()
        self._devices: OrderedDict[str, DeviceSeen] = OrderedDict()

    def heard(
        self,
        device: str,
        health: HealthReport | None = None,
        now_ns: int = 0,
        desired_version: int = 0,
    ) -> None:
        """``device`` sent a message that decoded; ``health`` if it was a report,
        ``desired_version`` if it accepted a desired config. A report older (by seq)
        than the one kept does not replace it: a resend of an old report after an
        outage says nothing about now; nor does an older version."""
        now_ns = now_ns or time.time_ns()
        with self._lock:
            seen = self._devices.pop(device, None)
            latest, received = (seen.health, seen.health_received_ns) if seen else (None, 0)
            if health is not None and (latest is None or health.seq > latest.seq):
                latest, received = health, now_ns
            desired = max(desired_version, seen.desired_version if seen else 0)
            self._devices[device] = DeviceSeen(device, now_ns, latest, received, desired)
            while len(self._devices) > self.max_devices:
                self._devices.popitem(last=False)
                self.forgotten += 1

    def snapshot(self) -> list[DeviceSeen]:
        with self._lock:
            return list(self._devices.values())

    def __len__(self) -> int:
        return len(self._devices)
