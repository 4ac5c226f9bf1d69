"""Times on the command line: ISO 8601 (UTC when no zone is given), integer ns, or
a time before now (``-90m``, ``-2h``, ``-1d``: for timers that look back)."""

from __future__ import annotations

import re
import time
from datetime import UTC, date, datetime, timedelta

_AGO = re.compile(r"-(\d{1,6})([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(value: str, now_ns: int | None = None) -> int:
    """``2026-11-26T10:00:00Z``, ``2026-11-26``, ``1795600000000000000`` or ``-2h``
    (two hours before now) → ns since the epoch.

    Raises ValueError with a message fit for the user.
    """
    ago = _AGO.fullmatch(value)
    if ago:
        now_ns = time.time_ns() if now_ns is None else now_ns
        return now_ns - int(ago[1]) * _UNIT_S[ago[2]] * 10**9
    if value.lstrip("-").isdigit():
        return int(value)
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{value!r} is neither ISO 8601 time, integer nanoseconds nor a time before "
            "now such as -2h"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp()) * 10**9 + dt.microsecond * 1000


def parse_day(value: str, today: date | None = None) -> str:
    """``2026-11-26``, or ``-2d`` (two days before today, UTC) → ``YYYY-MM-DD``.

    Raises ValueError with a message fit for the user."""
    ago = re.fullmatch(r"-(\d{1,5})d", value)
    if ago:
        today = today or datetime.now(UTC).date()
        return (today - timedelta(days=int(ago[1]))).isoformat()
    try:
        return date.fromisoformat(value).isoformat()
    except ValueError:
        raise ValueError(
            f"{value!r} is neither YYYY-MM-DD nor a number of days ago (-2d)"
        ) from None
