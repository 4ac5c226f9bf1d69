"""The fleet report (``cloud-ingest report``): built from a real pipeline run's data
in InfluxDB (with the roll-ups ``cloud-ingest rollup`` wrote), one HTML file with
everything inside, rendered by Debian's Chromium, headless, to a screenshot that
is not blank."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cloud_ingest.jobs.report import Report, render_html, window_ns
from tests.conftest import FLEET_RUN_DEVICE, FleetRun
from tests.helpers import run_cli

DAY = 86_400 * 10**9


def ink(png: bytes) -> tuple[float, int]:
    """The share of pixels that are not the background, and the number of colours."""
    img = Image.open(io.BytesIO(png)).convert("RGB")
    pixels = np.asarray(img).reshape(-1, 3)
    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    return 1 - counts.max() / len(pixels), len(colours)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("cloud-ingest", *args)


def test_window_labels_read_back() -> None:
    assert window_ns("10s") == 10**10 and window_ns("500ms") == 5 * 10**8
    assert window_ns("1500ns") == 1500 and window_ns("60s/10s") is None


def test_an_empty_range_says_what_is_missing() -> None:
    page = render_html(Report(0, DAY, DAY, 3600.0))
    assert "No daily roll-ups in this range" in page and "No alert was raised" in page
    assert "<img" not in page


@pytest.mark.integration
def test_the_report_is_one_file_with_plots_that_chromium_renders(
    fleet_run: FleetRun, tmp_path: Path
) -> None:
    cfg = str(fleet_run.ingest_config)
    res = cli("rollup", "-c", cfg, "--since", "-1d")
    assert res.returncode == 0, res.stderr
    out = tmp_path / "report.html"
    res = cli("report", "-c", cfg, "--since", "-1d", "--out", str(out))
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    # the agent's device and the five simulated ones; two sensors and five times ten
    assert summary["devices"] == 6 and summary["silent"] == 0 and summary["alerts"] >= 1
    assert summary["sensors"] == 2 + 5 * 10
    # the commands the fixture sent: a config (done) and one the device refused; the
    # captures around the alert rule's raises (docs/commands.md)
    assert summary["commands_failed"] == 1 and summary["commands_unanswered"] == 0
    assert summary["captures"] >= 1

    page = out.read_text()
    # self-contained: nothing to fetch when it is opened (or mailed)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 5  # completeness, daily ranges, alerts, silent, ingest lag
    for data in images:
        share, colours = ink(base64.b64decode(data))
        assert share > 0.01 and colours > 5
    # the completeness table (for a reader with images off): the run's device, a share
    assert re.search(rf"<tr><td>{FLEET_RUN_DEVICE}</td>(<td>[0-9.]+%</td>)+</tr>", page)
    assert re.search(rf"<td>{FLEET_RUN_DEVICE}</td><td>c-[0-9a-f]+</td><td>reboot</td>", page)
    assert re.search(rf"<td>{FLEET_RUN_DEVICE}</td><td>hot</td><td>[^<]+</td><td>alert-\d+", page)

    chromium = shutil.which("chromium")
    assert chromium, "chromium is not installed (scripts/setup.sh dev installs it)"
    shot = tmp_path / "report.png"
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'chromium'}",
            "--hide-scrollbars",
            "--window-size=1200,3000",
            f"--screenshot={shot}",
            out.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    share, colours = ink(shot.read_bytes())
    assert share > 0.01 and colours > 50, (share, colours)


@pytest.mark.integration
def test_the_report_fails_in_one_line_when_influxdb_is_away(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[influx]\nurl = "http://127.0.0.1:9"\n')
    res = cli("report", "-c", str(cfg), "--since", "-1d", "--out", str(tmp_path / "r.html"))
    assert res.returncode == 1 and res.stderr.startswith("error: InfluxDB unreachable")
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "r.html").exists()
