"""``telegraf-json``: Telegraf's JSON output format (``data_format = "json"``),
one metric or a batch (``use_batch_format = true``)::

    {"fields": {"usage_idle": 97.5}, "name": "cpu",
     "tags": {"cpu": "cpu-total", "host": "pi-1"}, "timestamp": 1458229140}
    {"metrics": [ <metric>, ... ]}

(https://docs.influxdata.com/telegraf/v1/data_formats/output/json/). A metric is
read as the same line of line protocol would be: the node from ``node_tag``,
the sensor from the name, every other tag and the field
(:mod:`edge_agent.sources.series`), each field by the value rule of
:mod:`edge_agent.sources.values`. ``timestamp`` is a number in the source's
``precision`` (Telegraf's ``json_timestamp_units``, ``1s`` unless set: use
``precision = "s"``), or RFC 3339 text (``json_timestamp_format``). A metric
that cannot be read is quarantined (``bad-metric``) and the others stored.
"""

from __future__ import annotations

import json
from typing import Any

from edge_agent.sources import timestamps, values
from edge_agent.sources.config import SourceConfig
from edge_agent.sources.contract import Builder, Decoded, Decoder
from edge_agent.sources.naming import node_and_sensor
from edge_agent.sources.series import SeriesNaming, sensor_name
from edge_agent.sources.transform import Transforms
from shared import jsonwire
from shared.errors import WireError

MAX_METRICS = 100_000


def _part(metric: Any) -> str:
    """A metric as the quarantine keeps it."""
    return json.dumps(metric, separators=(",", ":"))[:4096]


def decoder(src: SourceConfig, transforms: Transforms, setting: str = "precision") -> Decoder:
    naming = SeriesNaming(src.node_tag, src.sensor_tags, src.ignore_tags)
    states = src.state_table

    def metric_time(raw: Any) -> int | None:
        if raw is None:
            return None
        if isinstance(raw, str):
            return timestamps.from_text(raw, "rfc3339", timestamps.zone(""), setting)
        return timestamps.from_number(raw, src.precision, setting)

    def decode(topic: str, payload: bytes, now_ns: int) -> Decoded:
        topic_node = src.node
        if src.template.names_node:
            topic_node, _ = node_and_sensor(src, topic)
        obj = jsonwire.loads(
            payload, reason="bad-json", what="a Telegraf JSON payload", max_bytes=src.max_bytes
        )
        if isinstance(obj, dict) and isinstance(obj.get("metrics"), list):
            metrics: list[Any] = obj["metrics"]
        elif isinstance(obj, dict):
            metrics = [obj]
        else:
            raise WireError("bad-json", 'not a Telegraf metric or {"metrics": [...]}')
        if len(metrics) > MAX_METRICS:
            raise WireError("bad-json", f"more than {MAX_METRICS} metrics")
        b = Builder(transforms, now_ns)
        for m in metrics:
            if not isinstance(m, dict) or not isinstance(m.get("fields"), dict):
                b.reject("bad-metric", "a metric is an object with fields", _part(m))
                continue
            name, tags = m.get("name"), m.get("tags", {})
            if not isinstance(name, str) or not isinstance(tags, dict):
                b.reject("bad-metric", "a metric's name is text and its tags an object", _part(m))
                continue
            target = naming.target(name, {str(k): str(v) for k, v in tags.items()}, topic_node)
            if isinstance(target, str):
                b.reject("bad-metric", target, _part(m))
                continue
            try:
                ts = metric_time(m.get("timestamp"))
            except timestamps.BadTimestamp as exc:
                b.reject("bad-timestamp", str(exc), _part(m))
                continue
            node, prefix = target
            for key, value in m["fields"].items():
                kind, reading = values.classify(value, states)
                if kind == "text" or isinstance(value, dict | list):
                    b.text()
                    continue
                sensor = sensor_name(prefix, str(key))
                if sensor is None:
                    b.reject("bad-name", f"field {str(key)[:40]!r} makes no usable name", _part(m))
                    continue
                b.add(node, sensor, src.unit, ts, reading, payload)
        out = b.done()
        if not out.chunks and not out.rejects and not out.filtered:
            raise WireError("no-readings", "no metric with a numeric field")
        return out

    return decode
