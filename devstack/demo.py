"""The demo: the whole path on this machine, ending in one accounting line.

    python -m devstack.demo [--duration 60] [--workdir demo-output]

Starts two Mosquittos (the device's, plain on loopback; the cloud's as shipped:
TLS, client certificates from ``cloud-ingest pki``, the per-device ACL) and
InfluxDB 1.x on free loopback ports, runs firmware-sim, edge-agent and
cloud-ingest (archive in a local directory; signed acks) for ``--duration``
seconds of simulated time, stops them cleanly and prints::

    demo: produced=N stored=N windows=W batches=B delivered=B influx_points=P archived=A lost=0
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
import tomllib
from pathlib import Path

from cloud_ingest.lake import archived_seqs
from cloud_ingest.sinks.archive import LocalArchive
from devstack import influxq, services
from devstack.pipeline import (
    IngestTarget,
    Pipeline,
    PipelineSpec,
    lost_readings,
    lost_stamped,
    stamped_counts,
    truth_window_counts,
)
from devstack.secure import secure_cloud
from firmware_sim.config import SimConfig
from firmware_sim.families import agent_sources
from shared.config import from_dict

#: The simulated site: the agent's own sensor nodes, and devices of the families in
#: docs/devices.md, each publishing as the real ones do (firmware_sim/families.py).
NODES = """
[[nodes]]
id = "env-1"
  [[nodes.sensors]]
  name = "temperature"
  kind = "temperature"
  rate_hz = 1.0
  unit = "degC"
  [[nodes.sensors]]
  name = "humidity"
  kind = "humidity"
  rate_hz = 1.0
  unit = "%RH"

[[nodes]]
id = "motor-1"
  [[nodes.sensors]]
  name = "vibration"
  kind = "vibration"
  rate_hz = 200.0
  chunk = 20
  unit = "g"

[[nodes]]
id = "tasmota_1"
family = "tasmota"
  [[nodes.sensors]]
  name = "Humidity"
  kind = "humidity"
  rate_hz = 1.0

[[nodes]]
id = "pi-1"
family = "telegraf"
  [[nodes.sensors]]
  name = "cpu_temp"
  kind = "temperature"
  rate_hz = 2.0
  chunk = 10

[[nodes]]
id = "logger-1"
family = "influx-http"
  [[nodes.sensors]]
  name = "flow"
  kind = "vibration"
  rate_hz = 10.0
  chunk = 50
"""
#: Families without a time in their payload: the agent stamps their readings on
#: arrival, which runs ahead of a simulated clock faster than real time; so they
#: are in the demo at --speed 1 only.
STAMPED_NODES = """
[[nodes]]
id = "esp-kitchen"
family = "esphome"
  [[nodes.sensors]]
  name = "temperature"
  kind = "temperature"
  rate_hz = 1.0

[[nodes]]
id = "kitchen_th"
family = "zigbee2mqtt"
  [[nodes.sensors]]
  name = "humidity"
  kind = "humidity"
  rate_hz = 0.5
"""


def site(http_port: int, stamped: bool) -> tuple[str, str]:
    """(firmware-sim's config, the agent's sources for it)."""
    text = (
        f'http_url = "http://127.0.0.1:{http_port}"\n' + NODES + (STAMPED_NODES if stamped else "")
    )
    cfg = from_dict(SimConfig, tomllib.loads(text))
    return text, agent_sources(cfg, http_port)


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
    device = "demo-device"
    broker = services.mosquitto(work / "mosquitto")
    cloud = secure_cloud(work / "cloud", [device], ["ingest-1"])
    influx = services.influxdb(work / "influxdb")
    pipe: Pipeline | None = None
    try:
        print(
            f"demo: starting the device's Mosquitto on :{broker.port}, the cloud's (TLS, "
            f"client certificates, per-device ACL) on :{cloud.broker.port}, and InfluxDB on "
            f":{influx.port}",
            file=sys.stderr,
        )
        broker.start()
        cloud.broker.start()
        influx.start()
        influxq.create_database(influx.url, "telemetry")
        archive = work / "archive"
        sim_toml, sources = site(services.free_port(), stamped=args.speed == 1)
        spec = PipelineSpec(
            workdir=work / "run",
            local_port=broker.port,
            cloud_port=cloud.broker.port,
            device_id=device,
            agent_tables={"forward": cloud.agent_forward(device)},
            targets=[
                IngestTarget(
                    "demo",
                    {"api": "v1", "url": influx.url, "database": "telemetry"},
                    {"url": f"file://{archive}"},
                    mqtt=cloud.ingestor_mqtt("ingest-1"),
                    acks=cloud.ingestor_acks(),
                )
            ],
            duration_s=args.duration,
            speed=args.speed,
            # Faster than real time, event time would run into the future; start in the
            # past instead so that the run ends about now.
            start_ns=0 if args.speed == 1 else time.time_ns() - int(args.duration * 1e9),
            sim_config=sim_toml,
            agent_extra="\n" + sources,
        )
        pipe = Pipeline(spec)
        truth: dict[tuple[str, str, int], int] = {}
        stamped: dict[tuple[str, str], int] = {}

        def lost(w: dict[tuple[str, str, str, int], dict[str, object]]) -> int:
            if not truth:
                truth.update(truth_window_counts(pipe.truth, int(spec.width_s * 1e9)))
                stamped.update(stamped_counts(pipe.truth))
            return lost_readings(truth, spec.device_id, w) + lost_stamped(
                stamped, spec.device_id, w
            )

        def arrived(produced: int) -> bool:
            w = influxq.v1_windows(influx.url, "telemetry")
            batches = int(pipe.agent_status()["counters"].get("batches_created", 0))
            return lost(w) == 0 and count_archived() >= batches

        def count_archived() -> int:
            return sum(len(s) for s in archived_seqs(LocalArchive(archive)).values())

        print(f"demo: simulating {args.duration:g} s of sensor data ...", file=sys.stderr)
        res = pipe.run(arrived)
        if not res.arrived:
            print("demo: timed out waiting for InfluxDB and the archive", file=sys.stderr)
        produced = res.produced
        windows = influxq.v1_windows(influx.url, "telemetry")
        c = res.counters
        archived = count_archived()
        missing = lost(windows)
        print(
            f"demo: produced={produced} stored={c.get('readings_stored', 0)} "
            f"windows={c.get('windows_closed', 0)} batches={c.get('batches_created', 0)} "
            f"delivered={c.get('batches_acked', 0)} influx_points={len(windows)} "
            f"archived={archived} lost={missing}"
        )
        print(f"""
Everything is in {work}:
  InfluxDB data   {work / "influxdb"}   (stopped; the demo's server ran on :{influx.port})
  Parquet lake    {archive / "aggregates"}   (and alerts/; partitions dt=, alerts' dt=/device_id=)
  ground truth    {pipe.truth}
  the fleet's CA  {cloud.folder}   (certificates: `cloud-ingest pki`)
  logs            {work / "run"}/*.log
To look at the windows, start InfluxDB on that data and ask it in InfluxQL:
  influxd -config {work / "influxdb" / "influxdb.conf"} &
  curl -G http://127.0.0.1:{influx.port}/query --data-urlencode db=telemetry \\
    --data-urlencode 'q=SELECT count, mean, min, max FROM "window" GROUP BY sensor LIMIT 3'
  curl -G http://127.0.0.1:{influx.port}/query --data-urlencode db=telemetry \\
    --data-urlencode 'q=SELECT sum("count") FROM "window"'
The lake is Parquet with Hive partitions: DuckDB, pandas, Spark or Athena read it
as it is. With the demo's own virtualenv (pyarrow):
  {sys.executable} -c "import pyarrow.dataset as ds; print(ds.dataset(
    '{archive}/aggregates', partitioning='hive').to_table().group_by('sensor')
    .aggregate([('count', 'sum'), ('max', 'max')]))"
(docs/cloud-ingest.md has the DuckDB query that keeps a window's latest revision).""")
        return 0 if missing == 0 else 1
    finally:
        if pipe is not None:
            pipe.stop_all()
        influx.stop()
        cloud.broker.stop()
        broker.stop()


if __name__ == "__main__":
    sys.exit(main())
