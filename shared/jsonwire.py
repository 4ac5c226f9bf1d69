"""JSON from untrusted bytes, total: a value, or :class:`WireError` with a reason.

``json.loads`` raises more than ``JSONDecodeError`` on hostile input: a
5,000-digit integer raises ``ValueError`` (Python's int-to-string limit), JSON
nested 100,000 deep raises ``RecursionError``, bytes that are not UTF-8 raise
``UnicodeDecodeError``. Every decoder of the project parses JSON through
:func:`loads`, which turns all of them into one :class:`WireError`, refuses
payloads over a size and integers of more than 20 digits (a 64-bit integer has
at most 20) before they are built. Nesting is bounded by Python's recursion
limit: the C parser raises ``RecursionError`` at about 1,000 levels, caught here.
"""

from __future__ import annotations

import json
from typing import Any

from shared.errors import WireError

MAX_INT_DIGITS = 20


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads(
    payload: bytes | str, *, reason: str, what: str, max_bytes: int, strict: bool = False
) -> Any:
    """Parse ``payload`` or raise ``WireError(reason, …)`` naming ``what`` it should be.
    ``strict``: JSON only, without Python's ``NaN`` and ``Infinity`` (which some
    devices' libraries write, and the sources accept)."""
    if len(payload) > max_bytes:
        raise WireError("too-large", f"{what} of {len(payload)} bytes, limit {max_bytes}")
    try:
        if strict:
            return json.loads(payload, parse_int=_bounded_int, parse_constant=_no_constant)
        return json.loads(payload, parse_int=_bounded_int)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError too
        raise WireError(reason, f"{what} is not valid JSON: {str(exc)[:200]}") from None


def printable(text: str) -> bool:
    """No control characters (newlines, tabs, NUL …), which line protocol cannot
    carry in a tag or field and a log line should not: for units, rule names and
    messages, at both ends."""
    return text.isprintable()
