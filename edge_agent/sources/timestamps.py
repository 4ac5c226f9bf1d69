"""Timestamps from devices: numbers in a configured unit, RFC 3339 text, or local
time without a zone (as Tasmota sends it) in a configured zone.

A timestamp that, read in its configured unit, falls outside 2000–2100 cannot be
right: a count of seconds read as nanoseconds is 1970-01-01T00:00:01.7. It is
rejected (``bad-timestamp``) with a message that names the setting to change and
the unit that would fit, instead of being stored and dropped as too old.
"""

from __future__ import annotations

import datetime as dt
import math
from decimal import Decimal
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from shared.config import Invalid

TimeUnit = Literal["s", "ms", "us", "ns"]
TimeFormat = Literal["rfc3339", "s", "ms", "us", "ns", "local"]

NS_PER: dict[str, int] = {"s": 10**9, "ms": 10**6, "us": 10**3, "ns": 1}
#: 2000-01-01 and 2100-01-01 UTC, in ns: a timestamp outside is in the wrong unit.
PLAUSIBLE_MIN_NS = 946_684_800 * 10**9
PLAUSIBLE_MAX_NS = 4_102_444_800 * 10**9


class BadTimestamp(ValueError):
    """A timestamp that cannot be read; ``str()`` says why and what to change."""


def zone(name: str) -> dt.tzinfo:
    """The IANA zone ``name`` ("" = UTC), or :class:`Invalid` for the config."""
    if not name:
        return dt.UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise Invalid(
            "timezone", f"unknown time zone {name!r} (an IANA name such as 'Europe/Berlin')"
        ) from None


def _iso(ns: int) -> str:
    try:
        return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).isoformat(timespec="seconds")
    except (OverflowError, ValueError, OSError):
        return "out of range"


def check(ns: int, raw: object, unit: str, setting: str) -> int:
    """``ns`` if it lies in 2000–2100, else :class:`BadTimestamp` naming ``setting``."""
    if PLAUSIBLE_MIN_NS <= ns < PLAUSIBLE_MAX_NS:
        return ns
    fits = [
        u
        for u, f in NS_PER.items()
        if isinstance(raw, int | float) and PLAUSIBLE_MIN_NS <= raw * f < PLAUSIBLE_MAX_NS
    ]
    hint = f"; it fits {setting} = {fits[0]!r}" if fits else ""
    raise BadTimestamp(
        f"timestamp {str(raw)[:40]} read as {unit} is {_iso(ns)}, not between 2000 and "
        f"2100: check {setting}{hint}"
    )


def from_number(raw: object, unit: str, setting: str) -> int:
    """Nanoseconds from a number in ``unit`` (s, ms, us or ns)."""
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        raise BadTimestamp(f"timestamp {str(raw)[:40]!r} is not a number ({setting} = {unit!r})")
    if isinstance(raw, float):
        if not math.isfinite(raw):
            raise BadTimestamp(f"timestamp {raw} is not finite")
        # through its decimal text: 1732600000.25 s is ...250000000 ns, not ...249999872
        ns = int(Decimal(repr(raw)) * NS_PER[unit]) if abs(raw) < 1e20 else PLAUSIBLE_MAX_NS
    else:
        ns = raw * NS_PER[unit] if abs(raw) < 10**20 else PLAUSIBLE_MAX_NS
    return check(ns, raw, unit, setting)


def from_text(raw: str, fmt: TimeFormat, tz: dt.tzinfo, setting: str) -> int:
    """Nanoseconds from text: RFC 3339 (``rfc3339``), a number in a unit, or local
    time without a zone read in ``tz`` (``local``)."""
    if fmt in NS_PER:
        text = raw.strip()
        try:
            num: int | float = int(text) if text.lstrip("-").isdigit() else float(text)
        except ValueError:
            raise BadTimestamp(
                f"timestamp {raw[:40]!r} is not a number ({setting} = {fmt!r})"
            ) from None
        return from_number(num, fmt, setting)
    text = raw.strip()
    if len(text) > 40:
        raise BadTimestamp(f"timestamp {text[:40]!r}… is too long")
    try:
        when = dt.datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise BadTimestamp(f"timestamp {text!r} is not RFC 3339 ({setting} = {fmt!r})") from None
    if when.tzinfo is None:
        if fmt == "rfc3339":
            raise BadTimestamp(
                f"timestamp {text!r} has no zone: for local time set {setting} = 'local' "
                "and the source's timezone"
            )
        when = when.replace(tzinfo=tz)
    elif fmt == "local":
        when = when.astimezone(tz)
    delta = when - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    ns = (delta.days * 86_400 + delta.seconds) * 10**9 + delta.microseconds * 1000
    # fromisoformat keeps microseconds; nanosecond digits are read from the text
    frac = _nanos_digits(text)
    if frac is not None:
        ns += frac
    return check(ns, text, fmt, setting)


def _nanos_digits(text: str) -> int | None:
    """The 7th–9th fractional digits of an RFC 3339 time (fromisoformat drops them)."""
    dot = text.find(".")
    if dot < 0:
        return None
    digits = ""
    for c in text[dot + 1 :]:
        if not c.isdigit():
            break
        digits += c
    return int(digits[6:9].ljust(3, "0")) if len(digits) > 6 else None
