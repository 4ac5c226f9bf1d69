"""The README's demo, shortened: it must end with the accounting line and lost=0."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from cloud_ingest.lake import archived_seqs
from cloud_ingest.sinks.archive import LocalArchive

pytestmark = pytest.mark.integration

LINE = re.compile(
    r"^demo: produced=(\d+) stored=(\d+) windows=(\d+) batches=(\d+) delivered=(\d+) "
    r"influx_points=(\d+) archived=(\d+) lost=(\d+)$",
    re.MULTILINE,
)


def test_demo_accounts_for_every_reading(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "devstack.demo",
            "--duration",
            "20",
            "--speed",
            "5",
            "--workdir",
            str(work),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    m = LINE.search(res.stdout)
    assert m, res.stdout
    produced, stored, windows, batches, delivered, points, archived, lost = map(int, m.groups())
    # env-1 2 x 20, motor-1 20 x 200, tasmota_1 20, pi-1 20 x 2, logger-1 20 x 10 (no
    # stamped families: not at --speed 5, devstack/demo.py)
    assert produced == 40 + 4000 + 20 + 40 + 200 and stored == produced
    assert lost == 0 and batches == delivered == archived >= 1 and points == windows
    assert (work / "influxdb" / "influxdb.conf").exists()
    assert sum(len(s) for s in archived_seqs(LocalArchive(work / "archive")).values()) == archived
