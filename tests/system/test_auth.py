"""MQTT username and password on every client of the project, against a Mosquitto
that admits only known users; the password comes from a file or the environment
and never reaches a log."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devstack import services
from devstack.pipeline import BIN, toml_dumps
from devstack.services import Service, wait_until
from shared.auth import AuthConfig
from shared.config import Invalid
from shared.readings import encode_chunk

PASSWORDS = {"dev-a": "Pw-dev-a-7f3c91", "ingest": "Pw-ingest-2b8e44"}


def test_a_password_file_readable_by_every_user_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "pw"
    f.write_text("secret\n")
    f.chmod(0o644)
    with pytest.raises(Invalid, match="readable by every user"):
        AuthConfig("u", password_file=str(f))
    f.chmod(0o600)
    assert AuthConfig("u", password_file=str(f)).password() == "secret"


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"username": "u", "password_file": "/nonexistent/pw"}, "password_file"),
        ({"username": "u", "password_env": "TELEMETRY_TEST_UNSET_VAR"}, "password_env"),
        ({"password_env": "HOME"}, "username"),
        (
            {"username": "u", "password_env": "HOME", "password_file": "/etc/hostname"},
            "password_file",
        ),
    ],
)
def test_bad_auth_settings_name_the_key(kwargs: dict[str, str], key: str) -> None:
    with pytest.raises(Invalid) as info:
        AuthConfig(**kwargs)
    assert info.value.key == key


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Service]:
    svc = services.mosquitto(tmp_path / "mq", passwords=PASSWORDS).start()
    try:
        yield svc
    finally:
        svc.stop()


def _secret(tmp_path: Path, user: str) -> str:
    f = tmp_path / f"{user}.pw"
    f.write_text(PASSWORDS[user] + "\n")
    f.chmod(0o600)
    return str(f)


@pytest.mark.integration
def test_firmware_sim_and_doctor_authenticate_and_a_wrong_password_is_refused(
    broker: Service, tmp_path: Path
) -> None:
    cfg = tmp_path / "sim.toml"
    auth = {"username": "dev-a", "password_file": _secret(tmp_path, "dev-a")}
    cfg.write_text(
        toml_dumps(
            {"duration_s": 2.0, "speed": 100.0, "broker": {"port": broker.port, "auth": auth}}
        )
    )
    res = subprocess.run(
        [str(BIN / "firmware-sim"), "run", "-c", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["produced"] > 0

    wrong = tmp_path / "wrong.pw"
    wrong.write_text("not-the-password\n")
    wrong.chmod(0o600)
    agent = tmp_path / "agent.toml"
    brokers = {
        "intake": {"broker": {"port": broker.port, "auth": auth}},
        "forward": {"broker": {"port": broker.port, "auth": {**auth, "password_file": str(wrong)}}},
        "storage": {"path": str(tmp_path / "buf.sqlite")},
    }
    agent.write_text(toml_dumps(brokers))
    res = subprocess.run(
        [str(BIN / "edge-agent"), "doctor", "-c", str(agent)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = {ln.split()[1]: ln for ln in res.stdout.splitlines() if len(ln.split()) > 1}
    assert lines["intake.broker"].startswith("OK"), res.stdout
    assert (
        lines["forward.broker"].startswith("FAIL") and "authori" in lines["forward.broker"].lower()
    )


@pytest.mark.integration
def test_tail_authenticates(broker: Service, tmp_path: Path) -> None:
    from edge_agent.config import AgentConfig
    from edge_agent.technician.tail import tail
    from shared.config import from_dict

    auth = {"username": "dev-a", "password_file": _secret(tmp_path, "dev-a")}
    cfg = from_dict(AgentConfig, {"intake": {"broker": {"port": broker.port, "auth": auth}}})
    pub = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.username_pw_set("dev-a", PASSWORDS["dev-a"])
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    try:
        ts = time.time_ns()
        got = tail(
            cfg,
            timeout_s=10,
            on_subscribed=lambda: pub.publish(
                "sensors/n1/t", encode_chunk("C", [ts], [1.5]), qos=1
            ),
        )
        first = next(iter(got))
        assert getattr(first, "value", None) == 1.5
    finally:
        pub.loop_stop()
        pub.disconnect()


@pytest.mark.integration
def test_ingestor_and_fleet_authenticate_and_no_log_holds_a_password(
    broker: Service, influxdb: Service, influx_db: str, tmp_path: Path
) -> None:
    """The ingestor at DEBUG (password from a file) and the fleet (password from the
    environment): every batch acked, and neither password in any output."""
    cfg = tmp_path / "ingest.toml"
    cfg.write_text(
        toml_dumps(
            {
                "log_level": "DEBUG",
                "mqtt": {
                    "port": broker.port,
                    "client_id": "ingest-auth",
                    "auth": {"username": "ingest", "password_file": _secret(tmp_path, "ingest")},
                },
                "influx": {"url": influxdb.url, "database": influx_db},
                "archive": {"url": f"file://{tmp_path / 'lake'}"},
            }
        )
    )
    ready = tmp_path / "ready"
    log = tmp_path / "ingest.log"
    with log.open("wb") as out:
        ingestor = subprocess.Popen(
            [str(BIN / "cloud-ingest"), "run", "-c", str(cfg), "--ready-file", str(ready)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until(ready.exists, 30, "the ingestor to subscribe")
            env = {**os.environ, "FLEET_PW": PASSWORDS["dev-a"]}
            res = subprocess.run(
                [
                    str(BIN / "firmware-sim"),
                    "fleet",
                    "--devices",
                    "2",
                    "--batches",
                    "3",
                    "--speed",
                    "0",
                    "--port",
                    str(broker.port),
                    "--timeout",
                    "60",
                    "--username",
                    "dev-a",
                    "--password-env",
                    "FLEET_PW",
                ],
                capture_output=True,
                text=True,
                timeout=120,
                env=env,
            )
            assert res.returncode == 0, res.stderr
            assert json.loads(res.stdout)["acked"] == 6
        finally:
            ingestor.terminate()
            ingestor.wait(30)
    text = log.read_text() + res.stdout + res.stderr
    assert "DEBUG" in text  # the ingestor did log at DEBUG
    for secret in PASSWORDS.values():
        assert secret not in text


@pytest.mark.integration
def test_influx_v1_credentials_come_from_a_file_and_travel_in_a_header(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against an InfluxDB 1.x with authentication on: the password comes from a file
    (or the environment), goes in the Authorization header and never in the URL; a
    wrong one is a retryable failure (an operator fixes it; no data is dropped)."""
    import base64
    import urllib.parse
    import urllib.request

    from cloud_ingest.config import InfluxConfig
    from cloud_ingest.sinks.influx import InfluxV1Sink
    from shared.config import from_dict
    from shared.errors import RetryableSinkError

    password = "Pw-influx-5d1a93"
    svc = services.influxdb(tmp_path / "influx", auth=True).start()
    try:

        def query(q: str, auth: bool = True) -> None:
            req = urllib.request.Request(
                f"{svc.url}/query", data=urllib.parse.urlencode({"q": q}).encode()
            )
            if auth:
                token = base64.b64encode(f"admin:{password}".encode()).decode()
                req.add_header("Authorization", f"Basic {token}")
            urllib.request.urlopen(req, timeout=10).read()

        query(f"CREATE USER admin WITH PASSWORD '{password}' WITH ALL PRIVILEGES", auth=False)
        query("CREATE DATABASE t")
        pw = tmp_path / "influx.pw"
        pw.write_text(password + "\n")
        pw.chmod(0o600)
        base = {"url": svc.url, "database": "t", "username": "admin"}
        sink = InfluxV1Sink(from_dict(InfluxConfig, {**base, "password_file": str(pw)}))
        assert password not in sink.url
        sink.write(["m,device_id=d v=1 1000000000"])
        sink.close()

        monkeypatch.setenv("INFLUX_PW", "wrong")
        bad = InfluxV1Sink(from_dict(InfluxConfig, {**base, "password_env": "INFLUX_PW"}))
        with pytest.raises(RetryableSinkError, match="401"):
            bad.write(["m,device_id=d v=2 2000000000"])
        bad.close()
    finally:
        svc.stop()
