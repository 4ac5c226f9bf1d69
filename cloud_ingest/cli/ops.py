"""The operators' tools: the broker's ACL and config, the dashboards, the devices'
ack keys and the certificate authority."""

from __future__ import annotations

import sys

import click

from cloud_ingest.cli.app import DEFAULT_CONFIG, config_option, main
from cloud_ingest.config import IngestConfig
from shared.cli import EXIT_CONFIG, EXIT_FAILURE, load_or_exit


@main.command("broker-acl")
@click.option(
    "--ingestor",
    "ingestors",
    multiple=True,
    required=True,
    help="An ingestor identity (its MQTT username), e.g. ingest-1. Repeatable.",
)
@click.option(
    "--operator",
    "operators",
    multiple=True,
    help="An operator identity, which may send commands (`cloud-ingest command`). Repeatable.",
)
@click.option("--prefix", default="telemetry/v1", show_default=True, help="Topic prefix.")
@click.option(
    "--prefix-v2",
    default="telemetry/v2",
    show_default=True,
    help='Topic prefix of the batches of wire format v2 ("" = none).',
)
def broker_acl(
    ingestors: tuple[str, ...], operators: tuple[str, ...], prefix: str, prefix_v2: str
) -> None:
    """Print the cloud broker's ACL file (Mosquitto), for these ingestor identities.

    Devices (every other username, which must be its device id) may publish only
    their own batch (v1 and v2), alert, health, result and raw topics and read only their own ack
    and command topics; the ingestors read every batch, alert, health report and
    result and publish acks; operators publish commands and read results. Use
    it with `cloud-ingest broker-conf` (the listener's settings; docs/cloud-ingest.md,
    "Identities at the broker").
    """
    from cloud_ingest.ops.broker import mosquitto_acl
    from shared.topics import is_valid_id

    for option, names in (("--ingestor", ingestors), ("--operator", operators)):
        for name in names:
            if not is_valid_id(name):
                raise click.UsageError(f"{option} {name!r} is not a valid identity")
    if set(ingestors) & set(operators):
        raise click.UsageError("an identity cannot be both an ingestor and an operator")
    click.echo(mosquitto_acl(list(ingestors), prefix, list(operators), prefix_v2), nl=False)


@main.command("broker-conf")
@click.option(
    "--listener", default="8883 0.0.0.0", show_default=True, help="Mosquitto's listener line."
)
@click.option("--acl-file", required=True, type=click.Path(), help="The ACL (broker-acl).")
@click.option("--password-file", type=click.Path(), help="Mosquitto's password file, if any.")
@click.option("--ca-file", type=click.Path(), help="TLS: the CA of the clients' certificates.")
@click.option("--cert-file", type=click.Path(), help="TLS: the broker's certificate.")
@click.option("--key-file", type=click.Path(), help="TLS: the broker's key.")
@click.option(
    "--max-packet-size",
    type=click.IntRange(min=0),
    default=None,
    help="The largest MQTT packet a client may send, bytes (0: no limit). Default: "
    "the largest batch cloud-ingest takes (1 MiB) and 64 KiB for topic and properties.",
)
@click.option(
    "--crl-file",
    type=click.Path(),
    help="With TLS: require client certificates (CN = identity) and refuse those listed.",
)
def broker_conf(
    listener: str,
    acl_file: str,
    password_file: str | None,
    ca_file: str | None,
    cert_file: str | None,
    key_file: str | None,
    max_packet_size: int | None,
    crl_file: str | None,
) -> None:
    """Print the cloud broker's listener settings (a Mosquitto conf.d file).

    No anonymous clients, the client id bound to the identity, no retained
    messages, the ACL, a bound on packets; with --ca-file, --cert-file and
    --key-file, TLS; with --crl-file as well, a client certificate from
    `cloud-ingest pki` for every client.
    """
    from pathlib import Path

    from cloud_ingest.ops.broker import CLOUD_MAX_PACKET, mosquitto_conf

    tls_files = (ca_file, cert_file, key_file)
    if any(tls_files) and not all(tls_files):
        raise click.UsageError("TLS needs --ca-file, --cert-file and --key-file together")
    if crl_file and not all(tls_files):
        raise click.UsageError("--crl-file needs TLS (--ca-file, --cert-file, --key-file)")
    tls = (
        (Path(ca_file), Path(cert_file), Path(key_file))
        if ca_file and cert_file and key_file
        else None
    )
    click.echo(
        mosquitto_conf(
            listener,
            Path(password_file) if password_file else None,
            Path(acl_file),
            tls,
            Path(crl_file) if crl_file else None,
            CLOUD_MAX_PACKET if max_packet_size is None else max_packet_size,
        ),
        nl=False,
    )


@main.command("dashboards")
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder for the dashboards' JSON (one file per dashboard).",
)
def dashboards_cmd(out: str) -> None:
    """Write the Grafana dashboards (fleet, device, alerts, cloud ingest) as JSON.

    Built with Grafana's foundation SDK (pip install 'iot-telemetry[dashboards]').
    The same files are in ansible/roles/monitoring/files/grafana/dashboards, which
    the monitoring role provisions; docs/deploy.md says which Grafana versions.
    """
    from pathlib import Path

    try:
        from cloud_ingest.ops.dashboards import write_all
    except ImportError as exc:
        raise click.ClickException(
            f"{exc}: install the SDK with pip install 'iot-telemetry[dashboards]'"
        ) from None
    for path in write_all(Path(out)):
        click.echo(str(path))


@main.command("device-key")
@config_option("TOML config file with [acks] key_file (the ingestors' master key).")
@click.option("--device", "devices", multiple=True, required=True, help="Device id. Repeatable.")
def device_key_cmd(config_path: str | None, devices: tuple[str, ...]) -> None:
    """Print each device's ack key (hex), derived from [acks] key_file.

    Give the key to the device at provisioning, in the file its agent's
    forward.ack_key_file names (chmod 600). With it, the agent acts only on acks
    that the ingestors signed: a fake ack, even one a broker let through, cannot
    make it delete a batch the cloud did not store. Prints "<device> <key>" lines.
    """
    from shared.acks import device_key
    from shared.topics import is_valid_id

    cfg = load_or_exit(IngestConfig, config_path, DEFAULT_CONFIG)
    master = cfg.acks.master_key()
    if master is None:
        click.echo("error: [acks] key_file (or key_env) is not set in the config", err=True)
        sys.exit(EXIT_CONFIG)
    for device in devices:
        if not is_valid_id(device):
            raise click.UsageError(f"--device {device!r} is not a valid device id")
        click.echo(f"{device} {device_key(master, device).hex()}")


@main.group()
def pki() -> None:
    """A small CA for the fleet's client certificates (CN = device id).

    `init` creates the CA and an empty CRL in --dir; `issue` gives a device (or,
    with --server, the broker) a certificate and key, and prints the lines its
    agent's config needs; `revoke` adds a device to the CRL, which the broker
    reads as its crlfile. Keep --dir, which holds the CA's key, off the broker.
    With a PKI of your own (step-ca, Vault, AWS IoT) skip this: any certificate
    with CN = device id will do.
    """


pki_dir = click.option(
    "--dir",
    "folder",
    type=click.Path(file_okay=False),
    required=True,
    help="The CA's folder.",
)


@pki.command("init")
@pki_dir
def pki_init(folder: str) -> None:
    """Create the CA (ca.pem, ca.key 0600) and an empty CRL (crl.pem)."""
    from pathlib import Path

    from cloud_ingest.ops import pki as ca

    try:
        click.echo(ca.init(Path(folder)))
    except ca.PkiError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_FAILURE)


@pki.command("issue")
@pki_dir
@click.argument("name")
@click.option("--server", is_flag=True, help="A broker certificate for host or IP NAME.")
@click.option("--host", default="broker.example.com", show_default=True, help="Cloud broker host.")
@click.option("--port", type=int, default=8883, show_default=True, help="Cloud broker TLS port.")
@click.option(
    "--ack-master-key",
    "ack_master_key",
    type=click.Path(dir_okay=False),
    help="The ingestors' master key file ([acks] key_file): also write the device's "
    "ack key, issued/NAME.ackkey, which the printed config names.",
)
def pki_issue(
    folder: str, name: str, server: bool, host: str, port: int, ack_master_key: str | None
) -> None:
    """Issue NAME (a device id) a certificate and key, and print its agent's config lines.

    The lines turn ack verification on (forward.ack_key_file = issued/NAME.ackkey):
    with --ack-master-key that file is written too; without it, write it with
    `cloud-ingest device-key -c ingest.toml --device NAME` (the agent's config
    check fails until it is there)."""
    from pathlib import Path

    from cloud_ingest.ops import pki as ca
    from shared.auth import read_key
    from shared.config import Invalid

    try:
        master = read_key("ack_master_key", ack_master_key or "", "") if not server else None
    except Invalid as exc:
        click.echo(f"error: --ack-master-key: {exc.message}", err=True)
        sys.exit(EXIT_CONFIG)
    try:
        issued = ca.issue(Path(folder), name, server=server)
    except ca.PkiError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_FAILURE)
    click.echo(f"# {issued.cert} and {issued.key} (serial {issued.serial})", err=True)
    if server:
        return
    if master is not None:
        click.echo(f"# {ca.write_ack_key(Path(folder), name, master)} (its ack key)", err=True)
    else:
        click.echo(
            f"# write the device's ack key to {Path(folder) / 'issued' / (name + '.ackkey')}: "
            f"cloud-ingest device-key -c <ingest.toml> --device {name} (or pass "
            "--ack-master-key)",
            err=True,
        )
    click.echo(ca.agent_config_lines(Path(folder), name, host, port), nl=False)


@pki.command("revoke")
@pki_dir
@click.argument("name")
def pki_revoke(folder: str, name: str) -> None:
    """Revoke NAME's certificate: rewrite crl.pem; then restart the broker."""
    from pathlib import Path

    from cloud_ingest.ops import pki as ca

    try:
        click.echo(ca.revoke(Path(folder), name))
    except ca.PkiError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_FAILURE)
