"""``chunk``: the agent's own JSON chunk (shared/readings.py), node and sensor from
the topic. Its timestamps are nanoseconds; one outside 2000–2100 is refused as
``bad-timestamp`` (a node sending seconds), not stored and dropped as too old."""

from __future__ import annotations

from edge_agent.sources import timestamps
from edge_agent.sources.config import SourceConfig
from edge_agent.sources.contract import Builder, Decoded, Decoder
from edge_agent.sources.naming import node_and_sensor
from edge_agent.sources.transform import Transforms
from shared.errors import WireError
from shared.readings import ReadingChunk, decode_chunk_payload


def decoder(src: SourceConfig, transforms: Transforms) -> Decoder:
    def decode(topic: str, payload: bytes, now_ns: int) -> Decoded:
        node, sensor = node_and_sensor(src, topic)
        chunk = decode_chunk_payload(node, sensor, payload)
        lo, hi = int(chunk.ts.min()), int(chunk.ts.max())
        for t in (lo, hi):
            try:
                timestamps.check(t, t, "ns", "ts")
            except timestamps.BadTimestamp as exc:
                raise WireError(
                    "bad-timestamp", f"{exc} (the chunk format's ts are nanoseconds)"
                ) from None
        if not chunk.unit and src.unit:
            chunk = ReadingChunk(node, sensor, src.unit, chunk.ts, chunk.values)
        b = Builder(transforms, now_ns)
        b.add_chunk(chunk)
        return b.done()

    return decode
