"""Helpers that more than one test module uses, defined once."""

from __future__ import annotations

import subprocess
from pathlib import Path

from click.testing import CliRunner, Result

from cloud_ingest.lake import group_rows, part_key, to_parquet
from devstack.pipeline import BIN
from edge_agent.cli import main as agent_main
from shared.wire import Batch

#: the repository
ROOT = Path(__file__).resolve().parent.parent


def batch_objects(batch: Batch, name: str = "0") -> list[tuple[str, bytes]]:
    """The lake objects of a group of one batch (one per UTC day its windows start
    on), named ``name``: what the ingestor writes for it."""
    return [(part_key(g.dt, name), to_parquet(g.rows)) for g in group_rows([batch])]


def agent_cli(*args: str) -> Result:
    """``edge-agent ARGS`` in this process (click's runner): its output and exit code,
    and any exception raised as it is."""
    return CliRunner().invoke(agent_main, list(args), catch_exceptions=False)


def run_cli(command: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """An installed command (``cloud-ingest``, ``edge-agent``, ``firmware-sim``) as a
    process, as a user runs it: its output and exit code."""
    return subprocess.run(
        [str(BIN / command), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
