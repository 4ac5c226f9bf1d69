"""The systemd units the Ansible roles install: ``systemd-analyze verify`` passes on
each with nothing to say, ``systemd-analyze security`` rates the long-running
services' exposure, and the services speak sd_notify (READY=1, a watchdog fed
only while they are healthy) to a real notify socket.

The units are rendered from the roles' templates with the roles' defaults, with
ExecStart pointing at this checkout's virtualenv (verify requires the programs to
exist). tests/system/test_ansible.py verifies the units the playbook itself wrote.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jinja2
import pytest
import yaml

from devstack.pipeline import BIN, toml_dumps
from devstack.services import Service, wait_until

ROLES = Path(__file__).resolve().parents[2] / "ansible" / "roles"
VENV = BIN.parent
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None and not os.environ.get("CI"),
    reason="systemd-analyze is not installed (scripts/setup.sh installs it)",
)

#: (role, template) of every unit
UNITS = [
    ("edge_agent", "edge-agent.service"),
    ("cloud_ingest", "cloud-ingest.service"),
    ("cloud_ingest", "cloud-ingest-rollup.service"),
    ("cloud_ingest", "cloud-ingest-rollup.timer"),
    ("cloud_ingest", "cloud-ingest-compact.service"),
    ("cloud_ingest", "cloud-ingest-compact.timer"),
]
#: systemd-analyze security's overall exposure (0 = locked down, 10 = not at all):
#: what the long-running services reach with their own users; less is better
MAX_EXPOSURE = 1.5


def role_defaults(*roles: str) -> dict[str, Any]:
    """The defaults of ``roles`` (and telemetry), each resolved the way
    Ansible would resolve them for a host named ``dev-1``."""
    raw: dict[str, Any] = {"inventory_hostname_short": "dev-1", "playbook_dir": "/srv/ansible"}
    for role in ("telemetry", *roles):
        raw.update(yaml.safe_load((ROLES / role / "defaults" / "main.yml").read_text()))
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    for _ in range(5):  # a value may name another that names another
        raw = {
            k: env.from_string(v).render(raw) if isinstance(v, str) else v for k, v in raw.items()
        }
    return raw


def render(role: str, name: str, **overrides: Any) -> str:
    variables = {
        **role_defaults(role),
        "ansible_managed": "rendered by tests/system/test_systemd.py",
        **overrides,
    }
    template = (ROLES / role / "templates" / f"{name}.j2").read_text()
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.from_string(template).render(variables)


@pytest.fixture
def units(tmp_path: Path) -> Path:
    out = tmp_path / "units"
    out.mkdir()
    for role, name in UNITS:
        venv = {"edge_agent_venv" if role == "edge_agent" else "cloud_ingest_venv": str(VENV)}
        (out / name).write_text(render(role, name, **venv))
    return out


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, *args], capture_output=True, text=True, timeout=60, check=False
    )


@needs_systemd_analyze
def test_every_unit_verifies_with_nothing_to_say(units: Path) -> None:
    res = analyze("verify", *(str(units / n) for _, n in UNITS))
    assert res.returncode == 0 and res.stderr == "" and res.stdout == "", res.stderr


@needs_systemd_analyze
def test_verify_catches_a_broken_unit(units: Path) -> None:
    """The check above can fail: a misspelt directive and a missing program are found."""
    unit = units / "edge-agent.service"
    unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSystem=stritc"))
    assert "protect system value, ignoring: stritc" in analyze("verify", str(unit)).stderr
    unit.write_text(render("edge_agent", "edge-agent.service"))  # /opt/iot-telemetry/edge
    res = analyze("verify", str(unit))
    assert res.returncode != 0 and "is not executable" in res.stderr


@needs_systemd_analyze
@pytest.mark.parametrize("name", ["edge-agent.service", "cloud-ingest.service"])
def test_the_services_are_hardened(units: Path, name: str) -> None:
    unit = (units / name).read_text()
    for line in (
        "Type=notify",
        "NoNewPrivileges=true",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/",
        "CapabilityBoundingSet=\n",
        "WatchdogSec=60",
    ):
        assert line in unit, line
    res = analyze("security", "--offline=true", str(units / name))
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", res.stdout + res.stderr)
    assert found, res.stdout[-2000:]
    assert float(found[1]) <= MAX_EXPOSURE, res.stdout[-3000:]


# ---- sd_notify from the real services ----


class NotifySocket:
    """What systemd listens on for a Type=notify service: a datagram socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []

    def env(self, watchdog_s: float) -> dict[str, str]:
        return {"NOTIFY_SOCKET": str(self.path), "WATCHDOG_USEC": str(int(watchdog_s * 1e6))}

    def poll(self) -> list[str]:
        try:
            while True:
                data = self.sock.recv(4096)
                self.messages.append((time.monotonic(), data.decode()))
        except TimeoutError:
            pass
        return [m for _, m in self.messages]

    def count(self, field: str, since: float = 0.0) -> int:
        self.poll()
        return sum(1 for t, m in self.messages if t >= since and field in m.split("\n"))

    def last(self, field: str) -> float:
        """When ``field`` last came (monotonic), 0.0 if never."""
        self.poll()
        return max((t for t, m in self.messages if field in m.split("\n")), default=0.0)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    s = NotifySocket(tmp_path / "notify.sock")
    yield s
    s.close()


@contextlib.contextmanager
def notifying(
    program: str, cfg: Path, notify: NotifySocket, ready_s: float
) -> Iterator[subprocess.Popen[bytes]]:
    """``program run -c cfg`` under a notify socket with a watchdog: yields once it
    said READY=1 and pinged three times; on exit, requires a clean stop that said
    STOPPING=1."""
    log = cfg.with_suffix(".log")
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(BIN / program), "run", "-c", str(cfg)],
            env={**os.environ, **notify.env(WATCHDOG_S)},
            stdout=out,
            stderr=out,
        )
    try:
        wait_until(lambda: notify.count("READY=1") == 1, ready_s, f"READY=1 from {program}")
        t = time.monotonic()
        wait_until(lambda: notify.count("WATCHDOG=1", t) >= 3, 10, "watchdog pings")
        yield proc
    finally:
        proc.terminate()
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait(10)
    assert rc == 0, log.read_text()[-3000:]
    assert notify.count("STOPPING=1") == 1


WATCHDOG_S = 1.0


@pytest.mark.integration
def test_the_agent_is_ready_when_subscribed_and_starves_the_watchdog_when_stuck(
    fresh: Callable[[str], Service], notify: NotifySocket, tmp_path: Path
) -> None:
    broker = fresh("mosquitto")
    buffer = tmp_path / "buf.sqlite"
    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        toml_dumps(
            {
                "device_id": "dev-sd",
                "storage": {"path": str(buffer)},
                "intake": {"broker": {"port": broker.port}},
                "forward": {"broker": {"port": broker.port}},
            }
        )
    )
    with notifying("edge-agent", cfg, notify, 120):
        assert any("STATUS=device dev-sd" in m for m in notify.poll())
        # stuck: another process holds the buffer's write lock, so the agent's
        # transactions wait (SQLite's busy timeout, 30 s) and its loop with them
        holder = sqlite3.connect(buffer, isolation_level=None, timeout=30)
        holder.execute("BEGIN IMMEDIATE")
        try:
            # the loop blocks at its next write (the heartbeat: at most 2 s away, later on
            # a loaded machine); from then on no ping may come
            wait_until(
                lambda: time.monotonic() - notify.last("WATCHDOG=1") > 2 * WATCHDOG_S,
                20, "the pings to stop",
            )  # fmt: skip
            stuck = time.monotonic()
            wait_until(lambda: time.monotonic() > stuck + 3 * WATCHDOG_S, 10, "a stuck spell")
            assert notify.count("WATCHDOG=1", stuck) == 0  # systemd would restart it now
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        t = time.monotonic()
        wait_until(lambda: notify.count("WATCHDOG=1", t) >= 2, 40, "pings again after the lock")


@pytest.mark.integration
def test_cloud_ingest_is_ready_when_subscribed_and_feeds_the_watchdog(
    fresh: Callable[[str], Service], notify: NotifySocket, tmp_path: Path
) -> None:
    broker = fresh("mosquitto")
    cfg = tmp_path / "ingest.toml"
    cfg.write_text(
        toml_dumps(
            {
                "mqtt": {"port": broker.port, "client_id": "sd-ingest"},
                "influx": {"url": "http://127.0.0.1:9"},
                "archive": {"url": f"file://{tmp_path / 'lake'}"},
            }
        )
    )
    with notifying("cloud-ingest", cfg, notify, 60):
        assert any("STATUS=subscribed to 127.0.0.1" in m for m in notify.poll())


def test_the_ingestor_starves_the_watchdog_only_when_stuck() -> None:
    from cloud_ingest.ingest.watchdog import blocker

    assert blocker(in_hand=0, still_s=999, limit_s=10, died=[]) is None  # idle is fine
    assert blocker(in_hand=5, still_s=3, limit_s=10, died=[]) is None  # working
    assert "nothing done" in str(blocker(in_hand=5, still_s=11, limit_s=10, died=[]))
    assert "metrics-http" in str(blocker(in_hand=0, still_s=0, limit_s=10, died=["metrics-http"]))


def test_without_systemd_nothing_is_sent() -> None:
    from shared.sdnotify import Notifier

    n = Notifier({})
    assert not n.enabled and n.ping_every_s() is None and not n.ready()
    other = Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert other.ping_every_s() is None  # the watchdog is another process's
    assert Notifier({"NOTIFY_SOCKET": "/nope", "WATCHDOG_USEC": "4000000"}).ping_every_s() == 2.0
