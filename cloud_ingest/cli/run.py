"""``cloud-ingest run``: the streaming service."""

from __future__ import annotations

import sys

import click

from cloud_ingest.cli.app import DEFAULT_CONFIG, config_option, main
from cloud_ingest.config import IngestConfig
from shared.cli import load_or_exit, setup_logging


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
    from cloud_ingest.ingest.service import run_service

    sys.exit(run_service(cfg, ready_file))
