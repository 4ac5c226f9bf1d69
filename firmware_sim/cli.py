"""``firmware-sim``: simulated microcontroller sensor nodes."""

from __future__ import annotations

import dataclasses
import json
import sys

import click

from firmware_sim.config import SimConfig
from shared.cli import EXIT_FAILURE, config_group, load_or_exit, setup_logging


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
def run(
    config_path: str | None,
    duration: float | None,
    speed: float | None,
    seed: int | None,
    start_ns: int | None,
    truth_path: str | None,
    host: str | None,
    port: int | None,
) -> None:
    """Publish readings for --duration seconds of event time, then exit.

    Prints one JSON line with the number of readings and messages produced.
    """
    cfg = load_or_exit(SimConfig, config_path)
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
