"""Helpers that more than one test module uses, defined once."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

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


def windows_hold_their_readings(store: Any, width_ns: int) -> int:
    """Close every window of the buffer in ``store`` into batches and check each
    window against the raw readings it covers: count, min, max exactly, mean to
    1e-12. Returns the readings the windows hold (a source's tests compare it with
    what they sent)."""
    import numpy as np

    from edge_agent.pipeline import buffer, window
    from shared.wire import decode_batch

    sensors = {r.name: sid for sid, r in buffer.load_sensors(store).items()}
    data = buffer.read_range(store, 0, 2**62)
    held = 0
    for seq in window.close_until(store, device_id="d", width_ns=width_ns, upto_ns=2**62,
                                  max_rows=10_000):  # fmt: skip
        (payload,) = store.conn.execute(
            "SELECT payload FROM outbox WHERE seq = ?", (seq,)
        ).fetchone()
        b = decode_batch(bytes(payload))
        for i in range(b.rows):
            ts, got = data[sensors[b.sensors[b.sensor[i]].name]]
            inside = got[(ts >= b.start_ns[i]) & (ts < b.start_ns[i] + width_ns)]
            assert (b.count[i], b.min[i], b.max[i]) == (len(inside), inside.min(), inside.max())
            assert abs(b.mean[i] - np.mean(inside)) <= 1e-12 * max(1.0, abs(b.mean[i]))
            held += int(b.count[i])
    return held
