"""Times on the command line: ISO 8601 (UTC when no zone is given) or integer ns."""

from __future__ import annotations

from datetime import UTC, datetime


def parse_time(value: str) -> int:
    """``2026-11-26T10:00:00Z``, ``2026-11-26`` or ``1795600000000000000`` → ns since the epoch.

    Raises ValueError with a message fit for the user.
    """
    if value.lstrip("-").isdigit():
        return int(value)
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{value!r} is neither ISO 8601 time nor integer nanoseconds") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp()) * 10**9 + dt.microsecond * 1000
