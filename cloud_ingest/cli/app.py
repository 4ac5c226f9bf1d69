"""The ``cloud-ingest`` command group and what its commands share: the config and
lake options, the time range, the signal handling of long jobs."""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click

from cloud_ingest.config import ArchiveConfig, IngestConfig
from shared.cli import (
    CONFIG_DIR,
    EXIT_CONFIG,
    config_group,
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


async def until_signal(run: Callable[..., Awaitable[T]], *args: object) -> T:
    """``await run(*args, stop=…)``, with SIGINT and SIGTERM setting ``stop``: the
    retries then end within retry.shutdown_grace_s, with one line, not a traceback."""
    import asyncio
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return await run(*args, stop=stop)


def time_range(since: str, until: str | None) -> tuple[int, int]:
    """--since and --until (default now) in ns, or a usage error naming the problem."""
    import time

    from shared.timefmt import parse_time

    try:
        since_ns = parse_time(since)
        until_ns = time.time_ns() if until is None else parse_time(until)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    return since_ns, until_ns


def lake_config(cfg: IngestConfig, source: str | None, endpoint: str | None) -> ArchiveConfig:
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
