"""Transforms at intake: per sensor, a new name, a unit, a linear calibration, or drop.

Rules come from the config's ``[[intake.transforms]]`` tables, in order; the first
whose ``match`` (a glob on ``node/sensor``, as the device names them) fits a
sensor applies to it. The value stored is ``value * scale + offset``.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

from shared.config import Invalid
from shared.readings import ReadingChunk
from shared.topics import is_valid_id, is_valid_unit

#: (node, sensor) pairs whose rule is remembered; beyond this the cache starts afresh
#: (a device inventing names cannot grow it without bound).
CACHE_MAX = 4096


@dataclass(frozen=True)
class TransformRule:
    #: glob on "node/sensor" (fnmatch: * ? [..]), as the device names them
    match: str
    #: the sensor's name in the buffer and the cloud ("" = unchanged)
    rename: str = ""
    #: the sensor's unit (unset = the unit the device sent, or the source's unit)
    unit: str | None = None
    scale: float = 1.0
    offset: float = 0.0
    #: true: readings of matching sensors are not stored (counted as filtered)
    drop: bool = False

    def __post_init__(self) -> None:
        if self.match.count("/") != 1:
            raise Invalid("match", "must be a glob on <node>/<sensor>, e.g. 'kitchen/*'")
        if self.rename and not is_valid_id(self.rename):
            raise Invalid("rename", "must be 1-64 characters of A-Z a-z 0-9 _ . -")
        if self.unit is not None and not is_valid_unit(self.unit):
            raise Invalid("unit", "must be at most 32 printable characters")
        if not (math.isfinite(self.scale) and math.isfinite(self.offset)):
            raise Invalid("scale", "scale and offset must be finite numbers")
        if self.scale == 0:
            raise Invalid("scale", "must not be 0 (use drop = true to drop a sensor)")


class Transforms:
    """The rules, with a bounded cache of which one applies to a sensor."""

    def __init__(self, rules: tuple[TransformRule, ...] = ()) -> None:
        self.rules = rules
        self._cache: dict[tuple[str, str], TransformRule | None] = {}

    def rule_for(self, node: str, sensor: str) -> TransformRule | None:
        if not self.rules:
            return None
        key = (node, sensor)
        try:
            return self._cache[key]
        except KeyError:
            pass
        name = f"{node}/{sensor}"
        rule = next((r for r in self.rules if fnmatch.fnmatchcase(name, r.match)), None)
        if len(self._cache) >= CACHE_MAX:
            self._cache.clear()
        self._cache[key] = rule
        return rule

    def apply(self, chunk: ReadingChunk) -> ReadingChunk | None:
        """The chunk as its rule says (renamed, unit, calibrated), or None if dropped."""
        rule = self.rule_for(chunk.node, chunk.sensor)
        if rule is None:
            return chunk
        if rule.drop:
            return None
        values = chunk.values
        if rule.scale != 1.0 or rule.offset != 0.0:
            values = values * rule.scale + rule.offset
        return ReadingChunk(
            chunk.node,
            rule.rename or chunk.sensor,
            rule.unit if rule.unit is not None else chunk.unit,
            chunk.ts,
            values,
        )
