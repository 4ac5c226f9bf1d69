"""Topic templates: the MQTT topics a source subscribes to, and what their levels name.

A template is an MQTT topic whose levels may be ``{node}``, ``{sensor}``, ``+``
(any one level, ignored) or, last, ``#`` (any rest, ignored)::

    esphome/{node}/sensor/{sensor}/state   ->  esphome/+/sensor/+/state
    zigbee2mqtt/{node}                     ->  zigbee2mqtt/+
    tele/{node}/SENSOR                     ->  tele/+/SENSOR

A level that is only a placeholder matches any one level; the node and sensor
names a topic gives are cleaned (:func:`~edge_agent.sources.contract.clean_id`).
``{sensor}`` may name several levels, joined with dots: Shelly's
``shellies/<id>/emeter/0/power`` read by ``shellies/{node}/{sensor}/{sensor}/{sensor}``
is the sensor ``emeter.0.power``.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.config import Invalid

PLACEHOLDERS = ("{node}", "{sensor}")


@dataclass(frozen=True)
class TopicTemplate:
    levels: tuple[str, ...]

    @classmethod
    def parse(cls, text: str, key: str = "topic") -> TopicTemplate:
        if not text or len(text) > 256:
            raise Invalid(key, "must be an MQTT topic of 1-256 characters")
        levels = tuple(text.split("/"))
        for i, level in enumerate(levels):
            if level == "#":
                if i != len(levels) - 1:
                    raise Invalid(key, "'#' may only be the last level")
            elif level in ("+", *PLACEHOLDERS):
                continue
            elif any(c in level for c in "+#{}\0"):
                raise Invalid(
                    key, f"level {level!r}: a level is text, '+', '#', '{{node}}' or '{{sensor}}'"
                )
        if levels.count("{node}") > 1:
            raise Invalid(key, "{node} may appear once")
        return cls(levels)

    @property
    def filter(self) -> str:
        """The MQTT subscription filter."""
        return "/".join("+" if lv in PLACEHOLDERS else lv for lv in self.levels)

    @property
    def names_node(self) -> bool:
        return "{node}" in self.levels

    @property
    def names_sensor(self) -> bool:
        return "{sensor}" in self.levels

    def match(self, topic: str) -> dict[str, str] | None:
        """The placeholders' levels in ``topic``, or None if it does not match."""
        parts = topic.split("/")
        lv = self.levels
        if lv and lv[-1] == "#":
            if len(parts) < len(lv) - 1:
                return None
        elif len(parts) != len(lv):
            return None
        out: dict[str, str] = {}
        sensor: list[str] = []
        for want, got in zip(lv, parts, strict=False):
            if want == "#":
                break
            if want == "{sensor}":
                sensor.append(got)
            elif want == "{node}":
                out["node"] = got
            elif want != "+" and want != got:
                return None
        if sensor:
            out["sensor"] = ".".join(sensor)
        return out
