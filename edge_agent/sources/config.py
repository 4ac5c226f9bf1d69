"""The config of input sources: ``[[intake.sources]]`` (MQTT subscriptions),
``[intake.http]`` (the InfluxDB-compatible HTTP intake) and ``[[intake.transforms]]``.
``edge_agent/sample.toml`` documents every key."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Literal

from edge_agent.sources.template import TopicTemplate
from edge_agent.sources.timestamps import TimeFormat, TimeUnit, zone
from edge_agent.sources.values import parse_states
from shared.auth import check_secret, read_secret
from shared.config import Invalid, port, positive
from shared.tls import is_loopback
from shared.topics import is_valid_id, is_valid_unit

Format = Literal["chunk", "value", "json", "influx", "telegraf-json", "csv"]
#: what to do with a retained message whose readings carry no time of their own
#: (docs/devices.md, "Retained messages")
Retained = Literal["skip", "once"]
MAX_PAYLOAD_BYTES = 4 << 20  # a chunk of 100,000 readings in JSON fits in about 4 MB


@dataclass(frozen=True)
class SourceConfig:
    """One MQTT subscription and how to read what arrives on it."""

    #: the source's name in counters and `edge-agent status`
    name: str
    #: topic template: levels may be {node}, {sensor}, + or (last) #
    topic: str
    format: Format = "chunk"
    qos: int = 1
    #: the node when the topic does not name one (influx: when a line has no node_tag)
    node: str = ""
    #: value and csv formats: the sensor when the topic does not name one
    sensor: str = ""
    #: the unit of every reading of this source (a transform can set one per sensor)
    unit: str = ""
    #: value format: payloads that are not readings and not errors either (Home
    #: Assistant's "unavailable"), matched without case; counted, not quarantined
    ignore: tuple[str, ...] = ()
    #: texts that are readings, as "text=number" (empty: ON=1, OFF=0, true=1,
    #: false=0); matched exactly (edge_agent/sources/values.py)
    states: tuple[str, ...] = ()
    #: json: globs on field paths (dots between levels: BME280.Temperature, and
    #: array elements: ENERGY.Power.0) to take (empty = all fields) and to leave
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    #: json: the path of the object to read (Shelly's events: "params"); "" = all
    root: str = ""
    #: json: the field holding the reading's time ("" = stamped on arrival)
    time_field: str = ""
    #: json time_field and csv time column: rfc3339, s, ms, us, ns, or local (local
    #: time without a zone, in `timezone`)
    time_format: TimeFormat = "rfc3339"
    timezone: str = ""
    #: influx: the unit of line timestamps
    precision: TimeUnit = "ns"
    #: influx: the tag naming the node
    node_tag: str = "host"
    #: influx, telegraf-json: every tag but node_tag and ignore_tags is part of the
    #: sensor's name (as of an InfluxDB series key); sensor_tags come first, in
    #: this order, then the others by key
    sensor_tags: tuple[str, ...] = ()
    ignore_tags: tuple[str, ...] = ()
    #: a retained message without times of its own: "skip" (not a reading: the
    #: broker replays it at every subscription) or "once" (each retained value
    #: stored once, at its first arrival)
    retained: Retained = "skip"
    max_bytes: int = MAX_PAYLOAD_BYTES

    def __post_init__(self) -> None:
        if not is_valid_id(self.name):
            raise Invalid("name", "must be 1-64 characters of A-Z a-z 0-9 _ . -")
        tpl = TopicTemplate.parse(self.topic)
        if self.qos not in (0, 1, 2):
            raise Invalid("qos", "must be 0, 1 or 2")
        for key, value in (("node", self.node), ("sensor", self.sensor)):
            if value and not is_valid_id(value):
                raise Invalid(key, "must be 1-64 characters of A-Z a-z 0-9 _ . -")
        if not is_valid_unit(self.unit):
            raise Invalid("unit", "must be at most 32 printable characters")
        if self.format == "chunk" and not (tpl.names_node and tpl.names_sensor):
            raise Invalid("topic", "the chunk format needs {node} and {sensor} in the topic")
        if self.format not in ("influx", "telegraf-json") and not tpl.names_node and not self.node:
            raise Invalid("node", "the topic has no {node}: set node")
        if self.format in ("value",) and not tpl.names_sensor and not self.sensor:
            raise Invalid("sensor", "the topic has no {sensor}: set sensor")
        if self.time_format == "local" and not self.timezone:
            raise Invalid("timezone", "time_format 'local' needs a timezone (e.g. 'Europe/Berlin')")
        zone(self.timezone)
        if not 1 <= self.max_bytes <= 64 << 20:
            raise Invalid("max_bytes", "must be 1 to 67108864 (64 MiB)")
        parse_states(self.states)
        for t in self.sensor_tags:
            if t in self.ignore_tags or t == self.node_tag:
                raise Invalid("sensor_tags", f"tag {t!r} is also node_tag or in ignore_tags")

    @functools.cached_property
    def template(self) -> TopicTemplate:
        return TopicTemplate.parse(self.topic)

    @functools.cached_property
    def state_table(self) -> dict[str, float]:
        return parse_states(self.states)


@dataclass(frozen=True)
class HttpConfig:
    """The HTTP intake: InfluxDB's v1 and v2 write endpoints, plus JSON and CSV."""

    enabled: bool = False
    #: loopback by default: devices on the LAN need host = "0.0.0.0" and a token
    host: str = "127.0.0.1"
    port: int = 8086
    #: the node for lines without node_tag, and for JSON and CSV bodies without ?node=
    node: str = "http"
    node_tag: str = "host"
    #: as the same keys of [[intake.sources]]
    sensor_tags: tuple[str, ...] = ()
    ignore_tags: tuple[str, ...] = ()
    states: tuple[str, ...] = ()
    #: json bodies: as the same keys of [[intake.sources]]
    time_field: str = ""
    time_format: TimeFormat = "rfc3339"
    timezone: str = ""
    max_body_bytes: int = 8 << 20
    #: requests served at once (a request takes one once its head is in and
    #: authenticated); more are answered 503 with Retry-After
    max_connections: int = 8
    #: connections whose request head is still coming in; more are answered 503
    max_pending: int = 32
    #: a connection's whole request head (request line and headers) must be in
    #: within this, or the connection is closed (a slow client cannot hold it)
    head_timeout_s: float = 10.0
    #: a body that sends nothing for this long is closed
    timeout_s: float = 30.0
    #: a token the clients must send (`Authorization: Token …` or `Bearer …`, or
    #: v1's `u`/`p` parameters with p = the token); unset = no authentication
    token_file: str = ""
    token_env: str = ""
    #: without a token, a host other than loopback is refused unless this is true
    allow_unauthenticated: bool = False

    def __post_init__(self) -> None:
        port("port", self.port)
        if not is_valid_id(self.node):
            raise Invalid("node", "must be 1-64 characters of A-Z a-z 0-9 _ . -")
        if not 1024 <= self.max_body_bytes <= 64 << 20:
            raise Invalid("max_body_bytes", "must be 1024 to 67108864 (64 MiB)")
        positive("max_connections", self.max_connections)
        positive("max_pending", self.max_pending)
        for key in ("timeout_s", "head_timeout_s"):
            if not math.isfinite(getattr(self, key)):
                raise Invalid(key, "must be a finite number")
            positive(key, getattr(self, key))
        zone(self.timezone)
        parse_states(self.states)
        token = self.token()
        if token is None and not self.allow_unauthenticated and not is_loopback(self.host):
            raise Invalid(
                "token_file",
                f"host {self.host} takes writes from the network: give it a token "
                "(token_file or token_env), or allow_unauthenticated = true",
            )

    def token(self) -> str | None:
        """The token clients must send, or None (no authentication). Read at start."""
        check_secret("token", "", self.token_file, self.token_env)
        if not (self.token_file or self.token_env):
            return None
        value = read_secret("", self.token_file, self.token_env).strip()
        if len(value) < 16:
            raise Invalid(
                "token_file" if self.token_file else "token_env",
                "a token of at least 16 characters",
            )
        return value

    def source(self, fmt: Format, name: str) -> SourceConfig:
        """The settings of one endpoint as a source (for the decoders and counters)."""
        return SourceConfig(
            name=name,
            topic="{node}/{sensor}",
            format=fmt,
            node=self.node,
            node_tag=self.node_tag,
            sensor_tags=self.sensor_tags,
            ignore_tags=self.ignore_tags,
            states=self.states,
            time_field=self.time_field,
            time_format=self.time_format,
            timezone=self.timezone,
            max_bytes=self.max_body_bytes,
        )


RegisterKind = Literal["holding", "input"]
RegisterType = Literal[
    "int16", "uint16", "int32", "uint32", "float32", "int64", "uint64", "float64"
]
#: 16-bit registers per value of each type
REGISTER_WORDS = {
    "int16": 1,
    "uint16": 1,
    "int32": 2,
    "uint32": 2,
    "float32": 2,
    "int64": 4,
    "uint64": 4,
    "float64": 4,
}


@dataclass(frozen=True)
class Register:
    """One value in a Modbus device's register map."""

    sensor: str
    #: the first register's address (0-based, as on the wire: 30001 is input 0)
    address: int
    kind: RegisterKind = "holding"
    type: RegisterType = "uint16"
    #: for values of two or four registers: "big" = the first register holds the
    #: most significant word (Modbus's usual order), "little" = the least
    word_order: Literal["big", "little"] = "big"
    #: stored value = raw * scale + offset
    scale: float = 1.0
    offset: float = 0.0
    unit: str = ""

    def __post_init__(self) -> None:
        if not is_valid_id(self.sensor):
            raise Invalid("sensor", "must be 1-64 characters of A-Z a-z 0-9 _ . -")
        if not 0 <= self.address <= 65535 - REGISTER_WORDS[self.type] + 1:
            raise Invalid("address", "must be 0-65535 (0-based)")
        if not (math.isfinite(self.scale) and math.isfinite(self.offset)) or self.scale == 0:
            raise Invalid("scale", "scale (not 0) and offset must be finite numbers")
        if not is_valid_unit(self.unit):
            raise Invalid("unit", "must be at most 32 printable characters")

    @property
    def words(self) -> int:
        return REGISTER_WORDS[self.type]


@dataclass(frozen=True)
class RegisterMap:
    """A register map file: ``[[registers]]`` tables (docs/examples/modbus-sdm120.toml)."""

    registers: tuple[Register, ...] = ()


@dataclass(frozen=True)
class ModbusConfig:
    """A Modbus device polled by the agent: over TCP (host) or RTU (serial_port)."""

    #: the source's name in counters and `edge-agent status`
    name: str
    #: the node its readings belong to
    node: str
    #: Modbus TCP: the device's (or gateway's) address and port
    host: str = ""
    port: int = 502
    #: Modbus RTU: the serial port (/dev/ttyUSB0) and its settings
    serial_port: str = ""
    baudrate: int = 9600
    parity: Literal["N", "E", "O"] = "N"
    stopbits: int = 1
    #: the device's unit id (slave address), 0-247
    unit_id: int = 1
    #: seconds between polls
    interval_s: float = 10.0
    #: a request without an answer after this long counts as an error
    timeout_s: float = 1.0
    #: the register map: these tables, and/or a file of [[registers]] tables
    registers: tuple[Register, ...] = ()
    register_map: str = ""
    #: unmapped registers one read may span between two values (fewer requests;
    #: 0 = only contiguous values share a read, for devices that refuse the gaps)
    read_gap: int = 0

    def __post_init__(self) -> None:
        if not is_valid_id(self.name) or self.name.startswith("http"):
            raise Invalid("name", "must be 1-64 characters of A-Z a-z 0-9 _ . -, not http*")
        if not is_valid_id(self.node):
            raise Invalid("node", "must be 1-64 characters of A-Z a-z 0-9 _ . -")
        if bool(self.host) == bool(self.serial_port):
            raise Invalid("host", "give host (Modbus TCP) or serial_port (RTU), not both")
        port("port", self.port)
        if not 0 <= self.unit_id <= 247:
            raise Invalid("unit_id", "must be 0-247")
        if not math.isfinite(self.interval_s) or self.interval_s < 0.1:
            raise Invalid("interval_s", "must be at least 0.1")
        positive("timeout_s", self.timeout_s)
        if self.timeout_s >= self.interval_s:
            raise Invalid("timeout_s", "must be shorter than interval_s")
        if not 0 <= self.read_gap <= 100:
            raise Invalid("read_gap", "must be 0-100")
        if self.stopbits not in (1, 2):
            raise Invalid("stopbits", "must be 1 or 2")
        positive("baudrate", self.baudrate)
        regs = self.all_registers()
        if not regs:
            raise Invalid("registers", "a Modbus source needs registers or a register_map")
        names = [r.sensor for r in regs]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise Invalid("registers", f"two registers are the sensor {dup!r}")

    def all_registers(self) -> tuple[Register, ...]:
        """The tables here, then the map file's."""
        if not self.register_map:
            return self.registers
        from shared.config import load_config
        from shared.errors import ConfigError

        try:
            loaded = load_config(RegisterMap, self.register_map)
        except ConfigError as exc:
            raise Invalid("register_map", str(exc)) from None
        return self.registers + loaded.registers


@dataclass(frozen=True)
class HostConfig:
    """The gateway's own health as readings (edge_agent/sources/host.py)."""

    #: off by default: each device's metrics are about 20 more series in the cloud
    #: (its quotas, InfluxDB's cardinality) and bytes on the uplink; an operator's choice
    enabled: bool = False
    #: the source's name in counters and `edge-agent status`
    name: str = "host"
    #: the node its readings belong to
    node: str = "host"
    #: seconds between samples
    interval_s: float = 10.0
    #: the Raspberry Pi firmware's throttling word in sysfs; "" = not read
    throttled_path: str = "/sys/devices/platform/soc/soc:firmware/get_throttled"
    #: else this program's ``get_throttled``, if it is on PATH; "" = not run
    vcgencmd: str = "vcgencmd"

    def __post_init__(self) -> None:
        if not is_valid_id(self.name) or self.name.startswith("http"):
            raise Invalid("name", "must be 1-64 characters of A-Z a-z 0-9 _ . -, not http*")
        if not is_valid_id(self.node):
            raise Invalid("node", "must be 1-64 characters of A-Z a-z 0-9 _ . -")
        if not math.isfinite(self.interval_s) or self.interval_s < 0.1:
            raise Invalid("interval_s", "must be at least 0.1")


@dataclass(frozen=True)
class CanConfig:
    """A CAN bus read by the agent and decoded with a DBC file (edge_agent/sources/can.py)."""

    #: the source's name in counters and `edge-agent status`
    name: str
    #: the node its readings belong to
    node: str
    #: the DBC file that names the frames and their signals
    dbc: str
    #: python-can's interface and channel: "socketcan" and "can0" on a Pi's CAN HAT
    interface: str = "socketcan"
    channel: str = "can0"
    #: bits per second, for interfaces that set it (SocketCAN takes the OS's: `ip link`)
    bitrate: int = 0
    #: frames are committed together at most this often (seconds)
    commit_every_s: float = 0.5

    def __post_init__(self) -> None:
        if not is_valid_id(self.name) or self.name.startswith("http"):
            raise Invalid("name", "must be 1-64 characters of A-Z a-z 0-9 _ . -, not http*")
        if not is_valid_id(self.node):
            raise Invalid("node", "must be 1-64 characters of A-Z a-z 0-9 _ . -")
        if not self.dbc:
            raise Invalid("dbc", "a CAN source needs its DBC file")
        if not self.interface or not self.channel:
            raise Invalid("interface", "give python-can's interface and channel")
        if self.bitrate < 0:
            raise Invalid("bitrate", "must be >= 0 (0 = the interface's own)")
        if not math.isfinite(self.commit_every_s) or not 0.05 <= self.commit_every_s <= 60:
            raise Invalid("commit_every_s", "must be 0.05-60 seconds")
        db = load_dbc(self.dbc)
        for message in db.messages:
            for sig in message.signals:
                if not is_valid_id(f"{message.name}.{sig.name}"):
                    raise Invalid("dbc", f"{message.name}.{sig.name} is not a valid sensor id")


def load_dbc(path: str) -> Any:
    """The CAN database in a DBC file (cantools); Invalid("dbc") with why if it is not one."""
    try:
        import cantools
    except ImportError:
        raise Invalid("dbc", "install the can extra (python-can, cantools)") from None

    try:
        db = cantools.database.load_file(path, database_format="dbc", strict=True)
    except Exception as exc:  # noqa: BLE001 (file, parse and format errors of several kinds)
        raise Invalid("dbc", f"{path}: {exc}"[:300]) from None
    if not isinstance(db, cantools.database.can.Database):
        raise Invalid("dbc", f"{path} is not a CAN database")
    return db
