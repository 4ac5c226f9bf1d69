"""What other people's devices send, read by the one value rule
(edge_agent/sources/values.py, docs/devices.md "What a value becomes"): nothing
lost without a count, nothing merged, nothing a reading that is not one.

Every payload here is copied from the upstream project's documentation, source
or test fixtures, named beside it, not written from a reading of the format.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.sources.config import SourceConfig
from edge_agent.sources.contract import Decoded
from edge_agent.sources.router import decoder_for
from edge_agent.sources.transform import Transforms
from edge_agent.sources.values import classify, from_text, parse_states
from shared.config import Invalid
from shared.errors import WireError

NOW = 1_764_522_245_000_000_000  # 2025-11-30T17:04:05Z


def src(**kw: Any) -> SourceConfig:
    kw.setdefault("name", "s")
    return SourceConfig(**kw)


def decode(s: SourceConfig, topic: str, payload: bytes | str) -> Decoded:
    raw = payload.encode() if isinstance(payload, str) else payload
    return decoder_for(s, Transforms())(topic, raw, NOW)


def values(d: Decoded) -> dict[str, list[float]]:
    return {f"{c.node}/{c.sensor}": c.values.tolist() for c in d.chunks}


def same(a: dict[str, list[float]], b: dict[str, list[float]]) -> bool:
    """Equal, NaN equal to NaN."""

    def eq(x: float, y: float) -> bool:
        return x == y or (math.isnan(x) and math.isnan(y))

    return a.keys() == b.keys() and all(
        len(a[k]) == len(b[k]) and all(map(eq, a[k], b[k])) for k in a
    )


NAN = math.nan

# -- the rule itself


def test_the_value_rule_table() -> None:
    """docs/devices.md's table, row by row."""
    st_ = parse_states(())
    rows: list[tuple[Any, str, float]] = [
        (21.5, "reading", 21.5),
        (40, "reading", 40.0),
        ("21.5", "reading", 21.5),
        (" 7 ", "reading", 7.0),
        (True, "reading", 1.0),
        (False, "reading", 0.0),
        ("ON", "reading", 1.0),
        ("OFF", "reading", 0.0),
        ("true", "reading", 1.0),
        ("false", "reading", 0.0),
        (NAN, "invalid", NAN),
        (math.inf, "invalid", NAN),
        (-math.inf, "invalid", NAN),
        (None, "invalid", NAN),
        ("nan", "invalid", NAN),
        ("NaN", "invalid", NAN),
        ("-inf", "invalid", NAN),
        ("None", "invalid", NAN),
        ("null", "invalid", NAN),
        ("off", "text", NAN),  # an enum (Zigbee2MQTT's power_on_behavior), not a state
        ("single", "text", NAN),
        ("1_000", "text", NAN),
        ("", "text", NAN),
        ("0x10", "text", NAN),
    ]
    for value, kind, want in rows:
        got_kind, got = classify(value, st_)
        assert got_kind == kind, value
        assert got == want or (math.isnan(got) and math.isnan(want)), value
    assert from_text("off", parse_states(("on=1", "off=0"))) == ("reading", 0.0)
    for bad in (("on",), ("=1",), ("on=x",), ("on=inf",)):
        with pytest.raises(Invalid):
            parse_states(bad)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.recursive(
        st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner),
        max_leaves=30,
    )
)
def test_every_json_value_is_a_reading_an_invalid_one_or_counted_text(obj: Any) -> None:
    """Nothing vanishes: each scalar of a JSON object becomes a reading (invalid
    ones included), a text count, a rejected name, or the whole message is
    quarantined; the counts add up to the scalars."""
    import json

    from edge_agent.sources.jsonfields import fields

    payload = json.dumps({"v": obj}).encode()
    scalars = sum(1 for _ in fields({"v": obj}))
    try:
        d = decode(src(topic="j/{node}", format="json"), "j/n", payload)
    except WireError as exc:
        assert exc.reason in ("no-readings", "bad-json")
        return
    assert d.readings + d.counts["text"] + d.rejected == scalars
    assert d.counts["invalid"] == sum(
        int(math.isnan(v)) for c in d.chunks for v in c.values.tolist()
    )


# -- Tasmota


def test_tasmota_two_channel_meter_arrays() -> None:
    """A Sonoff Dual R3 (two BL0939 channels) on Tasmota's tele/<topic>/SENSOR:
    payload captured from the device, from ferrets6/wattson's test fixture
    (internal/mqtt); Tasmota's docs, "Power Monitoring", show the same arrays."""
    payload = (
        '{"Time":"2026-09-18T11:19:21","ENERGY":{"TotalStartTime":"2026-09-16T00:00:00",'
        '"Total":[2.813,0.254],"Yesterday":[1.530,0.125],"Today":[0.772,0.059],"Power":[52,5],'
        '"ApparentPower":[66,10],"ReactivePower":[40,9],"Factor":[0.79,0.50],"Voltage":235,'
        '"Current":[0.278,0.044],"BL09XX":{"Temperature":46.5}}}'
    )
    s = src(topic="tele/{node}/SENSOR", format="json", time_field="Time", time_format="local",
            timezone="Europe/Berlin")  # fmt: skip
    d = decode(s, "tele/dual/SENSOR", payload)
    got = values(d)
    assert got["dual/ENERGY.Power.0"] == [52.0] and got["dual/ENERGY.Power.1"] == [5.0]
    assert got["dual/ENERGY.Current.0"] == [0.278] and got["dual/ENERGY.Current.1"] == [0.044]
    assert got["dual/ENERGY.Voltage"] == [235.0]
    assert got["dual/ENERGY.BL09XX.Temperature"] == [46.5]
    # 8 arrays of 2, Voltage and the temperature: 18 readings; TotalStartTime is text
    assert d.readings == 18 and d.counts["text"] == 1 and not d.rejects
    # the time is the device's, every reading of the message at it
    assert len({int(c.ts[0]) for c in d.chunks}) == 1 and not d.stamped


def test_tasmota_null_is_an_invalid_reading_like_esphome_nan() -> None:
    """A failed DS18B20 on Tasmota reads null; ESPHome publishes nan
    (esphome.io, Sensor Component: "NaN" when a sensor cannot be read): one
    failure, one outcome, an invalid reading of the sensor."""
    s = src(topic="tele/{node}/SENSOR", format="json")
    payload = '{"DS18B20":{"Id":"01144A0CB2AA","Temperature":null},"TempUnit":"C"}'
    d = decode(s, "tele/t1/SENSOR", payload)
    assert same(values(d), {"t1/DS18B20.Temperature": [NAN]})
    assert d.counts == {"invalid": 1, "text": 2}
    e = src(topic="esphome/{node}/sensor/{sensor}/state", format="value")
    d = decode(e, "esphome/n/sensor/t/state", "nan")
    assert same(values(d), {"n/t": [NAN]}) and d.counts["invalid"] == 1
    # JSON's own NaN (Python's json.dumps writes it) is the same
    d = decode(s, "tele/t1/SENSOR", '{"A":NaN,"B":Infinity,"C":1}')
    assert same(values(d), {"t1/A": [NAN], "t1/B": [NAN], "t1/C": [1.0]})


# -- Zigbee2MQTT


def test_zigbee2mqtt_last_seen_is_the_time_and_enums_are_text() -> None:
    """Zigbee2MQTT's device state with `advanced.last_seen: epoch`
    (zigbee2mqtt.io, Configuration, "last_seen": milliseconds since the epoch) and
    an enum setting (zigbee2mqtt.io device pages, "power_on_behavior": off, on,
    toggle, previous)."""
    s = src(topic="zigbee2mqtt/{node}", format="json", time_field="last_seen",
            time_format="ms", exclude=("linkquality", "update.*"))  # fmt: skip
    payload = (
        '{"state":"ON","power":12.3,"power_on_behavior":"off","linkquality":120,'
        '"last_seen":1764522245123,"update":{"state":"idle","installed_version":-1}}'
    )
    d = decode(s, "zigbee2mqtt/plug_1", payload)
    assert values(d) == {"plug_1/state": [1.0], "plug_1/power": [12.3]}
    assert d.counts["text"] == 1  # power_on_behavior
    assert {int(c.ts[0]) for c in d.chunks} == {1764522245123 * 10**6} and not d.stamped


# -- Telegraf


def lp_src(**kw: Any) -> SourceConfig:
    return src(topic="telegraf/{node}/#", format="influx", **kw)


def test_telegraf_disk_net_docker_series_stay_distinct() -> None:
    """The example output of Telegraf's disk, net and docker input plugins
    (plugins/inputs/{disk,net,docker}/README.md): four mount points are four
    sensors, two interfaces two, a container's seven tags one sensor per field."""
    disk = (
        "disk,fstype=hfs,mode=ro,path=/ free=398407520256i,inodes_free=97267461i,"
        "inodes_total=121847806i,inodes_used=24580345i,total=499088621568i,used=100418957312i,"
        "used_percent=20.131039916242397 1453832006274071563\n"
        "disk,fstype=devfs,mode=rw,path=/dev free=0i,inodes_free=0i,inodes_total=628i,"
        "inodes_used=628i,total=185856i,used=185856i,used_percent=100 1453832006274137913\n"
        "disk,fstype=autofs,mode=rw,path=/net free=0i,inodes_free=0i,inodes_total=0i,"
        "inodes_used=0i,total=0i,used=0i,used_percent=0 1453832006274157077\n"
        "disk,fstype=autofs,mode=rw,path=/home free=0i,inodes_free=0i,inodes_total=0i,"
        "inodes_used=0i,total=0i,used=0i,used_percent=0 1453832006274169688\n"
    )
    d = decode(lp_src(node="pi"), "telegraf/pi/disk", disk)
    used = {k: v for k, v in values(d).items() if k.endswith(".used_percent")}
    assert used == {
        "pi/disk.hfs.ro._.used_percent": [20.131039916242397],
        "pi/disk.devfs.rw._dev.used_percent": [100.0],
        "pi/disk.autofs.rw._net.used_percent": [0.0],
        "pi/disk.autofs.rw._home.used_percent": [0.0],
    }
    assert d.readings == 4 * 7
    net = (
        "net,interface=eth0,host=HOST bytes_sent=451838509i,bytes_recv=3284081640i,"
        "packets_sent=2663590i,packets_recv=3585442i,err_in=0i,err_out=0i,drop_in=4i,"
        "drop_out=0i 1492834180000000000\n"
        "net,interface=wlan0,host=HOST bytes_sent=1019i,bytes_recv=2200i,packets_sent=9i,"
        "packets_recv=22i,err_in=0i,err_out=0i,drop_in=0i,drop_out=0i 1492834180000000000\n"
    )
    got = values(decode(lp_src(), "telegraf/HOST/net", net))
    assert got["HOST/net.eth0.bytes_sent"] == [451838509.0]
    assert got["HOST/net.wlan0.bytes_sent"] == [1019.0]
    docker = (
        "docker_container_mem,container_image=telegraf,container_name=zen_ritchie,"
        "container_status=running,container_version=unknown,engine_host=debian-stretch-docker,"
        "server_version=17.09.0-ce active_anon=8327168i,active_file=2314240i,cache=27402240i,"
        "usage_percent=0.5949484701448631 1524002042000000000\n"
        "docker_container_mem,container_image=influxdb,container_name=happy_hopper,"
        "container_status=running,container_version=unknown,engine_host=debian-stretch-docker,"
        "server_version=17.09.0-ce active_anon=1000i,active_file=2000i,cache=3000i,"
        "usage_percent=1.5 1524002042000000000\n"
    )
    d = decode(lp_src(node="dk"), "telegraf/dk/docker", docker)
    names = sorted(values(d))
    assert len(names) == 8 and all(len(n.split("/", 1)[1]) <= 64 for n in names)
    # readable with sensor_tags naming the tag that matters, and still distinct
    d = decode(lp_src(node="dk", sensor_tags=("container_name",)), "telegraf/dk/docker", docker)
    usage = sorted(k for k in values(d) if k.endswith("usage_percent"))
    assert len(usage) == 2 and "zen_ritchie" in usage[1] and "happy_hopper" in usage[0]
    # or with ignore_tags leaving out the tags that do not tell containers apart
    ign = ("container_image", "container_status", "container_version", "engine_host",
           "server_version")  # fmt: skip
    d = decode(lp_src(node="dk", ignore_tags=ign), "telegraf/dk/docker", docker)
    assert values(d)["dk/docker_container_mem.zen_ritchie.cache"] == [27402240.0]


def test_telegraf_json_format_single_and_batch() -> None:
    """Telegraf's JSON output format (docs.influxdata.com/telegraf/v1/data_formats/
    output/json/): the standard form and the batch form, timestamps in seconds."""
    one = (
        '{"fields":{"field_1":30,"field_2":4,"field_N":59,"n_images":660},"name":"docker",'
        '"tags":{"host":"raynor"},"timestamp":1458229140}'
    )
    s = src(topic="telegraf/{node}/json", format="telegraf-json", precision="s")
    d = decode(s, "telegraf/raynor/json", one)
    assert values(d) == {
        "raynor/docker.field_1": [30.0],
        "raynor/docker.field_2": [4.0],
        "raynor/docker.field_N": [59.0],
        "raynor/docker.n_images": [660.0],
    }
    assert {int(c.ts[0]) for c in d.chunks} == {1458229140 * 10**9}
    batch = '{"metrics":[' + one + "," + one.replace("raynor", "kerrigan") + "]}"
    d = decode(s, "telegraf/raynor/json", batch)
    assert d.readings == 8 and {c.node for c in d.chunks} == {"raynor", "kerrigan"}
    # a metric that cannot be read is quarantined, the others stored
    d = decode(s, "telegraf/x/json", '{"metrics":[' + one + ',{"name":1,"fields":{}}]}')
    assert d.readings == 4 and [r.reason for r in d.rejects] == ["bad-metric"]
    # the default precision ns reads Telegraf's seconds as 1970: refused, naming the key
    d = decode(src(topic="t/{node}", format="telegraf-json"), "t/x", one)
    assert d.rejects[0].reason == "bad-timestamp" and "'s'" in d.rejects[0].message


# -- Shelly


def test_shelly_gen2_notify_status_with_params_ts() -> None:
    """A Gen2 NotifyStatus on <id>/events/rpc (shelly-api-docs.shelly.cloud, gen2
    "Notifications": params.ts is a Unix timestamp, each component's changed
    status under its key)."""
    payload = (
        '{"src":"shellyplus1pm-a8032ab12345","dst":"shellyplus1pm-a8032ab12345/events",'
        '"method":"NotifyStatus","params":{"ts":1654511972.67,"switch:0":{"id":0,'
        '"apower":8.9,"current":0.068,"aenergy":{"by_minute":[45.199,47.141,88.397],'
        '"minute_ts":1654511940,"total":6.532}}}}'
    )
    s = src(topic="{node}/events/rpc", format="json", root="params", time_field="params.ts",
            time_format="s", exclude=("*.id", "*.minute_ts", "*.by_minute.*"))  # fmt: skip
    d = decode(s, "shellyplus1pm-a8032ab12345/events/rpc", payload)
    assert values(d) == {
        "shellyplus1pm-a8032ab12345/switch_0.apower": [8.9],
        "shellyplus1pm-a8032ab12345/switch_0.current": [0.068],
        "shellyplus1pm-a8032ab12345/switch_0.aenergy.total": [6.532],
    }
    assert {int(c.ts[0]) for c in d.chunks} == {1654511972670000000}


# -- Campbell Scientific TOA5


TOA5 = (
    '"TOA5","CR1000_Station","CR1000","12345","CR1000.Std.32","CPU:met.CR1","4321","Table1"\n'
    '"TIMESTAMP","RECORD","BattV_Min","PTemp_C_Avg","AirTC_Avg","RH"\n'
    '"TS","RN","Volts","Deg C","Deg C","%"\n'
    '"","","Min","Avg","Avg","Smp"\n'
    '"2025-11-30 17:00:00",0,12.51,21.3,4.62,81.2\n'
    '"2025-11-30 17:10:00",1,12.5,21.4,"NAN",80.9\n'
)


def test_campbell_toa5_file() -> None:
    """A TOA5 file as LoggerNet writes one (Campbell Scientific, LoggerNet manual,
    "TOA5": an environment row, field names, units, processing, then the
    records; "NAN" for a failed measurement)."""
    s = src(topic="loggers/{node}/toa5", format="csv", time_format="local", timezone="UTC")
    d = decode(s, "loggers/cr1000/toa5", TOA5)
    assert same(
        values(d),
        {
            "cr1000/BattV_Min": [12.51, 12.5],
            "cr1000/PTemp_C_Avg": [21.3, 21.4],
            "cr1000/AirTC_Avg": [4.62, NAN],
            "cr1000/RH": [81.2, 80.9],
        },
    )
    units = {c.sensor: c.unit for c in d.chunks}
    assert units == {"BattV_Min": "Volts", "PTemp_C_Avg": "Deg C", "AirTC_Avg": "Deg C", "RH": "%"}
    assert d.counts["invalid"] == 1 and not d.rejects
    assert int(d.chunks[0].ts[0]) == 1764522000 * 10**9
    # without a zone for the logger's clock, the message says which setting to set
    with pytest.raises(WireError) as exc:
        bad = decode(src(topic="l/{node}", format="csv"), "l/x", TOA5)
        raise WireError(bad.rejects[0].reason, bad.rejects[0].message)
    assert "local" in str(exc.value)


# -- the HTTP intake's new readers, fuzzed


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=200), min_size=1, max_size=3), st.binary(max_size=20))
def test_gunzip_reads_every_member_and_is_total(members: list[bytes], tail: bytes) -> None:
    import gzip

    from edge_agent.sources.http import BodyError, gunzip

    body = b"".join(gzip.compress(m) for m in members)
    assert gunzip(body, 10_000) == b"".join(members)
    try:
        gunzip(body + tail, 10_000)
    except BodyError as exc:
        assert exc.status in (400, 413)
    with pytest.raises(BodyError) as too_big:
        gunzip(gzip.compress(b"x" * 5000) * 3, 10_000)
    assert too_big.value.status == 413


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_query_answers_every_text_with_200_or_400(q: str) -> None:
    from edge_agent.sources.influxquery import Databases, answer

    status, body = answer(q, Databases())
    assert status in (200, 400) and isinstance(body, dict)
    assert answer('CREATE DATABASE "a b"; SHOW DATABASES', Databases())[1]["results"][1]["series"][
        0
    ]["values"] == [["a b"]]
