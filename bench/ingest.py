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

A paced run at --paced-points-per-s (10,000: half the 20,000 goal) then gives
the publish-to-ack latency (p50, p99) of a sustainable load. Bytes per point
compare the wire format with the same points as line protocol. CPU per batch is
each process's during the ingest run (the fleet's without building its batches);
``cores_busy`` is their sum over the run, of the machine's two: every process
shares them. ``--processes 2`` runs two ingestors in one shared subscription
group (``$share``) and measures them together.

    .venv/bin/python bench/ingest.py [--devices 1000] [--batches 6] [--rounds 2] [--processes 1]
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
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

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
    work: Path, broker: int, influx: str, db: str, recv_max: int, member: int | None = None
) -> subprocess.Popen[bytes]:
    """One ``cloud-ingest run``; with ``member``, one of a shared subscription's group
    (MQTT v5 ``$share``: the broker hands each batch to one member)."""
    name = db if member is None else f"{db}-{member}"
    client = "bench-ingest" if member is None else f"bench-ingest-{member}"
    mqtt = {"port": broker, "client_id": client, "receive_maximum": recv_max}
    if member is not None:
        mqtt["subscription"] = "$share/bench/telemetry/v1/+/batch"
    cfg = work / f"ingest-{name}.toml"
    cfg.write_text(
        toml_dumps(
            {
                "log_level": "WARNING",
                "mqtt": mqtt,
                "influx": {"url": influx, "database": db},
                "archive": {"url": f"file://{work / ('lake-' + name)}"},
            }
        )
    )
    ready = work / f"ready-{name}"
    log = (work / f"ingest-{name}.log").open("wb")
    p = subprocess.Popen(
        [str(BIN / "cloud-ingest"), "run", "-c", str(cfg), "--ready-file", str(ready)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    services.wait_until(ready.exists, 60, "the ingestor to subscribe")
    return p


def stop_ingestor(p: subprocess.Popen[bytes], broker: int, member: int | None) -> None:
    """Stop an ingestor and end its persistent session: left behind, it would have the
    broker queue every later run's batches for it (and hand them to the next one)."""
    p.terminate()
    p.wait(60)
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id="bench-ingest" if member is None else f"bench-ingest-{member}",
        protocol=mqtt.MQTTv5,
    )
    client.connect("127.0.0.1", broker, clean_start=True)  # no Session Expiry: ends now
    services.wait_until(lambda: client.loop(0.1) == 0 and client.is_connected(), 10, "a CONNACK")
    client.disconnect()
    client.loop(0.1)


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
    ap.add_argument(
        "--paced-points-per-s",
        type=float,
        default=10_000.0,
        help="the paced run's load (default: half of the 20,000 points/s goal)",
    )
    ap.add_argument("--wire-version", type=int, choices=(1, 2), default=1)
    ap.add_argument(
        "--processes",
        type=int,
        default=1,
        help="ingestors in one shared subscription ($share) group, measured together",
    )
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
            members = [None] if args.processes == 1 else list(range(args.processes))
            ings = [
                start_ingestor(work, broker.port, influx.url, db, args.receive_maximum, m)
                for m in members
            ]
            spec = FleetSpec(
                devices=args.devices,
                batches=args.batches,
                sensors=args.sensors,
                speed=0,
                port=broker.port,
                seed=r + 1,
                max_in_flight=args.max_in_flight,
                wire_version=args.wire_version,
                device_prefix=f"r{r}",
                client_id=f"bench-fleet-{r}",
            )
            procs = {f"ingestor {i}": p.pid for i, p in enumerate(ings)}
            procs |= {"influxd": influx.proc.pid, "mosquitto": broker.proc.pid}
            procs["fleet (this process)"] = os.getpid()
            t0 = time.process_time()
            build_batches(spec)  # the fleet builds its batches before its clock starts:
            build_s = time.process_time() - t0  # its CPU below leaves that out
            before = {name: cpu_s(pid) for name, pid in procs.items()}
            res = run_fleet(spec)
            s = res.summary()
            used = {name: cpu_s(pid) - before[name] for name, pid in procs.items()}
            used["fleet (this process)"] -= build_s
            cpu_ms = {name: round(sec * 1000 / res.batches, 3) for name, sec in used.items()}
            for ing, m in zip(ings, members, strict=True):
                stop_ingestor(ing, broker.port, m)
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
                # CPU per batch during the ingest run (the fleet's without building
                # its batches), and what the machine's two cores could do at that cost
                "cpu_ms_per_batch": cpu_ms,
                "all_cpu_ms_per_batch": round(sum(cpu_ms.values()), 3),
                "cores_busy": round(sum(used.values()) / s["elapsed_s"], 2),
                "ingestor_points_per_cpu_s": round(
                    args.sensors * 1000 / sum(v for k, v in cpu_ms.items() if "ingestor" in k)
                ),
            }
            results.append(row)
            print(json.dumps(row))
        best = max(results, key=lambda x: x["ratio"])
        # the publish-to-ack latency of a paced load
        rate_pts = args.paced_points_per_s
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
        stop_ingestor(ing, broker.port, None)
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
