"""Sensor names for tagged series (line protocol, Telegraf's JSON), so that two
series are never one sensor.

InfluxDB tells series apart by measurement and *all* their tags; so does the
agent: a series' sensor is ``<measurement>.<tag values>`` (then ``.<field>``),
with the values of ``sensor_tags`` first, in their order, then those of every
other tag by key, leaving out only the tag that names the node (``node_tag``)
and the ``ignore_tags``. Telegraf's ``disk`` plugin's
``disk,device=sda1,fstype=ext4,host=pi-1,mode=rw,path=/boot`` is the sensor
``disk.sda1.ext4.rw._boot``, beside ``disk.sda2.ext4.rw._`` for ``path=/``.

Names are cleaned (:func:`~edge_agent.sources.contract.clean_id`: ``/`` becomes
``_``) and at most 64 characters: a longer one (Docker's seven tags) keeps the
measurement and the leading values that fit, then ``.h`` and 10 hex digits of a
digest of the whole name, then the field, so it stays distinct and the same
across restarts. Two series can still share a sensor only if their tag values
differ in nothing but characters the cleaning replaces (``/dev`` and ``_dev``),
or if one lacks a tag the other has and the remaining values are equal.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from edge_agent.sources.contract import clean_id

MAX_NAME = 64
_DIGEST_PART = 1 + 1 + 10  # ".h" and 10 hex digits


@dataclass(frozen=True)
class SeriesNaming:
    node_tag: str = "host"
    sensor_tags: tuple[str, ...] = ()
    ignore_tags: tuple[str, ...] = ()

    def target(
        self, measurement: str, tags: dict[str, str], default_node: str
    ) -> tuple[str, str] | str:
        """(node, sensor prefix) of a series, or why it is not usable."""
        if not measurement:
            return "a line without a measurement"
        raw_node = tags.get(self.node_tag)
        node = clean_id(raw_node) if raw_node is not None else default_node
        if not node:
            if raw_node is None:
                return f"no tag {self.node_tag!r} names the node, and the source sets no node"
            return f"tag {self.node_tag}={raw_node[:40]!r} is not a usable node name"
        skip = {self.node_tag, *self.ignore_tags}
        keys = [t for t in self.sensor_tags if t in tags]
        keys += sorted(k for k in tags if k not in skip and k not in self.sensor_tags)
        return node, ".".join([measurement, *(tags[k] for k in keys)])


def sensor_name(prefix: str, field: str) -> str | None:
    """The sensor of a field of a series (``prefix`` from :meth:`SeriesNaming.target`);
    just the prefix for a field named ``value``. None if no usable name exists."""
    full = prefix if field == "value" else f"{prefix}.{field}"
    name = clean_id(full)
    if name is not None or len(full) <= MAX_NAME:
        return name
    # too long: the leading parts that fit, a digest of the whole, the field
    tail = "" if field == "value" else "." + field
    digest = hashlib.blake2b(full.encode(), digest_size=5).hexdigest()
    room = MAX_NAME - len(tail) - _DIGEST_PART
    if room < 1:
        return None
    keep = ""
    for part in prefix.split("."):
        if len(keep) + len(part) + (1 if keep else 0) > room:
            break
        keep = f"{keep}.{part}" if keep else part
    return clean_id(f"{keep or prefix[:room]}.h{digest}{tail}")
