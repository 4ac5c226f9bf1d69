"""The edge agent's typed config; the field defaults below are the defaults.

``edge_agent/sample.toml`` documents every key; a test checks that it loads and
lists every key that exists here.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from edge_agent.pipeline.alerts import AlertRule
from edge_agent.pipeline.kernels import KERNELS
from edge_agent.sources.config import (
    CanConfig,
    HostConfig,
    HttpConfig,
    ModbusConfig,
    SourceConfig,
)
from edge_agent.sources.transform import TransformRule
from shared import tags as tags_mod
from shared.auth import read_key
from shared.config import Invalid, positive
from shared.mqttlink import MqttLinkConfig
from shared.tls import require_tls
from shared.topics import (
    DEFAULT_BATCH_PREFIX,
    DEFAULT_BATCH_PREFIX_V2,
    DEFAULT_SENSOR_PREFIX,
    is_valid_id,
)
from shared.wire import WindowSpec


@dataclass(frozen=True)
class BrokerConfig(MqttLinkConfig):
    """A broker the agent talks to (shared/mqttlink.py has the keys). The cloud link
    ([forward.broker]) refuses plain MQTT to another machine unless ``insecure`` is
    true (``ForwardConfig`` checks it); the device broker ([intake.broker]) ignores it."""


@dataclass(frozen=True)
class IntakeBrokerConfig(BrokerConfig):
    """The device's own broker: retried every second at most, since a broker that
    came back without the agent's session (a power cut before its first save)
    queues nothing until the agent has subscribed again; bench/session_window.py
    measured that window at 1.6-2.8 s with 5 s, 0.4-0.5 s with 1 s."""

    reconnect_max_s: float = 1.0


@dataclass(frozen=True)
class StorageConfig:
    path: str = "edge-agent.sqlite"
    synchronous: Literal["full", "normal"] = "full"
    raw_retention_s: float = 24 * 3600.0
    group_commit_max: int = 16
    group_commit_ms: float = 20.0
    max_bytes: int = 1 << 30
    quarantine_max_bytes: int = 8 << 20
    quarantine_max_age_s: float = 7 * 24 * 3600.0
    #: readings stamped ahead of the clock, held until it allows them
    #: (edge_agent/pipeline/held.py); beyond either bound the oldest are dropped
    held_max_bytes: int = 64 << 20
    held_max_age_s: float = 7 * 24 * 3600.0

    def __post_init__(self) -> None:
        if not self.path:
            raise Invalid("path", "must not be empty")
        if self.raw_retention_s < 0:
            raise Invalid("raw_retention_s", "must be >= 0")
        positive("group_commit_max", self.group_commit_max)
        if self.group_commit_ms < 0:
            raise Invalid("group_commit_ms", "must be >= 0")
        if self.max_bytes != 0 and self.max_bytes < 1 << 20:
            raise Invalid("max_bytes", "must be 0 (no budget) or at least 1048576 (1 MiB)")
        if self.quarantine_max_bytes < 0:
            raise Invalid("quarantine_max_bytes", "must be >= 0 (0 = no cap of its own)")
        if self.quarantine_max_age_s < 0:
            raise Invalid("quarantine_max_age_s", "must be >= 0 (0 = kept until the cap)")
        if self.held_max_bytes < 0:
            raise Invalid("held_max_bytes", "must be >= 0 (0 = no cap of its own)")
        if self.held_max_age_s < 0:
            raise Invalid("held_max_age_s", "must be >= 0 (0 = kept until the cap)")


@dataclass(frozen=True)
class WindowConfig:
    width_s: float = 10.0
    lateness_s: float = 2.0
    max_future_s: float = 300.0
    max_age_s: float = 3600.0
    hop_s: float = 0.0
    flush_on_shutdown: bool = False
    sketches: bool = True
    kernel: str = "auto"

    def __post_init__(self) -> None:
        positive("width_s", self.width_s)
        if self.kernel not in KERNELS:
            raise Invalid("kernel", f"must be one of {', '.join(KERNELS)}")
        if self.width_s * 1e9 != int(self.width_s * 1e9):
            raise Invalid("width_s", "must be a whole number of nanoseconds")
        if self.lateness_s < 0:
            raise Invalid("lateness_s", "must be >= 0")
        if self.max_future_s < 0:
            raise Invalid("max_future_s", "must be >= 0")
        if self.max_age_s < 0:
            raise Invalid("max_age_s", "must be >= 0 (0 = drop late readings, no revisions)")
        if self.hop_s < 0:
            raise Invalid("hop_s", "must be >= 0 (0 = tumbling windows)")
        if self.hop_s:
            if self.width_ns % round(self.hop_s * 1e9) or self.hop_s > self.width_s:
                raise Invalid("hop_s", "must divide width_s (e.g. width 60, hop 10)")
            if self.max_age_s < self.width_s:
                raise Invalid(
                    "max_age_s",
                    "hopping windows need max_age_s >= width_s: a late "
                    "reading can belong to closed and open windows at once",
                )

    @property
    def width_ns(self) -> int:
        return round(self.width_s * 1e9)

    @property
    def hop_ns(self) -> int:
        """Distance between window starts (= width for tumbling windows)."""
        return round(self.hop_s * 1e9) if self.hop_s else self.width_ns

    @property
    def spec(self) -> WindowSpec:
        if self.hop_s and self.hop_ns != self.width_ns:
            return WindowSpec("hopping", self.width_ns, self.hop_ns)
        return WindowSpec("tumbling", self.width_ns)

    @property
    def max_age_ns(self) -> int:
        return round(self.max_age_s * 1e9)

    @property
    def max_future_ns(self) -> int:
        return round(self.max_future_s * 1e9)

    @property
    def lateness_ns(self) -> int:
        return round(self.lateness_s * 1e9)


#: the name of the agent's own chunk source in counters and `edge-agent status`
NATIVE_SOURCE = "sensors"


@dataclass(frozen=True)
class IntakeConfig:
    broker: IntakeBrokerConfig = field(default_factory=IntakeBrokerConfig)
    #: the agent's own chunk format is always read on <topic_prefix>/{node}/{sensor}
    #: (the source "sensors"); "" = not at all
    topic_prefix: str = DEFAULT_SENSOR_PREFIX
    sources: tuple[SourceConfig, ...] = ()
    http: HttpConfig = field(default_factory=HttpConfig)
    modbus: tuple[ModbusConfig, ...] = ()
    #: the gateway's own health (edge_agent/sources/host.py); off by default
    host: HostConfig = field(default_factory=HostConfig)
    #: CAN buses decoded with a DBC file (edge_agent/sources/can.py)
    can: tuple[CanConfig, ...] = ()
    transforms: tuple[TransformRule, ...] = ()

    def __post_init__(self) -> None:
        names = [s.name for s in self.sources] + [m.name for m in self.modbus]
        names += [c.name for c in self.can]
        if self.host.enabled:
            names.append(self.host.name)
        if self.topic_prefix:
            names.append(NATIVE_SOURCE)
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise Invalid(
                "sources",
                f"two sources (Modbus devices, [intake.host]) are named {dup!r}: names are unique"
                + (" (sensors is the agent's own chunk source)" if dup == NATIVE_SOURCE else ""),
            )
        if "http" in names or any(n.startswith("http-") for n in names):
            raise Invalid("sources", "the names http and http-* are the HTTP intake's")
        inputs = (self.topic_prefix, self.sources, self.http.enabled, self.modbus, self.can)
        if not any(inputs) and not self.host.enabled:
            raise Invalid(
                "topic_prefix",
                "the agent has no input: set topic_prefix, [[intake.sources]], "
                "[intake.http] enabled, [[intake.modbus]], [[intake.can]] or [intake.host] enabled",
            )

    @property
    def mqtt_sources(self) -> tuple[SourceConfig, ...]:
        """The agent's own chunk source (unless ``topic_prefix`` is ""), then the
        configured ones, in the order a message's topic is matched."""
        native = (
            (SourceConfig(name=NATIVE_SOURCE, topic=f"{self.topic_prefix}/{{node}}/{{sensor}}"),)
            if self.topic_prefix
            else ()
        )
        return native + self.sources


@dataclass(frozen=True)
class ForwardConfig:
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    topic_prefix: str = DEFAULT_BATCH_PREFIX
    max_in_flight: int = 16
    max_windows_per_batch: int = 5000
    #: a batch's bounds, within what the cloud takes from a device (its quotas and
    #: limits.max_payload_bytes): larger closes become several batches
    max_sensors_per_batch: int = 1000
    max_batch_bytes: int = 1_000_000
    message_expiry_s: int = 0
    drain_timeout_s: float = 10.0
    end_to_end_ack: bool = True
    live_window_s: float = 60.0
    backfill_bytes_per_s: int = 0
    #: close windows into batches at most this often (monotonic seconds): one batch
    #: then holds every window that closed meanwhile; 0 = at every tick
    batch_every_s: float = 0.0
    #: the batches' wire format: 1, or 2 (fewer bytes; on topic_prefix_v2, which
    #: the cloud must read first: docs/wire-format.md §2.14)
    wire_version: int = 1
    topic_prefix_v2: str = DEFAULT_BATCH_PREFIX_V2
    ack_timeout_s: float = 30.0
    max_backoff_s: float = 600.0
    #: this device's ack key (hex; `cloud-ingest device-key`): then only acks that
    #: verify are acted on
    ack_key_file: str = ""
    ack_key_env: str = ""

    def __post_init__(self) -> None:
        positive("max_in_flight", self.max_in_flight)
        read_key("ack_key", self.ack_key_file, self.ack_key_env)
        try:
            require_tls(self.broker.host, self.broker.tls, self.broker.insecure)
        except Invalid as exc:
            raise Invalid(f"broker.{exc.key}", exc.message) from None
        positive("max_windows_per_batch", self.max_windows_per_batch)
        if self.wire_version not in (1, 2):
            raise Invalid("wire_version", "must be 1 or 2")
        if not self.topic_prefix_v2 or self.topic_prefix_v2 == self.topic_prefix:
            raise Invalid("topic_prefix_v2", "must be set, and differ from topic_prefix")
        if not 0 <= self.batch_every_s <= 86400:
            raise Invalid("batch_every_s", "must be 0-86400 seconds (0 = at every window close)")
        if self.max_windows_per_batch > 65535:
            raise Invalid("max_windows_per_batch", "must be <= 65535")
        if not 1 <= self.max_sensors_per_batch <= 65535:
            raise Invalid("max_sensors_per_batch", "must be 1-65535")
        if self.max_batch_bytes < 4096:
            raise Invalid("max_batch_bytes", "must be at least 4096")
        if self.message_expiry_s < 0:
            raise Invalid("message_expiry_s", "must be >= 0 (0 = never expires)")
        if self.drain_timeout_s < 0:
            raise Invalid("drain_timeout_s", "must be >= 0")
        positive("ack_timeout_s", self.ack_timeout_s)
        if self.live_window_s < 0:
            raise Invalid("live_window_s", "must be >= 0")
        if self.backfill_bytes_per_s < 0:
            raise Invalid("backfill_bytes_per_s", "must be >= 0 (0 = no cap)")
        if self.max_backoff_s < self.ack_timeout_s:
            raise Invalid("max_backoff_s", "must be >= ack_timeout_s")


@dataclass(frozen=True)
class HealthConfig:
    """The agent's health report to the cloud (edge_agent/pipeline/health.py)."""

    #: a report every this many seconds, and at once when a problem starts or ends;
    #: 0 = no reports (for a cloud broker whose ACL does not allow …/health yet)
    interval_s: float = 60.0
    #: "behind" when the oldest unsent batch is older than this
    behind_after_s: float = 600.0
    #: "near-budget" when the buffer uses more than this share of storage.max_bytes
    near_budget: float = 0.9
    #: reports kept while the link is down; beyond this the oldest is dropped
    #: (counted as dropped_health): a day's worth at the default interval
    max_unsent: int = 1440

    def __post_init__(self) -> None:
        if self.interval_s != 0 and self.interval_s < 1:
            raise Invalid("interval_s", "must be at least 1 second, or 0 (no reports)")
        positive("behind_after_s", self.behind_after_s)
        if not 0 < self.near_budget <= 1:
            raise Invalid("near_budget", "must be in (0, 1]")
        if self.max_unsent < 1:
            raise Invalid("max_unsent", "must be at least 1")


@dataclass(frozen=True)
class NodeTags:
    """Static tags for the sensors of the nodes that ``match`` (a glob on the node)."""

    match: str
    tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.match:
            raise Invalid("match", "must be a glob on the node, e.g. 'kitchen-*'")
        try:
            tags_mod.parse(self.tags)
        except ValueError as exc:
            raise Invalid("tags", str(exc)) from None


@dataclass(frozen=True)
class CommandKey:
    """A key the operators sign commands with (docs/commands.md): ``id`` is the
    name commands give it, ``file`` its public half (PEM, from `cloud-ingest
    command keygen`)."""

    id: str
    file: str

    def __post_init__(self) -> None:
        if not is_valid_id(self.id):
            raise Invalid("id", "must be 1-64 characters of A-Z a-z 0-9 _ . -")
        try:
            from shared.commands import load_public
        except ImportError:
            raise Invalid(
                "file",
                "commands need the cryptography package: pip install 'iot-telemetry[commands]'",
            ) from None
        try:
            load_public(Path(self.file))
        except (OSError, ValueError) as exc:
            raise Invalid("file", f"not an Ed25519 public key (PEM): {exc}"[:200]) from None


@dataclass(frozen=True)
class CommandsConfig:
    """Commands from the operators: off unless a key is given."""

    keys: tuple[CommandKey, ...] = ()
    #: a ``raw`` command sends at most this many readings (16 bytes each in the
    #: buffer until the cloud acks them); beyond, the answer says where to go on from
    raw_max_readings: int = 1_000_000
    #: a desired config (a `config` command) is on trial this long: rolled back if
    #: the cloud's acks or the readings stop within it (docs/commands.md)
    config_grace_s: float = 300.0

    def __post_init__(self) -> None:
        ids = [k.id for k in self.keys]
        if len(set(ids)) != len(ids):
            raise Invalid("keys", "two keys have the same id")
        positive("raw_max_readings", self.raw_max_readings)
        positive("config_grace_s", self.config_grace_s)

    @property
    def enabled(self) -> bool:
        return bool(self.keys)


@dataclass(frozen=True)
class AgentConfig:
    device_id: str = "device-1"
    tick_s: float = 0.2
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    storage: StorageConfig = field(default_factory=StorageConfig)
    window: WindowConfig = field(default_factory=WindowConfig)
    intake: IntakeConfig = field(default_factory=IntakeConfig)
    forward: ForwardConfig = field(default_factory=ForwardConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    commands: CommandsConfig = field(default_factory=CommandsConfig)
    alerts: tuple[AlertRule, ...] = ()
    #: static tags of every sensor of this device: "key=value" (site, building …)
    tags: tuple[str, ...] = ()
    #: more tags for the sensors of some nodes: the first table whose match fits
    node_tags: tuple[NodeTags, ...] = ()

    def __post_init__(self) -> None:
        if not is_valid_id(self.device_id):
            raise Invalid("device_id", "must be 1-64 characters of A-Z a-z 0-9 _ . -")
        try:
            base = tags_mod.parse(self.tags)
        except ValueError as exc:
            raise Invalid("tags", str(exc)) from None
        for i, rule in enumerate(self.node_tags):
            if len(tags_mod.merge(base, tags_mod.parse(rule.tags))) > tags_mod.MAX_TAGS:
                raise Invalid(f"node_tags[{i}].tags", f"with tags, more than {tags_mod.MAX_TAGS}")
        positive("tick_s", self.tick_s)
        names = [r.name for r in self.alerts]
        if len(set(names)) != len(names):
            raise Invalid("alerts", "rule names must be unique")
        for i, r in enumerate(self.alerts):
            if r.capture is not None and r.capture.before_s > self.storage.raw_retention_s:
                raise Invalid(
                    f"alerts[{i}].capture.before_s",
                    "must be <= storage.raw_retention_s: the buffer keeps raw readings no longer",
                )
        if self.window.max_age_s > self.storage.raw_retention_s:
            raise Invalid(
                "window.max_age_s",
                "must be <= storage.raw_retention_s: a revision "
                "is computed from the raw readings, which must still be there",
            )


def sensor_tags(cfg: AgentConfig) -> Callable[[str], tags_mod.Tags]:
    """The tags of a node's sensors: the device's, then the first matching
    ``node_tags`` table's (which win)."""
    base = tags_mod.parse(cfg.tags)
    rules = [(r.match, tags_mod.parse(r.tags)) for r in cfg.node_tags]

    def of(node: str) -> tags_mod.Tags:
        for match, extra in rules:
            if fnmatch.fnmatchcase(node, match):
                return tags_mod.merge(base, extra)
        return base

    return of
