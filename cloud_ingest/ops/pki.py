"""A small certificate authority for the fleet: ``cloud-ingest pki``.

One folder holds it::

    <dir>/ca.pem  ca.key            the CA (the key 0600: keep this folder off the broker)
    <dir>/crl.pem                   revoked certificates (Mosquitto ``crlfile``)
    <dir>/issued/<name>.pem .key    a device's (or the broker's) certificate and key
    <dir>/issued/<name>.serial      its serial number
    <dir>/issued/<name>.serials     every serial ever issued to the name, for revocation
    <dir>/issued/<name>.ackkey      the device's ack key (``issue --ack-master-key``)

A device's certificate has CN = its device id: with ``use_identity_as_username``
the broker takes that as the client's identity, which the ACL's patterns use
(cloud_ingest/ops/broker.py). An operator with a PKI of their own (step-ca, Vault,
AWS IoT) skips this and points ``[forward.broker.tls]`` at their files; the only
requirement is CN = device id.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.topics import is_valid_id

CA_DAYS = 3650
CERT_DAYS = 825


class PkiError(Exception):
    """A PKI folder or request that cannot be used; the message is for people."""


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path
    serial: int


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def init(folder: Path, name: str = "telemetry fleet CA") -> Path:
    """Create the CA and an empty CRL; refuses to overwrite an existing CA."""
    if (folder / "ca.key").exists():
        raise PkiError(f"{folder} already holds a CA (ca.key); refusing to overwrite it")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write(folder / "ca.key", _key_pem(key), private=True)
    _write(folder / "ca.pem", cert.public_bytes(serialization.Encoding.PEM))
    _write_crl(folder, [])
    return folder / "ca.pem"


def _load_ca(folder: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes())
        key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), None)
    except FileNotFoundError:
        raise PkiError(f"no CA in {folder}: run `cloud-ingest pki init --dir {folder}`") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{folder}/ca.key is not an EC key")
    return cert, key


def issue(folder: Path, name: str, *, server: bool = False) -> Issued:
    """A certificate and key for device ``name`` (CN = name, client auth), or with
    ``server`` for the broker at host or IP ``name`` (server auth)."""
    if not server and not is_valid_id(name):
        raise PkiError(f"{name!r} is not a valid device id")
    ca, ca_key = _load_ca(folder)
    key = ec.generate_private_key(ec.SECP256R1())
    serial = x509.random_serial_number()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if server:
        try:
            san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            san = x509.DNSName(name)
        builder = builder.add_extension(x509.SubjectAlternativeName([san]), critical=False)
        usage = ExtendedKeyUsageOID.SERVER_AUTH
    else:
        usage = ExtendedKeyUsageOID.CLIENT_AUTH
    cert = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False).sign(
        ca_key, hashes.SHA256()
    )
    out = folder / "issued"
    earlier = _serials(folder, name)  # every certificate issued to the name stays valid
    _write(out / f"{name}.key", _key_pem(key), private=True)
    _write(out / f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM))
    _write(out / f"{name}.serial", f"{serial}\n".encode())
    _write(out / f"{name}.serials", "".join(f"{n}\n" for n in [*earlier, serial]).encode())
    return Issued(out / f"{name}.pem", out / f"{name}.key", serial)


def _serials(folder: Path, name: str) -> list[int]:
    """Every serial issued to ``name``: ``.serials``, and ``.serial`` (the newest;
    the only record of folders from before ``.serials``)."""
    out: list[int] = []
    for suffix in (".serials", ".serial"):
        try:
            text = (folder / "issued" / f"{name}{suffix}").read_text()
        except FileNotFoundError:
            continue
        out += [int(line) for line in text.split() if line.strip()]
    return list(dict.fromkeys(out))


def revoke(folder: Path, name: str) -> Path:
    """Add every certificate ever issued to ``name`` to the CRL (an issue again, to
    replace a lost key, must not leave the old one valid); the broker refuses them
    once it has re-read the CRL (Mosquitto: restart, or SIGHUP on versions that
    reload it)."""
    serials = _serials(folder, name)
    if not serials:
        raise PkiError(f"no certificate issued to {name!r} in {folder}")
    revoked = _revoked(folder)
    revoked += [n for n in serials if n not in revoked]
    return _write_crl(folder, revoked)


def write_ack_key(folder: Path, name: str, master: bytes) -> Path:
    """The device's ack key (shared/acks.py), derived from the ingestors' master key,
    as the hex file its agent's ``forward.ack_key_file`` names (0600)."""
    from shared.acks import device_key

    path = folder / "issued" / f"{name}.ackkey"
    _write(path, (device_key(master, name).hex() + "\n").encode(), private=True)
    return path


def _revoked(folder: Path) -> list[int]:
    try:
        crl = x509.load_pem_x509_crl((folder / "crl.pem").read_bytes())
    except FileNotFoundError:
        return []
    return [r.serial_number for r in crl]


def _write_crl(folder: Path, serials: list[int]) -> Path:
    ca, ca_key = _load_ca(folder)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(_now() - dt.timedelta(minutes=5))
        .next_update(_now() + dt.timedelta(days=CA_DAYS))
    )
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(_now() - dt.timedelta(minutes=1))
            .build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())
    _write(folder / "crl.pem", crl.public_bytes(serialization.Encoding.PEM))
    return folder / "crl.pem"


def agent_config_lines(folder: Path, device: str, host: str, port: int) -> str:
    """The lines an agent's config needs to reach the cloud broker as ``device``, and
    to act only on acks the ingestors signed (``ack_key_file``: the device's key,
    ``issue --ack-master-key`` writes it)."""
    issued = folder / "issued"
    return (
        f'device_id = "{device}"\n\n'
        "[forward]\n"
        f'ack_key_file = "{(issued / f"{device}.ackkey").resolve()}"\n\n'
        "[forward.broker]\n"
        f'host = "{host}"\nport = {port}\n\n'
        "[forward.broker.tls]\n"
        f'ca_file = "{(folder / "ca.pem").resolve()}"\n'
        f'cert_file = "{(issued / f"{device}.pem").resolve()}"\n'
        f'key_file = "{(issued / f"{device}.key").resolve()}"\n'
    )
