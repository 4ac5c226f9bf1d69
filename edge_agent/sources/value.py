"""``value``: one reading per message, the payload a plain number (ESPHome's
``21.5``, ``nan`` for a failed sensor) or ON/OFF, true/false as 1/0. Stamped on
arrival. Payloads in the source's ``ignore`` list (Home Assistant's
``unavailable``) are counted as ``readings_filtered``, not quarantined."""

from __future__ import annotations

from edge_agent.sources.config import SourceConfig
from edge_agent.sources.contract import Builder, Decoded, Decoder, number
from edge_agent.sources.naming import node_and_sensor
from edge_agent.sources.transform import Transforms
from shared.errors import WireError

MAX_VALUE_BYTES = 64


def decoder(src: SourceConfig, transforms: Transforms) -> Decoder:
    ignored = frozenset(v.strip().lower() for v in src.ignore)

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
        value = number(text)
        if value is None:
            raise WireError("bad-value", f"{text[:64]!r} is not a number, ON/OFF or true/false")
        b = Builder(transforms, now_ns)
        b.add(node, sensor, src.unit, None, value, payload)
        return b.done()

    return decode
