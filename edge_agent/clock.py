"""Time on a device whose wall clock may be wrong, or stepped while the agent runs.

A Raspberry Pi has no real-time clock: it boots with the time it last saved (or
1970) until NTP steps it, possibly hours later. So the agent keeps two clocks
apart:

* **Timers** (resends, backoff, ticks, the heartbeat's age) run on
  ``CLOCK_MONOTONIC``, which a step of the wall clock does not move. Values that
  outlive the process are stored with the boot they belong to (:func:`boot_id`):
  a monotonic time from another boot means nothing, and is treated as "now".
* **Event time** (when a reading was taken) is the wall clock's. What the agent
  knows of its error comes from the cloud: every ack carries the ingestor's
  clock, and :class:`Clock` estimates the offset from it, dropping what it
  measured before a step (the wall clock moved against the monotonic one), so
  that a step shows in the next ack, not minutes later.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path

BOOT_ID_FILE = Path("/proc/sys/kernel/random/boot_id")
CLOCK_SAMPLES = 64
PUBLISHED_KEPT = 4096  # publish times remembered, for the acks that follow them
#: a sample whose wall-minus-monotonic differs from the clock's now by more than
#: this was measured before a step of the wall clock, and is dropped
STEP_S = 1.0


def boot_id() -> int:
    """This boot, as a positive 63-bit number (0 where the platform does not say:
    then every stored monotonic time counts as another boot's)."""
    try:
        text = BOOT_ID_FILE.read_text().strip()
    except OSError:
        return 0
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1 or 1


def mono_ns() -> int:
    return time.monotonic_ns()


def wall_minus_mono_ns() -> int:
    """How far the wall clock is from the monotonic one now; a step changes it."""
    return time.time_ns() - time.monotonic_ns()


@dataclass(frozen=True)
class ClockSample:
    #: the cloud's clock minus this device's, seconds
    offset_s: float
    #: the round trip it was measured over (the offset is within ± half of it)
    rtt_s: float
    #: wall minus monotonic when it was taken (see :data:`STEP_S`)
    wall_mono_ns: int = 0
    #: the cloud's time came in an ack whose MAC covers it (or acks are not verified)
    trusted: bool = True
    #: the monotonic clock when it was taken
    at_mono_ns: int = 0


class Clock:
    """The device clock against the cloud's, from acks. Used from the agent's thread
    only (the forwarder's pump).

    For a message published once, the ack's ``ts_ns`` is compared with the midpoint
    of publish and receipt; the round trip is measured on the monotonic clock.
    The estimate is the sample with the shortest round trip among the last
    :data:`CLOCK_SAMPLES` taken since the wall clock last stepped.

    :meth:`offset_ns` may be called from any thread (intake's): it reads one
    attribute, which the agent's thread replaces whole."""

    def __init__(self) -> None:
        # seq -> (monotonic ns at publish, times published)
        self._published: OrderedDict[int, tuple[int, int]] = OrderedDict()
        self._samples: deque[ClockSample] = deque(maxlen=CLOCK_SAMPLES)
        self._trusted: ClockSample | None = None

    def published(self, seq: int, at_mono_ns: int | None = None) -> None:
        count = self._published.pop(seq, (0, 0))[1] + 1
        self._published[seq] = (mono_ns() if at_mono_ns is None else at_mono_ns, count)
        while len(self._published) > PUBLISHED_KEPT:
            self._published.popitem(last=False)

    def acked(
        self,
        seq: int,
        cloud_ns: int,
        *,
        received_wall_ns: int | None = None,
        received_mono_ns: int | None = None,
        trusted: bool = True,
    ) -> None:
        sent = self._published.pop(seq, None)
        recv_mono = mono_ns() if received_mono_ns is None else received_mono_ns
        recv_wall = time.time_ns() if received_wall_ns is None else received_wall_ns
        if not cloud_ns or sent is None or sent[1] != 1 or recv_mono < sent[0]:
            return  # a resend: which publish the ack answers is not known
        rtt = recv_mono - sent[0]
        offset = cloud_ns - (recv_wall - rtt // 2)
        self._samples.append(
            ClockSample(offset / 1e9, rtt / 1e9, recv_wall - recv_mono, trusted, recv_mono)
        )
        self._trusted = self.estimate(trusted_only=True)

    def estimate(self, *, trusted_only: bool = False) -> ClockSample | None:
        now = wall_minus_mono_ns()
        fresh = [
            s
            for s in self._samples
            if abs(s.wall_mono_ns - now) <= STEP_S * 1e9 and (s.trusted or not trusted_only)
        ]
        return min(fresh, key=lambda s: s.rtt_s, default=None)

    def offset_ns(self) -> int:
        """The correction to the wall clock the agent may act on: 0 when none is
        known, none can be trusted, or the wall clock stepped since it was measured."""
        est = self._trusted
        if est is None or abs(est.wall_mono_ns - wall_minus_mono_ns()) > STEP_S * 1e9:
            return 0
        return round(est.offset_s * 1e9)
