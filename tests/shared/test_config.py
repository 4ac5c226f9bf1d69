"""Config loading: defaults, samples, and errors that name the key and the file."""

from __future__ import annotations

import dataclasses
import json
import re
import tomllib
import typing
from pathlib import Path
from typing import Any

import pytest

from cloud_ingest.config import IngestConfig
from edge_agent.config import AgentConfig
from firmware_sim.config import SimConfig
from shared.cli import sample_path
from shared.config import load_config
from shared.errors import ConfigError

COMPONENTS = [
    ("edge_agent", AgentConfig),
    ("cloud_ingest", IngestConfig),
    ("firmware_sim", SimConfig),
]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


#: The sample shows the cloud link with TLS (secure by default, issue 10), and acks
#: verified with the device's key where the Ansible role puts it (issue 20); the
#: built-in default stays plain MQTT to this machine, for a first run and the tests.
SAMPLE_CLOUD_LINK = {"host": "mqtt.example.com", "port": 8883}
SAMPLE_ACK_KEY = "/etc/iot-telemetry/edge-agent-ack.key"


def sample_text(package: str, tmp_path: Path) -> str:
    """The sample, with its ack key file made (a key of this test's) in ``tmp_path``."""
    key = tmp_path / "ack.key"
    key.write_text("ab" * 32 + "\n")
    key.chmod(0o600)
    return sample_path(package).read_text().replace(SAMPLE_ACK_KEY, str(key))


def _with_tls_cloud_link(cfg: Any, ack_key: str = "") -> Any:
    from shared.tls import TlsConfig

    def link(broker: Any) -> Any:
        return dataclasses.replace(broker, **SAMPLE_CLOUD_LINK, tls=TlsConfig(system_ca=True))

    if isinstance(cfg, AgentConfig):
        return dataclasses.replace(
            cfg,
            forward=dataclasses.replace(
                cfg.forward, broker=link(cfg.forward.broker), ack_key_file=ack_key
            ),
        )
    if isinstance(cfg, IngestConfig):
        return dataclasses.replace(cfg, mqtt=link(cfg.mqtt))
    return cfg


@pytest.mark.parametrize(("package", "cls"), COMPONENTS)
def test_sample_loads_and_equals_defaults(package: str, cls: type, tmp_path: Path) -> None:
    """The shipped sample states the defaults (loading it changes nothing), but for
    the cloud link, which it shows over TLS, and the agent's verified acks."""
    p = write(tmp_path, sample_text(package, tmp_path))
    want = _with_tls_cloud_link(load_config(cls, None), str(tmp_path / "ack.key"))
    assert load_config(cls, p) == want


def _keys(cls: type, prefix: str = "") -> set[str]:
    out = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            out |= _keys(tp, f"{prefix}{f.name}.")
        else:
            out.add(f"{prefix}{f.name}")
    return out


def _sample_keys(data: dict[str, Any], prefix: str = "") -> set[str]:
    out = set()
    for k, v in data.items():
        if isinstance(v, dict):
            out |= _sample_keys(v, f"{prefix}{k}.")
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            out.add(f"{prefix}{k}")
        else:
            out.add(f"{prefix}{k}")
    return out


@pytest.mark.parametrize(("package", "cls"), COMPONENTS[:2])
def test_sample_documents_every_key(package: str, cls: type) -> None:
    path = sample_path(package)
    # arrays of tables with no default (alert rules) are documented as a commented example
    commented = set(re.findall(r"^# \[\[([\w.]+)\]\]", path.read_text(), re.M))
    assert _sample_keys(tomllib.loads(path.read_text())) | commented == _keys(cls)
    # every key line is preceded by a comment line or another key of the same block
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^\s*\w+ = ", line):
            j = i - 1
            while j >= 0 and re.match(r"^\s*\w+ = ", lines[j]):
                j -= 1
            assert j >= 0 and lines[j].lstrip().startswith(("#", "[")), line
            if lines[j].lstrip().startswith("["):
                # a key straight after a table header must itself be commented above it
                pytest.fail(f"{package}: key without a comment: {line!r}")


def test_unknown_key_names_file_key_and_suggests(tmp_path: Path) -> None:
    p = write(tmp_path, "[window]\nwidht_s = 5\n")
    with pytest.raises(ConfigError) as e:
        load_config(AgentConfig, p)
    msg = str(e.value)
    assert str(p) in msg and "window.widht_s" in msg and "did you mean 'width_s'" in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ("[window]\nwidth_s = -1\n", "window.width_s", "must be > 0"),
        ('[window]\nwidth_s = "ten"\n', "window.width_s", "must be a number"),
        ('device_id = "has space"\n', "device_id", "must be 1-64"),
        ("[forward.broker]\nport = 70000\n", "forward.broker.port", "TCP port"),
        ('[storage]\nsynchronous = "sometimes"\n', "storage.synchronous", "must be one of"),
        ("[intake]\nbroker = 3\n", "intake.broker", "must be a table"),
        ("tick_s = true\n", "tick_s", "must be a number"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(AgentConfig, p)
    assert e.value.key == key
    assert fragment in str(e.value) and str(p) in str(e.value)


def test_nested_array_of_tables_errors_are_indexed(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        '[[nodes]]\nid = "n1"\n[[nodes.sensors]]\nname = "t"\nkind = "sonar"\nrate_hz = 1.0\n',
    )
    with pytest.raises(ConfigError) as e:
        load_config(SimConfig, p)
    assert e.value.key == "nodes[0].sensors[0].kind"


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(AgentConfig, write(tmp_path, "device_id = \n"))
    with pytest.raises(ConfigError, match="file not found"):
        load_config(AgentConfig, tmp_path / "nope.toml")


def test_ingest_archive_url_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(IngestConfig, write(tmp_path, '[archive]\nurl = "ftp://x"\n'))
    assert e.value.key == "archive.url"


@pytest.mark.parametrize(
    ("cls", "table", "key"),
    [
        ("edge", {"forward": {"broker": {"host": "10.1.2.3"}}}, "forward.broker.insecure"),
        ("cloud", {"mqtt": {"host": "broker.example"}}, "mqtt.insecure"),
    ],
)
def test_plain_mqtt_to_another_machine_needs_insecure(
    cls: str, table: dict[str, Any], key: str, tmp_path: Path
) -> None:
    """Secure by default: the cloud link refuses plain MQTT beyond this machine unless
    the config says insecure = true; loopback and TLS need nothing."""
    from devstack.pipeline import toml_dumps
    from shared.config import load_config
    from shared.errors import ConfigError

    config_cls: Any = AgentConfig if cls == "edge" else IngestConfig
    path = tmp_path / "c.toml"
    path.write_text(toml_dumps(table))
    with pytest.raises(ConfigError) as info:
        load_config(config_cls, path)
    assert info.value.key == key and "in clear" in str(info.value)
    inner = table
    for part in key.split(".")[:-1]:
        inner = inner[part]
    inner["insecure"] = True
    path.write_text(toml_dumps(table))
    load_config(config_cls, path)


@pytest.mark.parametrize(
    ("influx", "ok"),
    [
        ({"url": "http://influx.example.com:8086", "username": "u", "password_env": "P"}, False),
        ({"api": "v2", "url": "http://10.0.0.5:8086", "token_env": "T"}, False),
        ({"url": "http://influx.example.com:8086", "username": "u", "password_env": "P",
          "insecure": True}, True),
        ({"url": "https://influx.example.com:8086", "username": "u", "password_env": "P"}, True),
        ({"url": "http://127.0.0.1:8086", "username": "u", "password_env": "P"}, True),
        ({"url": "http://influx.example.com:8086"}, True),  # no credentials to leak
    ],
)  # fmt: skip
def test_influx_credentials_over_plain_http_to_another_host_are_refused(
    tmp_path: Path, influx: dict[str, Any], ok: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As for MQTT: a password or token in clear only to this machine, or when asked."""
    monkeypatch.setenv("P", "a-password")
    monkeypatch.setenv("T", "a-token")
    lines = [f"{k} = {json.dumps(v)}" for k, v in influx.items()]
    p = write(tmp_path, "[influx]\n" + "\n".join(lines) + "\n")
    if ok:
        load_config(IngestConfig, p)
        return
    with pytest.raises(ConfigError) as e:
        load_config(IngestConfig, p)
    assert "influx.insecure" in str(e.value) and "https://" in str(e.value)


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ('[quotas]\nstate_file = "/nonexistent/x/q.sqlite"\n', "quotas.state_file", "create it"),
        ("[quotas]\nmax_series_per_device = 0\n", "quotas.max_series_per_device", "at least 1"),
        ("[quotas]\nmax_past_s = -1\n", "quotas.max_past_s", "must be > 0"),
    ],
)
def test_bad_quotas_name_the_key(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(IngestConfig, p)
    assert e.value.key == key
    assert fragment in str(e.value) and str(p) in str(e.value)
