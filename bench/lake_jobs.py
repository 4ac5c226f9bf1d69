"""The lake's jobs at scale: ``rollup`` and ``compact`` on DuckDB and on Spark
(``local[2]``) against the Python code they replaced, side by side in one run.

A day of generated windows (``--rows``, 20 sensors per device, 10-second windows,
1 % of them revised, 0.5 % delivered twice, sketches taken from a pool of real
ones) is written as objects of ``--object-rows`` rows, as the ingestor's groups
are. Each job runs in a process of its own; this one samples the resident memory
of that process and its children (Spark's JVM) every 0.1 s. The Python baselines
(tests/cloud_ingest/rollup_oracle.py, bench/baseline_compact.py) hold the day in
memory: they run on the first ``--baseline-rows`` rows only.

    .venv/bin/python bench/lake_jobs.py --rows 10000000 --baseline-rows 2000000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DAY_START = 1_790_035_200 * 10**9  # a UTC midnight
WIDTH = 10 * 10**9
SENSORS = 20
#: DuckDB's memory limit in the jobs (--memory-limit; the child reads it here)
MEMORY_LIMIT = os.environ.get("BENCH_DUCKDB_MEMORY") or None


def generate(root: Path, rows: int, object_rows: int, seed: int = 1) -> int:
    """A day of windows in objects of ``object_rows``; returns the rows written."""
    import pyarrow as pa

    from cloud_ingest.lake import part_key, to_parquet
    from cloud_ingest.lake.schema import aggregates_schema, sketch_bins_array, tags_type
    from firmware_sim.parts import quantize
    from shared.sketch import DDSketch

    rng = np.random.default_rng(seed)
    pool = [  # windows of 10 readings of DS18B20s, in their 1/16 degC steps
        DDSketch.from_values(quantize(rng.normal(20, 2, 10), "temperature")).encode()
        for _ in range(256)
    ]
    pool_bins = sketch_bins_array(pool)
    schema = aggregates_schema()
    windows_per_day = 86_400 * 10**9 // WIDTH
    devices = max(1, rows // (SENSORS * windows_per_day))
    per_device = rows // devices
    written = 0
    # object by object: a slice of (device, time) in time order, as groups arrive
    order = np.arange(devices * per_device, dtype=np.int64)
    for n_obj, a in enumerate(range(0, len(order), object_rows)):
        idx = order[a : a + object_rows]
        n = len(idx)
        window = idx // (devices * SENSORS)
        rest = idx % (devices * SENSORS)
        dev, sensor = rest // SENSORS, rest % SENSORS
        revision = (rng.random(n) < 0.01).astype(np.uint32)
        take = rng.integers(0, len(pool), n)
        mean = rng.normal(20, 2, n)
        cols = {
            "device_id": pa.array([f"dev-{d:06d}" for d in dev]),
            "seq": pa.array(window // 6 + 1),
            "batch_created_ns": pa.array(np.full(n, DAY_START, np.int64)),
            "window_kind": pa.array(["tumbling"] * n),
            "window_width_ns": pa.array(np.full(n, WIDTH, np.int64)),
            "window_hop_ns": pa.array(np.full(n, WIDTH, np.int64)),
            "node": pa.array(["node-1"] * n),
            "sensor": pa.array([f"s{s:02d}" for s in sensor]),
            "unit": pa.array([""] * n),
            "window_start": pa.array(DAY_START + window * WIDTH).cast(
                schema.field("window_start").type
            ),
            "count": pa.array(np.full(n, 10, np.uint32)),
            "invalid": pa.array(np.zeros(n, np.uint32)),
            "min": pa.array(mean - 3),
            "max": pa.array(mean + 3),
            "mean": pa.array(mean),
            "stddev": pa.array(np.full(n, 2.0)),
            "first": pa.array(mean - 1),
            "last": pa.array(mean + 1),
            "sum": pa.array(mean * 10),
            "p50": pa.array(mean),
            "p90": pa.array(mean + 2),
            "p99": pa.array(mean + 2.9),
            "revision": pa.array(revision),
            "sketch": pa.array([pool[t] for t in take], pa.binary()),
            "tags": pa.nulls(n, tags_type()),
            "generation": pa.array(np.zeros(n, np.int64)),
            "sketch_bins": pool_bins.take(pa.array(take)),
        }
        table = pa.table(cols).cast(schema)
        # the revised windows' first versions, and 0.5 % delivered twice
        first = table.filter(pa.array(revision == 1)).set_column(
            schema.get_field_index("revision"), "revision", pa.array(
                np.zeros(int(revision.sum()), np.uint32)))  # fmt: skip
        again = table.filter(pa.array(rng.random(n) < 0.005))
        table = pa.concat_tables([first, table, again])
        path = root / part_key("2026-09-22", f"{n_obj:020d}-bench-000001")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(to_parquet(table))
        written += table.num_rows
    return written


def _tree_rss(pid: int) -> int:
    """Resident bytes of a process and its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def measure(args: list[str]) -> tuple[float, int, dict[str, object]]:
    """Seconds, peak RSS of the process tree, and the job's JSON line."""
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss(proc.pid))
            done.wait(0.1)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, _ = proc.communicate()
    done.set()
    t.join()
    if proc.returncode:
        raise SystemExit(f"{args}: exit {proc.returncode}")
    return time.monotonic() - started, peak, json.loads(out.strip().splitlines()[-1])


def run_job(job: str, engine: str, lake: Path, work: Path) -> None:
    """One job in this process (the child of measure): prints a JSON line."""
    from cloud_ingest.sinks.archive import LocalArchive

    store = LocalArchive(lake)
    since, until = DAY_START, DAY_START + 86_400 * 10**9
    if job == "rollup":
        if engine == "python":
            from tests.cloud_ingest.rollup_oracle import oracle_lines

            n = len(oracle_lines(store, since, until, "1h", "window"))
        else:
            from cloud_ingest.jobs.engines import open_engine
            from cloud_ingest.jobs.rollup import rollup_lines

            eng = open_engine(engine, work, master="local[2]", memory_limit=MEMORY_LIMIT)
            n = sum(1 for _ in rollup_lines(store, since, until, "1h", "window", engine=eng))
            eng.close()
        print(json.dumps({"points": n}))
        return
    if engine == "python":
        sys.path.insert(0, str(ROOT / "bench"))
        from baseline_compact import compact as old_compact

        res = old_compact(store, "2026-09-22", "2026-09-22")
    else:
        from cloud_ingest.jobs.compact import compact
        from cloud_ingest.jobs.engines import open_engine

        eng = open_engine(engine, work, master="local[2]", memory_limit=MEMORY_LIMIT)
        res = compact(store, "2026-09-22", "2026-09-22", engine=eng, workdir=work)
        eng.close()
    print(json.dumps({"rows_in": res.rows_in, "rows_out": res.rows_out}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--baseline-rows", type=int, default=2_000_000)
    ap.add_argument("--object-rows", type=int, default=250_000)
    ap.add_argument("--engine", action="append", choices=["duckdb", "spark", "python"])
    ap.add_argument("--job", action="append", choices=["rollup", "compact"])
    ap.add_argument("--memory-limit", help="DuckDB's memory limit (default: DuckDB's, 80%% of RAM)")
    ap.add_argument(
        "--run", nargs=4, metavar=("JOB", "ENGINE", "LAKE", "WORK"), help=argparse.SUPPRESS
    )
    args = ap.parse_args()
    if args.run:
        job, engine, lake, work = args.run
        run_job(job, engine, Path(lake), Path(work))
        return
    if args.memory_limit:
        os.environ["BENCH_DUCKDB_MEMORY"] = args.memory_limit
    engines = args.engine or ["python", "duckdb", "spark"]
    jobs = args.job or ["rollup", "compact"]
    with tempfile.TemporaryDirectory(prefix="bench-lake-") as tmp:
        base = Path(tmp)
        sizes = {"python": args.baseline_rows}
        lakes: dict[int, tuple[Path, int]] = {}
        for engine in engines:
            size = sizes.get(engine, args.rows)
            if size not in lakes:
                t0 = time.monotonic()
                path = base / f"lake-{size}"
                rows = generate(path, size, args.object_rows)
                mb = sum(p.stat().st_size for p in path.rglob("*.parquet")) / 2**20
                took = time.monotonic() - t0
                print(f"# lake of {rows:,} rows ({mb:,.0f} MB of Parquet), made in {took:.0f} s")
                lakes[size] = (path, rows)
        print("| job | engine | rows in | seconds | rows/s | peak RSS (MB) |", flush=True)
        print("| --- | --- | ---: | ---: | ---: | ---: |")
        for job in jobs:
            for engine in engines:
                lake, rows = lakes[sizes.get(engine, args.rows)]
                work = base / f"work-{job}-{engine}"
                work.mkdir()
                target = lake
                if job == "compact":  # compaction rewrites the lake: a copy of it
                    target = base / f"copy-{job}-{engine}"
                    shutil.copytree(lake, target)
                seconds, peak, _ = measure(["--run", job, engine, str(target), str(work)])
                rate, mb = rows / seconds, peak / 2**20
                print(f"| {job} | {engine} | {rows:,} | {seconds:.1f} | {rate:,.0f} | {mb:,.0f} |")
                shutil.rmtree(work)
                if target != lake:
                    shutil.rmtree(target)


if __name__ == "__main__":
    main()
