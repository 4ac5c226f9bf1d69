"""The agent's MQTT sources: which subscriptions to make, and which decoder reads
a message that arrives (the first source whose topic template matches)."""

from __future__ import annotations

from dataclasses import dataclass

from edge_agent.sources import chunk, csvrows, jsonfields, telegrafjson, value
from edge_agent.sources.config import MAX_PAYLOAD_BYTES, SourceConfig
from edge_agent.sources.contract import Decoded, Decoder, guard
from edge_agent.sources.lineproto import LineDecoder
from edge_agent.sources.naming import node_and_sensor
from edge_agent.sources.template import TopicTemplate
from edge_agent.sources.transform import Transforms
from shared.errors import WireError

#: counters of messages that no source's template matches (a filter overlap, say)
UNMATCHED = "unmatched"


def _setting(index: int, key: str) -> str:
    return f"intake.sources[{index}].{key}"


def decoder_for(src: SourceConfig, transforms: Transforms, index: int = 0) -> Decoder:
    """The decoder of one MQTT source (``index``: its place in the config, for the
    settings that error messages name)."""
    if src.format == "chunk":
        return guard(chunk.decoder(src, transforms))
    if src.format == "value":
        return guard(value.decoder(src, transforms))
    if src.format == "json":
        return guard(jsonfields.decoder(src, transforms, _setting(index, "time_format")))
    if src.format == "telegraf-json":
        return guard(telegrafjson.decoder(src, transforms, _setting(index, "precision")))
    if src.format == "csv":

        def decode_csv(topic: str, payload: bytes, now_ns: int) -> Decoded:
            node, sensor = node_and_sensor(src, topic)
            return csvrows.decode_rows(
                src, transforms, node, sensor, payload, now_ns, _setting(index, "time_format")
            )

        return guard(decode_csv)
    lines = LineDecoder(
        transforms,
        node=src.node,
        node_tag=src.node_tag,
        sensor_tags=src.sensor_tags,
        ignore_tags=src.ignore_tags,
        unit=src.unit,
        max_bytes=src.max_bytes,
    )

    def decode_influx(topic: str, payload: bytes, now_ns: int) -> Decoded:
        names = src.template.match(topic) or {}
        if "node" in names:  # a node in the topic is the default for lines without the tag
            node, _ = node_and_sensor(src, topic)
            return LineDecoder(
                transforms,
                node=node,
                node_tag=src.node_tag,
                sensor_tags=src.sensor_tags,
                ignore_tags=src.ignore_tags,
                unit=src.unit,
                max_bytes=src.max_bytes,
            ).decode(payload, now_ns, src.precision, _setting(index, "precision"))
        return lines.decode(payload, now_ns, src.precision, _setting(index, "precision"))

    return guard(decode_influx)


@dataclass(frozen=True)
class Route:
    source: SourceConfig
    template: TopicTemplate
    decode: Decoder


class MqttSources:
    def __init__(self, sources: tuple[SourceConfig, ...], transforms: Transforms) -> None:
        self.routes = [
            Route(s, s.template, decoder_for(s, transforms, i)) for i, s in enumerate(sources)
        ]
        #: subscription identifier -> filter (the i-th subscription's is i + 1)
        self._filters = {i + 1: f for i, (f, _) in enumerate(self.subscriptions())}
        self._filter_tpl = {i: TopicTemplate.parse(f) for i, f in self._filters.items()}

    def subscriptions(self) -> list[tuple[str, int]]:
        """(filter, qos) for each source, each filter once. The subscription
        identifier of the i-th is i + 1 (:meth:`is_extra_copy`)."""
        seen: dict[str, int] = {}
        for r in self.routes:
            seen[r.template.filter] = max(seen.get(r.template.filter, 0), r.source.qos)
        return list(seen.items())

    def is_extra_copy(self, topic: str, ids: list[int]) -> bool:
        """True if a message on ``topic`` that came through the subscriptions
        ``ids`` (its MQTT v5 Subscription Identifiers) is a copy to acknowledge and
        not read. Filters overlap (``shellies/+/sensor/+`` and ``shellies/+/+/+``),
        and a broker may send a copy per matching subscription (Mosquitto 2 does;
        MQTT 5.0 §3.3.4 allows it): the copy read is the one through the filter of
        the first source that matches the topic. A copy whose identifier is not
        one of this config's filters that match the topic (a message queued in the
        session under an older config) is read."""
        if not ids:
            return False
        want = next((r.template.filter for r in self.routes if r.template.match(topic)), None)
        if want is None:
            return False
        filters = [self._filters.get(i) for i in ids]
        if want in filters:
            return False
        return all(
            f is not None and TopicTemplate.parse(f).match(topic) is not None for f in filters
        )

    def names(self) -> list[str]:
        return [r.source.name for r in self.routes]

    def max_payload_bytes(self) -> int:
        """The largest payload any source takes (``max_bytes``): the agent announces
        it (with the packet's overhead) as its MQTT Maximum Packet Size."""
        return max((r.source.max_bytes for r in self.routes), default=MAX_PAYLOAD_BYTES)

    def decode(self, topic: str, payload: bytes, now_ns: int) -> tuple[str, Decoded | WireError]:
        """(the source's name, what it decoded or why not)."""
        for r in self.routes:
            if r.template.match(topic) is not None:
                try:
                    return r.source.name, r.decode(topic, payload, now_ns)
                except WireError as exc:
                    return r.source.name, exc
        return UNMATCHED, WireError("bad-topic", f"no source matches {topic[:200]!r}")
