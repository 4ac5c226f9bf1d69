"""systemd's watchdog for cloud-ingest: fed only while the ingestor makes progress.

Under ``WatchdogSec=`` (deploy: ansible/roles/cloud_ingest), :func:`feed` pings
every half of the watchdog's timeout, from the event loop: a blocked loop stops
the pings by itself. It also stops them when the ingestor holds messages and
none of its counters has moved for a whole timeout (nothing written, quarantined,
acknowledged or even retried: the writes are stuck, not failing), or when one of
its threads died. systemd then restarts it, and the broker redelivers what it
held.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from cloud_ingest.ingest.writer import Stats
from shared.sdnotify import Notifier

log = logging.getLogger(__name__)


def blocker(*, in_hand: int, still_s: float, limit_s: float, died: list[str]) -> str | None:
    """Why not to feed the watchdog, or None: ``still_s`` is how long no counter moved."""
    if died:
        return f"the {' and '.join(died)} thread died"
    if in_hand and still_s > limit_s:
        return f"{in_hand} messages in hand and nothing done for {still_s:.0f} s"
    return None


async def feed(
    notifier: Notifier,
    stats: Stats,
    in_hand: Callable[[], int],
    died: list[str],
    stop: asyncio.Event,
) -> None:
    every = notifier.ping_every_s()
    if every is None:
        return
    last_total, moved, starved = -1, time.monotonic(), False
    while not stop.is_set():
        now = time.monotonic()
        total = sum(dict(stats.counters).values())
        if total != last_total:
            last_total, moved = total, now
        why = blocker(in_hand=in_hand(), still_s=now - moved, limit_s=2 * every, died=died)
        if why is None:
            notifier.watchdog()
            starved = False
        elif not starved:
            log.error("not feeding the watchdog: %s", why)
            starved = True
        with contextlib.suppress(TimeoutError):  # the next ping is due
            await asyncio.wait_for(stop.wait(), timeout=every)
