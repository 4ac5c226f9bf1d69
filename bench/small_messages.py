"""Small messages through the agent's real intake, beside today's chunk path.

Real devices send one reading per message (ESPHome's ``21.5``) or line protocol
over HTTP (Telegraf, InfluxDB clients). This runs, on real SQLite files with
``synchronous = "full"``, interleaved over --repeat rounds (the best reported):

1. **MQTT, one reading per message**: the agent's ``Intake`` from paho's message
   callback on (source routing, the ``value`` decoder, group commit of
   ``storage.group_commit_max``, the PUBACK to a stub client), windows closed
   about once per window width;
2. **today's chunk path**: the same ``Intake`` with the agent's own JSON chunks of
   --chunk readings;
3. **HTTP line protocol**: bodies of --lines lines posted over one keep-alive
   connection by a second process to the agent's ``HttpIntake`` (one commit per
   body, 204 after it); the agent's side runs in this process, one core.

    .venv/bin/python bench/small_messages.py [--messages 40000] [--bodies 60] [--repeat 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from devstack.services import free_port
from devstack.stubs import StubPahoClient
from edge_agent.config import AgentConfig
from edge_agent.pipeline import kernels, window
from edge_agent.pipeline.intake import Intake
from edge_agent.sources.config import HttpConfig
from edge_agent.sources.http import HttpIntake
from firmware_sim.sensors import readings as part_readings
from shared.config import from_dict
from shared.readings import encode_chunk

CLIENT = r"""
import http.client, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
body = sys.stdin.buffer.read()
bodies = body.split(b"\0")
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
t = time.perf_counter()
for b in bodies:
    conn.request("POST", "/api/v2/write?precision=ns", body=b)
    r = conn.getresponse(); r.read()
    assert r.status == 204, r.status
print(time.perf_counter() - t)
"""


@dataclasses.dataclass
class Msg:
    """What the intake reads of paho's MQTTMessage."""

    topic: str
    payload: bytes
    mid: int
    qos: int = 1
    retain: bool = False
    dup: bool = False
    properties: object = None


#: the simulated readings' time of day (their values follow a daily cycle)
T_SIM = 1_790_000_000 * 10**9


def agent_config(folder: Path, group: int) -> AgentConfig:
    return from_dict(
        AgentConfig,
        {
            "storage": {"path": str(folder / f"b-{time.monotonic_ns()}.sqlite"),
                        "group_commit_max": group, "group_commit_ms": 1000.0},
            "intake": {"sources": [
                {"name": "esphome", "topic": "esphome/{node}/sensor/{sensor}/state",
                 "format": "value"},
                {"name": "chunks", "topic": "sensors/{node}/{sensor}"},
            ]},
            "health": {"interval_s": 0},
        },
    )  # fmt: skip


def drive(cfg: AgentConfig, msgs: list[Msg]) -> float:
    """Feed the messages to a real Intake; readings stored per second, until all are
    committed and windows closed."""
    intake = Intake(cfg, client=StubPahoClient())  # type: ignore[arg-type]
    close_every = 2000
    t = time.perf_counter()
    for i, m in enumerate(msgs):
        intake._on_message(None, None, m)  # type: ignore[arg-type]  # paho's callback
        if i % close_every == close_every - 1:
            with intake._lock:
                window.send_ready(intake.store, cfg)
    intake.flush()
    window.send_ready(intake.store, cfg, flush=True)
    elapsed = time.perf_counter() - t
    stored = intake.store.counters().get("readings_stored", 0)
    intake.store.close()
    cleanup(cfg)
    return stored / elapsed


def cleanup(cfg: AgentConfig) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{cfg.storage.path}{suffix}").unlink(missing_ok=True)


def value_messages(n: int, sensors: int) -> list[Msg]:
    rng = np.random.default_rng(1)  # DS18B20s, in their 1/16 degC steps
    vals = part_readings("temperature", T_SIM + np.arange(n, dtype=np.int64) * 10**9, rng).tolist()
    return [
        Msg(f"esphome/node{i % 10}/sensor/s{i % sensors}/state", repr(vals[i]).encode(), i)
        for i in range(n)
    ]


def chunk_messages(readings: int, chunk: int, sensors: int) -> list[Msg]:
    rng = np.random.default_rng(2)
    t0 = time.time_ns() - (readings // sensors) * 1_000_000  # ends about now
    out = []
    for k in range(readings // chunk):
        ts = t0 + ((k // sensors) * chunk + np.arange(chunk)) * 1_000_000
        vals = part_readings("vibration", ts, rng)  # 1 kHz: an accelerometer's 1/256 g steps
        payload = encode_chunk("g", ts.tolist(), vals.tolist())
        out.append(Msg(f"sensors/node/s{k % sensors}", payload, k))
    return out


def bodies(n_bodies: int, lines: int) -> bytes:
    rng = np.random.default_rng(3)
    t0 = time.time_ns()
    out = []
    for b in range(n_bodies):  # BME280 humidity, in its 1/1024 %RH steps
        at = T_SIM + (b * lines + np.arange(lines, dtype=np.int64)) * 10**9
        vals = part_readings("humidity", at, rng).tolist()
        out.append(
            "\n".join(
                f"climate,host=node{i % 10} f{i % 10}={vals[i]!r} {t0 + (b * lines + i) * 1000}"
                for i in range(lines)
            ).encode()
        )
    return b"\0".join(out)


def http_run(cfg: AgentConfig, data: bytes, n_bodies: int) -> float:
    intake = Intake(cfg, client=StubPahoClient())  # type: ignore[arg-type]
    http = HttpIntake(dataclasses.replace(HttpConfig(), enabled=True, port=free_port()), intake)
    http.start()
    try:
        res = subprocess.run(
            [sys.executable, "-c", CLIENT, str(http.port), str(n_bodies)],
            input=data, capture_output=True, check=True, timeout=600,
        )  # fmt: skip
        stored = intake.store.counters().get("readings_stored", 0)
    finally:
        http.stop()
        intake.store.close()
        cleanup(cfg)
    return stored / float(res.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--messages", type=int, default=40_000, help="one-reading messages")
    ap.add_argument("--sensors", type=int, default=50)
    ap.add_argument("--chunk", type=int, default=1000, help="readings per chunk message")
    ap.add_argument("--bodies", type=int, default=60, help="HTTP bodies")
    ap.add_argument("--lines", type=int, default=5000, help="lines per HTTP body")
    ap.add_argument("--group", type=int, default=16, help="storage.group_commit_max")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dir", default=None, help="folder for the SQLite files (default: /tmp)")
    args = ap.parse_args()
    folder = Path(args.dir or tempfile.gettempdir())
    kernels.warm_up()
    small = value_messages(args.messages, args.sensors)
    chunk_readings = max(args.messages * 10, args.bodies * args.lines)
    chunks = chunk_messages(chunk_readings, args.chunk, 10)
    data = bodies(args.bodies, args.lines)
    best_small = best_chunk = best_http = 0.0
    for _ in range(args.repeat):
        best_small = max(best_small, drive(agent_config(folder, args.group), small))
        best_chunk = max(best_chunk, drive(agent_config(folder, args.group), chunks))
        best_http = max(best_http, http_run(agent_config(folder, args.group), data, args.bodies))
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cpus, python "
        f"{platform.python_version()}, kernel backend {kernels.backend()}, files in {folder}, "
        f"synchronous=full, group commit of {args.group}, best of {args.repeat}"
    )
    print(f"  MQTT, one reading per message (value):  {best_small:10,.0f} messages/s")
    print(
        f"  MQTT, chunks of {args.chunk} readings (today): {best_chunk:10,.0f} readings/s "
        f"({best_chunk / args.chunk:,.0f} messages/s)"
    )
    print(
        f"  HTTP line protocol, {args.lines} lines/body: {best_http:10,.0f} readings/s "
        f"(x{best_http / best_chunk:.2f} of the chunk path)"
    )


if __name__ == "__main__":
    main()
