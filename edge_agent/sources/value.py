"""``value``: one reading per message, the payload a plain number (ESPHome's
``21.5``), a state text (``ON``/``OFF``, ``true``/``false``, or the source's
``states``), or a text saying the sensor has no value (``nan``, ``None``: an
invalid reading), by the rule of :mod:`edge_agent.sources.values`. Stamped on
arrival. Payloads in the source's ``ignore`` list (Home Assistant's
``unavailable``) are counted as ``readings_filtered``; any other text is
quarantined (``bad-value``): the message holds no reading."""

from __future__ import annotations

from edge_agent.sources import values
from edge_agent.sources.config import SourceConfig
from edge_agent.sources.contract import Builder, Decoded, Decoder
from edge_agent.sources.naming import node_and_sensor
from edge_agent.sources.transform import Transforms
from shared.errors import WireError

MAX_VALUE_BYTES = 64


def decoder(src: SourceConfig, transforms: Transforms) -> Decoder:
    ignored = frozenset(v.strip().lower() for v in src.ignore)
    states = src.state_table

    def decode(topic: str, payload: bytes, now_ns: int) -> Decoded:
        node, sensor = node_and_sensor(src, topic)
        if len(payload) > MAX_VALUE_BYTES:
            raise WireError("bad-value", f"{len(payload)} bytes: a value has at most 64")
        try:
            text = payload.decode("ascii")
        except UnicodeDecodeError:
            raise WireError("bad-value", "not ASCII text") from None
        if text.strip().lower() in ignored:
            out = Decoded(filtered=1)  # not a reading, not an error: counted
            out.stamped = True
            return out
        kind, value = values.from_text(text, states)
        if kind == "text":
            known = ", ".join(states)
            raise WireError(
                "bad-value", f"{text[:64]!r} is not a number, nan or a state ({known[:100]})"
            )
        b = Builder(transforms, now_ns)
        b.add(node, sensor, src.unit, None, value, payload)
        return b.done()

    return decode
