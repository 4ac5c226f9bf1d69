"""MQTT topic layout, shared by every component.

Cloud link (device → broker → cloud ingest)::

    telemetry/v1/<device_id>/batch     one wire-format batch per message (QoS 1)
    telemetry/v1/<device_id>/ack       cloud → device: a batch is stored, or rejected (QoS 1)
    telemetry/v1/<device_id>/alert     device → cloud: an alert raised or cleared (QoS 1)
    telemetry/v1/<device_id>/health    device → cloud: the agent's health report (QoS 1)
    telemetry/v1/<device_id>/cmd       operator → device: a signed command (QoS 1)
    telemetry/v1/<device_id>/result    device → cloud: a command's result (QoS 1)
    telemetry/v1/<device_id>/raw       device → cloud: raw readings a command asked for (QoS 1)
    telemetry/v2/<device_id>/batch     a batch of wire format v2 (forward.wire_version = 2)

Device-local broker (sensor nodes → edge agent)::

    sensors/<node_id>/<sensor>         one reading chunk per message (QoS 1)

``device_id``, ``node_id`` and sensor names are restricted to ``ID_PATTERN`` so that
they can never contain MQTT separators or wildcards.
"""

from __future__ import annotations

import re

ID_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
DEFAULT_BATCH_PREFIX = "telemetry/v1"
#: where batches of wire format v2 go (docs/wire-format.md §2.6, §2.14): only the
#: batches; acks, alerts, health, commands and raw readings stay under v1's prefix
DEFAULT_BATCH_PREFIX_V2 = "telemetry/v2"
DEFAULT_SENSOR_PREFIX = "sensors"


def is_valid_id(value: str) -> bool:
    """True if ``value`` may be used as a device, node or sensor id."""
    return bool(ID_PATTERN.match(value))


MAX_UNIT_CHARS = 32


def is_valid_unit(value: object) -> bool:
    """True if ``value`` may be a sensor's unit: a string of at most 32 characters,
    none of them a control character (line protocol cannot carry one in a tag). The
    agent refuses other units at intake, so that the cloud never has to."""
    return isinstance(value, str) and len(value) <= MAX_UNIT_CHARS and value.isprintable()


def batch_topic(device_id: str, prefix: str = DEFAULT_BATCH_PREFIX) -> str:
    return f"{prefix}/{device_id}/batch"


def ack_topic(device_id: str, prefix: str = DEFAULT_BATCH_PREFIX) -> str:
    return f"{prefix}/{device_id}/ack"


def alert_topic(device_id: str, prefix: str = DEFAULT_BATCH_PREFIX) -> str:
    return f"{prefix}/{device_id}/alert"


def alert_filter(prefix: str = DEFAULT_BATCH_PREFIX) -> str:
    return f"{prefix}/+/alert"


def device_from_alert_topic(topic: str, prefix: str = DEFAULT_BATCH_PREFIX) -> str | None:
    return _device_from(topic, prefix, "alert")


def health_topic(device_id: str, prefix: str = DEFAULT_BATCH_PREFIX) -> str:
    return f"{prefix}/{device_id}/health"


def health_filter(prefix: str = DEFAULT_BATCH_PREFIX) -> str:
    return f"{prefix}/+/health"


def device_from_health_topic(topic: str, prefix: str = DEFAULT_BATCH_PREFIX) -> str | None:
    return _device_from(topic, prefix, "health")


def command_topic(device_id: str, prefix: str = DEFAULT_BATCH_PREFIX) -> str:
    """Where the operators publish a device's commands (docs/wire-format.md §2.11)."""
    return f"{prefix}/{device_id}/cmd"


def result_topic(device_id: str, prefix: str = DEFAULT_BATCH_PREFIX) -> str:
    """Where a device publishes its commands' results (§2.12)."""
    return f"{prefix}/{device_id}/result"


def result_filter(prefix: str = DEFAULT_BATCH_PREFIX) -> str:
    return f"{prefix}/+/result"


def device_from_result_topic(topic: str, prefix: str = DEFAULT_BATCH_PREFIX) -> str | None:
    return _device_from(topic, prefix, "result")


def raw_topic(device_id: str, prefix: str = DEFAULT_BATCH_PREFIX) -> str:
    """Where a device publishes the raw readings an operator asked for (§2.13)."""
    return f"{prefix}/{device_id}/raw"


def raw_filter(prefix: str = DEFAULT_BATCH_PREFIX) -> str:
    return f"{prefix}/+/raw"


def device_from_raw_topic(topic: str, prefix: str = DEFAULT_BATCH_PREFIX) -> str | None:
    return _device_from(topic, prefix, "raw")


def _device_from(topic: str, prefix: str, kind: str) -> str | None:
    """The device id in ``<prefix>/<device_id>/<kind>``, or None if the topic is not one."""
    head, tail = prefix + "/", "/" + kind
    if not topic.startswith(head) or not topic.endswith(tail):
        return None
    device = topic[len(head) : -len(tail)]
    return device if is_valid_id(device) else None


def batch_filter(prefix: str = DEFAULT_BATCH_PREFIX) -> str:
    """Subscription filter that matches every device's batch topic."""
    return f"{prefix}/+/batch"


def device_from_batch_topic(topic: str, prefix: str = DEFAULT_BATCH_PREFIX) -> str | None:
    """The device id in a batch topic, or None if the topic is not one."""
    return _device_from(topic, prefix, "batch")


def sensor_topic(node_id: str, sensor: str, prefix: str = DEFAULT_SENSOR_PREFIX) -> str:
    return f"{prefix}/{node_id}/{sensor}"
