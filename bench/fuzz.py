"""Hostile input at volume, through a real Mosquitto, into a running ingestor and agent.

Cloud: one ``cloud-ingest run`` (InfluxDB 1.x + a local lake) takes --cloud
generated and mutated messages on batch and alert topics (damaged valid batches,
random bytes, the known poison batches and alerts) while ``firmware-sim fleet``
sends valid batches beside them. Edge: one ``edge-agent run`` takes --edge
damaged reading chunks (and random bytes, and the known poison chunks) while
``firmware-sim run`` publishes valid readings beside them.

Reports, for each process: crashes (exit before the end: must be 0), messages
quarantined by reason, valid readings lost against the ground truth (must be 0:
the fleet's every window in InfluxDB with its count; every simulator reading in
the agent's buffer), and peak RSS (the kernel's VmHWM).

    .venv/bin/python bench/fuzz.py [--cloud 100000] [--edge 20000] [--seed 1]
    .venv/bin/python bench/fuzz.py --edge 0 --cloud 100000 --rounds 6   # a soak
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from devstack import hostile, influxq, services
from devstack.pipeline import IngestTarget, Pipeline, PipelineSpec, fleet_window_counts
from edge_agent.store import Store
from shared.readings import encode_chunk

W = 10_000_000_000


def peak_rss_mb(pid: int, field: str = "VmHWM") -> float:
    """The kernel's peak RSS of ``pid`` (``VmRSS``: the current one), in MB."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return float("nan")
    for line in status.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class RssSampler:
    """The highest VmRSS of a process in each of a run's rounds, and the highest
    value of each gauge of its /metrics (sampled twice a second)."""

    def __init__(self, pid: int, metrics_url: str | None = None) -> None:
        self.pid = pid
        self.metrics_url = metrics_url
        self.per_round: list[float] = [0.0]
        self.gauges: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            rss = peak_rss_mb(self.pid, "VmRSS")
            if rss == rss:  # not NaN
                self.per_round[-1] = max(self.per_round[-1], rss)
            if self.metrics_url:
                for name, value in self._gauges().items():
                    self.gauges[name] = max(self.gauges.get(name, 0.0), value)

    def received(self) -> float:
        """Batches and alerts the ingestor has taken so far (0 if /metrics fails)."""
        events = ('cloud_ingest_events_total{event="received"}',
                  'cloud_ingest_events_total{event="alerts_received"}')  # fmt: skip
        return sum(v for k, v in self._metrics().items() if k in events)

    def _gauges(self) -> dict[str, float]:
        wanted = ("cloud_ingest_queue_depth", "cloud_ingest_in_hand", "cloud_ingest_acks_pending")
        return {k: v for k, v in self._metrics().items() if k in wanted}

    def _metrics(self) -> dict[str, float]:
        if self.metrics_url is None:
            return {}
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=2) as resp:
                text = resp.read().decode()
        except OSError:
            return {}
        out = {}
        for line in text.splitlines():
            name, _, value = line.rpartition(" ")
            if name and not name.startswith("#"):
                out[name] = float(value)
        return out

    def next_round(self) -> None:
        self.per_round.append(0.0)

    def stop(self) -> list[float]:
        self._stop.set()
        self._thread.join()
        return [round(r, 1) for r in self.per_round]


def flood(port: int, messages: list[tuple[str, bytes]]) -> None:
    """Publish at QoS 1 without waiting for each PUBACK (at most 1,000 in flight)."""
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        for at in range(0, len(messages), 2000):  # in slices: bounded memory in paho
            infos = [client.publish(t, p, qos=1) for t, p in messages[at : at + 2000]]
            for info in infos:
                info.wait_for_publish(600)
    finally:
        client.disconnect()
        client.loop_stop()


def cloud_messages(n: int, rng: random.Random) -> list[tuple[str, bytes]]:
    valid = [hostile.valid_batch(f"fz-{k}", k + 1, 1 + k % 5) for k in range(50)]
    out: list[tuple[str, bytes]] = []
    for i in range(n):
        device = f"fz-{rng.randrange(200)}"
        kind = rng.randrange(10)
        if kind < 6:
            payload = hostile.mutate(rng.choice(valid), rng)
        elif kind < 8:
            payload = rng.randbytes(rng.randint(0, 600))
        elif kind == 8:
            payload = rng.choice(hostile.poison_batches(device, i + 1))[0]
        else:
            alert = rng.choice(hostile.poison_alerts(i + 1))
            out.append((f"telemetry/v1/{device}/alert", hostile.mutate(alert, rng)))
            continue
        out.append((f"telemetry/v1/{device}/batch", payload))
    return out


def edge_messages(n: int, rng: random.Random) -> list[tuple[str, bytes]]:
    t0 = (time.time_ns() // W - 30) * W
    valid = [
        encode_chunk("C", [t0 + k * 10**6 + j for j in range(20)], [1.5] * 20) for k in range(20)
    ]
    poison = [p for p, _ in hostile.poison_chunks()]
    out = []
    for _ in range(n):
        kind = rng.randrange(10)
        if kind < 7:
            payload = hostile.mutate(rng.choice(valid), rng)
        elif kind < 9:
            payload = rng.randbytes(rng.randint(0, 300))
        else:
            payload = rng.choice(poison)
        out.append((f"sensors/fuzz-{rng.randrange(20)}/s{rng.randrange(5)}", payload))
    return out


def stats_of(log: Path) -> dict[str, int]:
    text = log.read_text()
    if "stats " not in text:
        return {}
    out: dict[str, int] = json.loads(text.rsplit("stats ", 1)[1].splitlines()[0])
    return out


def run_cloud(tmp: Path, n: int, rounds: int, rng: random.Random) -> dict[str, object]:
    broker = services.mosquitto(tmp / "mq-cloud").start()
    influx = services.influxdb(tmp / "influx").start()
    try:
        influxq.create_database(influx.url, "fz")
        http = services.free_port()
        pipe = Pipeline(
            PipelineSpec(
                workdir=tmp / "cloud",
                local_port=broker.port,
                cloud_port=broker.port,
                targets=[
                    IngestTarget(
                        "fz",
                        {"api": "v1", "url": influx.url, "database": "fz"},
                        {"url": f"file://{tmp / 'lake'}"},
                        http={"listen": f"127.0.0.1:{http}"},
                    )
                ],
            )
        )
        (ingestor,) = pipe.start_ingestors()
        fleet = pipe.start_fleet(
            "--devices", "50", "--batches", str(40 * rounds), "--speed", "0",
            "--max-in-flight", "200", "--ack-timeout", "20", "--timeout", str(900 * rounds),
        )  # fmt: skip
        sampler = RssSampler(ingestor.popen.pid, f"http://127.0.0.1:{http}/metrics")
        started = time.monotonic()
        for r in range(rounds):  # fresh messages each round: a soak, not a replay
            if r:
                sampler.next_round()
            flood(broker.port, cloud_messages(n, rng))
            # the round ends when the ingestor has taken as many (the broker queues
            # what it has not), so that each round's RSS is that of a round's work
            deadline = time.monotonic() + 900
            while sampler.received() < (r + 1) * n and time.monotonic() < deadline:
                time.sleep(0.5)  # polling the ingestor's counters, with a deadline
        summary = pipe.finish_fleet(fleet, timeout_s=900 * rounds)
        seconds = time.monotonic() - started
        rss_per_round = sampler.stop()
        crashed = ingestor.popen.poll() is not None
        rss = peak_rss_mb(ingestor.popen.pid) if not crashed else float("nan")
        ingestor.terminate(120)
        st = stats_of(ingestor.log)
        truth = fleet_window_counts(pipe.fleet_truth)
        got = {k: int(v["count"]) for k, v in influxq.v1_windows(influx.url, "fz").items()}
        lost = sum(max(0, c - got.get(k, 0)) for k, c in truth.items())
        return {
            "messages": n * rounds,
            "rounds": rounds,
            "seconds": round(seconds, 1),
            "crashed": crashed,
            "quarantined": {
                k[12:]: v for k, v in sorted(st.items()) if k.startswith("quarantined_")
            },
            "written_hostile_but_valid": st.get("batches_written", 0) - summary["batches"],
            "fleet_batches": summary["batches"],
            "fleet_acked": summary["acked"],
            "valid_readings_lost": lost,
            "peak_rss_mb": round(rss, 1),
            "rss_mb_per_round": rss_per_round,
            "peak_gauges": sampler.gauges,
        }
    finally:
        influx.stop()
        broker.stop()


def run_edge(tmp: Path, n: int, rng: random.Random) -> dict[str, object]:
    broker = services.mosquitto(tmp / "mq-edge").start()
    try:
        pipe = Pipeline(
            PipelineSpec(
                workdir=tmp / "edge",
                local_port=broker.port,
                cloud_port=broker.port,
                targets=[],
                duration_s=120.0,
                speed=4.0,
                drain_timeout_s=0.2,
                start_ns=(time.time_ns() // W - 20) * W,
            )
        )
        agent = pipe.start_agent(flush_on_shutdown=False)
        sim = pipe.start_sim()
        started = time.monotonic()
        flood(broker.port, edge_messages(n, rng))
        produced = int(pipe.finish_sim(sim, timeout_s=300)["produced"])
        seconds = time.monotonic() - started
        # every simulator reading stored: per sensor, against the ground truth
        from firmware_sim.truth import truth_by_sensor

        want = {k: len(ts) for k, (ts, _v) in truth_by_sensor(pipe.truth).items()}

        def have() -> dict[tuple[str, str], int]:
            s = Store(pipe.agent_db, readonly=True)
            try:
                rows = s.conn.execute(
                    "SELECT s.node, s.name, sum(c.n) FROM chunks c JOIN sensors s "
                    "ON s.id = c.sensor_id GROUP BY s.id"
                )
                return {(str(a), str(b)): int(c) for a, b, c in rows}
            finally:
                s.close()

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and any(have().get(k, 0) < v for k, v in want.items()):
            time.sleep(0.5)  # polling the agent's buffer with a deadline
        got = have()
        lost = sum(max(0, v - got.get(k, 0)) for k, v in want.items())
        crashed = agent.popen.poll() is not None
        rss = peak_rss_mb(agent.popen.pid) if not crashed else float("nan")
        counters = pipe.agent_status()["counters"]
        agent.terminate(60)
        return {
            "messages": n,
            "seconds": round(seconds, 1),
            "crashed": crashed,
            "quarantined": {
                k[12:]: v for k, v in sorted(counters.items()) if k.startswith("quarantined_")
            },
            "valid_readings": produced,
            "valid_readings_lost": lost,
            "peak_rss_mb": round(rss, 1),
        }
    finally:
        broker.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cloud", type=int, default=100_000, help="hostile messages to the ingestor")
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="floods of --cloud messages, one after the other (a soak: the\n"
        "ingestor's highest RSS in each round is reported)",
    )
    ap.add_argument("--edge", type=int, default=20_000, help="hostile chunks to the agent")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    print(f"machine: {platform.machine()}, python {platform.python_version()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fuzz-") as d:
        tmp = Path(d)
        results = {}
        if args.edge:
            results["edge"] = run_edge(tmp, args.edge, rng)
        if args.cloud:
            results["cloud"] = run_cloud(tmp, args.cloud, args.rounds, rng)
    print(json.dumps(results, indent=2))
    bad = [k for k, r in results.items() if r["crashed"] or r["valid_readings_lost"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
