"""What one device's flood costs the others: the fleet's ack latency while one
device floods cloud ingest with bad messages, with the per-device quotas
(cloud_ingest/ingest/quotas.py, the defaults) and without them (every quota out of the
way: what the ingestor did before issue 20), side by side in one run.

Each round starts its own Mosquitto and InfluxDB 1.x on loopback ports and one
``cloud-ingest run`` with a directory lake; ``firmware-sim fleet`` sends the
fleet's batches paced in event time while one more device publishes --rate bad
messages a second for --flood-s seconds. Reported per mode: the fleet's
publish-to-ack latency (p50, p99, max), its batches acked (all must be), and the
quarantine objects the flood left in the lake.

    .venv/bin/python bench/one_device.py [--devices 100] [--rate 1500] [--flood-s 20]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from devstack import hostile, influxq, services
from devstack.pipeline import IngestTarget, Pipeline, PipelineSpec

OFF = {
    "quotas": {
        "max_messages_per_s": 1e9,
        "burst_messages": 10**9,
        "max_quarantined_per_min": 10**9,
    }
}


def flood(port: int, rate: float, seconds: float) -> None:
    """Bad messages on one device's batch topic, paced at ``rate`` a second."""
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        hostile.flood(
            lambda junk: client.publish("telemetry/v1/flooder/batch", junk, qos=1),
            rate,
            int(rate * seconds),
        )
    finally:
        client.disconnect()
        client.loop_stop()


def one_round(work: Path, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    broker = services.mosquitto(work / "mq").start()
    influx = services.influxdb(work / "influx").start()
    influxq.create_database(influx.url, "bench")
    lake = work / "lake"
    pipe = Pipeline(
        PipelineSpec(
            workdir=work / "run",
            local_port=broker.port,
            cloud_port=broker.port,
            targets=[
                IngestTarget(
                    "i1",
                    {"api": "v1", "url": influx.url, "database": "bench"},
                    {"url": f"file://{lake}"},
                    top=OFF if mode == "quotas off" else {},
                )
            ],
        )
    )
    try:
        pipe.start_ingestors()
        fleet = pipe.start_fleet(
            "--devices", str(args.devices), "--batches", str(args.batches),
            "--speed", str(args.speed), "--ack-timeout", "600", "--timeout", "900",
        )  # fmt: skip
        flooder = threading.Thread(
            target=lambda: flood(broker.port, args.rate, args.flood_s), daemon=True
        )
        flooder.start()
        summary = pipe.finish_fleet(fleet, 960)
        flooder.join(120)
        q = lake / "quarantine"
        objects = sum(1 for _ in q.rglob("*.bin")) if q.exists() else 0
        return {
            "mode": mode,
            "acked": summary["acked"],
            "batches": summary["batches"],
            "ack_p50_s": summary["ack_latency_p50_s"],
            "ack_p99_s": summary["ack_latency_p99_s"],
            "quarantine_objects": objects,
            "elapsed_s": summary["elapsed_s"],
        }
    finally:
        pipe.stop_all()
        influx.stop()
        broker.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=100)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--speed", type=float, default=1.0, help="fleet event s per wall s")
    ap.add_argument("--rate", type=float, default=1500.0, help="bad messages a second")
    ap.add_argument("--flood-s", type=float, default=20.0)
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="one-device-") as tmp:
        for r in range(args.rounds):
            for mode in ("quotas on", "quotas off"):
                row = one_round(Path(tmp) / f"{r}-{mode.replace(' ', '-')}", mode, args)
                print(json.dumps(row), flush=True)
                rows.append(row)
    on = [r for r in rows if r["mode"] == "quotas on"]
    off = [r for r in rows if r["mode"] == "quotas off"]
    print(
        json.dumps(
            {
                "machine": f"{platform.machine()}, {platform.processor() or '?'}",
                "flood_per_s": args.rate,
                "p99_on_s": max(r["ack_p99_s"] for r in on),
                "p99_off_s": max(r["ack_p99_s"] for r in off),
            }
        )
    )


if __name__ == "__main__":
    main()
