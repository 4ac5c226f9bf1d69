"""Run simulator → edge agent → cloud ingest as real processes, and account for every reading.

Used by the demo (``python -m devstack.demo``) and the end-to-end tests. The
components run through their console commands with TOML config files written
here, exactly as an operator would run them.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from devstack import influxq
from devstack.services import wait_until
from edge_agent.technician.status import read_status
from firmware_sim.truth import read_truth, truth_by_sensor

BIN = Path(sys.executable).parent


def toml_dumps(data: dict[str, Any], prefix: str = "") -> str:
    """Tiny TOML writer for nested tables of scalars and arrays of strings (all our
    configs need)."""
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, int | float):
            lines.append(f"{key} = {value!r}")
        elif isinstance(value, str) or (
            isinstance(value, list) and all(isinstance(v, str) for v in value)
        ):
            lines.append(f"{key} = {json.dumps(value)}")
        else:
            raise TypeError(f"cannot write {type(value).__name__} for {key}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for key, table in tables:
        name = f"{prefix}.{key}" if prefix else key
        out += f"\n[{name}]\n" + toml_dumps(table, name)
    return out


@dataclass
class IngestTarget:
    """One cloud-ingest process: its client id and its [influx]/[archive] tables."""

    name: str
    influx: dict[str, Any]
    archive: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)
    mqtt: dict[str, Any] = field(default_factory=dict)  # more [mqtt] keys (subscription ...)
    http: dict[str, Any] = field(default_factory=dict)  # [http] (listen = "127.0.0.1:<port>")
    acks: dict[str, Any] = field(default_factory=dict)  # [acks] (key_file: signs acks)
    top: dict[str, Any] = field(default_factory=dict)  # top-level keys (log_level ...)


@dataclass
class PipelineSpec:
    workdir: Path
    local_port: int
    cloud_port: int
    targets: list[IngestTarget]
    device_id: str = "demo-device"
    duration_s: float = 60.0
    speed: float = 1.0
    seed: int = 42
    width_s: float = 10.0
    start_ns: int = 0
    drain_timeout_s: float = 30.0
    ack_timeout_s: float = 5.0
    sim_config: str | None = None  # firmware-sim TOML (nodes, sensors); None: its defaults
    agent_extra: str = ""  # TOML appended to the agent's config (e.g. [[alerts]] tables)
    #: merged per table (and one level deeper); a non-table value sets a top-level key
    agent_tables: dict[str, Any] = field(default_factory=dict)
    hop_s: float = 0.0  # hopping windows; 0 = tumbling
    cloud_tls: dict[str, str] | None = None  # [tls] table for the cloud link, both ends


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def terminate(self, timeout_s: float = 60.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            raise RuntimeError(f"{self.name} did not stop within {timeout_s} s; killed") from None


@dataclass(frozen=True)
class RunResult:
    produced: int
    counters: dict[str, int]
    arrived: bool


class Pipeline:
    def __init__(self, spec: PipelineSpec) -> None:
        self.spec = spec
        self.dir = spec.workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.agent_db = self.dir / "edge-agent.sqlite"
        self.truth = self.dir / "truth.jsonl"
        self.fleet_truth = self.dir / "fleet-truth.jsonl"
        self.procs: list[Proc] = []
        self.fleets: list[subprocess.Popen[bytes]] = []

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        log = self.dir / f"{name}.log"
        fh = open(log, "ab")  # noqa: SIM115 (inherited by the child, closed below)
        try:
            popen = subprocess.Popen(
                argv,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                cwd=self.dir,
            )
        finally:
            fh.close()
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def agent_config(self, flush_on_shutdown: bool = True) -> Path:
        s = self.spec
        cfg: dict[str, Any] = {
            "device_id": s.device_id,
            "tick_s": 0.1,
            "storage": {"path": str(self.agent_db), "synchronous": "normal"},
            # flush: by default the simulator has stopped when the agent is stopped
            "window": {
                "width_s": s.width_s,
                "lateness_s": 2.0,
                "flush_on_shutdown": flush_on_shutdown,
                "hop_s": s.hop_s,
            },
            "intake": {"broker": {"port": s.local_port}},
            "forward": {
                "broker": {"port": s.cloud_port, **({"tls": s.cloud_tls} if s.cloud_tls else {})},
                "drain_timeout_s": s.drain_timeout_s,
                "ack_timeout_s": s.ack_timeout_s,
                "max_backoff_s": max(s.ack_timeout_s, 30.0),
            },
        }
        for table, values in s.agent_tables.items():
            if not isinstance(values, dict):
                cfg[table] = values  # a top-level key (log_level ...)
                continue
            for key, value in values.items():  # one level deeper for [forward.broker]
                old = cfg.setdefault(table, {}).get(key)
                if isinstance(old, dict) and isinstance(value, dict):
                    old.update(value)
                else:
                    cfg[table][key] = value
        path = self.dir / "edge-agent.toml"
        path.write_text(toml_dumps(cfg) + s.agent_extra)
        return path

    def start_agent(
        self,
        timeout_s: float = 60.0,
        *,
        flush_on_shutdown: bool = True,
        env: dict[str, str] | None = None,
    ) -> Proc:
        """Start the agent and wait until its intake subscription is in place
        (``env``: more environment, libfaketime's for a wrong clock, say)."""
        ready = self.dir / "edge-agent.ready"
        ready.unlink(missing_ok=True)
        proc = self._spawn(
            "edge-agent",
            [
                str(BIN / "edge-agent"),
                "run",
                "-c",
                str(self.agent_config(flush_on_shutdown)),
                "--ready-file",
                str(ready),
            ],
            env,
        )
        self._wait_ready(proc, ready, timeout_s)
        return proc

    def _wait_ready(self, proc: Proc, ready: Path, timeout_s: float) -> None:
        def check() -> bool:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"{proc.name} exited: {proc.log.read_text()[-2000:]}")
            return ready.exists()

        wait_until(check, timeout_s, f"{proc.name} to subscribe", interval_s=0.05)

    def start_ingestors(self, timeout_s: float = 60.0, only: set[str] | None = None) -> list[Proc]:
        """Start the ingestors (``only`` these names, if given) and wait until subscribed."""
        procs = []
        targets = [t for t in self.spec.targets if only is None or t.name in only]
        for t in targets:
            cfg = {
                "mqtt": {
                    "port": self.spec.cloud_port,
                    "client_id": f"cloud-ingest-{t.name}",
                    **({"tls": self.spec.cloud_tls} if self.spec.cloud_tls else {}),
                    **t.mqtt,
                },
                "influx": t.influx,
                "archive": t.archive,
                "retry": {"initial_s": 0.2, "max_s": 2.0},
                **({"http": t.http} if t.http else {}),
                **({"acks": t.acks} if t.acks else {}),
                **t.top,
            }
            path = self.dir / f"cloud-ingest-{t.name}.toml"
            path.write_text(toml_dumps(cfg))
            ready = self.dir / f"cloud-ingest-{t.name}.ready"
            ready.unlink(missing_ok=True)
            procs.append(
                self._spawn(
                    f"cloud-ingest-{t.name}",
                    [str(BIN / "cloud-ingest"), "run", "-c", str(path), "--ready-file", str(ready)],
                    t.env,
                )
            )
        for t, p in zip(targets, procs, strict=True):
            self._wait_ready(p, self.dir / f"cloud-ingest-{t.name}.ready", timeout_s)
        return procs

    def start_sim(self) -> subprocess.Popen[bytes]:
        """Start firmware-sim in the background; finish with :meth:`finish_sim`."""
        s = self.spec
        argv = [
            str(BIN / "firmware-sim"), "run",
            "--port", str(s.local_port),
            "--duration", str(s.duration_s),
            "--speed", str(s.speed),
            "--seed", str(s.seed),
            "--start-ns", str(s.start_ns),
            "--truth", str(self.truth),
        ]  # fmt: skip
        if s.sim_config is not None:
            path = self.dir / "firmware-sim.toml"
            path.write_text(s.sim_config)
            argv += ["-c", str(path)]
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def _communicate(
        self, popen: subprocess.Popen[bytes], timeout_s: float, log_name: str
    ) -> tuple[bytes, bytes]:
        """Wait for a command (killing it after ``timeout_s``); keep its stderr as a log."""
        try:
            stdout, stderr = popen.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.communicate()
            raise
        (self.dir / log_name).write_bytes(stderr)
        return stdout, stderr

    def finish_sim(self, popen: subprocess.Popen[bytes], timeout_s: float) -> dict[str, Any]:
        """Wait for the simulator; return its summary (``produced``, ``messages`` ...)."""
        stdout, stderr = self._communicate(popen, timeout_s, "firmware-sim.log")
        if popen.returncode != 0:
            raise RuntimeError(f"firmware-sim failed ({popen.returncode}): {stderr[-2000:]!r}")
        out: dict[str, Any] = json.loads(stdout.decode().strip().splitlines()[-1])
        return out

    def start_fleet(self, *args: str) -> subprocess.Popen[bytes]:
        """Start ``firmware-sim fleet`` against the cloud broker (ground truth in
        ``fleet-truth.jsonl``); finish with :meth:`finish_fleet`."""
        argv = [
            str(BIN / "firmware-sim"), "fleet",
            "--port", str(self.spec.cloud_port),
            "--truth", str(self.fleet_truth),
            *args,
        ]  # fmt: skip
        popen = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.fleets.append(popen)  # stop_all ends it if a test fails first
        return popen

    def finish_fleet(self, popen: subprocess.Popen[bytes], timeout_s: float) -> dict[str, Any]:
        """Wait for the fleet; return its summary even when some batches were not acked
        (exit 1), so that a test can say which."""
        stdout, stderr = self._communicate(popen, timeout_s, "firmware-sim-fleet.log")
        lines = stdout.decode().strip().splitlines()
        if popen.returncode not in (0, 1) or not lines:
            raise RuntimeError(
                f"firmware-sim fleet failed ({popen.returncode}): {stderr[-2000:]!r}"
            )
        out: dict[str, Any] = json.loads(lines[-1])
        return out

    def run_sim(self, timeout_s: float) -> dict[str, Any]:
        return self.finish_sim(self.start_sim(), timeout_s)

    def agent_status(self) -> dict[str, Any]:
        return read_status(self.agent_db) if self.agent_db.exists() else {"counters": {}}

    def batch_seqs(self, influx_url: str, db: str) -> set[int]:
        """The seqs the agent gave its batches: every seq it used but those of its
        health reports, which share the counter. Call after the agent drained (then
        InfluxDB holds each report once); no alerts in the run."""
        c = self.agent_status()["counters"]
        health = {
            int(r["seq"])
            for r in influxq.rows(
                influx_url,
                f"SELECT seq FROM agent_health WHERE device_id = '{self.spec.device_id}'",
                db,
            )
        }
        assert len(health) == c.get("health_reports", 0), (len(health), c)
        return set(range(1, int(c["batches_created"]) + len(health) + 1)) - health

    def agent_raw(self) -> Counter[tuple[str, str, int]]:
        """Every raw reading in the agent's buffer, (node, sensor, ts_ns) -> how
        many times it is there, read as a technician would (``edge-agent export
        --kind raw``)."""
        out = self.dir / "raw-export.csv"
        subprocess.run(
            [str(BIN / "edge-agent"), "export", "-c", str(self.dir / "edge-agent.toml"),
             "--kind", "raw", "--since", "0", "-o", str(out)],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        with open(out, encoding="utf-8", newline="") as fh:
            return Counter((r["node"], r["sensor"], int(r["ts_ns"])) for r in csv.DictReader(fh))

    def wait_agent_has(self, produced: int, timeout_s: float) -> None:
        """Poll until the agent has stored (or counted as dropped) every produced reading."""

        def done() -> bool:
            c = self.agent_status()["counters"]
            return int(c.get("readings_stored", 0)) + int(c.get("dropped_late", 0)) >= produced

        wait_until(
            done, timeout_s, f"the edge agent to take all {produced} readings", interval_s=0.1
        )

    def run(self, arrived: Callable[[int], bool], *, deliver_timeout_s: float = 60.0) -> RunResult:
        """The whole path, once: ingestors, agent, simulator; then a clean shutdown.

        ``arrived(produced)`` is polled after the agent has flushed and drained, until
        it returns true (the sinks hold everything) or ``deliver_timeout_s`` passes;
        a timeout is not raised here but reported in ``RunResult.arrived`` so the
        caller can still count what did arrive.
        """
        self.start_ingestors()
        agent = self.start_agent()
        sim = self.run_sim(timeout_s=self.spec.duration_s / self.spec.speed + 120)
        produced = int(sim["produced"])
        self.wait_agent_has(produced, timeout_s=60)
        agent.terminate()  # SIGTERM: flush open windows, drain the outbox
        try:
            wait_until(
                lambda: arrived(produced),
                deliver_timeout_s,
                "the sinks to hold every batch",
                interval_s=0.2,
            )
            ok = True
        except TimeoutError:
            ok = False
        for p in self.procs:
            p.terminate()
        return RunResult(produced=produced, counters=self.agent_status()["counters"], arrived=ok)

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            if p.popen.poll() is None:
                p.popen.kill()
                p.popen.wait()
        for popen in self.fleets:
            if popen.poll() is None:
                popen.kill()
            if popen.stdout is not None and not popen.stdout.closed:
                popen.communicate()  # reaps it and closes its pipes
            popen.wait()


def truth_window_counts(truth: Path, width_ns: int) -> dict[tuple[str, str, int], int]:
    """Readings per (node, sensor, window start), straight from the ground truth; for
    the readings the agent stamps on arrival (``stamped``) see :func:`stamped_counts`."""
    out: dict[tuple[str, str, int], int] = {}
    stamped = set(stamped_counts(truth))
    for (node, sensor), (ts, _vals) in truth_by_sensor(truth).items():
        if (node, sensor) in stamped:
            continue
        starts, counts = np.unique((ts // width_ns) * width_ns, return_counts=True)
        for st, n in zip(starts.tolist(), counts.tolist(), strict=True):
            out[(node, sensor, int(st))] = int(n)
    return out


def message_fates(truth: Path, held: Counter[tuple[str, str, int]]) -> str:
    """One letter per message of the simulator's truth, in the order it published
    them: ``A`` when ``held`` has each of its readings once, ``L`` when none of
    them, ``P`` when some, ``D`` when one twice."""
    fates = []
    for c in read_truth(truth):
        n = [held.get((c.node, c.sensor, t), 0) for t in c.ts.tolist()]
        fates.append("D" if max(n) > 1 else "A" if min(n) == 1 else "L" if max(n) == 0 else "P")
    return "".join(fates)


def write_truth_without(truth: Path, out: Path, skip: set[int]) -> Path:
    """The truth file without its messages numbered ``skip`` (0-based, in order)."""
    with open(truth, encoding="utf-8") as src, open(out, "w", encoding="utf-8") as dst:
        dst.writelines(line for i, line in enumerate(src) if i not in skip)
    return out


def stamped_counts(truth: Path) -> dict[tuple[str, str], int]:
    """Readings per (node, sensor) of the sensors whose readings the agent stamps on
    arrival: only their total is exact, not their windows."""
    out: dict[tuple[str, str], int] = {}
    for c in read_truth(truth):
        if c.stamped:
            out[(c.node, c.sensor)] = out.get((c.node, c.sensor), 0) + len(c.ts)
    return out


def lost_stamped(
    counts: dict[tuple[str, str], int],
    device_id: str,
    windows: dict[tuple[str, str, str, int], dict[str, Any]],
) -> int:
    """Readings stamped on arrival that InfluxDB's windows do not hold, per sensor."""
    have: dict[tuple[str, str], int] = {}
    for (dev, node, sensor, _), w in windows.items():
        if dev == device_id and (node, sensor) in counts:
            n = int(w.get("count") or 0) + int(w.get("invalid") or 0)
            have[(node, sensor)] = have.get((node, sensor), 0) + n
    return sum(max(0, n - have.get(k, 0)) for k, n in counts.items())


def fleet_window_counts(truth: Path) -> dict[tuple[str, str, str, int], int]:
    """Readings per (device_id, node, sensor, window start) from the fleet's ground truth."""
    out: dict[tuple[str, str, str, int], int] = {}
    with open(truth, encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            for name, n in zip(rec["sensors"], rec["counts"], strict=True):
                out[(rec["device_id"], rec["node"], name, int(rec["start_ns"]))] = int(n)
    return out


def lost_readings(
    truth_counts: dict[tuple[str, str, int], int],
    device_id: str,
    windows: dict[tuple[str, str, str, int], dict[str, Any]],
) -> int:
    """Produced readings whose window is missing from InfluxDB or holds fewer readings."""
    lost = 0
    for (node, sensor, start), n in truth_counts.items():
        w = windows.get((device_id, node, sensor, start))
        have = 0 if w is None else int(w.get("count") or 0) + int(w.get("invalid") or 0)
        lost += max(0, n - have)
    return lost
