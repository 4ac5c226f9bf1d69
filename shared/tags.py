"""Static tags on sensors (site, building, room …): from the agent's config, in the
batch header's sensor objects, to InfluxDB as tags and to the lake as a column.

Bounded by construction: at most ``MAX_TAGS`` per sensor; keys are lower-case
identifiers that cannot shadow the fixed tags and columns; values are ids
(``A-Z a-z 0-9 _ . -``, 1–64 characters). The values come from the agent's config,
not from the devices' payloads, so their cardinality is the operator's choice;
the ingestor writes to InfluxDB only the keys its ``[influx] tag_keys`` allows.
"""

from __future__ import annotations

import re

from shared.topics import is_valid_id

MAX_TAGS = 8
TAG_KEY = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
#: keys taken by the fixed tags, fields and lake columns
RESERVED = frozenset(
    (
        "device_id", "node", "sensor", "unit", "window", "revision", "count", "invalid",
        "seq", "time", "tags", "rule", "kind", "state",
    )
)  # fmt: skip

Tags = tuple[tuple[str, str], ...]


def check(tags: Tags) -> str | None:
    """Why these tags are not allowed, or None."""
    if len(tags) > MAX_TAGS:
        return f"more than {MAX_TAGS} tags"
    keys = [k for k, _ in tags]
    if len(set(keys)) != len(keys):
        return "a tag key appears twice"
    for key, value in tags:
        if not isinstance(key, str) or not TAG_KEY.match(key) or key in RESERVED:
            return (
                f"tag key {str(key)[:40]!r}: a-z, 0-9 and _, starting with a letter, "
                "not a fixed tag (node, sensor, unit …)"
            )
        if not isinstance(value, str) or not is_valid_id(value):
            return (
                f"tag {key}: value {str(value)[:40]!r} is not 1-64 characters of A-Z a-z 0-9 _ . -"
            )
    return None


def parse(items: tuple[str, ...]) -> Tags:
    """``("site=berlin", "building=b1")`` as sorted pairs; ValueError saying why not."""
    pairs = []
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"{item[:40]!r} is not key=value")
        pairs.append((key.strip(), value.strip()))
    out = tuple(sorted(pairs))
    why = check(out)
    if why is not None:
        raise ValueError(why)
    return out


def merge(base: Tags, extra: Tags) -> Tags:
    """``base`` with ``extra``'s keys set (extra wins), sorted."""
    return tuple(sorted({**dict(base), **dict(extra)}.items()))
