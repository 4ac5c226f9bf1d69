"""The cloud link over TLS against a real Mosquitto TLS listener, and doctor's
certificate check. Certificates are made here with `cryptography`."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from devstack import influxq, services
from devstack.pipeline import IngestTarget, Pipeline, PipelineSpec
from devstack.publish import publish_all
from devstack.services import Service, wait_until
from edge_agent.cli import main as agent_main
from shared.config import from_dict
from shared.errors import ConfigError
from shared.readings import encode_chunk
from shared.tls import TlsConfig

pytestmark = pytest.mark.integration
S = 10**9


def _pem(path: Path, obj: object) -> Path:
    if isinstance(obj, x509.Certificate):
        path.write_bytes(obj.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(
            obj.private_bytes(  # type: ignore[attr-defined]
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return path


def make_pki(folder: Path, days: int) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 valid for ``days``: (ca, cert, key)."""
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return (
        _pem(folder / "ca.pem", ca),
        _pem(folder / "server.pem", cert),
        _pem(folder / "server.key", key),
    )


@pytest.fixture
def tls_broker(tmp_path: Path) -> object:
    ca, cert, key = make_pki(tmp_path / "pki", days=400)
    svc = services.mosquitto(tmp_path / "mq-tls", tls=(ca, cert, key)).start()
    yield svc, ca
    svc.stop()


def test_batches_cross_a_tls_link_and_doctor_checks_the_certificate(
    fresh,
    tls_broker,
    influxdb: Service,
    influx_db: str,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    cloud, ca = tls_broker
    local = fresh("mosquitto")
    pipe = Pipeline(
        PipelineSpec(
            workdir=tmp_path / "run",
            local_port=local.port,
            cloud_port=cloud.port,
            cloud_tls={"ca_file": str(ca)},
            targets=[
                IngestTarget(
                    "t",
                    {"api": "v1", "url": influxdb.url, "database": influx_db},
                    {"url": f"file://{tmp_path / 'archive'}"},
                )
            ],
        )
    )
    t0 = (time.time_ns() // (10 * S) - 3) * 10 * S
    try:
        pipe.start_ingestors()
        agent = pipe.start_agent()
        publish_all(
            local.port,
            [("sensors/n1/t", encode_chunk("C", [t0 + i * S], [float(i)])) for i in range(5)],
        )
        cfg = str(pipe.dir / "edge-agent.toml")
        wait_until(
            lambda: (
                json.loads(CliRunner().invoke(agent_main, ["status", "-c", cfg, "--json"]).stdout)[
                    "counters"
                ].get("readings_stored")
                == 5
            ),
            30,
            "intake",
        )
        assert CliRunner().invoke(agent_main, ["flush", "-c", cfg]).exit_code == 0
        assert influxq.total_count(influxq.v1_windows(influxdb.url, influx_db)) == 5
        res = CliRunner().invoke(agent_main, ["doctor", "-c", cfg, "--json"])
        checks = {c["name"]: c for c in json.loads(res.stdout)}
        assert checks["forward.broker"]["level"] == "ok"
        assert checks["tls certificate"]["level"] == "ok"
        assert "expires in 400 days" in checks["tls certificate"]["detail"]
        assert agent.terminate() == 0
    finally:
        pipe.stop_all()


def test_doctor_warns_before_expiry_and_fails_on_a_wrong_ca(tmp_path: Path) -> None:
    ca, cert, key = make_pki(tmp_path / "pki", days=10)
    other_ca, _, _ = make_pki(tmp_path / "other", days=10)
    broker = services.mosquitto(tmp_path / "mq", tls=(ca, cert, key)).start()
    try:
        for trust, level, text in (
            (ca, "warn", "expires in 10 days"),
            (other_ca, "fail", "certificate verify failed"),
        ):
            cfg = tmp_path / "a.toml"
            cfg.write_text(
                f'[storage]\npath = "{tmp_path / "a.sqlite"}"\n'
                f"[forward.broker]\nport = {broker.port}\n"
                f'[forward.broker.tls]\nca_file = "{trust}"\n'
            )
            res = CliRunner().invoke(agent_main, ["doctor", "-c", str(cfg), "--json"])
            checks = {c["name"]: c for c in json.loads(res.stdout)}
            assert checks["tls certificate"]["level"] == level, checks["tls certificate"]
            assert text in checks["tls certificate"]["detail"]
    finally:
        broker.stop()


def test_tls_config_names_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        from_dict(TlsConfig, {"ca_file": str(tmp_path / "nope.pem")})
    assert e.value.key == "ca_file" and "file not found" in str(e.value)
    (tmp_path / "c.pem").write_text("x")
    with pytest.raises(ConfigError) as e:
        from_dict(
            TlsConfig, {"ca_file": str(tmp_path / "c.pem"), "cert_file": str(tmp_path / "c.pem")}
        )
    assert e.value.key == "cert_file"


def test_firmware_sim_run_and_fleet_speak_tls(tls_broker: Any, tmp_path: Path) -> None:
    """firmware-sim's two clients use [broker.tls] / --ca-file: run publishes over
    TLS; fleet connects and subscribes over TLS (no ingestor here: it times out with
    every batch unacked, exit 1, after publishing them)."""
    import json
    import subprocess

    from devstack.pipeline import BIN, toml_dumps

    svc, ca = tls_broker
    cfg = tmp_path / "sim.toml"
    broker = {"port": svc.port, "tls": {"ca_file": str(ca)}}
    cfg.write_text(toml_dumps({"duration_s": 2.0, "speed": 100.0, "broker": broker}))
    res = subprocess.run(
        [str(BIN / "firmware-sim"), "run", "-c", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["produced"] > 0
    args = ["--devices", "1", "--batches", "1", "--port", str(svc.port), "--timeout", "3"]
    res = subprocess.run(
        [str(BIN / "firmware-sim"), "fleet", *args, "--ca-file", str(ca)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 1 and json.loads(res.stdout)["unacked"] == 1, res.stderr
    plain = subprocess.run(
        [str(BIN / "firmware-sim"), "fleet", *args], capture_output=True, text=True, timeout=60
    )
    assert plain.returncode == 1 and plain.stdout == "", plain.stdout  # no TLS: no connection


def test_system_ca_verifies_against_the_system_trust_store(tls_broker: Any) -> None:
    """system_ca = true turns TLS on with the system's CAs (brokers with a public
    certificate): the test broker's private CA is not among them, so the handshake
    fails verification, where ca_file pointing at that CA succeeds."""
    import ssl

    from shared.tls import server_certificate_expiry

    svc, ca = tls_broker
    server_certificate_expiry("127.0.0.1", svc.port, TlsConfig(ca_file=str(ca)))
    with pytest.raises(ssl.SSLCertVerificationError):
        server_certificate_expiry("127.0.0.1", svc.port, TlsConfig(system_ca=True))
