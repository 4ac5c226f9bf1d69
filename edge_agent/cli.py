"""``edge-agent``: run the agent, and the technician's local commands."""

from __future__ import annotations

import json
import sys

import click

from edge_agent.config import AgentConfig
from shared.cli import EXIT_FAILURE, config_group, load_or_exit, setup_logging
from shared.errors import StorageError

CONFIG_HELP = "TOML config file (see `edge-agent config sample`). Defaults apply without one."


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Edge agent: store sensor readings durably, window them, forward batches.

    Sensor nodes publish readings to the device's local MQTT broker; the agent
    stores them in SQLite, closes event-time windows (count, min, max, mean,
    stddev, first, last per sensor) and forwards compact batches to the cloud
    broker over MQTT v5, QoS 1.

    Exit codes: 0 ok, 1 failure, 2 bad config or usage.
    """


@main.command()
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option(
    "--ready-file",
    type=click.Path(dir_okay=False),
    help="Create this file once subscribed (for supervisors and scripts to wait on).",
)
def run(config_path: str | None, ready_file: str | None) -> None:
    """Run the agent until SIGTERM or Ctrl-C, then flush and drain the outbox."""
    cfg = load_or_exit(AgentConfig, config_path)
    setup_logging(cfg.log_level)
    from edge_agent.agent import run_agent  # imports numba: keep other commands fast

    try:
        sys.exit(run_agent(cfg, ready_file))
    except StorageError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_FAILURE)


@main.command()
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def status(config_path: str | None, as_json: bool) -> None:
    """Show what the buffer holds: readings, windows, outbox, drops.

    Reads the SQLite buffer directly, so it works with no network and whether
    or not the agent is running.
    """
    from edge_agent.status import read_status

    cfg = load_or_exit(AgentConfig, config_path)
    try:
        st = read_status(cfg.storage.path)
    except (FileNotFoundError, StorageError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_FAILURE)
    st["max_bytes"] = cfg.storage.max_bytes
    if as_json:
        click.echo(json.dumps(st, indent=2, sort_keys=True))
        return
    click.echo(f"buffer      {st['buffer']}")
    click.echo(f"sensors     {st['sensors']}")
    click.echo(f"raw chunks  {st['raw_chunks']}")
    click.echo(
        "outbox      " + (", ".join(f"{k}={v}" for k, v in sorted(st["outbox"].items())) or "empty")
    )
    click.echo(f"quarantined {st['quarantined']}")
    budget = f" of {cfg.storage.max_bytes:,} budget" if cfg.storage.max_bytes else ", no budget"
    click.echo(f"disk        {st['used_bytes']:,} bytes in use{budget}")
    for name, value in sorted(st["counters"].items()):
        click.echo(f"  {name:<24} {value}")


main.add_command(config_group(AgentConfig, "edge_agent"))
