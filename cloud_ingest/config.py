"""cloud-ingest's typed config; the field defaults below are the defaults.

``cloud_ingest/sample.toml`` documents every key.
"""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass, field
from typing import Literal

from shared.auth import check_secret, read_key, read_secret
from shared.config import Invalid, port, positive
from shared.mqttlink import MqttLinkConfig
from shared.tags import RESERVED, TAG_KEY
from shared.tls import is_loopback, require_tls
from shared.topics import DEFAULT_BATCH_PREFIX, DEFAULT_BATCH_PREFIX_V2
from shared.wire import MAX_BODY_BYTES, MAX_PAYLOAD_BYTES


@dataclass(frozen=True)
class MqttConfig(MqttLinkConfig):
    """The ingestors' broker: the link's keys (shared/mqttlink.py) and what to
    subscribe to."""

    client_id: str = "cloud-ingest-1"
    topic_prefix: str = DEFAULT_BATCH_PREFIX
    #: batches of wire format v2 (docs/wire-format.md §2.14) are read here too;
    #: "" = v1 only
    topic_prefix_v2: str = DEFAULT_BATCH_PREFIX_V2
    subscription: str = ""
    #: the v2 batches' subscription instead of <topic_prefix_v2>/+/batch (a
    #: shared group: $share/<group>/telemetry/v2/+/batch)
    subscription_v2: str = ""
    alert_subscription: str = ""
    health_subscription: str = ""
    result_subscription: str = ""
    raw_subscription: str = ""
    receive_maximum: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        require_tls(self.host, self.tls, self.insecure)
        if not 1 <= self.receive_maximum <= 65535:
            raise Invalid("receive_maximum", "must be 1-65535")
        if self.topic_prefix_v2 == self.topic_prefix:
            raise Invalid("topic_prefix_v2", "must differ from topic_prefix (or be empty)")
        if not self.client_id:
            raise Invalid("client_id", "must not be empty (the persistent session is keyed by it)")


@dataclass(frozen=True)
class InfluxConfig:
    api: Literal["v1", "v2"] = "v1"
    url: str = "http://127.0.0.1:8086"
    database: str = "telemetry"
    retention_policy: str = ""
    username: str = ""
    #: the password inline, or (better) the file or environment variable holding it
    password: str = ""
    password_file: str = ""
    password_env: str = ""
    org: str = ""
    bucket: str = "telemetry"
    token: str = ""
    token_file: str = ""
    token_env: str = ""
    measurement: str = "window"
    alert_measurement: str = "alert"
    health_measurement: str = "agent_health"
    result_measurement: str = "command_result"
    #: raw readings a device sent on request (docs/commands.md) also go to InfluxDB,
    #: into this measurement; empty = the lake only
    raw_measurement: str = ""
    timeout_s: float = 10.0
    #: Points of concurrently handled batches go out together, up to this many per request.
    max_lines_per_write: int = 5000
    #: the sensors' static tags (the agents' `tags`/`node_tags`) written as tags: only
    #: these keys, so that the series count stays the operator's choice
    tag_keys: tuple[str, ...] = ("site", "building", "room")
    #: credentials over plain http:// to another machine only if true (as [mqtt])
    insecure: bool = False

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise Invalid("url", f"must start with http:// or https://, got {self.url!r}")
        host = urllib.parse.urlsplit(self.url).hostname or ""
        secret = self.password or self.password_file or self.password_env
        secret = secret or self.token or self.token_file or self.token_env or self.username
        plain = self.url.startswith("http://") and not is_loopback(host)
        if plain and secret and not self.insecure:
            raise Invalid(
                "insecure",
                f"credentials over plain http:// to {host}: use an https:// url, or "
                "insecure = true to send them in clear",
            )
        positive("timeout_s", self.timeout_s)
        if self.max_lines_per_write < 1:
            raise Invalid("max_lines_per_write", "must be at least 1")
        if not self.measurement:
            raise Invalid("measurement", "must not be empty")
        for key in self.tag_keys:
            if not TAG_KEY.match(key) or key in RESERVED:
                raise Invalid("tag_keys", f"{key!r} cannot be a tag key (shared/tags.py)")
        check_secret("password", self.password, self.password_file, self.password_env)
        check_secret("token", self.token, self.token_file, self.token_env)

    @property
    def allowed_tags(self) -> frozenset[str]:
        return frozenset(self.tag_keys)

    def password_value(self) -> str:
        return read_secret(self.password, self.password_file, self.password_env)

    def token_value(self) -> str:
        return read_secret(self.token, self.token_file, self.token_env)


@dataclass(frozen=True)
class ArchiveConfig:
    url: str = "file://./archive"
    s3_endpoint_url: str = ""
    s3_region: str = "us-east-1"
    #: Objects written at the same time. Each put is a blocking call (an fsync, or an
    #: S3 request of tens of ms); they run in their own threads, off the CPU work.
    max_concurrent_puts: int = 16

    def __post_init__(self) -> None:
        if not 1 <= self.max_concurrent_puts <= 256:
            raise Invalid("max_concurrent_puts", "must be 1-256")
        if not self.url.startswith(("file://", "s3://")):
            raise Invalid(
                "url", f"must be file://<dir> or s3://<bucket>/<prefix>, got {self.url!r}"
            )
        if self.url.startswith("s3://") and not self.url[len("s3://") :].split("/")[0]:
            raise Invalid("url", "s3:// URL has no bucket")


@dataclass(frozen=True)
class RetryConfig:
    initial_s: float = 0.5
    max_s: float = 30.0
    shutdown_grace_s: float = 10.0

    def __post_init__(self) -> None:
        positive("initial_s", self.initial_s)
        positive("max_s", self.max_s)
        if self.shutdown_grace_s < 0:
            raise Invalid("shutdown_grace_s", "must be >= 0")


@dataclass(frozen=True)
class LimitsConfig:
    max_payload_bytes: int = MAX_PAYLOAD_BYTES
    max_body_bytes: int = MAX_BODY_BYTES

    def __post_init__(self) -> None:
        positive("max_payload_bytes", self.max_payload_bytes)
        positive("max_body_bytes", self.max_body_bytes)


@dataclass(frozen=True)
class HttpConfig:
    listen: str = ""

    def __post_init__(self) -> None:
        if self.listen:
            _host, sep, p = self.listen.rpartition(":")
            if not sep or not p.isdigit():
                raise Invalid("listen", f"must be host:port, got {self.listen!r}")
            port("listen", int(p))


@dataclass(frozen=True)
class AcksConfig:
    """The master key that signs acks (shared/acks.py): hex, 32 bytes or more, in a
    file (not readable by every user) or an environment variable. Empty: unsigned."""

    key_file: str = ""
    key_env: str = ""

    def __post_init__(self) -> None:
        read_key("key", self.key_file, self.key_env)

    def master_key(self) -> bytes | None:
        return read_key("key", self.key_file, self.key_env)


@dataclass(frozen=True)
class FleetConfig:
    """What the ingestor remembers of each device (cloud_ingest/ingest/registry.py)."""

    #: devices whose last-heard time and latest health are kept (and exported to
    #: Prometheus); beyond this the one heard from least recently is forgotten
    max_devices: int = 10_000
    #: a device's health is on /metrics this long after its newest report arrived
    health_fresh_s: float = 900.0

    def __post_init__(self) -> None:
        if not 1 <= self.max_devices <= 1_000_000:
            raise Invalid("max_devices", "must be 1-1000000")
        positive("health_fresh_s", self.health_fresh_s)


@dataclass(frozen=True)
class QuotasConfig:
    """What one device may cost the fleet (cloud_ingest/ingest/quotas.py, and
    docs/cloud-ingest.md "What one device can cost the fleet")."""

    #: a window or alert may start at most this long before the ingestor's clock:
    #: set it to the retention of InfluxDB's retention policy (90 days by default)
    max_past_s: float = 90 * 86400.0
    #: ... and at most this long after it
    max_future_s: float = 86400.0
    #: the windows of one batch may span at most this much (2 UTC days of the lake)
    max_batch_span_s: float = 86400.0
    max_sensors_per_batch: int = 1000
    max_series_per_device: int = 2000
    max_new_series_per_day: int = 500
    #: distinct values of a device's unit, and of each static tag written as a tag
    max_tag_values: int = 64
    #: a series not seen this long is forgotten (0: max_past_s)
    series_expiry_s: float = 0.0
    max_messages_per_s: float = 200.0
    burst_messages: int = 2000
    #: quarantine entries kept per device a minute (the rest are counted)
    max_quarantined_per_min: int = 60
    #: where each device's series are remembered across restarts ("" = memory only)
    state_file: str = ""
    #: series of all devices together; beyond it, new series are deferred
    max_tracked_series: int = 2_000_000

    def __post_init__(self) -> None:
        positive("max_past_s", self.max_past_s)
        positive("max_future_s", self.max_future_s)
        positive("max_batch_span_s", self.max_batch_span_s)
        for name in (
            "max_sensors_per_batch",
            "max_series_per_device",
            "max_new_series_per_day",
            "max_tag_values",
            "burst_messages",
            "max_quarantined_per_min",
            "max_tracked_series",
        ):
            if getattr(self, name) < 1:
                raise Invalid(name, "must be at least 1")
        positive("max_messages_per_s", self.max_messages_per_s)
        if self.series_expiry_s < 0:
            raise Invalid("series_expiry_s", "must be >= 0 (0 = max_past_s)")
        if self.max_sensors_per_batch > 65536:
            raise Invalid("max_sensors_per_batch", "must be <= 65536 (a batch's own bound)")
        if self.state_file and not os.path.isdir(os.path.dirname(self.state_file) or "."):
            raise Invalid(
                "state_file", f"the folder of {self.state_file} does not exist: create it first"
            )


@dataclass(frozen=True)
class IngestConfig:
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    #: Threads for decoding, Parquet encoding and InfluxDB requests (puts: archive).
    worker_threads: int = 2
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    influx: InfluxConfig = field(default_factory=InfluxConfig)
    archive: ArchiveConfig = field(default_factory=ArchiveConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    acks: AcksConfig = field(default_factory=AcksConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    quotas: QuotasConfig = field(default_factory=QuotasConfig)

    def __post_init__(self) -> None:
        if not 1 <= self.worker_threads <= 64:
            raise Invalid("worker_threads", "must be 1-64")
