"""Every event the ingestor counts, defined once (as vector keeps its internal events
in ``src/internal_events/`` and telegraf in ``selfstat``).

:meth:`~cloud_ingest.ingest.writer.Stats.inc` takes only an :data:`Event`, which only
this module makes, so a name cannot be mistyped at the place it is counted; /metrics
(``metrics.py``) shows every name of :data:`ALL` from 0, so that the alert rules'
``rate()`` sees the first increase; ``tests/cloud_ingest/test_prometheus.py`` checks that the
rules and dashboards name only events that exist here.

On /metrics an event is ``cloud_ingest_events_total{event="<name>"}``, except the two
families, which have a metric of their own: ``quarantined_<reason>`` is
``cloud_ingest_quarantined_total{reason=…}`` and ``deferred_<reason>`` is
``cloud_ingest_deferred_total{reason=…}``.
"""

from __future__ import annotations

from typing import Final, Literal, NewType

from shared.errors import CLOUD_DEFER_REASONS, CLOUD_QUARANTINE_REASONS

Event = NewType("Event", str)

#: name → what it counts (docs/cloud-ingest.md, "Metrics")
HELP: dict[Event, str] = {}


def _event(name: str, what: str) -> Event:
    event = Event(name)
    HELP[event] = what
    return event


RECEIVED: Final = _event("received", "batch messages received")
ALERTS_RECEIVED: Final = _event("alerts_received", "alert messages received")
HEALTH_RECEIVED: Final = _event("health_received", "health reports received")
RESULTS_RECEIVED: Final = _event("results_received", "results of commands received")
RAW_RECEIVED: Final = _event("raw_received", "raw-readings messages received (on request)")
BATCHES_WRITTEN: Final = _event("batches_written", "batches written to both sinks")
POINTS_WRITTEN: Final = _event("points_written", "InfluxDB points of those batches")
ALERTS_WRITTEN: Final = _event("alerts_written", "alerts written to both sinks")
HEALTH_WRITTEN: Final = _event("health_written", "health reports written to InfluxDB")
RESULTS_WRITTEN: Final = _event("results_written", "results of commands written to InfluxDB")
RAW_WRITTEN: Final = _event("raw_written", "raw-readings messages written to the lake")
RAW_READINGS_WRITTEN: Final = _event("raw_readings_written", "the readings they held")
DUPLICATES: Final = _event("duplicates", "messages recognised as written before")
ACKS_STORED: Final = _event("acks_stored", "`stored` acks published to devices")
ACKS_REJECTED: Final = _event("acks_rejected", "`rejected` acks published to devices")
ACKS_NOT_SENT: Final = _event("acks_not_sent", "acks not published: too many await a PUBACK")
INFLUX_RETRIES: Final = _event("influx_retries", "InfluxDB writes retried")
ARCHIVE_RETRIES: Final = _event("archive_retries", "lake writes retried")
INFLUX_REJECTED: Final = _event("influx_rejected", "batches InfluxDB refused for good")
ARCHIVE_REJECTED: Final = _event("archive_rejected", "lake objects the store refused for good")
INFLUX_LIMITED: Final = _event("influx_limited", "writes InfluxDB refused for its state")
MQTT_RECONNECTS: Final = _event("mqtt_reconnects", "reconnections to the broker")
REVISIONS_SUPERSEDED: Final = _event(
    "revisions_superseded", "window revisions left out: a later one was written"
)
ABANDONED_AT_SHUTDOWN: Final = _event(
    "abandoned_at_shutdown", "messages left unacknowledged at shutdown (redelivered)"
)
QUARANTINE_NOT_KEPT: Final = _event(
    "quarantine_not_kept", "quarantine entries the archive would not take"
)
QUOTA_WINDOWS_REFUSED: Final = _event(
    "quota_windows_refused", "windows of accepted batches refused by a quota"
)

_RECEIVED: Final = {
    "batch": RECEIVED, "alert": ALERTS_RECEIVED, "health": HEALTH_RECEIVED,
    "result": RESULTS_RECEIVED, "raw": RAW_RECEIVED,
}  # fmt: skip
_WRITTEN: Final = {
    "alert": ALERTS_WRITTEN, "health": HEALTH_WRITTEN, "result": RESULTS_WRITTEN,
    "raw": RAW_WRITTEN,
}  # fmt: skip
_RETRIES: Final = {"influx": INFLUX_RETRIES, "archive": ARCHIVE_RETRIES}
_ACKS: Final = {"stored": ACKS_STORED, "rejected": ACKS_REJECTED}

QUARANTINED_PREFIX: Final = "quarantined_"
DEFERRED_PREFIX: Final = "deferred_"


def received(kind: Literal["batch", "alert", "health", "result", "raw"]) -> Event:
    return _RECEIVED[kind]


def written(kind: Literal["alert", "health", "result", "raw"]) -> Event:
    return _WRITTEN[kind]


def retries(stage: str) -> Event:
    """``influx_retries`` or ``archive_retries``."""
    return _RETRIES[stage]


def acks(status: str) -> Event:
    """``acks_stored`` or ``acks_rejected``."""
    return _ACKS[status]


def quarantined(reason: str) -> Event:
    """Input quarantined for ``reason`` (one of shared.errors.CLOUD_QUARANTINE_REASONS)."""
    return Event(QUARANTINED_PREFIX + reason)


def deferred(reason: str) -> Event:
    """A message deferred for ``reason`` (one of shared.errors.CLOUD_DEFER_REASONS)."""
    return Event(DEFERRED_PREFIX + reason)


#: every name the ingestor counts; /metrics shows each from 0
ALL: Final[frozenset[Event]] = frozenset(
    [*HELP, *map(quarantined, CLOUD_QUARANTINE_REASONS), *map(deferred, CLOUD_DEFER_REASONS)]
)
