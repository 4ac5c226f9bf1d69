"""The edge agent as a process, against faults of its own device: a full disk under its
buffer, and a second agent started on the same buffer."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from devstack.pipeline import BIN, Pipeline
from devstack.publish import publish_all
from devstack.services import Service, wait_until
from edge_agent.cli import main as agent_main
from edge_agent.lock import is_locked
from shared.readings import encode_chunk
from tests.conftest import SpecFactory

pytestmark = pytest.mark.integration
W = 10_000_000_000


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 6 MiB tmpfs of its own: a disk that can really be filled up."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (root needed): {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path: Path) -> None:
    """Write until the filesystem says no more (unbuffered: each write reaches it)."""
    with open(path, "wb", buffering=0) as fh, contextlib.suppress(OSError):
        while fh.write(b"\0" * 4096):
            pass


def status(cfg: Path) -> dict[str, object]:
    res = CliRunner().invoke(agent_main, ["status", "-c", str(cfg), "--json"])
    assert res.exit_code == 0, res.output
    out: dict[str, object] = json.loads(res.stdout)
    return out


def test_a_full_disk_costs_no_reading_and_no_alert(
    pipeline_spec: SpecFactory, fresh: Callable[[str], Service], small_fs: Path, tmp_path: Path
) -> None:
    """The buffer's disk fills up while readings arrive: commits fail, nothing is
    acknowledged to the device broker, the agent stays up. Once space is freed,
    intake resumes with every reading stored once, the alert that the failed commits
    had raised (and rolled back) fires, and `status` shows the store errors."""
    broker = fresh("mosquitto")
    pipe = Pipeline(
        pipeline_spec(
            broker=broker,
            targets=[],  # no cloud: the outbox just fills
            drain_timeout_s=0.2,
            agent_tables={"storage": {"path": str(small_fs / "buffer.sqlite")}},
            agent_extra=(
                '\n[[alerts]]\nname = "hot"\nsensor = "n1/temp"\nkind = "threshold"\nabove = 50.0\n'
            ),
        )
    )
    agent = pipe.start_agent(flush_on_shutdown=False)
    cfg = pipe.dir / "edge-agent.toml"
    try:
        t0 = (time.time_ns() // W - 6) * W
        publish_all(broker.port, [("sensors/n1/temp", encode_chunk("C", [t0], [20.0]))])
        wait_until(lambda: status(cfg)["counters"].get("readings_stored") == 1, 30, "a reading")
        filler = small_fs / "filler"
        fill(filler)
        # 40 messages of 500 readings (8 KB of BLOBs each), the very last reading hot
        msgs = [
            (
                "sensors/n1/temp",
                encode_chunk(
                    "C",
                    [t0 + 10**9 + k * 10**7 + i for i in range(500)],
                    [99.0 if (k, i) == (39, 499) else 20.0 for i in range(500)],
                ),
            )
            for k in range(40)
        ]
        publish_all(broker.port, msgs)
        log = pipe.dir / "edge-agent.log"
        wait_until(
            lambda: b"cannot take" in log.read_bytes(), 30, "the agent to meet the full disk"
        )
        assert agent.popen.poll() is None  # still up
        assert status(cfg)["counters"].get("readings_stored") == 1  # nothing more stored
        filler.unlink()  # the technician frees space
        wait_until(
            lambda: status(cfg)["counters"].get("readings_stored") == 1 + 40 * 500,
            60,
            "every held reading to be stored",
        )
        st = status(cfg)
        c = st["counters"]
        assert isinstance(c, dict)
        assert c["alerts_raised"] == 1 and c.get("duplicates_ignored", 0) == 0
        assert [a["rule"] for a in st["open_alerts"]] == ["hot"]  # type: ignore[union-attr]
        assert isinstance(st["store_errors"], int) and st["store_errors"] >= 1
        res = CliRunner().invoke(agent_main, ["status", "-c", str(cfg)])
        assert "store errors" in res.output and "the last at" in res.output
        res = CliRunner().invoke(agent_main, ["doctor", "-c", str(cfg), "--json"])
        levels = {c["name"]: c["level"] for c in json.loads(res.stdout)}
        assert levels["buffer writes"] == "warn"
        assert agent.terminate() == 0
    finally:
        pipe.stop_all()


def test_a_stop_on_a_full_disk_is_a_clean_stop_and_loses_nothing(
    pipeline_spec: SpecFactory, fresh: Callable[[str], Service], small_fs: Path, tmp_path: Path
) -> None:
    """SIGTERM while the disk is full once ended the agent with an uncaught
    sqlite3.OperationalError (exit 1). Now it stops cleanly (exit 0), and what it could
    not store waits at the device broker, unacknowledged, for the next start."""
    broker = fresh("mosquitto")
    pipe = Pipeline(
        pipeline_spec(
            broker=broker,
            drain_timeout_s=0.2,
            agent_tables={"storage": {"path": str(small_fs / "buffer.sqlite")}},
        )
    )
    agent = pipe.start_agent(flush_on_shutdown=True)
    cfg = pipe.dir / "edge-agent.toml"
    log = pipe.dir / "edge-agent.log"
    try:
        t0 = (time.time_ns() // W - 6) * W
        publish_all(broker.port, [("sensors/n1/temp", encode_chunk("C", [t0], [20.0]))])
        wait_until(lambda: status(cfg)["counters"].get("readings_stored") == 1, 30, "a reading")
        filler = small_fs / "filler"
        fill(filler)
        ts = [t0 + 10**9 + i for i in range(500)]
        publish_all(broker.port, [("sensors/n1/temp", encode_chunk("C", ts, [1.0] * 500))])
        wait_until(
            lambda: b"cannot take" in log.read_bytes(), 30, "the agent to meet the full disk"
        )
        assert agent.terminate() == 0
        assert b"Traceback" not in log.read_bytes()
        filler.unlink()
        pipe.start_agent(flush_on_shutdown=False)
        wait_until(
            lambda: status(cfg)["counters"].get("readings_stored") == 501,
            30,
            "the reading the broker kept, stored at the next start",
        )
        assert status(cfg)["counters"].get("duplicates_ignored", 0) == 0
    finally:
        pipe.stop_all()


def test_a_second_agent_on_the_same_buffer_refuses_to_start(
    pipeline_spec: SpecFactory, mosquitto: Service, tmp_path: Path
) -> None:
    pipe = Pipeline(
        pipeline_spec(
            broker=mosquitto,
            workdir=tmp_path,
            device_id=f"lock-{os.getpid()}",
            targets=[],
            drain_timeout_s=0.2,
        )
    )
    first = pipe.start_agent()
    try:
        cfg = pipe.dir / "edge-agent.toml"
        res = subprocess.run(
            [str(BIN / "edge-agent"), "run", "-c", str(cfg)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert res.returncode == 2, res.stderr
        assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: cannot start:")
        assert f"pid {first.popen.pid}" in res.stderr and str(pipe.agent_db) in res.stderr
        # the read-only technician commands keep working beside it
        st = status(cfg)
        assert st["running"] and st["agent_pid"] == first.popen.pid
        for cmd in (["buffer", "check"], ["sensors"], ["doctor", "--json"]):
            r = CliRunner().invoke(agent_main, [*cmd, "-c", str(cfg)])
            assert "already using" not in r.output, cmd
        assert CliRunner().invoke(agent_main, ["buffer", "check", "-c", str(cfg)]).exit_code == 0
        assert first.terminate() == 0
        assert not is_locked(pipe.agent_db)  # released at exit
    finally:
        pipe.stop_all()


def test_a_dead_intake_thread_stops_the_agent_with_exit_1(
    mosquitto: Service, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No silent death. paho ends its network thread when a callback raises; before,
    the agent went on without intake, `status` said it was running, and nothing was
    stored. A bug is simulated here (a callback that raises) in a real agent loop with
    real paho threads and broker: the agent logs why and exits 1, for its service
    manager to restart it, and releases its buffer."""
    import threading

    from edge_agent.agent import Agent
    from edge_agent.config import AgentConfig
    from shared.config import from_dict

    broker = {"port": mosquitto.port}
    cfg = from_dict(
        AgentConfig,
        {
            "device_id": f"dies-{os.getpid()}",
            "storage": {"path": str(tmp_path / "a.sqlite")},
            "intake": {"broker": broker},
            "forward": {"broker": broker, "drain_timeout_s": 0.1},
        },
    )
    agent = Agent(cfg)

    def boom(*_args: object) -> None:
        raise RuntimeError("injected bug in a callback")

    def break_intake() -> None:
        wait_until(agent.intake.subscribed.is_set, 60, "the agent to subscribe")
        agent.intake.client.on_message = boom
        t0 = (time.time_ns() // W - 5) * W
        publish_all(mosquitto.port, [("sensors/n1/t", encode_chunk("C", [t0], [1.0]))])

    threading.Thread(target=break_intake, daemon=True).start()
    assert agent.run() == 1
    assert "thread paho-mqtt-client-" in caplog.text and "injected bug" in caplog.text
    assert "the intake thread died" in caplog.text
    assert not is_locked(tmp_path / "a.sqlite")
