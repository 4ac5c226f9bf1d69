"""How each simulated device family publishes a chunk of readings, and the agent
config that reads it (docs/devices.md has the real devices' side).

* ``native``: the agent's JSON chunk on ``<prefix>/<node>/<sensor>`` (timestamps);
* ``esphome``: one plain value per reading on ``esphome/<node>/sensor/<sensor>/state``
  (no time: the agent stamps it on arrival);
* ``tasmota``: ``tele/<node>/SENSOR``, JSON with the local ``Time`` (whole seconds,
  no zone; the reading's time is truncated to its second, as Tasmota does);
* ``zigbee2mqtt``: ``zigbee2mqtt/<node>``, JSON with ``linkquality`` beside the
  reading (no time);
* ``telegraf``: line protocol with nanosecond times on ``telegraf/<node>/<sensor>``;
* ``influx-http``: the same line protocol posted to the agent's ``/api/v2/write``.

Floats are written with Python's shortest round-tripping repr, so the agent reads
back bit-identical values. The ground truth records the times the agent will see
where the payload carries them, and marks the readings it stamps (``stamped``):
their windows depend on arrival, so only their counts per sensor are exact.
"""

from __future__ import annotations

import datetime as dt
import json
import urllib.request
from dataclasses import dataclass
from zoneinfo import ZoneInfo

from firmware_sim.config import Family, NodeSpec, SensorSpec, SimConfig
from shared.readings import encode_chunk
from shared.topics import sensor_topic

#: families whose payload carries no time: the agent stamps their readings on arrival
STAMPED: frozenset[Family] = frozenset(("esphome", "zigbee2mqtt"))


@dataclass(frozen=True)
class Publication:
    """What one chunk becomes: MQTT messages, or an HTTP body; and the times the
    agent will read (for the ground truth)."""

    messages: list[tuple[str, bytes]]
    http_body: bytes | None
    ts: list[int]


def publication(
    cfg: SimConfig, node: NodeSpec, spec: SensorSpec, ts: list[int], values: list[float]
) -> Publication:
    fam = node.family
    if fam == "native":
        topic = sensor_topic(node.id, spec.name, cfg.topic_prefix)
        return Publication([(topic, encode_chunk(spec.unit, ts, values))], None, ts)
    if fam == "esphome":
        topic = f"esphome/{node.id}/sensor/{spec.name}/state"
        return Publication([(topic, repr(v).encode()) for v in values], None, ts)
    if fam == "zigbee2mqtt":
        msgs = [
            (f"zigbee2mqtt/{node.id}", json.dumps({spec.name: v, "linkquality": 120}).encode())
            for v in values
        ]
        return Publication(msgs, None, ts)
    if fam == "tasmota":
        zone = ZoneInfo(cfg.timezone)
        secs = [t // 10**9 for t in ts]
        msgs = []
        for s, v in zip(secs, values, strict=True):
            local = dt.datetime.fromtimestamp(s, zone).replace(tzinfo=None)
            body = {"Time": local.isoformat(timespec="seconds"), spec.name: v, "TempUnit": "C"}
            msgs.append((f"tele/{node.id}/SENSOR", json.dumps(body).encode()))
        return Publication(msgs, None, [s * 10**9 for s in secs])
    lines = "\n".join(
        f"{spec.name},host={node.id} value={v!r} {t}" for t, v in zip(ts, values, strict=True)
    ).encode()
    if fam == "telegraf":
        return Publication([(f"telegraf/{node.id}/{spec.name}", lines)], None, ts)
    return Publication([], lines, ts)


def post(cfg: SimConfig, body: bytes, timeout_s: float = 30.0) -> None:
    """One body to the agent's HTTP intake; anything but 204 raises."""
    req = urllib.request.Request(
        f"{cfg.http_url.rstrip('/')}/api/v2/write?precision=ns", data=body, method="POST"
    )
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        if resp.status != 204:
            raise ConnectionError(f"the agent answered {resp.status}")


def agent_sources(cfg: SimConfig, http_port: int | None = None) -> str:
    """The agent's TOML for the families ``cfg`` uses besides the native one (sources,
    and [intake.http]), to append to its config."""
    families = {n.family for n in cfg.nodes}
    # the native nodes' chunks: the agent's own source, on intake.topic_prefix
    out = (
        []
        if cfg.topic_prefix == "sensors"
        else [f'[intake]\ntopic_prefix = "{cfg.topic_prefix}"\n']
    )
    if "esphome" in families:
        out += [
            "[[intake.sources]]",
            'name = "esphome"',
            'topic = "esphome/{node}/+/{sensor}/state"',
            'format = "value"',
            "",
        ]
    if "tasmota" in families:
        out += [
            "[[intake.sources]]",
            'name = "tasmota"',
            'topic = "tele/{node}/SENSOR"',
            'format = "json"',
            'time_field = "Time"',
            'time_format = "local"',
            f'timezone = "{cfg.timezone}"',
            "",
        ]
    if "zigbee2mqtt" in families:
        out += [
            "[[intake.sources]]",
            'name = "zigbee2mqtt"',
            'topic = "zigbee2mqtt/{node}"',
            'format = "json"',
            'exclude = ["linkquality", "update.*"]',
            "",
        ]
    if "telegraf" in families:
        out += [
            "[[intake.sources]]",
            'name = "telegraf"',
            'topic = "telegraf/{node}/#"',
            'format = "influx"',
            "",
        ]
    if "influx-http" in families and http_port is not None:
        out += ["[intake.http]", "enabled = true", f"port = {http_port}", ""]
    return "\n".join(out)  # fmt: skip
