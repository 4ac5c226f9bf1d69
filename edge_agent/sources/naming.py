"""Where a reading's node and sensor come from: the topic's placeholders, or the
source's fixed ``node`` and ``sensor``."""

from __future__ import annotations

from edge_agent.sources.config import SourceConfig
from edge_agent.sources.contract import clean_id
from shared.errors import WireError


def node_and_sensor(src: SourceConfig, topic: str) -> tuple[str, str]:
    """The node and sensor the topic names (or the source's own); the sensor is ""
    when neither names one. Raises ``WireError('bad-topic')``."""
    names = src.template.match(topic)
    if names is None:
        raise WireError("bad-topic", f"topic {topic[:200]!r} does not match {src.topic!r}")
    node = clean_id(names["node"]) if "node" in names else src.node
    sensor = clean_id(names["sensor"]) if "sensor" in names else src.sensor
    if not node or sensor is None:
        raise WireError("bad-topic", f"topic {topic[:200]!r}: node or sensor is empty or too long")
    return node, sensor


def joined(*parts: str) -> str | None:
    """A sensor name from parts (empty ones left out), cleaned; None if unusable."""
    return clean_id(".".join(p for p in parts if p))
