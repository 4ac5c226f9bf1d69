"""The demo: the whole path on this machine, ending in one accounting line.

    python -m devstack.demo [--duration 60] [--workdir demo-output]

Starts Mosquitto and InfluxDB 1.x on free loopback ports, runs firmware-sim,
edge-agent and cloud-ingest (archive in a local directory) for ``--duration``
seconds of simulated time, stops them cleanly and prints::

    demo: produced=N stored=N windows=W batches=B delivered=B influx_points=P archived=A lost=0
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from devstack import influxq, services
from devstack.pipeline import (
    IngestTarget,
    Pipeline,
    PipelineSpec,
    lost_readings,
    truth_window_counts,
)
from devstack.services import wait_until


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--duration", type=float, default=60.0, help="seconds of simulated sensor time (default 60)"
    )
    ap.add_argument(
        "--speed",
        type=float,
        default=1.0,
        help="simulated seconds per wall-clock second (default 1: real time)",
    )
    ap.add_argument(
        "--workdir",
        default="demo-output",
        help="folder for InfluxDB data, the archive and logs (emptied first)",
    )
    args = ap.parse_args(argv)
    if args.duration <= 0 or args.speed <= 0:
        ap.error("--duration and --speed must be > 0")

    work = Path(args.workdir).resolve()
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    broker = services.mosquitto(work / "mosquitto")
    influx = services.influxdb(work / "influxdb")
    pipe: Pipeline | None = None
    try:
        print(
            f"demo: starting Mosquitto on :{broker.port} and InfluxDB on :{influx.port}",
            file=sys.stderr,
        )
        broker.start()
        influx.start()
        influxq.create_database(influx.url, "telemetry")
        archive = work / "archive"
        spec = PipelineSpec(
            workdir=work / "run",
            local_port=broker.port,
            cloud_port=broker.port,
            targets=[
                IngestTarget(
                    "demo",
                    {"api": "v1", "url": influx.url, "database": "telemetry"},
                    {"url": f"file://{archive}"},
                )
            ],
            duration_s=args.duration,
            speed=args.speed,
        )
        pipe = Pipeline(spec)
        pipe.start_ingestors()
        agent = pipe.start_agent()
        print(f"demo: simulating {args.duration:g} s of sensor data ...", file=sys.stderr)
        sim = pipe.run_sim(timeout_s=args.duration / args.speed + 120)
        produced = int(sim["produced"])
        pipe.wait_agent_has(produced, timeout_s=60)
        agent.terminate()  # flushes open windows and drains the outbox
        truth = truth_window_counts(pipe.truth, int(spec.width_s * 1e9))
        batches = int(pipe.agent_status()["counters"].get("batches_created", 0))

        def arrived() -> bool:
            w = influxq.v1_windows(influx.url, "telemetry")
            done = lost_readings(truth, spec.device_id, w) == 0
            objs = len(list((archive / "batches").rglob("*.tlmb"))) if archive.exists() else 0
            return done and objs >= batches

        try:
            wait_until(arrived, 60, "InfluxDB and the archive to hold every batch", 0.2)
        except TimeoutError as exc:
            print(f"demo: {exc}", file=sys.stderr)
        for p in pipe.procs:
            p.terminate()
        windows = influxq.v1_windows(influx.url, "telemetry")
        c = pipe.agent_status()["counters"]
        archived = len(list((archive / "batches").rglob("*.tlmb"))) if archive.exists() else 0
        lost = lost_readings(truth, spec.device_id, windows)
        print(
            f"demo: produced={produced} stored={c.get('readings_stored', 0)} "
            f"windows={c.get('windows_closed', 0)} batches={c.get('batches_created', 0)} "
            f"delivered={c.get('batches_sent', 0)} influx_points={len(windows)} "
            f"archived={archived} lost={lost}"
        )
        print(f"""
Everything is in {work}:
  InfluxDB data   {work / "influxdb"}   (stopped; the demo's server ran on :{influx.port})
  archive         {archive / "batches"}
  ground truth    {pipe.truth}
  logs            {work / "run"}/*.log
To look at the windows, start InfluxDB on that data and query it:
  influxd -config {work / "influxdb" / "influxdb.conf"} &
  influx -port {influx.port} -database telemetry -execute \\
    'SELECT count, mean, min, max, stddev FROM "window" GROUP BY node, sensor LIMIT 3'
  (or: curl -G http://127.0.0.1:{influx.port}/query --data-urlencode db=telemetry \\
        --data-urlencode 'q=SELECT sum("count") FROM "window"')
Each archived batch is one wire-format v1 message as received (docs/wire-format.md);
shared.wire.decode_batch() reads it.""")
        return 0 if lost == 0 else 1
    finally:
        if pipe is not None:
            pipe.stop_all()
        influx.stop()
        broker.stop()


if __name__ == "__main__":
    sys.exit(main())
