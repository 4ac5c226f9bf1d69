"""Start real Mosquitto, InfluxDB 1.x, VictoriaMetrics and moto S3 as processes.

Each binds a free port on 127.0.0.1, keeps its data in its own folder, is
waited for by polling its health check against a deadline (never a fixed
sleep), and can be stopped and started again on the same port and data to
simulate an outage.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

LOOPBACK = "127.0.0.1"


class ServiceError(RuntimeError):
    pass


#: Ports that ``free_port`` hands out under pytest-xdist: below Linux's ephemeral
#: range (32768-60999), so that no outgoing connection holds one, split between the
#: workers (gw0, gw1, ...), and each handed out once per process: a port chosen for a
#: service that has not bound it yet (or that is restarting on it) is never chosen
#: again for another.
PORTS_FIRST, PORTS_PER_WORKER = 20000, 1500
_handed_out: set[int] = set()


def free_port() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    lo = PORTS_FIRST + int(worker[2:]) * PORTS_PER_WORKER if worker.startswith("gw") else 0
    if not lo or lo + PORTS_PER_WORKER > 32768:  # not a worker, or more than 8 of them
        for _ in range(100):
            with socket.socket() as s:
                s.bind((LOOPBACK, 0))
                port = int(s.getsockname()[1])
            if port not in _handed_out:
                _handed_out.add(port)
                return port
        raise ServiceError("the kernel keeps handing out ports already given to a service")
    start = random.randrange(PORTS_PER_WORKER)
    for k in range(PORTS_PER_WORKER):
        candidate = lo + (start + k) % PORTS_PER_WORKER
        if candidate in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind((LOOPBACK, candidate))
            except OSError:
                continue  # in use (or in TIME_WAIT): try another
        _handed_out.add(candidate)
        return candidate
    raise ServiceError(f"no free port in {lo}-{lo + PORTS_PER_WORKER} for worker {worker}")


def wait_until(
    check: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.05
) -> None:
    """Poll ``check`` until it is true; raise :class:`TimeoutError` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        if check():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def tcp_open(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5):
            return True
    except OSError:
        return False


def http_ok(url: str, expect: tuple[int, ...] = (200, 204)) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return int(resp.status) in expect
    except (urllib.error.URLError, OSError):
        return False


def find_binary(name: str, *extra: str) -> str:
    for cand in (shutil.which(name), *extra):
        if cand and Path(cand).exists():
            return cand
    raise ServiceError(f"{name} not found; run the README's setup (scripts/setup.sh)")


@dataclass
class Service:
    name: str
    argv: list[str]
    port: int
    workdir: Path
    health: Callable[[], bool]
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def start(self, timeout_s: float = 60.0) -> Service:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            self.argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env={**os.environ, **self.env},
        )
        try:
            wait_until(lambda: self._alive() and self.health(), timeout_s, f"{self.name} to start")
        except TimeoutError:
            self.stop()
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise ServiceError(f"{self.name} did not become healthy; log:\n{tail}") from None
        except ServiceError:
            self.stop()
            raise
        return self

    def _alive(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise ServiceError(f"{self.name} exited early; log:\n{tail}")
        return True

    def kill(self) -> None:
        """SIGKILL: a crash, with no chance to save state (Mosquitto's persistence)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stop()

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None


#: the device broker's largest packet as shipped (the Ansible role's default): the
#: largest payload the agent's sources take by default (4 MiB) and 64 KiB
DEVICE_MAX_PACKET = (4 << 20) + (64 << 10)


#: Mosquitto's persistence as the device broker ships it (Ansible's
#: telemetry-edge.conf): the in-memory state saved after every 100 changes
#: (a message queued for an absent agent, one the agent acknowledged, a
#: subscription), not every 30 minutes (Debian's default). docs/edge-agent.md,
#: "A power cut on the device", has the trade-off and the measurements.
DEVICE_AUTOSAVE_CHANGES = 100
DEVICE_PERSISTENCE = f"autosave_on_changes true\nautosave_interval {DEVICE_AUTOSAVE_CHANGES}\n"
#: most devices publish their states with QoS 0 (ESPHome, Zigbee2MQTT, Shelly by
#: default), which Mosquitto queues for a stopped agent only with this
DEVICE_QUEUE_QOS0 = "queue_qos0_messages true\n"


def mosquitto(
    workdir: Path,
    port: int | None = None,
    tls: tuple[Path, Path, Path] | None = None,
    passwords: dict[str, str] | None = None,
    ingestors: list[str] | None = None,
    crl: Path | None = None,
    max_packet_size: int | None = None,
    operators: list[str] | None = None,
) -> Service:
    """``tls``: (CA, server certificate, server key) PEM files for a TLS listener.
    ``passwords``: username → password; then only those users may connect.
    ``ingestors``: the cloud broker's shipped access rules (cloud_ingest/ops/broker.py),
    with these ingestor identities; every other user is a device. ``crl``: with
    ``tls`` and ``ingestors``, clients authenticate by certificate (CN = identity).
    ``max_packet_size``: the largest packet a client may send (0: no limit); by
    default the shipped cloud broker's with ``ingestors``, else the device broker's
    (a broker of the tests plays both). ``operators``: with ``ingestors``, the
    identities that may send commands."""
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "mosquitto.conf"
    tls_lines = f"cafile {tls[0]}\ncertfile {tls[1]}\nkeyfile {tls[2]}\n" if tls is not None else ""
    anonymous = "allow_anonymous true\n"
    if passwords is not None:
        pwfile = workdir / "passwords"
        pwfile.write_text("")
        pwfile.chmod(0o600)
        tool = find_binary("mosquitto_passwd", "/usr/bin/mosquitto_passwd")
        for user, password in passwords.items():
            subprocess.run([tool, "-b", str(pwfile), user, password], check=True)
        anonymous = f"allow_anonymous false\npassword_file {pwfile}\n"
    listener = f"listener {port} {LOOPBACK}\n" + tls_lines + anonymous
    if ingestors is not None:
        from cloud_ingest.ops.broker import mosquitto_acl, mosquitto_conf

        acl = workdir / "acl"
        acl.write_text(mosquitto_acl(ingestors, operators=operators or []))
        pw = workdir / "passwords" if passwords is not None else None
        listener = mosquitto_conf(
            f"{port} {LOOPBACK}",
            pw,
            acl,
            tls,
            crl,
            **({"max_packet_size": max_packet_size} if max_packet_size is not None else {}),
        )
    elif max_packet_size != 0:
        listener += f"max_packet_size {max_packet_size or DEVICE_MAX_PACKET}\n"
    # As root, Mosquitto would switch to the user "mosquitto", which can read neither
    # the certificates nor the persistence folder in a test's private temp folder.
    run_as = "user root\n" if os.geteuid() == 0 else ""
    conf.write_text(
        listener + run_as + "persistence true\n"
        f"persistence_location {workdir}/\n"
        # The default of 1000 queued QoS 1 messages per client silently drops the
        # rest for a slow or absent subscriber (docs/architecture.md); 0 = no limit here,
        # where the agent and the ingestor hold persistent sessions.
        "max_queued_messages 0\n"
        "max_inflight_messages 100\n" + DEVICE_PERSISTENCE + DEVICE_QUEUE_QOS0 +
        # Small packets (PUBACKs, acks) at once, not after the peer's delayed TCP
        # ACK (~40 ms): docs/cloud-ingest.md, "Broker clusters".
        "set_tcp_nodelay true\n"
        "log_type error\nlog_type warning\nlog_type notice\n"
        "log_dest stdout\n"
    )
    binary = find_binary("mosquitto", "/usr/sbin/mosquitto")
    return Service(
        "mosquitto", [binary, "-c", str(conf)], port, workdir, health=lambda: tcp_open(port)
    )


def influxdb(
    workdir: Path,
    port: int | None = None,
    auth: bool = False,
    max_values_per_tag: int | None = None,
) -> Service:
    """``auth``: HTTP authentication on; create the first (admin) user before use.
    ``max_values_per_tag``: InfluxDB's own limit (``[data]``; 100,000 by default, 0 =
    none): a test fills it, and starts the server again on the same data with
    another to play the operator who raises it."""
    port = port or free_port()
    rpc = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "influxdb.conf"
    conf.write_text(
        "reporting-disabled = true\n"
        f'bind-address = "{LOOPBACK}:{rpc}"\n'
        f'[meta]\n  dir = "{workdir}/meta"\n'
        f'[data]\n  dir = "{workdir}/data"\n  wal-dir = "{workdir}/wal"\n'
        "  query-log-enabled = false\n"
        + (
            f"  max-values-per-tag = {max_values_per_tag}\n"
            if max_values_per_tag is not None
            else ""
        )
        + f'[http]\n  bind-address = "{LOOPBACK}:{port}"\n  log-enabled = false\n'
        "  max-row-limit = 0\n"
        + ("  auth-enabled = true\n" if auth else "")
        + "[monitor]\n  store-enabled = false\n"
        "[continuous_queries]\n  enabled = false\n"
    )
    binary = find_binary("influxd", "/usr/bin/influxd")
    svc = Service(
        "influxdb",
        [binary, "-config", str(conf)],
        port,
        workdir,
        health=lambda: http_ok(f"http://{LOOPBACK}:{port}/ping"),
    )
    return svc


def victoria_metrics(workdir: Path, port: int | None = None) -> Service:
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    binary = find_binary("victoria-metrics", "/usr/bin/victoria-metrics")
    argv = [
        binary,
        f"-httpListenAddr={LOOPBACK}:{port}",
        f"-storageDataPath={workdir}/data",
        "-retentionPeriod=100y",
        "-loggerLevel=WARN",
        "-search.latencyOffset=0s",
    ]
    return Service(
        "victoria-metrics",
        argv,
        port,
        workdir,
        health=lambda: http_ok(f"http://{LOOPBACK}:{port}/health"),
    )


def prometheus(
    workdir: Path, targets: list[str], rule_files: list[Path], port: int | None = None
) -> Service:
    """Debian's Prometheus, scraping ``targets`` (host:port of cloud-ingest's
    /metrics, as job "cloud-ingest") every second and evaluating ``rule_files``."""
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    binary = find_binary("prometheus", "/usr/bin/prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [{"job_name": "cloud-ingest", "static_configs": [{"targets": targets}]}],
    }
    (workdir / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    argv = [
        binary,
        f"--config.file={workdir / 'prometheus.yml'}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address={LOOPBACK}:{port}",
        "--log.level=warn",
    ]
    return Service(
        "prometheus",
        argv,
        port,
        workdir,
        health=lambda: http_ok(f"http://{LOOPBACK}:{port}/-/ready"),
    )


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def moto_s3(workdir: Path, port: int | None = None) -> Service:
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    binary = find_binary("moto_server", str(Path(sys.executable).parent / "moto_server"))
    return Service(
        "moto-s3",
        [binary, "-H", LOOPBACK, "-p", str(port)],
        port,
        workdir,
        health=lambda: http_ok(f"http://{LOOPBACK}:{port}/moto-api/data.json"),
        env=S3_ENV,
    )
