"""``cloud-ingest``: the cloud side of the telemetry path."""

from __future__ import annotations

import sys

import click

from cloud_ingest.config import IngestConfig
from shared.cli import config_group, load_or_exit, setup_logging


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Cloud ingest: MQTT batches from devices into InfluxDB and an archive.

    Subscribes to every device's batch topic (telemetry/v1/+/batch), decodes and
    validates each batch, writes one InfluxDB point per (device, sensor, window)
    and stores the batch in the archive (S3 or a local directory) under a key
    made of device_id and seq. Invalid input goes to the archive's quarantine/
    folder with its reason.

    Exit codes: 0 ok, 1 failure, 2 bad config or usage.
    """


@main.command()
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="TOML config file (see `cloud-ingest config sample`). Defaults apply without one.",
)
@click.option(
    "--ready-file",
    type=click.Path(dir_okay=False),
    help="Create this file once subscribed (for supervisors and scripts to wait on).",
)
def run(config_path: str | None, ready_file: str | None) -> None:
    """Run until SIGTERM or Ctrl-C; finish the batch in hand, then exit."""
    cfg = load_or_exit(IngestConfig, config_path)
    setup_logging(cfg.log_level, cfg.log_format)
    from cloud_ingest.service import run_service

    sys.exit(run_service(cfg, ready_file))


main.add_command(config_group(IngestConfig, "cloud_ingest"))
