"""The agent's memory over a long run: RSS every few seconds while a simulator
sends it a steady stream of readings (10,000 per second by default) and an MQTT
floor (bench/mqtt_floor.py) acknowledges every batch it forwards.

The agent runs from a clean ``pip install '.[edge]'`` virtualenv that the script
builds in its work folder (or ``--agent-bin``): the project's dev virtualenv also
has pandas and pyarrow, which sqlite-utils imports when they are there (+60 MB
that a device does not have). Each ``--kernel`` given runs in turn, the same
stream, so they compare in one run.

Reports per run: RSS after the first minute, the median and highest RSS of the
second half, the growth of the second half (a least-squares slope, MB per 10
minutes), and readings produced against readings stored (must be equal).

    .venv/bin/python bench/agent_memory.py --minutes 30 --kernel auto
    .venv/bin/python bench/agent_memory.py --minutes 2 --kernel auto --kernel numba
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from devstack import services
from devstack.pipeline import Pipeline, PipelineSpec
from edge_agent.store import Store

ROOT = Path(__file__).resolve().parent.parent
W = 10_000_000_000


def sim_config(nodes: int, sensors: int, rate_hz: float, chunk: int) -> str:
    out = []
    for n in range(nodes):
        out.append(f'[[nodes]]\nid = "node-{n:03d}"\n')
        for s in range(sensors):
            out.append(
                f'  [[nodes.sensors]]\n  name = "s{s}"\n  kind = "vibration"\n'
                f'  rate_hz = {rate_hz}\n  chunk = {chunk}\n  unit = "g"\n'
            )
    return "\n".join(out)


def edge_venv(work: Path) -> Path:
    venv = work / "edge-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "pip"), "install", "--quiet", f"{ROOT}[edge]"]  # not editable
    subprocess.run(pip, check=True)
    # fill numba's cache, as an earlier start of the agent would have
    warm = "from edge_agent.pipeline import kernels; kernels.configure('numba'); kernels.warm_up()"
    # (from the work folder: `-c` puts the current folder first on sys.path, and from
    # the repository it would import, and cache, the repository's copy)
    subprocess.run([str(venv / "bin" / "python"), "-c", warm], check=True, cwd=work)
    return venv / "bin" / "edge-agent"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def slope_per_10min(samples: list[tuple[float, float]]) -> float:
    xs = [t for t, _ in samples]
    ys = [r for _, r in samples]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return 600 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den


def stored(db: Path) -> int:
    s = Store(db, readonly=True)
    try:
        return int(s.conn.execute("SELECT coalesce(sum(n), 0) FROM chunks").fetchone()[0])
    finally:
        s.close()


def run_one(
    work: Path, agent_bin: Path, kernel: str, args: argparse.Namespace
) -> dict[str, object]:
    broker = services.mosquitto(work / f"mq-{kernel}").start()
    floor = None
    agent = None
    try:
        pipe = Pipeline(
            PipelineSpec(
                workdir=work / f"run-{kernel}",
                local_port=broker.port,
                cloud_port=broker.port,
                targets=[],
                duration_s=args.minutes * 60,
                speed=1.0,
                start_ns=(time.time_ns() // W) * W,
                sim_config=sim_config(args.nodes, args.sensors, args.rate_hz, args.chunk),
                agent_tables={"window": {"kernel": kernel}, "log_level": "WARNING"},
            )
        )
        ready = pipe.dir / "floor.ready"
        floor = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "bench" / "mqtt_floor.py"),
                "--port",
                str(broker.port),
                "--ready-file",
                str(ready),
            ],
            cwd=ROOT,
        )
        services.wait_until(ready.exists, 30, "the MQTT floor to subscribe")
        agent_ready = pipe.dir / "agent.ready"
        log = (pipe.dir / "edge-agent.log").open("wb")
        agent = subprocess.Popen(
            [
                str(agent_bin),
                "run",
                "-c",
                str(pipe.agent_config(False)),
                "--ready-file",
                str(agent_ready),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        services.wait_until(
            lambda: agent_ready.exists() or agent.poll() is not None, 120, "the agent to start"
        )
        if agent.poll() is not None:
            raise RuntimeError(f"the agent exited: {(pipe.dir / 'edge-agent.log').read_text()}")
        samples: list[tuple[float, float]] = []
        started = time.monotonic()
        sim = pipe.start_sim()
        while sim.poll() is None:
            samples.append((time.monotonic() - started, rss_mb(agent.pid)))
            with contextlib.suppress(subprocess.TimeoutExpired):
                sim.wait(timeout=args.every_s)  # the sampling period, not a wait for a result
        produced = int(pipe.finish_sim(sim, timeout_s=60)["produced"])
        services.wait_until(
            lambda: stored(pipe.agent_db) >= produced, 120, "the agent to store every reading"
        )
        if agent.poll() is not None:
            raise RuntimeError(f"the agent exited: {agent.returncode}")
        half = [s for s in samples if s[0] >= samples[-1][0] / 2]
        first_min = [r for t, r in samples if t <= 60] or [samples[0][1]]
        status = json.loads(
            subprocess.run(
                [str(agent_bin), "status", "--json", "-c", str(pipe.dir / "edge-agent.toml")],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        return {
            "kernel": kernel,
            "seconds": round(samples[-1][0]),
            "readings_per_s": round(produced / samples[-1][0]),
            "produced": produced,
            "stored": stored(pipe.agent_db),
            "batches_acked": status["counters"].get("batches_acked"),
            "rss_after_1_min_mb": round(first_min[-1], 1),
            "rss_second_half_median_mb": round(statistics.median(r for _, r in half), 1),
            "rss_highest_mb": round(max(r for _, r in samples), 1),
            "growth_second_half_mb_per_10_min": round(slope_per_10min(half), 2),
            "samples": len(samples),
        }
    finally:
        for p in (agent, floor):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(60)
        broker.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0, help="length of each run")
    ap.add_argument("--kernel", action="append", choices=("auto", "numba", "numpy"))
    ap.add_argument("--nodes", type=int, default=50)
    ap.add_argument("--sensors", type=int, default=4, help="per node")
    ap.add_argument("--rate-hz", type=float, default=50.0, help="per sensor")
    ap.add_argument("--chunk", type=int, default=25, help="readings per MQTT message")
    ap.add_argument("--every-s", type=float, default=5.0, help="RSS sampling period")
    ap.add_argument("--agent-bin", type=Path, help="an edge-agent to run (default: a clean venv)")
    args = ap.parse_args()
    kernels = args.kernel or ["auto"]
    with tempfile.TemporaryDirectory(prefix="bench-agent-memory-") as tmp:
        work = Path(tmp)
        agent_bin = args.agent_bin or edge_venv(work)
        print(
            f"machine: {platform.machine()}, python {platform.python_version()}, "
            f"{args.nodes * args.sensors} sensors x {args.rate_hz:g} Hz, "
            f"{args.chunk} readings per message, agent {agent_bin}",
            flush=True,
        )
        for kernel in kernels:
            print(json.dumps(run_one(work, agent_bin, kernel, args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
