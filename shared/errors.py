"""The project's error hierarchy, in one place.

::

    TelemetryError
    ├── ConfigError            bad config file: names the file and the key; stops start-up
    ├── StorageError           a SQLite file cannot be opened or used (the edge agent's
    │                          buffer, cloud-ingest's quotas.state_file)
    ├── LakeObjectError        an object in the lake cannot be read as what its key says
    ├── WireError              a message that cannot be decoded or fails validation
    │                          (permanent: resending the same bytes will fail again);
    │                          carries a short machine-readable ``reason`` for counters
    └── SinkError              a sink (InfluxDB, archive) could not take a batch
        ├── RetryableSinkError outage, 5xx, 429, timeout: the sink takes nothing now;
        │                      hold everything and try again after ``retry_after``
        ├── SinkLimitError     the sink's state refuses this write (a series limit
        │                      reached, a schema conflict another writer made, an
        │                      object the store will not take): not the batch's
        │                      fault, so it is deferred (the device keeps it and
        │                      sends it again) while the rest is written
        └── PermanentSinkError the batch itself is at fault (line protocol InfluxDB
                               cannot parse, points beyond its retention): quarantine it

Third-party exceptions (paho, influxdb-client, urllib3, botocore) are translated
into these at one place per sink, never further up.
"""

from __future__ import annotations


class TelemetryError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(TelemetryError):
    """A config file is unreadable or has a wrong key or value."""

    def __init__(self, path: str, key: str | None, message: str) -> None:
        self.path = path
        self.key = key
        self.message = message
        where = f"{path}: {key}: " if key else f"{path}: "
        super().__init__(f"config error in {where}{message}")


class StorageError(TelemetryError):
    """A SQLite file cannot be opened or used: the agent's buffer (or it was written
    by a newer agent), or cloud-ingest's record of the devices' series."""


class LakeObjectError(TelemetryError):
    """An object of the Parquet lake is damaged or not what its key says."""

    def __init__(self, key: str, message: str) -> None:
        self.key = key
        super().__init__(f"lake object {key} cannot be read: {message}")


#: Every reason cloud-ingest may quarantine a message for (docs/wire-format.md §2.7),
#: so that each counter can be shown from 0 before its first increase (a counter
#: that appears at 1 shows no increase to Prometheus). tests/cloud_ingest/test_prometheus.py
#: holds the decoders to this list.
CLOUD_QUARANTINE_REASONS = (
    "bad-topic",
    "too-large",
    "truncated",
    "bad-magic",
    "unsupported-version",
    "unsupported-codec",
    "bad-compression",
    "bad-header",
    "bad-window",
    "bad-sensor",
    "bad-column",
    "bad-sketch",
    "bad-device-id",
    "bad-seq",
    "device-mismatch",
    "bad-range",
    "bad-alert",
    "bad-health",
    "bad-result",  # a command's result (docs/commands.md)
    "bad-raw",  # raw readings a device sent on request (docs/wire-format.md §2.13)
    "sink-rejected",
    "undecodable",
    # per-device quotas (cloud_ingest/ingest/quotas.py)
    "time-too-old",
    "time-too-new",
    "time-span",
    "quota-sensors",
    "quota-series",
    "quota-new-series",
    "quota-tag-values",
)

#: Why cloud-ingest defers a message: acknowledged to the broker, not answered, so
#: that the device sends it again later. Never the device's loss.
CLOUD_DEFER_REASONS = (
    "rate",  # the device's message rate (cloud_ingest/ingest/quotas.py)
    "series-table-full",  # every device's series together: quotas.max_tracked_series
    "sink-limit",  # InfluxDB's state refused it (a series limit, a schema conflict)
    "archive-refused",  # the object store refused the object that holds it
)


class WireError(TelemetryError):
    """A wire message is malformed or invalid.

    ``reason`` is a short stable slug (``bad-magic``, ``too-large`` …) used as a
    counter label and as the quarantine folder name; the message is for people.
    """

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {message}")


class SinkError(TelemetryError):
    """A sink failed to store a batch."""


class RetryableSinkError(SinkError):
    """The sink is unavailable for now; the same write may succeed later."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class PermanentSinkError(SinkError):
    """The sink rejected the batch itself; retrying the same write cannot help."""


class SinkLimitError(SinkError):
    """The sink refuses this write because of its own state (a limit reached, a
    schema conflict made by another writer, a store that will not take the object),
    not because of the write: other writes still go through, and this one may later."""


#: Why a device refuses a command (docs/wire-format.md §2.11; shared/commands.py),
#: each counted as ``commands_refused_<reason>``.
COMMAND_REFUSALS = (
    "too-large",  # over MAX_COMMAND_BYTES
    "bad-command",  # not the envelope or body of §2.11
    "unknown-key",  # signed by a key the device does not hold
    "bad-signature",  # the signature does not verify
    "wrong-device",  # meant for another device
    "expired",  # expires_ns has passed on the device's clock
    "replayed",  # an id the device has seen (run once, answered once)
    "unknown-command",  # a kind this agent does not know
    "bad-args",  # the kind's arguments are not what it takes
    "stale-config",  # a desired config version not above the device's (docs/commands.md)
)
