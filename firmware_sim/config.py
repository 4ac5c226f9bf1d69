"""firmware-sim's typed config; the field defaults below are the defaults."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from shared import backoff
from shared.auth import AuthConfig
from shared.config import Invalid, port, positive
from shared.tls import TlsConfig
from shared.topics import DEFAULT_SENSOR_PREFIX, is_valid_id

#: What a sensor measures; firmware_sim/parts.py names the part behind each kind
#: and the resolution it reports at.
SensorKind = Literal["temperature", "humidity", "pressure", "adc", "vibration"]
#: How a node publishes (firmware_sim/families.py; docs/devices.md has the agent's
#: side of each): the agent's own chunks, or as a real device family does.
Family = Literal["native", "esphome", "tasmota", "zigbee2mqtt", "telegraf", "influx-http"]


@dataclass(frozen=True)
class SensorSpec:
    name: str
    kind: SensorKind
    rate_hz: float
    chunk: int = 1
    unit: str = ""
    delay_s: float = 0.0
    #: the step readings are rounded to, in the sensor's unit; None = the part's
    #: (firmware_sim/parts.py), 0 = full-precision noise
    resolution: float | None = None

    def __post_init__(self) -> None:
        if not is_valid_id(self.name):
            raise Invalid("name", "must be 1-64 characters of A-Z a-z 0-9 _ . -")
        positive("rate_hz", self.rate_hz)
        if self.resolution is not None and not self.resolution >= 0:
            raise Invalid("resolution", "must be >= 0 (0 = full precision)")
        positive("chunk", self.chunk)
        if self.delay_s < 0:
            raise Invalid("delay_s", "must be >= 0")
        if 1e9 / self.rate_hz != int(1e9 / self.rate_hz):
            raise Invalid("rate_hz", "1e9 / rate_hz must be a whole number of nanoseconds")


@dataclass(frozen=True)
class NodeSpec:
    id: str
    sensors: tuple[SensorSpec, ...] = ()
    family: Family = "native"

    def __post_init__(self) -> None:
        if not is_valid_id(self.id):
            raise Invalid("id", "must be 1-64 characters of A-Z a-z 0-9 _ . -")
        if self.family == "tasmota" and any(
            s.rate_hz > 1 or 1e9 / s.rate_hz % 1e9 for s in self.sensors
        ):
            raise Invalid("sensors", "a tasmota node's readings are whole seconds apart")
        if not self.sensors:
            raise Invalid("sensors", "a node needs at least one sensor")
        names = [s.name for s in self.sensors]
        if len(set(names)) != len(names):
            raise Invalid("sensors", "sensor names must be unique within a node")


DEFAULT_NODES = (
    NodeSpec(
        "env-1",
        (
            SensorSpec("temperature", "temperature", rate_hz=1.0, unit="degC"),
            SensorSpec("humidity", "humidity", rate_hz=1.0, unit="%RH"),
        ),
    ),
    NodeSpec("motor-1", (SensorSpec("vibration", "vibration", rate_hz=200.0, chunk=20, unit="g"),)),
)


@dataclass(frozen=True)
class SimBrokerConfig:
    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = "firmware-sim"
    reconnect_min_s: float = backoff.DEFAULT_MIN_S
    reconnect_max_s: float = backoff.DEFAULT_MAX_S
    #: the broker may be unreachable (or keep messages unacknowledged at the end)
    #: this long before the simulator gives up with an error
    give_up_s: float = 300.0
    tls: TlsConfig = field(default_factory=TlsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)

    def __post_init__(self) -> None:
        port("port", self.port)
        backoff.check(self.reconnect_min_s, self.reconnect_max_s)
        positive("give_up_s", self.give_up_s)


@dataclass(frozen=True)
class SimConfig:
    seed: int = 42
    duration_s: float = 60.0
    speed: float = 1.0
    start_ns: int = 0
    truth_path: str = "firmware-sim-truth.jsonl"
    topic_prefix: str = DEFAULT_SENSOR_PREFIX
    broker: SimBrokerConfig = field(default_factory=SimBrokerConfig)
    nodes: tuple[NodeSpec, ...] = DEFAULT_NODES
    #: influx-http nodes post line protocol to this agent's HTTP intake
    http_url: str = "http://127.0.0.1:8086"
    #: tasmota nodes send local time without a zone, in this IANA zone
    timezone: str = "Europe/Berlin"

    def __post_init__(self) -> None:
        positive("duration_s", self.duration_s)
        positive("speed", self.speed)
        if self.start_ns < 0:
            raise Invalid("start_ns", "must be >= 0 (0 = now)")
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise Invalid("timezone", f"unknown time zone {self.timezone!r}") from None
        if not self.http_url.startswith(("http://", "https://")):
            raise Invalid("http_url", "must start with http:// or https://")
        ids = [n.id for n in self.nodes]
        if not ids:
            raise Invalid("nodes", "at least one node is needed")
        if len(set(ids)) != len(ids):
            raise Invalid("nodes", "node ids must be unique")
