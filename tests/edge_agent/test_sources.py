"""The input adapters (edge_agent/sources): each device family's payloads, the
timestamp rules, transforms, and every decoder fuzzed (any bytes become readings
and rejects, or one WireError with a reason; never another exception)."""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.config import AgentConfig, IntakeConfig
from edge_agent.sources.config import SourceConfig
from edge_agent.sources.contract import Decoded, clean_id
from edge_agent.sources.lineproto import LineDecoder
from edge_agent.sources.router import UNMATCHED, MqttSources, decoder_for
from edge_agent.sources.template import TopicTemplate
from edge_agent.sources.transform import TransformRule, Transforms
from shared.config import Invalid, from_dict
from shared.errors import ConfigError, WireError

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NOW = 1_764_522_245_000_000_000  # 2025-11-30T17:04:05Z
T0 = 1_732_600_000_000_000_000


def src(**kw: Any) -> SourceConfig:
    kw.setdefault("name", "s")
    return SourceConfig(**kw)


def decode(
    s: SourceConfig, topic: str, payload: bytes, rules: tuple[TransformRule, ...] = ()
) -> Decoded:
    return decoder_for(s, Transforms(rules))(topic, payload, NOW)


def readings(d: Decoded) -> dict[tuple[str, str], list[tuple[int, float]]]:
    return {
        (c.node, c.sensor): list(zip(c.ts.tolist(), c.values.tolist(), strict=True))
        for c in d.chunks
    }


# -- topic templates


def test_template_filter_and_match() -> None:
    t = TopicTemplate.parse("esphome/{node}/sensor/{sensor}/state")
    assert t.filter == "esphome/+/sensor/+/state"
    assert t.match("esphome/esp1/sensor/temperature/state") == {
        "node": "esp1",
        "sensor": "temperature",
    }
    assert t.match("esphome/esp1/sensor/temperature") is None
    assert t.match("other/esp1/sensor/temperature/state") is None
    h = TopicTemplate.parse("shellies/{node}/#")
    assert h.filter == "shellies/+/#"
    assert h.match("shellies/sh1/sensor/temperature") == {"node": "sh1"}
    # a sensor of several levels (Shelly Gen1's emeter/0/power)
    m = TopicTemplate.parse("shellies/{node}/{sensor}/{sensor}/{sensor}")
    assert m.match("shellies/shellyem3-1/emeter/0/power") == {
        "node": "shellyem3-1",
        "sensor": "emeter.0.power",
    }
    for bad in ("a/#/b", "a/b{node}", "a/{node}/{node}", ""):
        with pytest.raises(Invalid):
            TopicTemplate.parse(bad)


def test_ids_from_devices_are_cleaned() -> None:
    assert clean_id("temperature:0") == "temperature_0"
    assert clean_id("Küche") == "K_che"
    assert clean_id("") is None
    assert clean_id("x" * 65) is None


# -- value (ESPHome)


def test_value_esphome() -> None:
    s = src(topic="esphome/{node}/sensor/{sensor}/state", format="value", unit="degC")
    d = decode(s, "esphome/esp1/sensor/temperature/state", b"21.5")
    assert readings(d) == {("esp1", "temperature"): [(NOW, 21.5)]}
    assert d.stamped and d.chunks[0].unit == "degC"
    for text, want in ((b"ON", 1.0), (b"OFF", 0.0), (b"true", 1.0), (b" 7 ", 7.0)):
        assert readings(decode(s, "esphome/e/sensor/x/state", text))[("e", "x")][0][1] == want
    # a failed sensor, however the firmware says it: an invalid reading, counted
    for failed in (b"nan", b"inf", b"None", b"null", b"-inf"):
        d = decode(s, "esphome/e/sensor/x/state", failed)
        assert math.isnan(readings(d)[("e", "x")][0][1]) and d.counts["invalid"] == 1
    ha = src(topic="ha/{sensor}", format="value", node="ha", ignore=("Unavailable",))
    assert decode(ha, "ha/t", b"unavailable").filtered == 1
    # states are matched exactly: Home Assistant's lowercase on/off needs them listed
    with pytest.raises(WireError):
        decode(ha, "ha/t", b"off")
    ha_bin = src(topic="ha/{sensor}", format="value", node="ha", states=("on=1", "off=0"))
    assert readings(decode(ha_bin, "ha/t", b"off"))[("ha", "t")][0][1] == 0.0
    for bad in (b"", b"1_000", b"warm", b"off", b"\xff", b"1" * 100):
        with pytest.raises(WireError) as exc:
            decode(s, "esphome/e/sensor/x/state", bad)
        assert exc.value.reason == "bad-value"


# -- json (Tasmota, Zigbee2MQTT, Shelly)


def test_json_tasmota_local_time_in_its_zone() -> None:
    s = src(
        topic="tele/{node}/SENSOR",
        format="json",
        time_field="Time",
        time_format="local",
        timezone="Europe/Berlin",
    )
    d = decode(
        s,
        "tele/tasmota_1/SENSOR",
        b'{"Time":"2026-11-30T17:04:05","BME280":{"Temperature":21.4,"Humidity":40.1},'
        b'"TempUnit":"C"}',
    )
    t = int(dt.datetime(2026, 11, 30, 16, 4, 5, tzinfo=dt.UTC).timestamp()) * 10**9
    assert readings(d) == {
        ("tasmota_1", "BME280.Temperature"): [(t, 21.4)],
        ("tasmota_1", "BME280.Humidity"): [(t, 40.1)],
    }
    assert not d.stamped


def test_json_zigbee2mqtt_include_exclude() -> None:
    s = src(topic="zigbee2mqtt/{node}", format="json", exclude=("linkquality",))
    payload = (
        b'{"temperature":21.5,"humidity":40,"battery":90,"linkquality":120,'
        b'"state":"ON","update":{"state":"idle"},"action":"single"}'
    )
    d = decode(s, "zigbee2mqtt/kitchen", payload)
    assert {k[1] for k in readings(d)} == {"temperature", "humidity", "battery", "state"}
    only = decode(
        src(topic="zigbee2mqtt/{node}", format="json", include=("temp*",)),
        "zigbee2mqtt/kitchen",
        payload,
    )
    assert list(readings(only)) == [("kitchen", "temperature")]
    with pytest.raises(WireError) as exc:
        decode(s, "zigbee2mqtt/bridge", b'{"action":"single"}')
    assert exc.value.reason == "no-readings"


def test_json_shelly_gen2_topic_names_the_sensor() -> None:
    s = src(topic="{node}/status/{sensor}", format="json", include=("tC",))
    d = decode(s, "shellyplus1-a8/status/temperature:0", b'{"id":0,"tC":21.5,"tF":70.7}')
    assert readings(d) == {("shellyplus1-a8", "temperature_0.tC"): [(NOW, 21.5)]}


@pytest.mark.parametrize(
    ("fmt", "raw", "want"),
    [
        ("s", 1732600000, T0),
        ("ms", 1732600000000, T0),
        ("us", 1732600000000000, T0),
        ("ns", T0, T0),
        ("s", 1732600000.25, T0 + 250_000_000),
        ("rfc3339", "2024-11-26T05:46:40Z", T0),
        ("rfc3339", "2024-11-26T06:46:40.000000001+01:00", T0 + 1),
    ],
)
def test_json_time_formats(fmt: str, raw: Any, want: int) -> None:
    import json

    s = src(topic="d/{node}", format="json", time_field="t", time_format=fmt)
    d = decode(s, "d/n", json.dumps({"t": raw, "v": 1}).encode())
    assert readings(d) == {("n", "v"): [(want, 1.0)]}


def test_a_timestamp_in_the_wrong_unit_names_the_setting() -> None:
    s = src(topic="d/{node}", format="json", time_field="t", time_format="ns")
    with pytest.raises(WireError) as exc:
        decode(s, "d/n", b'{"t": 1732600000, "v": 1}')
    assert exc.value.reason == "bad-timestamp"
    assert "intake.sources[0].time_format" in str(exc.value) and "'s'" in str(exc.value)
    chunk = src(topic="sensors/{node}/{sensor}")
    with pytest.raises(WireError) as exc:
        decode(chunk, "sensors/n/t", b'{"ts":[1732600000],"values":[1]}')
    assert exc.value.reason == "bad-timestamp" and "nanoseconds" in str(exc.value)
    with pytest.raises(WireError) as exc:
        decode(
            src(topic="d/{node}", format="json", time_field="t"),
            "d/n",
            b'{"t": "2026-11-30T17:04:05", "v": 1}',
        )
    assert "local" in str(exc.value)


# -- influx line protocol


def lp(
    body: bytes, precision: str = "ns", rules: tuple[TransformRule, ...] = (), **kw: Any
) -> Decoded:
    return LineDecoder(Transforms(rules), node=kw.pop("node", "default"), **kw).decode(
        body, NOW, precision, "precision"
    )


def test_line_protocol_telegraf() -> None:
    body = (
        b"climate,host=kitchen,room=east temperature=21.5,humidity=40i 1732600000000000000\n"
        b"climate,host=kitchen,room=east temperature=21.75,humidity=41i 1732600001000000000\n"
        b"# a comment\n\n"
        b'cpu,cpu=cpu0,host=pi usage_idle=98.5,label="idle, mostly" 1732600000000000000\r\n'
        b"power value=230.1,on=t\n"
    )
    d = lp(body, sensor_tags=("cpu",))
    assert readings(d) == {
        ("kitchen", "climate.east.temperature"): [(T0, 21.5), (T0 + 10**9, 21.75)],
        ("kitchen", "climate.east.humidity"): [(T0, 40.0), (T0 + 10**9, 41.0)],
        ("pi", "cpu.cpu0.usage_idle"): [(T0, 98.5)],
        ("default", "power"): [(NOW, 230.1)],
        ("default", "power.on"): [(NOW, 1.0)],
    }
    assert d.stamped and not d.rejects and d.counts["text"] == 1  # the string field
    # ignore_tags: a tag that does not tell series apart
    d = lp(body, ignore_tags=("room",))
    assert ("kitchen", "climate.temperature") in readings(d)


def test_line_protocol_escapes_and_bad_lines() -> None:
    body = (
        b'my\\ meas,host=n\\,1,x=a\\=b f\\ 1=1.5,s="a \\"q\\" b" 1732600000000000000\n'
        b"m,host=n f=1.5 1732600000\n"  # seconds read as ns
        b"m,host=n f=abc\n"
        b"m,host=n f=1.5 1732600000000000000 extra\n"
        b"m,host=n f=1_0\n"
        b"m,host=n f=1.5 1732600000000000000\n"
    )
    d = lp(body)
    assert readings(d) == {
        ("n_1", "my_meas.a_b.f_1"): [(T0, 1.5)],
        ("n", "m.f"): [(T0, 1.5)],
    }
    assert [r.reason for r in d.rejects] == ["bad-timestamp", "bad-line", "bad-line", "bad-line"]
    assert "precision" in d.rejects[0].message and "'s'" in d.rejects[0].message
    assert d.rejects[1].payload == b"m,host=n f=abc"


def test_line_protocol_precision() -> None:
    d = lp(b"m,host=n f=1 1732600000", precision="s")
    assert readings(d) == {("n", "m.f"): [(T0, 1.0)]}
    # InfluxDB 1.x's minutes and hours (node-influx offers them)
    assert readings(lp(b"m,host=n f=1 28876666", precision="m")) == {
        ("n", "m.f"): [(28876666 * 60 * 10**9, 1.0)]
    }
    assert readings(lp(b"m,host=n f=1 481277", precision="h")) == {
        ("n", "m.f"): [(481277 * 3600 * 10**9, 1.0)]
    }
    with pytest.raises(WireError):
        lp(b"m f=1", precision="d")


line_text = st.text(alphabet="ab ,=\\\"'.-1_ti\n#", max_size=60)


@FUZZ
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["m", "cpu", "a-b"]),
            st.dictionaries(
                st.sampled_from(["host", "room", "cpu"]),
                st.text("abc-._", min_size=1, max_size=5),
                max_size=3,
            ),
            st.dictionaries(
                st.text("xyz_.", min_size=1, max_size=4),
                st.floats(allow_nan=False, allow_infinity=False) | st.integers(-(10**6), 10**6),
                min_size=1,
                max_size=3,
            ),
            st.one_of(st.none(), st.integers(T0, T0 + 10**12)),
        ),
        max_size=8,
    )
)
def test_line_protocol_fast_and_escaped_paths_agree(lines: list[Any]) -> None:
    """The same lines, once plain (the str.split path) and once with a quoted string
    field added (the escape-aware path), give the same readings."""

    def render(with_string: bool) -> bytes:
        out = []
        for meas, tags, fields, ts in lines:
            series = meas + "".join(f",{k}={v}" for k, v in tags.items())
            fs = [f"{k}={v}i" if isinstance(v, int) else f"{k}={v!r}" for k, v in fields.items()]
            if with_string:
                fs.append('note="a b,c"')
            out.append(f"{series} {','.join(fs)}" + (f" {ts}" if ts is not None else ""))
        return "\n".join(out).encode()

    if not lines:
        return
    a, b = lp(render(False)), lp(render(True))
    assert readings(a) == readings(b)
    assert not a.rejects and not b.rejects


# -- csv


def test_csv_headerless_and_header() -> None:
    s = src(topic="csv/{node}/{sensor}", format="csv", time_format="s")
    d = decode(s, "csv/n1/temp", b"1732600000,21.5\n1732600001,21.6\n")
    assert readings(d) == {("n1", "temp"): [(T0, 21.5), (T0 + 10**9, 21.6)]}
    h = src(topic="csv/{node}", format="csv")
    d = decode(
        h,
        "csv/n1",
        b"time,temp,hum\n2024-11-26T05:46:40Z,21.5,40\n"
        b"2024-11-26T05:46:41Z,,41\nbad,1,2\n2024-11-26T05:46:42Z,x,1\n",
    )
    assert readings(d) == {
        ("n1", "temp"): [(T0, 21.5)],
        ("n1", "hum"): [(T0, 40.0), (T0 + 10**9, 41.0), (T0 + 2 * 10**9, 1.0)],
    }
    # a text cell is counted, its row's numbers stored (the one rule for values)
    assert [r.reason for r in d.rejects] == ["bad-timestamp"] and d.counts["text"] == 1


# -- transforms


def test_transforms_rename_unit_calibrate_drop() -> None:
    rules = (
        TransformRule(
            match="kitchen/temperature", rename="temp_c", unit="degC", scale=2.0, offset=-1.0
        ),
        TransformRule(match="*/battery", drop=True),
    )
    s = src(topic="zigbee2mqtt/{node}", format="json")
    d = decode(s, "zigbee2mqtt/kitchen", b'{"temperature":21.5,"battery":90}', rules)
    assert readings(d) == {("kitchen", "temp_c"): [(NOW, 42.0)]}
    assert d.chunks[0].unit == "degC" and d.filtered == 1
    with pytest.raises(Invalid):
        TransformRule(match="nodeonly")


# -- config and routing


def test_sources_config_errors_name_the_key(tmp_path: Any) -> None:
    def bad(sources: list[dict[str, Any]], key: str) -> None:
        with pytest.raises(ConfigError) as exc:
            from_dict(AgentConfig, {"intake": {"sources": sources}}, "agent.toml")
        assert exc.value.key is not None and exc.value.key.startswith(key), exc.value

    bad([{"name": "a", "topic": "x/{node}", "format": "value"}], "intake.sources[0].sensor")
    bad([{"name": "a", "topic": "x/{node}/{sensor}", "formt": "value"}], "intake.sources[0].formt")
    bad(
        [{"name": "a", "topic": "x/{node}", "format": "json", "time_format": "local"}],
        "intake.sources[0].timezone",
    )
    bad(
        [{"name": "a", "topic": "x/{node}", "format": "json", "timezone": "Mars/Base"}],
        "intake.sources[0].timezone",
    )
    bad(
        [{"name": "a", "topic": "x/{node}/{sensor}"}, {"name": "a", "topic": "y/{node}/{sensor}"}],
        "intake.sources",
    )
    bad([{"name": "sensors", "topic": "x/{node}/{sensor}"}], "intake.sources")
    with pytest.raises(ConfigError) as exc:
        from_dict(AgentConfig, {"intake": {"topic_prefix": ""}}, "agent.toml")
    assert exc.value.key == "intake.topic_prefix" and "no input" in str(exc.value)
    assert IntakeConfig().mqtt_sources[0].topic == "sensors/{node}/{sensor}"
    both = from_dict(
        AgentConfig, {"intake": {"sources": [{"name": "e", "topic": "e/{node}", "format": "json"}]}}
    )
    assert [s.name for s in both.intake.mqtt_sources] == ["sensors", "e"]


def test_router_first_match_and_unmatched() -> None:
    r = MqttSources(
        (
            src(name="esp", topic="esphome/{node}/sensor/{sensor}/state", format="value"),
            src(name="all", topic="esphome/#", format="json", node="x"),
        ),
        Transforms(),
    )
    assert r.subscriptions() == [("esphome/+/sensor/+/state", 1), ("esphome/#", 1)]
    name, item = r.decode("esphome/e/sensor/t/state", b"1", NOW)
    assert name == "esp" and isinstance(item, Decoded)
    name, item = r.decode("other/t", b"1", NOW)
    assert name == UNMATCHED and isinstance(item, WireError)


# -- fuzz: every format is total


def test_overlapping_filters_read_one_copy() -> None:
    """Mosquitto 2 sends a copy per matching subscription: the copy through the
    filter of the first matching source is read, the others only acknowledged; a
    copy queued under an older config's identifier is read."""
    r = MqttSources(
        (
            src(name="a", topic="shellies/{node}/sensor/{sensor}", format="value"),
            src(name="b", topic="shellies/{node}/{sensor}/{sensor}", format="value"),
            src(name="c", topic="x/{node}/{sensor}", format="value"),
        ),
        Transforms(),
    )
    assert r.subscriptions() == [("shellies/+/sensor/+", 1), ("shellies/+/+/+", 1), ("x/+/+", 1)]
    t = "shellies/ht/sensor/temperature"
    assert not r.is_extra_copy(t, [1]) and r.is_extra_copy(t, [2])
    assert not r.is_extra_copy(t, [1, 2])  # one copy carrying both identifiers
    assert not r.is_extra_copy("shellies/1pm/relay/0", [2])
    assert not r.is_extra_copy(t, [3]) and not r.is_extra_copy(t, [9])  # stale: read
    assert not r.is_extra_copy(t, [])


FORMATS = [
    src(topic="sensors/{node}/{sensor}"),
    src(topic="v/{node}/{sensor}", format="value"),
    src(topic="j/{node}", format="json", time_field="t", time_format="ms"),
    src(
        topic="j/{node}",
        format="json",
        time_field="t",
        time_format="local",
        timezone="Europe/Berlin",
    ),
    src(topic="i/{node}", format="influx", sensor_tags=("room",)),
    src(topic="c/{node}/{sensor}", format="csv", time_format="s"),
    src(topic="t/{node}", format="telegraf-json", precision="s"),
    src(topic="c/{node}", format="csv", time_format="local", timezone="UTC"),
    src(topic="j/{node}", format="json", root="p", time_field="p.ts", time_format="s"),
]
TOPICS = ["sensors/n/s", "v/n/s", "j/n", "j/n", "i/n", "c/n/s", "t/n", "c/n", "j/n"]


def check_total(index: int, payload: bytes) -> None:
    dec = decoder_for(FORMATS[index], Transforms((TransformRule(match="*/x*", scale=3.0),)))
    try:
        d = dec(TOPICS[index], payload, NOW)
    except WireError as exc:
        assert exc.reason and " " not in exc.reason
        return
    assert d.chunks or d.rejects or d.filtered
    for c in d.chunks:
        assert len(c.ts) == len(c.values) > 0
        assert c.ts.dtype == np.int64 and c.values.dtype == np.float64
        assert clean_id(c.node) == c.node and clean_id(c.sensor) == c.sensor
    for r in d.rejects:
        assert r.reason and " " not in r.reason


@FUZZ
@given(st.integers(0, len(FORMATS) - 1), st.binary(max_size=300))
def test_every_format_is_total_on_bytes(index: int, payload: bytes) -> None:
    check_total(index, payload)


@FUZZ
@given(st.integers(0, len(FORMATS) - 1), line_text)
def test_every_format_is_total_on_near_valid_text(index: int, text: str) -> None:
    check_total(index, text.encode())
    check_total(index, b'{"t": 1732600000000, "x": ' + text.encode()[:20] + b"}")
    # the shapes the newer decoders take: Telegraf metrics, TOA5 headers, a root
    check_total(index, b'{"metrics":[{"name":"m","tags":{"host":"h"},"fields":{"f":' +
                text.encode()[:20] + b'},"timestamp":1732600000}]}')  # fmt: skip
    check_total(index, b'"TOA5","s"\n"TIMESTAMP","RECORD","a"\n"TS","RN","V"\n"","",""\n' +
                text.encode()[:40])  # fmt: skip
    check_total(index, b'{"p":{"ts":1732600000,"x":[' + text.encode()[:20] + b"]}}")


json_scalar = (
    st.none() | st.booleans() | st.floats() | st.integers(-(2**70), 2**70) | st.text(max_size=6)
)
json_value = st.recursive(
    json_scalar,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=12,
)


@FUZZ
@given(st.lists(st.dictionaries(st.sampled_from(["name", "tags", "fields", "timestamp"]),
                                json_value), max_size=4))  # fmt: skip
def test_telegraf_json_is_total_on_metric_shapes(metrics: list[dict[str, Any]]) -> None:
    import json

    for body in ({"metrics": metrics}, *metrics):
        check_total(6, json.dumps(body).encode())


@pytest.mark.parametrize(
    "payload",
    [
        b'm,host=n f="unterminated',  # crasher candidates, kept as regressions
        b"m,host=n f=1i 99999999999999999999",
        b"m,host= f=1",
        b"m,=v f=1",
        b"\\",
        b"m f=-",
        b"m f=0x10",
        b"m f=\xd9\xa1",  # an Arabic-Indic digit, which float() would take
    ],
)
def test_line_protocol_regressions(payload: bytes) -> None:
    check_total(4, payload)
    with pytest.raises(WireError):
        d = decoder_for(FORMATS[4], Transforms())("i/n", payload, NOW)
        if d.rejects:
            raise WireError("x", "rejected")


# -- modbus register maps


def test_modbus_plan_and_decoding() -> None:
    import struct

    from edge_agent.sources.config import ModbusConfig, Register
    from edge_agent.sources.modbus import plan, value_of

    regs = (
        Register(sensor="a", address=0, kind="input", type="float32"),
        Register(sensor="b", address=2, kind="input", type="int16", scale=0.1),
        Register(sensor="c", address=10, kind="input", type="uint32", word_order="little"),
        Register(sensor="d", address=0, kind="holding", type="int64"),
    )
    assert [(b.kind, b.address, b.count) for b in plan(regs)] == [
        ("holding", 0, 4),
        ("input", 0, 3),
        ("input", 10, 2),
    ]
    assert [(b.kind, b.address, b.count) for b in plan(regs, gap=8)] == [
        ("holding", 0, 4),
        ("input", 0, 12),
    ]
    hi, lo = struct.unpack(">2H", struct.pack(">f", 230.5))
    assert value_of(regs[0], [hi, lo]) == 230.5
    # a float32 is widened through its shortest decimal text, and scaling is
    # decimal: the values a meter's display shows, not their float expansions
    hi, lo = struct.unpack(">2H", struct.pack(">f", 229.3))
    assert value_of(regs[0], [hi, lo]) == 229.3
    assert value_of(regs[1], [2293]) == 229.3  # not 229.29999999999998
    assert value_of(regs[1], [0xFFF6]) == -1.0
    hi, lo = struct.unpack(">2H", struct.pack(">f", float("inf")))
    assert math.isnan(value_of(regs[0], [hi, lo]))
    assert value_of(regs[2], [0x0002, 0x0001]) == 0x00010002
    cfg = ModbusConfig(
        name="m",
        node="n",
        host="127.0.0.1",
        register_map=str(
            __import__("pathlib").Path(__file__).resolve().parents[2]
            / "docs/examples/modbus-sdm120.toml"
        ),
    )
    assert len(cfg.all_registers()) == 10
    with pytest.raises(Invalid):
        ModbusConfig(name="m", node="n", host="h", serial_port="/dev/ttyUSB0", registers=regs)
    with pytest.raises(Invalid):
        ModbusConfig(name="m", node="n", host="h")
    with pytest.raises(Invalid):
        ModbusConfig(name="m", node="n", host="h", register_map="/nonexistent.toml")


# -- firmware-sim's device families read back by the agent's own sources


@pytest.mark.parametrize(
    "family", ["native", "esphome", "tasmota", "zigbee2mqtt", "telegraf", "influx-http"]
)
def test_each_simulated_family_reads_back_exactly(family: str) -> None:
    import tomllib

    from edge_agent.sources.lineproto import LineDecoder
    from firmware_sim.config import NodeSpec, SensorSpec, SimConfig
    from firmware_sim.families import STAMPED, agent_sources, publication
    from firmware_sim.sensors import chunk_times, chunk_values

    spec = SensorSpec("temp", "temperature", rate_hz=1.0, chunk=5, unit="degC")
    node = NodeSpec("n-1", (spec,), family)  # type: ignore[arg-type]
    sim = SimConfig(nodes=(node,))
    ts = chunk_times(spec, T0 + 123_456_789, 0)
    vals = chunk_values(spec, ts, 42, 0, 0, 0)
    pub = publication(sim, node, spec, ts.tolist(), vals.tolist())
    cfg = from_dict(AgentConfig, tomllib.loads(agent_sources(sim, http_port=8086)))
    router = MqttSources(cfg.intake.mqtt_sources, Transforms())
    got_ts: list[int] = []
    got_vals: list[float] = []
    decoded = [router.decode(t, p, NOW)[1] for t, p in pub.messages]
    if pub.http_body is not None:
        decoded.append(LineDecoder(Transforms(), node="http").decode(pub.http_body, NOW, "ns", "p"))
    for d in decoded:
        assert isinstance(d, Decoded) and not d.rejects, d
        for c in d.chunks:
            assert (c.node, c.sensor) == ("n-1", "temp")
            got_ts += c.ts.tolist()
            got_vals += c.values.tolist()
    assert got_vals == vals.tolist()  # bit for bit
    if family in STAMPED:
        assert got_ts == [NOW] * 5
    else:
        assert got_ts == pub.ts
        assert got_ts == (ts if family != "tasmota" else ts // 10**9 * 10**9).tolist()
