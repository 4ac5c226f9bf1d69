"""The jobs over the lake: ``replay``, ``rollup``, ``compact`` and ``report``."""

from __future__ import annotations

import contextlib
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click

from cloud_ingest.cli.app import (
    DEFAULT_CONFIG,
    config_option,
    lake_config,
    lake_options,
    main,
    time_range,
    until_signal,
)
from cloud_ingest.config import IngestConfig
from shared.cli import EXIT_FAILURE, load_or_exit, setup_logging

F = TypeVar("F", bound=Callable[..., Any])


def engine_options(f: F) -> F:
    """--engine, --memory-limit, --spark-master, --workdir: where a job's SQL runs."""
    for option in reversed(
        [
            click.option(
                "--engine",
                type=click.Choice(["duckdb", "spark"]),
                default="duckdb",
                show_default=True,
                help="DuckDB in this process, or Spark (pyspark) for lakes beyond one machine.",
            ),
            click.option(
                "--memory-limit",
                help="DuckDB's memory limit (e.g. 2GB; default 80% of RAM): it spills "
                "to --workdir past it.",
            ),
            click.option(
                "--spark-master",
                default="local[*]",
                show_default=True,
                help="Spark's master URL (yarn, spark://host:7077, local[2]).",
            ),
            click.option(
                "--workdir",
                type=click.Path(file_okay=False),
                help="Folder for the engine's spill files and staged objects (default: "
                "a temporary folder in $TMPDIR).",
            ),
        ]
    ):
        f = option(f)
    return f


@contextlib.contextmanager
def job_engine(
    engine: str, memory_limit: str | None, spark_master: str, workdir: str | None
) -> Iterator[tuple[Any, Path]]:
    """The engine a job runs on, and its work folder (removed afterwards)."""
    from cloud_ingest.jobs.engines import EngineUnavailable, open_engine

    parent = None if workdir is None else Path(workdir)
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"cloud-ingest-{engine}-", dir=parent) as tmp:
        try:
            eng = open_engine(engine, Path(tmp), memory_limit=memory_limit, master=spark_master)
        except EngineUnavailable as exc:
            raise click.UsageError(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - e.g. DuckDB refusing --memory-limit
            raise click.UsageError(f"--engine {engine}: {exc}") from None
        try:
            yield eng, Path(tmp)
        finally:
            eng.close()


@main.command()
@lake_options
@click.option("--since", help="Windows starting at or after this: ISO 8601 (UTC) or ns.")
@click.option("--until", help="Windows starting before this (exclusive), same forms.")
@click.option("--device", "devices", multiple=True, help="Only this device (repeatable).")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def replay(
    config_path: str | None,
    source: str | None,
    since: str | None,
    until: str | None,
    devices: tuple[str, ...],
    s3_endpoint_url: str | None,
    quiet: bool,
) -> None:
    """Rebuild InfluxDB from the Parquet lake, through the ingestor's write path.

    Idempotent: every point is keyed by its series and window start, so a replay
    over data that is already there rewrites the same values. Use it after losing
    an InfluxDB, to fill a new one, or after changing its retention. Prints one
    JSON line: objects, batches, points, alerts, rejected, damaged, seconds. A lake
    object that cannot be read is skipped and counted as damaged. Exit 1 if
    InfluxDB rejected anything or an object was damaged (the log names each), or
    if the lake or InfluxDB failed.
    """
    import asyncio
    import dataclasses
    import json
    import time

    from cloud_ingest.ingest.writer import ShuttingDown
    from cloud_ingest.jobs.engines import EngineMemoryError
    from cloud_ingest.jobs.replay import ReplayFilter, plan
    from cloud_ingest.jobs.replay import replay as run_replay
    from cloud_ingest.sinks.archive import open_archive
    from cloud_ingest.sinks.influx import make_point_sink
    from shared.errors import SinkError
    from shared.timefmt import parse_time

    cfg = load_or_exit(IngestConfig, config_path, DEFAULT_CONFIG)
    setup_logging("WARNING" if cfg.log_level == "INFO" else cfg.log_level, cfg.log_format)
    try:
        flt = ReplayFilter(
            None if since is None else parse_time(since),
            None if until is None else parse_time(until),
            frozenset(devices),
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    store = open_archive(lake_config(cfg, source, s3_endpoint_url))
    points = make_point_sink(cfg.influx)
    started = time.monotonic()
    try:
        work = plan(store, flt)
        total = work.objects
        with click.progressbar(
            length=total, label="replaying", file=sys.stderr, hidden=quiet
        ) as bar:
            res = asyncio.run(until_signal(run_replay, cfg, store, points, flt, bar.update, work))
    except (SinkError, ShuttingDown) as exc:
        click.echo(f"error: {exc} (a replay can be run again as it is)", err=True)
        sys.exit(EXIT_FAILURE)
    except EngineMemoryError as exc:
        click.echo(f"error: {exc} (replay fewer devices or hours at a time)", err=True)
        sys.exit(EXIT_FAILURE)
    finally:
        points.close()
        store.close()
    out = {**dataclasses.asdict(res), "seconds": round(time.monotonic() - started, 2)}
    click.echo(json.dumps(out))
    if res.rejected or res.damaged:
        sys.exit(EXIT_FAILURE)


@main.command()
@lake_options
@click.option(
    "--since",
    required=True,
    help="Start: ISO 8601 (UTC), ns, or a time before now (-1d); widened to a period.",
)
@click.option("--until", help="End (exclusive), same forms; default now; widened to a period.")
@click.option(
    "--period",
    "periods",
    type=click.Choice(["1h", "1d"]),
    multiple=True,
    help="Roll-up period (repeatable; default both).",
)
@click.option("--device", help="Only this device.")
@engine_options
def rollup(
    config_path: str | None,
    source: str | None,
    since: str,
    until: str | None,
    periods: tuple[str, ...],
    device: str | None,
    s3_endpoint_url: str | None,
    engine: str,
    memory_limit: str | None,
    spark_master: str,
    workdir: str | None,
) -> None:
    """Write hourly and daily roll-ups of the lake's windows to InfluxDB.

    Points go to <measurement>_1h and <measurement>_1d with the windows' tags.
    Quantiles come from merging the windows' DDSketches, so an hour's p99 is
    within 1 % of the reading at rank floor(0.99·(n-1)) of all its n readings,
    not an average of window p99s. Run it from a timer for the last closed hour
    and day; running a period again overwrites it (after late data, say). Prints
    one JSON line per period. The roll-up is SQL on DuckDB in this process
    (--engine duckdb, bounded by --memory-limit) or on Spark (--engine spark).
    """
    import json

    from cloud_ingest.jobs.engines import EngineMemoryError
    from cloud_ingest.jobs.rollup import rollup_lines
    from cloud_ingest.sinks.archive import open_archive
    from cloud_ingest.sinks.influx import make_point_sink
    from shared.errors import LakeObjectError, RetryableSinkError, SinkError
    from shared.topics import ID_PATTERN

    cfg = load_or_exit(IngestConfig, config_path, DEFAULT_CONFIG)
    setup_logging("WARNING" if cfg.log_level == "INFO" else cfg.log_level, cfg.log_format)
    since_ns, until_ns = time_range(since, until)
    if device is not None and not ID_PATTERN.match(device):
        raise click.UsageError(f"--device: {device!r} is not a device id")
    store = open_archive(lake_config(cfg, source, s3_endpoint_url))
    points = make_point_sink(cfg.influx)
    try:
        with job_engine(engine, memory_limit, spark_master, workdir) as (eng, _):
            for period in periods or ("1h", "1d"):
                lines = rollup_lines(
                    store,
                    since_ns,
                    until_ns,
                    period,
                    cfg.influx.measurement,
                    device,
                    cfg.influx.allowed_tags,
                    eng,
                )
                step, chunk, written = cfg.influx.max_lines_per_write, [], 0
                for line in lines:
                    chunk.append(line)
                    if len(chunk) == step:
                        points.write(chunk)
                        written, chunk = written + len(chunk), []
                if chunk:
                    points.write(chunk)
                    written += len(chunk)
                click.echo(json.dumps({"period": period, "points": written}))
    except SinkError as exc:
        kind = "retryable" if isinstance(exc, RetryableSinkError) else "permanent"
        click.echo(f"error: {exc} ({kind}; the roll-up can be run again as it is)", err=True)
        sys.exit(EXIT_FAILURE)
    except LakeObjectError as exc:
        click.echo(
            f"error: {exc} (move it out of the lake, or replace it, and run the roll-up"
            " again: a roll-up without it would be wrong)",
            err=True,
        )
        sys.exit(EXIT_FAILURE)
    except EngineMemoryError as exc:
        click.echo(f"error: {exc} (raise --memory-limit, and run it again)", err=True)
        sys.exit(EXIT_FAILURE)
    finally:
        points.close()
        store.close()


@main.command()
@lake_options
@click.option(
    "--since-day", required=True, help="First day (YYYY-MM-DD, UTC, or -2d: two days ago)."
)
@click.option("--until-day", help="Last day (inclusive); default yesterday (UTC).")
@engine_options
def compact(
    config_path: str | None,
    source: str | None,
    since_day: str,
    until_day: str | None,
    s3_endpoint_url: str | None,
    engine: str,
    memory_limit: str | None,
    spark_master: str,
    workdir: str | None,
) -> None:
    """Compact the lake: one aggregates object per day, current versions only.

    The ingestor writes one object per group of batches; a window revised by late
    data is then in two, and a batch delivered twice may be too. This rewrites
    each day as one object with the highest revision of every window (exactly
    what InfluxDB holds), and each day's alerts of a device as one object with
    each alert once, then deletes the objects it read. Safe to run while ingesting and
    to run again. Run it for closed days (the default ends yesterday). Prints one
    JSON line: partitions, objects_in, rows_in, rows_out, damaged. A partition with
    an object that cannot be read is left as it is, its key listed in damaged,
    and the exit code is 1.
    """
    import dataclasses
    import datetime
    import json

    from cloud_ingest.jobs.compact import compact as run_compact
    from cloud_ingest.jobs.engines import EngineMemoryError
    from cloud_ingest.sinks.archive import open_archive
    from shared.errors import SinkError
    from shared.timefmt import parse_day

    cfg = load_or_exit(IngestConfig, config_path, DEFAULT_CONFIG)
    setup_logging("WARNING" if cfg.log_level == "INFO" else cfg.log_level, cfg.log_format)
    yesterday = datetime.datetime.now(datetime.UTC).date() - datetime.timedelta(days=1)
    until_day = until_day or yesterday.isoformat()
    try:
        since_day = parse_day(since_day)
    except ValueError as exc:
        raise click.UsageError(f"--since-day: {exc}") from None
    try:
        until_day = parse_day(until_day)
    except ValueError as exc:
        raise click.UsageError(f"--until-day: {exc}") from None
    store = open_archive(lake_config(cfg, source, s3_endpoint_url))
    try:
        with job_engine(engine, memory_limit, spark_master, workdir) as (eng, folder):
            res = run_compact(store, since_day, until_day, engine=eng, workdir=folder)
    except SinkError as exc:
        click.echo(f"error: {exc} (run it again: compaction resumes)", err=True)
        sys.exit(EXIT_FAILURE)
    except EngineMemoryError as exc:
        click.echo(f"error: {exc} (raise --memory-limit; compaction resumes)", err=True)
        sys.exit(EXIT_FAILURE)
    finally:
        store.close()
    click.echo(json.dumps(dataclasses.asdict(res)))
    if res.damaged:
        sys.exit(EXIT_FAILURE)


@main.command("report")
@config_option("TOML config file: [influx] says which InfluxDB to read.")
@click.option(
    "--since", required=True, help="Start: ISO 8601 (UTC), ns, or a time before now (-7d)."
)
@click.option("--until", help="End (exclusive), same forms; default now.")
@click.option(
    "--out",
    default="fleet-report.html",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="The HTML file to write.",
)
@click.option(
    "--silent-after",
    default=3600.0,
    show_default=True,
    type=click.FloatRange(min=1),
    help="Seconds without a message after which a device counts as silent.",
)
def report_cmd(
    config_path: str | None, since: str, until: str | None, out: str, silent_after: float
) -> None:
    """Write the fleet report: one self-contained HTML file with plots.

    Data completeness per device and day and each sensor's daily range and p99
    (from the daily roll-ups: run `cloud-ingest rollup` first, or let its timer),
    alerts over time, silent devices, and ingest lag (from the agents' health
    reports). The plots are images inside the file, so it can be mailed. Needs
    matplotlib (pip install 'iot-telemetry[report]').
    """
    import json
    import time
    from pathlib import Path

    from shared.errors import SinkError

    cfg = load_or_exit(IngestConfig, config_path, DEFAULT_CONFIG)
    setup_logging("WARNING" if cfg.log_level == "INFO" else cfg.log_level, cfg.log_format)
    since_ns, until_ns = time_range(since, until)
    if until_ns <= since_ns:
        raise click.UsageError("--until must be after --since")
    try:
        from cloud_ingest.jobs.influxql import InfluxQLReader
        from cloud_ingest.jobs.report import gather, render_html
    except ImportError as exc:
        raise click.ClickException(
            f"{exc}: install matplotlib with pip install 'iot-telemetry[report]'"
        ) from None
    reader = InfluxQLReader(cfg.influx)
    try:
        rep = gather(
            reader,
            since_ns,
            until_ns,
            measurement=cfg.influx.measurement,
            health_measurement=cfg.influx.health_measurement,
            alert_measurement=cfg.influx.alert_measurement,
            result_measurement=cfg.influx.result_measurement,
            silent_after_s=silent_after,
            now_ns=time.time_ns(),
        )
    except SinkError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_FAILURE)
    finally:
        reader.close()
    path = Path(out)
    tmp = path.with_name(path.name + ".partial")
    try:
        tmp.write_text(render_html(rep))
        tmp.replace(path)
    except OSError as exc:
        click.echo(f"error: cannot write {path}: {exc.strerror}", err=True)
        sys.exit(EXIT_FAILURE)
    click.echo(
        json.dumps(
            {
                "out": str(path),
                "devices": len(rep.last_heard),
                "silent": len(rep.silent()),
                "sensors": len(rep.daily),
                "alerts": sum(n for pts in rep.alerts.values() for _, n in pts),
                "commands_unanswered": len(rep.unanswered),
                "commands_failed": len(rep.failed),
                "captures": len(rep.captures),
            }
        )
    )
