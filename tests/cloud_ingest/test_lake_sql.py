"""The SQL of docs/lake-sql.md, as written there, in DuckDB (and in Spark SQL:
tests/cloud_ingest/test_spark.py runs the checks here) on a lake of the
simulator's data: the same windows, counts, means and merged quantiles as the
project's Python (lake.current_rows, DDSketch.merge), and the quantiles within
the sketch's 1 % of the readings' own value at rank."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from cloud_ingest.jobs.engines import DuckDBEngine, Engine
from cloud_ingest.lake import current_rows, group_rows, part_key, pycolumns, read_table, to_parquet
from edge_agent.pipeline.kernels import segment_windows, window_stats
from firmware_sim.config import DEFAULT_NODES
from firmware_sim.sensors import chunk_times, chunk_values
from shared.sketch import ALPHA, DDSketch
from shared.wire import Batch, SensorRef, WindowSpec, make_batch
from tests.helpers import ROOT

WIDTH = 10 * 10**9
T0 = 1_790_000_000 * 10**9 // WIDTH * WIDTH
SECONDS = 300
QS = (0.5, 0.9, 0.99)


def queries() -> dict[str, str]:
    """The page's SQL blocks, by the name in their first line (``-- name``)."""
    text = (ROOT / "docs" / "lake-sql.md").read_text()
    out = {}
    for block in re.findall(r"```sql\n(.*?)```", text, re.S):
        first, _, body = block.partition("\n")
        out[first.removeprefix("-- ").strip()] = body
    return out


def readings(
    seed: int = 7, t0: int = T0, seconds: int = SECONDS
) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
    """The simulator's readings of its default nodes, ``seconds`` from ``t0``."""
    out = {}
    for ni, node in enumerate(DEFAULT_NODES):
        for si, spec in enumerate(node.sensors):
            n = int(seconds * spec.rate_hz) // spec.chunk
            ts = np.concatenate([chunk_times(spec, t0, k) for k in range(n)])
            vals = np.concatenate(
                [chunk_values(spec, chunk_times(spec, t0, k), seed, ni, si, k) for k in range(n)]
            )
            out[(node.id, spec.name)] = (ts, vals)
    return out


def batch(
    seq: int,
    data: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]],
    *,
    device: str = "pi-0042",
    width: int = WIDTH,
    t0: int = T0,
    tags: tuple[tuple[str, str], ...] = (),
    units: dict[str, str] | None = None,
) -> Batch:
    """The readings' tumbling windows as the agent sends them, sketches included."""
    sensors, sketches, cols = [], [], {}  # type: ignore[var-annotated]
    for (node, name), (ts, vals) in data.items():
        starts, segs = segment_windows(ts, width)
        ends = np.append(segs[1:], len(vals))
        sketches += [
            DDSketch.from_values(vals[a:b]).encode() for a, b in zip(segs, ends, strict=True)
        ]
        cols.setdefault("sensor", []).append(np.full(len(starts), len(sensors)))
        cols.setdefault("start_ns", []).append(starts)
        for k, v in window_stats(vals, segs).columns().items():
            cols.setdefault(k, []).append(v)
        sensors.append(SensorRef(node, name, (units or {}).get(name, ""), tags))
    return make_batch(
        device_id=device, seq=seq, created_ns=t0, window=WindowSpec("tumbling", width),
        sensors=tuple(sensors), columns={k: np.concatenate(v) for k, v in cols.items()},
        sketch=tuple(sketches),
    )  # fmt: skip


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    return build_lake(tmp_path_factory.mktemp("lake"))


def build_lake(root: Path) -> tuple[Path, dict]:
    data = readings()
    first = batch(1, data)
    # the same windows again as revision 1 (a resend of a revised window changes
    # nothing here), and the first batch delivered twice: the SQL shows each once
    again = dataclasses.replace(first, seq=2, revision=np.ones(first.rows, np.uint32))
    for n, group in enumerate(([first], [again], [first])):
        for g in group_rows(group):
            path = root / part_key(g.dt, f"{n:020d}-test-000001")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(to_parquet(g.rows))
    return root, data


def python_view(root: Path, since: int, until: int) -> dict[tuple[str, str], dict[str, float]]:
    """Per sensor: readings, mean and merged quantiles of the latest windows, in Python."""
    import pyarrow as pa

    tables = [read_table(p.read_bytes()) for p in sorted(root.rglob("*.parquet"))]
    rows = pycolumns(current_rows(pa.concat_tables(tables)))
    out: dict[tuple[str, str], dict[str, float]] = {}
    merged: dict[tuple[str, str], DDSketch] = {}
    for i, start in enumerate(rows["window_start"]):
        if not since <= start < until or not rows["count"][i]:
            continue
        key = (rows["node"][i], rows["sensor"][i])
        acc = out.setdefault(key, {"readings": 0, "sum": 0.0})
        acc["readings"] += rows["count"][i]
        acc["sum"] += rows["sum"][i]
        sk = DDSketch.decode(rows["sketch"][i])
        merged[key] = merged[key].merge(sk) if key in merged else sk
    for key, acc in out.items():
        acc["mean"] = acc["sum"] / acc["readings"]
        for q in QS:
            acc[f"p{round(q * 100)}"] = merged[key].quantile(q)
    return out


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory, lake: tuple[Path, dict]) -> Iterator[Engine]:
    eng = DuckDBEngine(tmp_path_factory.mktemp("duckdb"))
    with_view(eng, lake[0])
    yield eng
    eng.close()


def with_view(engine: Engine, root: Path) -> None:
    """The page's view of the lake, made by the page's own SQL for the engine."""
    engine.run(queries()[f"view {engine.name}"].format(root=root))


def text(engine: Engine, name: str, **values: object) -> str:
    """A query of the page, in the engine's dialect (the one word: UNNEST)."""
    return queries()[name].format(**values).replace("UNNEST(", f"{engine.unnest}(")


def sql(engine: Engine, name: str, since: int, until: int) -> list[dict]:
    return list(engine.rows(text(engine, name, since=since, until=until)))


@pytest.mark.parametrize("span", [(0, SECONDS), (60, 190)])
def test_counts_means_and_quantiles_equal_the_python_merge(
    lake: tuple[Path, dict], engine: Engine, span: tuple[int, int]
) -> None:
    check_counts_means_and_quantiles(lake, engine, span)


def check_counts_means_and_quantiles(
    lake: tuple[Path, dict], engine: Engine, span: tuple[int, int]
) -> None:
    root, data = lake
    since, until = T0 + span[0] * 10**9, T0 + span[1] * 10**9
    want = python_view(root, since, until)
    summary = {(r["node"], r["sensor"]): r for r in sql(engine, "summary", since, until)}
    quantiles = {(r["node"], r["sensor"]): r for r in sql(engine, "quantiles", since, until)}
    assert set(summary) == set(quantiles) == set(want) == set(data)
    for key, w in want.items():
        assert summary[key]["readings"] == quantiles[key]["readings"] == w["readings"]
        assert summary[key]["mean"] == pytest.approx(w["mean"], rel=1e-12)
        for q in ("p50", "p90", "p99"):
            assert quantiles[key][q] == pytest.approx(w[q], rel=1e-12), (key, q)
        # and within the sketch's guarantee of the readings' own value at rank
        ts, vals = data[key]
        window_starts = ts // WIDTH * WIDTH
        mine = np.sort(vals[(window_starts >= since) & (window_starts < until)])
        assert len(mine) == w["readings"]
        for q in QS:
            exact = mine[int(np.floor(q * (len(mine) - 1)))]
            got = quantiles[key][f"p{round(q * 100)}"]
            assert abs(got - exact) <= ALPHA * abs(exact) + 1e-9, (key, q, got, exact)


def test_the_latest_query_shows_each_window_once(engine: Engine) -> None:
    check_latest(engine)


def check_latest(engine: Engine) -> None:
    rows = list(engine.rows(text(engine, "latest")))
    assert len(rows) == len({(r["node"], r["sensor"], r["start_ns"]) for r in rows}) > 0
    assert {r["revision"] for r in rows} == {1}


def test_a_sketch_that_is_not_one_costs_only_its_own_bins() -> None:
    """The ingestor keeps a batch's sketch bytes as they came: bytes that are not a
    sketch have no bins (null), and the other rows theirs."""
    from cloud_ingest.lake.schema import sketch_bins_array
    from shared.sketch import bins_of

    good = DDSketch.from_values(np.array([-2.0, 0.0, 1.0, 1.0, 3.0])).encode()
    column = sketch_bins_array([good, b"\x01junk", None, good[:-3], b"\x07" + good[1:]])
    assert column.to_pylist()[1:] == [None] * 4
    (first,) = column.to_pylist()[:1]
    assert [(b["s"], b["n"]) for b in first] == [(-1, 1), (0, 1), (1, 2), (1, 1)]
    assert bins_of(good)[2] == [b["n"] for b in first]


def test_objects_without_the_bins_column_read_with_it(lake: tuple[Path, dict]) -> None:
    """An object written before ``sketch_bins``: read_table computes it from the bytes,
    so compaction writes it."""
    root, _ = lake
    path = sorted(root.rglob("*.parquet"))[0]
    table = read_table(path.read_bytes())
    old = table.drop_columns(["sketch_bins"])
    again = read_table(to_parquet(old))
    assert again.column("sketch_bins").to_pylist() == table.column("sketch_bins").to_pylist()
