"""``cloud-ingest``: the cloud side of the telemetry path."""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click

from cloud_ingest.config import ArchiveConfig, IngestConfig
from shared.cli import (
    CONFIG_DIR,
    EXIT_CONFIG,
    EXIT_FAILURE,
    config_group,
    load_or_exit,
    setup_logging,
)

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


def lake_options(f: F) -> F:
    """``-c``, ``--from`` and ``--s3-endpoint-url``: the options of every command that
    reads the lake (replay, rollup, compact)."""
    for option in reversed(
        [
            click.option(
                "-c",
                "--config",
                "config_path",
                type=click.Path(dir_okay=False),
                help="TOML config file: [influx] says where to write, [archive] where the lake is.",
            ),
            click.option(
                "--from",
                "source",
                help="The lake: s3://bucket/prefix or file:///dir (default: the config's archive).",
            ),
            click.option(
                "--s3-endpoint-url",
                help="S3 endpoint for --from (default: the config's s3_endpoint_url).",
            ),
        ]
    ):
        f = option(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Cloud ingest: MQTT batches from devices into InfluxDB and a Parquet lake.

    `run` subscribes to every device's batch and alert topics, decodes and
    validates each message, writes one InfluxDB point per (device, sensor,
    window) and the rows of each group of batches as one Parquet object per day
    to the lake (S3 or a local directory), then acks the devices. Invalid input
    goes to the archive's quarantine/ folder with its reason. `replay` rebuilds
    InfluxDB from the lake; `rollup` writes hourly and daily roll-ups; `compact`
    folds a day's objects into one, current window versions only.

    Exit codes: 0 ok, 1 failure, 2 bad config or usage.
    """


CONFIG_ENV = "CLOUD_INGEST_CONFIG"
DEFAULT_CONFIG = CONFIG_DIR / "cloud-ingest.toml"


def config_option(help_text: str) -> Callable[[F], F]:
    """``-c/--config FILE`` with this help, and the default every command shares."""
    option: Callable[[F], F] = click.option(
        "-c",
        "--config",
        "config_path",
        type=click.Path(dir_okay=False),
        envvar=CONFIG_ENV,
        help=f"{help_text} Default: ${CONFIG_ENV}, else {DEFAULT_CONFIG} if it exists.",
    )
    return option


@main.command()
@config_option("TOML config file (see `cloud-ingest config sample`). Defaults apply without one.")
@click.option(
    "--ready-file",
    type=click.Path(dir_okay=False),
    help="Create this file once subscribed (for supervisors and scripts to wait on).",
)
def run(config_path: str | None, ready_file: str | None) -> None:
    """Run until SIGTERM or Ctrl-C; finish the batches in hand (for up to
    retry.shutdown_grace_s), then exit."""
    cfg = load_or_exit(IngestConfig, config_path, DEFAULT_CONFIG)
    setup_logging(cfg.log_level, cfg.log_format)
    from cloud_ingest.service import run_service

    sys.exit(run_service(cfg, ready_file))


@main.command()
@lake_options
@click.option("--since", help="Windows starting at or after this: ISO 8601 (UTC) or ns.")
@click.option("--until", help="Windows starting before this (exclusive), same forms.")
@click.option("--device", "devices", multiple=True, help="Only this device (repeatable).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def replay(
    config_path: str | None,
    source: str | None,
    since: str | None,
    until: str | None,
    devices: tuple[str, ...],
    s3_endpoint_url: str | None,
    quiet: bool,
) -> None:
    """Rebuild InfluxDB from the Parquet lake, through the ingestor's write path.

    Idempotent: every point is keyed by its series and window start, so a replay
    over data that is already there rewrites the same values. Use it after losing
    an InfluxDB, to fill a new one, or after changing its retention. Prints one
    JSON line: objects, batches, points, alerts, rejected, damaged, seconds. A lake
    object that cannot be read is skipped and counted as damaged. Exit 1 if
    InfluxDB rejected anything or an object was damaged (the log names each), or
    if the lake or InfluxDB failed.
    """
    import asyncio
    import dataclasses
    import json
    import time

    from cloud_ingest.replay import ReplayFilter, plan
    from cloud_ingest.replay import replay as run_replay
    from cloud_ingest.sinks.archive import open_archive
    from cloud_ingest.sinks.influx import make_point_sink
    from cloud_ingest.writer import ShuttingDown
    from shared.errors import SinkError
    from shared.timefmt import parse_time

    cfg = load_or_exit(IngestConfig, config_path, DEFAULT_CONFIG)
    setup_logging("WARNING" if cfg.log_level == "INFO" else cfg.log_level, cfg.log_format)
    try:
        flt = ReplayFilter(
            None if since is None else parse_time(since),
            None if until is None else parse_time(until),
            frozenset(devices),
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    store = open_archive(_lake_config(cfg, source, s3_endpoint_url))
    points = make_point_sink(cfg.influx)
    started = time.monotonic()
    try:
        total = sum(len(objs) for objs in plan(store, flt).values())
        with click.progressbar(
            length=total, label="replaying", file=sys.stderr, hidden=quiet
        ) as bar:
            res = asyncio.run(_until_signal(run_replay, cfg, store, points, flt, bar.update))
    except (SinkError, ShuttingDown) as exc:
        click.echo(f"error: {exc} (a replay can be run again as it is)", err=True)
        sys.exit(EXIT_FAILURE)
    finally:
        points.close()
        store.close()
    out = {**dataclasses.asdict(res), "seconds": round(time.monotonic() - started, 2)}
    click.echo(json.dumps(out))
    if res.rejected or res.damaged:
        sys.exit(EXIT_FAILURE)


@main.command()
@lake_options
@click.option(
    "--since",
    required=True,
    help="Start: ISO 8601 (UTC), ns, or a time before now (-1d); widened to a period.",
)
@click.option("--until", help="End (exclusive), same forms; default now; widened to a period.")
@click.option(
    "--period",
    "periods",
    type=click.Choice(["1h", "1d"]),
    multiple=True,
    help="Roll-up period (repeatable; default both).",
)
@click.option("--device", help="Only this device.")
def rollup(
    config_path: str | None,
    source: str | None,
    since: str,
    until: str | None,
    periods: tuple[str, ...],
    device: str | None,
    s3_endpoint_url: str | None,
) -> None:
    """Write hourly and daily roll-ups of the lake's windows to InfluxDB.

    Points go to <measurement>_1h and <measurement>_1d with the windows' tags.
    Quantiles come from merging the windows' DDSketches, so an hour's p99 is
    within 1 % of the reading at rank floor(0.99·(n-1)) of all its n readings,
    not an average of window p99s. Run it from a timer for the last closed hour
    and day; running a period again overwrites it (after late data, say). Prints
    one JSON line per period.
    """
    import json

    from cloud_ingest.rollup import rollup_lines
    from cloud_ingest.sinks.archive import open_archive
    from cloud_ingest.sinks.influx import make_point_sink
    from shared.errors import LakeObjectError, RetryableSinkError, SinkError

    cfg = load_or_exit(IngestConfig, config_path, DEFAULT_CONFIG)
    setup_logging("WARNING" if cfg.log_level == "INFO" else cfg.log_level, cfg.log_format)
    since_ns, until_ns = _time_range(since, until)
    store = open_archive(_lake_config(cfg, source, s3_endpoint_url))
    points = make_point_sink(cfg.influx)
    try:
        for period in periods or ("1h", "1d"):
            lines = rollup_lines(
                store,
                since_ns,
                until_ns,
                period,
                cfg.influx.measurement,
                device,
                cfg.influx.allowed_tags,
            )
            step = cfg.influx.max_lines_per_write
            for i in range(0, len(lines), step):
                points.write(lines[i : i + step])
            click.echo(json.dumps({"period": period, "points": len(lines)}))
    except SinkError as exc:
        kind = "retryable" if isinstance(exc, RetryableSinkError) else "permanent"
        click.echo(f"error: {exc} ({kind}; the roll-up can be run again as it is)", err=True)
        sys.exit(EXIT_FAILURE)
    except LakeObjectError as exc:
        click.echo(
            f"error: {exc} (move it out of the lake, or replace it, and run the roll-up"
            " again: a roll-up without it would be wrong)",
            err=True,
        )
        sys.exit(EXIT_FAILURE)
    finally:
        points.close()
        store.close()


@main.command()
@lake_options
@click.option(
    "--since-day", required=True, help="First day (YYYY-MM-DD, UTC, or -2d: two days ago)."
)
@click.option("--until-day", help="Last day (inclusive); default yesterday (UTC).")
def compact(
    config_path: str | None,
    source: str | None,
    since_day: str,
    until_day: str | None,
    s3_endpoint_url: str | None,
) -> None:
    """Compact the lake: one aggregates object per day, current versions only.

    The ingestor writes one object per group of batches; a window revised by late
    data is then in two, and a batch delivered twice may be too. This rewrites
    each day as one object with the highest revision of every window (exactly
    what InfluxDB holds), and each day's alerts of a device as one object with
    each alert once, then deletes the objects it read. Safe to run while ingesting and
    to run again. Run it for closed days (the default ends yesterday). Prints one
    JSON line: partitions, objects_in, rows_in, rows_out, damaged. A partition with
    an object that cannot be read is left as it is, its key listed in damaged,
    and the exit code is 1.
    """
    import dataclasses
    import datetime
    import json

    from cloud_ingest.compact import compact as run_compact
    from cloud_ingest.sinks.archive import open_archive
    from shared.errors import SinkError
    from shared.timefmt import parse_day

    cfg = load_or_exit(IngestConfig, config_path, DEFAULT_CONFIG)
    setup_logging("WARNING" if cfg.log_level == "INFO" else cfg.log_level, cfg.log_format)
    yesterday = datetime.datetime.now(datetime.UTC).date() - datetime.timedelta(days=1)
    until_day = until_day or yesterday.isoformat()
    try:
        since_day = parse_day(since_day)
    except ValueError as exc:
        raise click.UsageError(f"--since-day: {exc}") from None
    try:
        until_day = parse_day(until_day)
    except ValueError as exc:
        raise click.UsageError(f"--until-day: {exc}") from None
    store = open_archive(_lake_config(cfg, source, s3_endpoint_url))
    try:
        res = run_compact(store, since_day, until_day)
    except SinkError as exc:
        click.echo(f"error: {exc} (run it again: compaction resumes)", err=True)
        sys.exit(EXIT_FAILURE)
    finally:
        store.close()
    click.echo(json.dumps(dataclasses.asdict(res)))
    if res.damaged:
        sys.exit(EXIT_FAILURE)


async def _until_signal(run: Callable[..., Awaitable[T]], *args: object) -> T:
    """``await run(*args, stop=…)``, with SIGINT and SIGTERM setting ``stop``: the
    retries then end within retry.shutdown_grace_s, with one line, not a traceback."""
    import asyncio
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return await run(*args, stop=stop)


@main.command("broker-acl")
@click.option(
    "--ingestor",
    "ingestors",
    multiple=True,
    required=True,
    help="An ingestor identity (its MQTT username), e.g. ingest-1. Repeatable.",
)
@click.option("--prefix", default="telemetry/v1", show_default=True, help="Topic prefix.")
def broker_acl(ingestors: tuple[str, ...], prefix: str) -> None:
    """Print the cloud broker's ACL file (Mosquitto), for these ingestor identities.

    Devices (every other username, which must be its device id) may publish only
    their own batch, alert and health topics and read only their own ack topic;
    the ingestors read every batch, alert and health report and publish acks. Use
    it with `cloud-ingest broker-conf` (the listener's settings; docs/cloud-ingest.md,
    "Identities at the broker").
    """
    from cloud_ingest.broker import mosquitto_acl
    from shared.topics import is_valid_id

    for name in ingestors:
        if not is_valid_id(name):
            raise click.UsageError(f"--ingestor {name!r} is not a valid identity")
    click.echo(mosquitto_acl(list(ingestors), prefix), nl=False)


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

    from cloud_ingest.broker import CLOUD_MAX_PACKET, mosquitto_conf

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


def _time_range(since: str, until: str | None) -> tuple[int, int]:
    """--since and --until (default now) in ns, or a usage error naming the problem."""
    import time

    from shared.timefmt import parse_time

    try:
        since_ns = parse_time(since)
        until_ns = time.time_ns() if until is None else parse_time(until)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    return since_ns, until_ns


@main.command("report")
@config_option("TOML config file: [influx] says which InfluxDB to read.")
@click.option(
    "--since", required=True, help="Start: ISO 8601 (UTC), ns, or a time before now (-7d)."
)
@click.option("--until", help="End (exclusive), same forms; default now.")
@click.option(
    "--out",
    default="fleet-report.html",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="The HTML file to write.",
)
@click.option(
    "--silent-after",
    default=3600.0,
    show_default=True,
    type=click.FloatRange(min=1),
    help="Seconds without a message after which a device counts as silent.",
)
def report_cmd(
    config_path: str | None, since: str, until: str | None, out: str, silent_after: float
) -> None:
    """Write the fleet report: one self-contained HTML file with plots.

    Data completeness per device and day and each sensor's daily range and p99
    (from the daily roll-ups: run `cloud-ingest rollup` first, or let its timer),
    alerts over time, silent devices, and ingest lag (from the agents' health
    reports). The plots are images inside the file, so it can be mailed. Needs
    matplotlib (pip install 'iot-telemetry[report]').
    """
    import json
    import time
    from pathlib import Path

    from shared.errors import SinkError

    cfg = load_or_exit(IngestConfig, config_path, DEFAULT_CONFIG)
    setup_logging("WARNING" if cfg.log_level == "INFO" else cfg.log_level, cfg.log_format)
    since_ns, until_ns = _time_range(since, until)
    if until_ns <= since_ns:
        raise click.UsageError("--until must be after --since")
    try:
        from cloud_ingest.influxql import InfluxQLReader
        from cloud_ingest.report import gather, render_html
    except ImportError as exc:
        raise click.ClickException(
            f"{exc}: install matplotlib with pip install 'iot-telemetry[report]'"
        ) from None
    reader = InfluxQLReader(cfg.influx)
    try:
        rep = gather(
            reader,
            since_ns,
            until_ns,
            measurement=cfg.influx.measurement,
            health_measurement=cfg.influx.health_measurement,
            alert_measurement=cfg.influx.alert_measurement,
            silent_after_s=silent_after,
            now_ns=time.time_ns(),
        )
    except SinkError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_FAILURE)
    finally:
        reader.close()
    path = Path(out)
    tmp = path.with_name(path.name + ".partial")
    try:
        tmp.write_text(render_html(rep))
        tmp.replace(path)
    except OSError as exc:
        click.echo(f"error: cannot write {path}: {exc.strerror}", err=True)
        sys.exit(EXIT_FAILURE)
    click.echo(
        json.dumps(
            {
                "out": str(path),
                "devices": len(rep.last_heard),
                "silent": len(rep.silent()),
                "sensors": len(rep.daily),
                "alerts": sum(n for pts in rep.alerts.values() for _, n in pts),
            }
        )
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
        from cloud_ingest.dashboards import write_all
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

    from cloud_ingest import pki as ca

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

    from cloud_ingest import pki as ca
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

    from cloud_ingest import pki as ca

    try:
        click.echo(ca.revoke(Path(folder), name))
    except ca.PkiError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_FAILURE)


def _lake_config(cfg: IngestConfig, source: str | None, endpoint: str | None) -> ArchiveConfig:
    """The lake to read: --from (and --s3-endpoint-url) over the config's [archive].
    A bad --from is one line and exit 2, like a bad config."""
    from pathlib import Path

    from shared.config import Invalid

    try:
        lake = ArchiveConfig(
            url=source or cfg.archive.url,
            s3_endpoint_url=cfg.archive.s3_endpoint_url if endpoint is None else endpoint,
            s3_region=cfg.archive.s3_region,
        )
    except Invalid as exc:
        click.echo(f"error: --from: {exc.message}", err=True)
        sys.exit(EXIT_CONFIG)
    folder = lake.url[len("file://") :] if lake.url.startswith("file://") else None
    if folder is not None and not Path(folder).is_dir():
        click.echo(f"error: --from: no lake at {folder} (not a directory)", err=True)
        sys.exit(EXIT_CONFIG)
    return lake


main.add_command(config_group(IngestConfig, "cloud_ingest"))
