"""``firmware-sim``: simulated microcontroller sensor nodes."""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

import click

from firmware_sim.config import NodeSpec, SimConfig
from shared.auth import AuthConfig
from shared.cli import EXIT_FAILURE, config_group, load_or_exit, setup_logging
from shared.config import Invalid
from shared.tls import TlsConfig


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Simulated sensor nodes that publish readings to the device's local broker.

    Each node publishes chunks of readings on sensors/<node>/<sensor> at QoS 1,
    as microcontrollers do to a gateway. Readings are deterministic under a seed
    and a start time; every reading is also written to a ground-truth file.

    Exit codes: 0 ok, 1 failure (broker unreachable, unacknowledged messages),
    2 bad config or usage.
    """


@main.command()
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="TOML config file (see `firmware-sim config sample`).",
)
@click.option("--duration", type=float, help="Event-time seconds to simulate (overrides config).")
@click.option("--speed", type=float, help="Event-time seconds per wall-clock second.")
@click.option("--seed", type=int, help="Random seed.")
@click.option("--start-ns", type=int, help="Event time of the first reading (0 = now).")
@click.option(
    "--truth",
    "truth_path",
    type=click.Path(dir_okay=False),
    help="Where to write the ground-truth JSON Lines file.",
)
@click.option("--host", help="Broker host.")
@click.option("--port", type=int, help="Broker port.")
@click.option(
    "--full-precision",
    is_flag=True,
    help="Unrounded noise instead of each part's resolution (resolution = 0 on every sensor).",
)
def run(
    config_path: str | None,
    duration: float | None,
    speed: float | None,
    seed: int | None,
    start_ns: int | None,
    truth_path: str | None,
    host: str | None,
    port: int | None,
    full_precision: bool,
) -> None:
    """Publish readings for --duration seconds of event time, then exit.

    Prints one JSON line with the number of readings and messages produced.
    """
    cfg = load_or_exit(SimConfig, config_path)
    if full_precision:
        cfg = dataclasses.replace(cfg, nodes=unrounded(cfg.nodes))
    try:  # the options go through the config's own checks
        cfg = dataclasses.replace(
            cfg,
            duration_s=cfg.duration_s if duration is None else duration,
            speed=cfg.speed if speed is None else speed,
            seed=cfg.seed if seed is None else seed,
            start_ns=cfg.start_ns if start_ns is None else start_ns,
            truth_path=cfg.truth_path if truth_path is None else truth_path,
            broker=dataclasses.replace(
                cfg.broker,
                host=cfg.broker.host if host is None else host,
                port=cfg.broker.port if port is None else port,
            ),
        )
    except Invalid as exc:
        raise click.UsageError(f"{exc.key}: {exc.message}") from None
    setup_logging("INFO")
    from firmware_sim.run import run_sim

    try:
        res = run_sim(cfg)
    except ConnectionError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_FAILURE)
    click.echo(
        json.dumps(
            {
                "produced": res.readings,
                "messages": res.messages,
                "start_ns": res.start_ns,
                "end_ns": res.end_ns,
                "truth": cfg.truth_path,
            }
        )
    )


main.add_command(config_group(SimConfig, "firmware_sim"))


def unrounded(nodes: tuple[NodeSpec, ...]) -> tuple[NodeSpec, ...]:
    """``nodes`` with every sensor's readings at full precision."""
    return tuple(
        dataclasses.replace(
            n, sensors=tuple(dataclasses.replace(s, resolution=0.0) for s in n.sensors)
        )
        for n in nodes
    )


@main.command()
@click.option("--devices", type=int, required=True, help="How many devices to simulate.")
@click.option("--batches", type=int, default=6, show_default=True, help="Batches per device.")
@click.option("--sensors", type=int, default=10, show_default=True, help="Sensors per device.")
@click.option(
    "--interval-s",
    type=float,
    default=10.0,
    show_default=True,
    help="Event time between a device's batches (its window width).",
)
@click.option(
    "--speed",
    type=float,
    default=1.0,
    show_default=True,
    help="Event seconds per wall-clock second; 0 sends as fast as the in-flight cap allows.",
)
@click.option("--readings", type=int, default=10, show_default=True, help="Mean readings/window.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Cloud broker host.")
@click.option("--port", type=int, default=1883, show_default=True, help="Cloud broker port.")
@click.option("--prefix", default="telemetry/v1", show_default=True, help="Topic prefix.")
@click.option("--seed", type=int, default=1, show_default=True, help="Random seed.")
@click.option("--start-ns", type=int, default=0, help="First window start (0: end at now).")
@click.option(
    "--max-in-flight",
    type=int,
    default=1000,
    show_default=True,
    help="Batches without a cloud ack at most; publishing waits beyond that.",
)
@click.option("--ack-timeout", type=float, default=30.0, show_default=True, help="Resend after.")
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Give up after.")
@click.option("--truth", "truth_path", type=click.Path(dir_okay=False), help="Ground truth JSONL.")
@click.option("--device-prefix", default="fleet", help="Device ids: PREFIX-00000 …")
@click.option(
    "--reconnect-max-s",
    type=float,
    default=5.0,
    show_default=True,
    help="Longest wait between two attempts to reconnect to a lost broker.",
)
@click.option("--username", default="", help="MQTT username (with a password, below).")
@click.option(
    "--password-file",
    default="",
    help="File holding the MQTT password (not readable by every user).",
)
@click.option("--password-env", default="", help="Environment variable holding the password.")
@click.option("--ca-file", default="", help="CA (PEM) of the broker's TLS certificate: TLS on.")
@click.option("--cert-file", default="", help="Client certificate (PEM), with --key-file.")
@click.option("--key-file", default="", help="Client certificate's key (PEM).")
@click.option(
    "--full-precision",
    is_flag=True,
    help="Unrounded Gaussian readings instead of each sensor's part resolution.",
)
@click.option(
    "--wire-version",
    type=click.Choice(["1", "2"]),
    default="1",
    show_default=True,
    help="Wire format of the batches; 2 goes to telemetry/v2/<device>/batch.",
)
def fleet(**kw: Any) -> None:
    """Simulate a fleet of devices at the wire level, for load tests of cloud ingest.

    Builds every device's batches up front (one window per sensor per batch, with
    the statistics and quantile sketch an agent sends; the sensors take turns
    being a temperature, humidity, pressure, ADC and vibration sensor, each
    rounded to its part's resolution), publishes them on
    <prefix>/<device>/batch, consumes the acks, resends what is not acked in
    time, and prints one JSON line: batches, points, acked, rejected, unacked,
    points_per_s and the publish-to-ack latency at p50 and p99. Exit 1 unless
    every batch was acked as stored.
    """
    from firmware_sim.fleet import FleetSpec, run_fleet

    setup_logging("WARNING")
    try:
        spec = FleetSpec(
            devices=kw["devices"],
            batches=kw["batches"],
            sensors=kw["sensors"],
            interval_s=kw["interval_s"],
            speed=kw["speed"],
            readings_per_window=kw["readings"],
            full_precision=kw["full_precision"],
            wire_version=int(kw["wire_version"]),
            host=kw["host"],
            port=kw["port"],
            prefix=kw["prefix"],
            seed=kw["seed"],
            start_ns=kw["start_ns"],
            max_in_flight=kw["max_in_flight"],
            ack_timeout_s=kw["ack_timeout"],
            timeout_s=kw["timeout"],
            truth_path=kw["truth_path"],
            device_prefix=kw["device_prefix"],
            reconnect_max_s=kw["reconnect_max_s"],
            auth=AuthConfig(kw["username"], kw["password_file"], kw["password_env"]),
            tls=TlsConfig(kw["ca_file"], kw["cert_file"], kw["key_file"]),
        )
    except (ValueError, Invalid) as exc:
        raise click.UsageError(str(exc)) from None
    try:
        res = run_fleet(spec)
    except ConnectionError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_FAILURE)
    click.echo(json.dumps(res.summary()))
    if res.acked != res.batches:
        sys.exit(EXIT_FAILURE)
