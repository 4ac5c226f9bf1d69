"""``edge-agent``: run the agent, and the field technician's local commands.

Every command is a thin layer over one library function: it loads the config,
calls the function, turns its errors into a one-line message and an exit code,
and prints a table for people or JSON (``--json``) for scripts.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
from humanize import naturalsize

from edge_agent.config import AgentConfig
from shared.cli import (
    CONFIG_DIR,
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_OK,
    config_group,
    load_or_exit,
    setup_logging,
)
from shared.errors import ConfigError, StorageError

CONFIG_ENV = "EDGE_AGENT_CONFIG"
DEFAULT_CONFIG = CONFIG_DIR / "edge-agent.toml"
CONFIG_HELP = (
    f"TOML config file (see `edge-agent config sample`). Default: ${CONFIG_ENV}, else "
    f"{DEFAULT_CONFIG} if it exists, else the built-in defaults."
)
#: flush: the windows are closed and queued, but not yet acknowledged by the cloud.
EXIT_PARTIAL = 3

F = TypeVar("F", bound=Callable[..., Any])


def config_option(f: F) -> F:
    return click.option(
        "-c",
        "--config",
        "config_path",
        type=click.Path(dir_okay=False),
        envvar=CONFIG_ENV,
        help=CONFIG_HELP,
    )(f)


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(f)


def ago(seconds: float | None, *, never: str = "-", digits: int = 0) -> str:
    """``42 s ago``, ``5 min ago``, ``3 h ago``, ``2 d ago`` (``digits`` after the
    point); ``never`` for None."""
    if seconds is None:
        return never
    if seconds < -1.0:
        return "in the future"  # the device clock is behind the newest reading
    seconds = max(seconds, 0.0)  # a reading stored while this command read the file
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.{digits}f} {unit} ago"
    return f"{seconds:.{digits}f} s ago"


def finite_or_null(obj: Any) -> Any:
    """``obj`` with every NaN or infinity replaced by None, for strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_or_null(v) for v in obj]
    return obj


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


#: What reading or writing the buffer can raise; a command turns each into one line.
BUFFER_ERRORS = (FileNotFoundError, StorageError, sqlite3.Error)


def buffer_failed(exc: BaseException, hint: str = "run `edge-agent buffer check`") -> NoReturn:
    """One line for a buffer that cannot be used; SQLite's own errors mean damage."""
    if isinstance(exc, sqlite3.Error):
        fail(f"the buffer cannot be read ({exc}): {hint}")
    fail(str(exc))


#: colours of the words a technician must not miss (click strips them when the
#: output is not a terminal, and NO_COLOR turns them off: https://no-color.org)
STYLES: dict[str, dict[str, Any]] = {
    "ok": {"fg": "green"},
    "warn": {"fg": "yellow", "bold": True},
    "fail": {"fg": "red", "bold": True},
}


def paint(text: str, level: str) -> str:
    """``text`` in the colour of ``level`` (ok, warn, fail); as it is for others."""
    style = STYLES.get(level)
    return click.style(text, **style) if style else text


def say(text: str = "") -> None:
    click.echo(text, color=False if os.environ.get("NO_COLOR") else None)


def table(rows: Sequence[Sequence[object]], headers: Sequence[str] | None = None) -> None:
    """Print rows as aligned columns (cells may be coloured with :func:`paint`)."""
    cells = [[str(c) for c in r] for r in ([headers] if headers else []) + list(rows)]
    if not cells:
        return
    widths = [
        max(len(click.unstyle(r[i])) for r in cells if i < len(r)) for i in range(len(cells[0]))
    ]
    for n, r in enumerate(cells):
        say(
            "  ".join(
                c + " " * (w - len(click.unstyle(c))) for c, w in zip(r, widths, strict=False)
            ).rstrip()
        )
        if headers and n == 0:
            say("  ".join("-" * w for w in widths))


def when(ns: int | None) -> str:
    return "-" if not ns else time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ns / 1e9))


def _load(config_path: str | None) -> AgentConfig:
    """The agent's config (exit 2 with a one-line error), its kernel choice applied."""
    from edge_agent.pipeline import kernels

    cfg = load_or_exit(AgentConfig, config_path, DEFAULT_CONFIG)
    kernels.configure(cfg.window.kernel)
    return cfg


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Edge agent: store sensor readings durably, window them, forward batches.

    Sensor nodes publish readings to the device's local MQTT broker; the agent
    stores them in SQLite, closes event-time windows (count, min, max, mean,
    stddev, first, last per sensor) and forwards compact batches to the cloud
    broker over MQTT v5, QoS 1, keeping each until the cloud acknowledges it.

    The technician commands (status, sensors, tail, flush, export, buffer,
    doctor, config) work with no network and whether or not the agent runs.

    Exit codes: 0 ok; 1 failure (or problems found by `buffer check` and
    `doctor`); 2 bad config or usage; 3 `flush` closed the windows but the cloud
    has not acknowledged them yet.
    """


@main.command()
@config_option
@click.option(
    "--ready-file",
    type=click.Path(dir_okay=False),
    help="Create this file once subscribed (for supervisors and scripts to wait on).",
)
def run(config_path: str | None, ready_file: str | None) -> None:
    """Run the agent until SIGTERM or Ctrl-C, then drain the outbox and exit.

    One agent per buffer: a second `run` on the same storage.path exits 2 and
    names the running one's PID. The read-only commands work beside it.
    """
    cfg = _load(config_path)
    setup_logging(cfg.log_level, cfg.log_format)
    from edge_agent.agent import run_agent  # imports numba: keep other commands fast
    from edge_agent.desired import Desired
    from edge_agent.lock import BufferBusy
    from edge_agent.sources.http import ListenError

    path = config_path or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    desired = Desired(path) if cfg.commands.enabled else None
    if desired is not None:  # the operators' desired config over the file (docs/commands.md)
        try:
            cfg = desired.load()
        except ConfigError as exc:
            fail(str(exc), EXIT_CONFIG)
        setup_logging(cfg.log_level, cfg.log_format)
    try:
        sys.exit(run_agent(cfg, ready_file, desired))
    except (BufferBusy, ListenError) as exc:
        fail(str(exc), EXIT_CONFIG)
    except StorageError as exc:
        fail(str(exc))


def _desired_status(config_path: str | None, cfg: AgentConfig) -> dict[str, Any] | None:
    """The operators' desired config in force (docs/commands.md), None without commands."""
    if not cfg.commands.enabled:
        return None
    from edge_agent.desired import Desired

    path = config_path or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
    s = Desired(path).status()
    return {"version": s.version, "state": s.state, "rejected": s.rejected, "reason": s.reason}


def _desired_line(d: dict[str, Any] | None) -> str:
    if d is None:
        return "- (no [commands] keys)"
    if not d["version"] and not d["rejected"]:
        return "none: the config file alone"
    text = f"version {d['version']}" if d["version"] else "none: the config file alone"
    if d["state"] == "rolled-back":
        return paint(f"{text}; version {d['rejected']} rolled back: {d['reason']}", "warn")
    return f"{text}, {d['state']}"


def clock_line(st: dict[str, Any], max_future_s: float) -> str:
    """The device's clock against the cloud's, as the running agent last measured it."""
    offset = st.get("clock_offset_s")
    if offset is None:
        return "-" if not st["running"] else "not measured yet (no ack with the cloud's time)"
    rtt = st["clock_rtt_s"] or 0.0
    side = "behind" if offset > 0 else "ahead of"
    text = (
        f"{abs(offset):.1f} s {side} the cloud's (± {rtt / 2:.2f} s, "
        f"{st['clock_measured_age_s']:.0f} s ago)"
    )
    error = abs(offset) - rtt / 2
    level = "ok" if error < 2.0 else "fail" if error > max_future_s else "warn"
    return paint(text if level == "ok" else f"off: {text}", level)


@main.command()
@config_option
@json_option
def status(config_path: str | None, as_json: bool) -> None:
    """Running or not, broker links, last ack, backlog, disk use, drops.

    Reads the SQLite buffer directly, so it works with no network and whether
    or not the agent is running.
    """
    from edge_agent.technician.status import read_status

    cfg = _load(config_path)
    try:
        st = read_status(cfg.storage.path)
    except BUFFER_ERRORS as exc:
        buffer_failed(exc)
    st["max_bytes"] = cfg.storage.max_bytes
    st["desired_config"] = _desired_status(config_path, cfg)
    st["intake_client_id"] = cfg.intake.broker.client_id or (
        f"edge-agent-{cfg.device_id}-intake-{st['intake_session']:016x}"
    )
    if as_json:
        click.echo(json.dumps(st, indent=2, sort_keys=True))
        return
    link = {True: paint("connected", "ok"), False: paint("not connected", "fail")}
    budget = (
        f" of {cfg.storage.max_bytes:,} ({naturalsize(cfg.storage.max_bytes, binary=True)})"
        if cfg.storage.max_bytes
        else " (no budget)"
    )
    oldest = st["oldest_unsent_age_s"]
    agent = paint("not running", "warn")
    if st["running"]:
        agent = paint(f"running (pid {st['agent_pid']})", "ok")
        if not st["healthy"]:
            beat = st["heartbeat_age_s"]
            agent = paint(
                f"running (pid {st['agent_pid']}), "
                + (f"but no heartbeat for {beat:.0f} s" if beat else "but no heartbeat yet"),
                "fail",
            )
    errors = f"{st['store_errors']:,}"
    if st["last_store_error_ns"]:
        errors += f", the last at {when(st['last_store_error_ns'])}"
    rows: list[tuple[str, object]] = [
        ("agent", agent),
        ("device broker", link[st["intake_connected"]] if st["running"] else "-"),
        ("cloud broker", link[st["forward_connected"]] if st["running"] else "-"),
        ("clock", clock_line(st, cfg.window.max_future_s)),
        (
            "last ack",
            f"{when(st['last_ack_ns'])} ({ago(st['last_ack_age_s'], never='never', digits=1)})",
        ),
        (
            "backlog",
            f"{st['backlog_batches']} batches, {st['backlog_readings']:,} readings, "
            f"{st['backlog_bytes']:,} bytes",
        ),
        ("oldest unsent", "-" if oldest is None else ago(oldest, digits=1).replace(" ago", " old")),
        (
            "disk",
            f"{st['used_bytes']:,} bytes ({naturalsize(st['used_bytes'], binary=True)}) "
            f"in use{budget}",
        ),
        ("buffer", st["buffer"]),
        ("desired config", _desired_line(st["desired_config"])),
        ("store errors", errors),
        ("sensors", st["sensors"]),
        (
            "held readings",
            f"{st['held_readings']:,} (stamped ahead of the clock; released when it allows)"
            if st["held_readings"]
            else "none",
        ),
        (
            "intake session",
            st["intake_client_id"]
            + (
                f" (the broker came back without it {lost:,} times: a power cut,"
                " docs/edge-agent.md)"
                if (lost := st["counters"].get("intake_sessions_lost", 0))
                else ""
            ),
        ),
        (
            "quarantined",
            f"{st['quarantined']:,} messages, {st['quarantine_bytes']:,} bytes kept"
            + (f", {st['quarantine_dropped']:,} oldest dropped" if st["quarantine_dropped"] else "")
            + ("  (edge-agent quarantine)" if st["quarantined"] else ""),
        ),
        (
            "open alerts",
            ", ".join(f"{a['rule']} (since {when(a['since_ns'])})" for a in st["open_alerts"])
            or "none",
        ),
        ("unsent alerts", st["unsent_alerts"]),
        (
            "health reports",
            f"{st['counters'].get('health_reports', 0):,} made, {st['unsent_health']:,} unsent",
        ),
    ]
    table(rows)
    if st["sources"]:
        from edge_agent.counters import SOURCE_KINDS

        click.echo("\nintake by source")
        table(
            [
                (f"  {name}", *(f"{c[k]:,}" for k in SOURCE_KINDS))
                for name, c in st["sources"].items()
            ],
            headers=("  source", *SOURCE_KINDS),
        )
    drops = st["drops"] or {"(none)": 0}
    click.echo("\ndrops")
    table([(f"  {k}", f"{v:,}") for k, v in drops.items()])


@main.command()
@config_option
@json_option
@click.option("--windows", default=20, show_default=True, help="Windows in the trend.")
def sensors(config_path: str | None, as_json: bool, windows: int) -> None:
    """Every sensor: last value, rate, last seen, and a trend of recent windows."""
    from edge_agent.technician.sensors import read_sensors

    cfg = _load(config_path)
    try:
        views = read_sensors(cfg.storage.path, width_ns=cfg.window.width_ns, windows=windows)
    except BUFFER_ERRORS as exc:
        buffer_failed(exc)
    if as_json:  # strict JSON: a window without readings is null, not NaN
        rows = [{**v.__dict__, "sparkline": v.sparkline} for v in views]
        click.echo(json.dumps(finite_or_null(rows), indent=2, allow_nan=False))
        return
    table(
        [
            (
                f"{v.node}/{v.sensor}",
                "-" if v.last_value is None else f"{v.last_value:.6g} {v.unit}".strip(),
                f"{v.rate_hz:.3g} Hz",
                when(v.last_seen_ns),
                ago(v.last_seen_age_s) + (paint("  STALE", "warn") if v.stale else ""),
                v.sparkline,
            )
            for v in views
        ],
        headers=("sensor", "last value", "rate", "last seen", "age", f"trend ({windows} windows)"),
    )


@main.command()
@config_option
@json_option
@click.option("--count", type=int, help="Stop after this many readings.")
@click.option("--timeout", "timeout_s", type=float, help="Stop after this many seconds.")
@click.option("--node", "node_glob", default="*", help="Only these nodes (a glob: 'env-*').")
@click.option("--sensor", "sensor_glob", default="*", help="Only these sensors (a glob).")
def tail(
    config_path: str | None,
    as_json: bool,
    count: int | None,
    timeout_s: float | None,
    node_glob: str,
    sensor_glob: str,
) -> None:
    """Print readings live as the sensor nodes publish them (Ctrl-C stops).

    Listens on the device broker beside the agent; the agent still gets every
    reading. Values are shown with 6 significant digits; --json prints one JSON
    object per reading (JSON Lines) with the value as sent.
    """
    from fnmatch import fnmatchcase

    from edge_agent.technician.tail import tail as tail_readings

    cfg = _load(config_path)
    seen = 0
    try:
        where = f"{cfg.intake.broker.host}:{cfg.intake.broker.port}"

        def listening() -> None:
            click.echo(f"listening on {where} (Ctrl-C stops)", err=True)

        for item in tail_readings(cfg, timeout_s=timeout_s, on_subscribed=listening):
            if isinstance(item, Exception):
                click.echo(f"bad message: {item}", err=True)
                continue
            if not (fnmatchcase(item.node, node_glob) and fnmatchcase(item.sensor, sensor_glob)):
                continue
            ts = time.strftime("%H:%M:%S", time.gmtime(item.ts_ns / 1e9))
            frac = f"{item.ts_ns % 10**9 / 1e9:.3f}"[1:]
            if as_json:
                day = time.strftime("%Y-%m-%dT", time.gmtime(item.ts_ns / 1e9))
                row = {**item.__dict__, "time": f"{day}{ts}{frac}Z"}
                click.echo(json.dumps(finite_or_null(row), allow_nan=False))
            else:
                click.echo(f"{ts}{frac}  {item.node}/{item.sensor}  {item.value:.6g} {item.unit}")
            seen += 1
            if count is not None and seen >= count:
                break
    except (ConnectionError, OSError) as exc:
        fail(f"cannot reach the device broker: {exc}")
    except KeyboardInterrupt:
        pass


@main.command()
@config_option
@click.option(
    "--timeout",
    "timeout_s",
    default=30.0,
    show_default=True,
    help="Seconds to wait for the cloud to acknowledge the flushed windows.",
)
def flush(config_path: str | None, timeout_s: float) -> None:
    """Send every open window now, and wait for the cloud's acks.

    With the agent running, it closes the windows at its next tick and this
    waits for the cloud to acknowledge them (exit 3 if it has not within
    --timeout). With the agent stopped, the windows are closed into the outbox
    here and are sent at the next start (exit 3).

    Only readings the agent has stored are in the flushed windows: readings
    that the device broker still holds for the agent (after an outage, say),
    and readings stamped later inside those windows, are sent as one revision
    of each window when the window would have closed by itself.
    """
    from edge_agent import control
    from edge_agent.lock import BufferLock
    from edge_agent.pipeline import outbox
    from edge_agent.store import Store

    cfg = _load(config_path)
    if not Path(cfg.storage.path).exists():  # not a new, empty buffer by mistake
        fail(f"no agent buffer at {cfg.storage.path}: nothing to flush (see storage.path)")
    lock = BufferLock(cfg.storage.path, "cannot flush")
    try:
        lock.try_acquire()  # taken: no agent runs on this buffer; else ask the agent
        store = Store(cfg.storage.path, synchronous=cfg.storage.synchronous)
    except StorageError as exc:
        lock.release()
        fail(str(exc))
    try:
        if lock.held:
            seqs = control.flush_here(store, cfg)
            click.echo(
                f"agent not running: closed {len(seqs)} batches into the outbox; "
                "they are sent when the agent starts"
            )
            sys.exit(EXIT_PARTIAL)
        req = control.request_flush(store)
        deadline = time.monotonic() + timeout_s
        with click.progressbar(length=100, label="flushing", file=sys.stderr) as bar:
            while control.pending_flush(store) == req and time.monotonic() < deadline:
                time.sleep(0.1)  # the agent picks the request up on its next tick
            bar.update(30)
            last_seq = store.get_state(outbox.NEXT_SEQ, 1) - 1
            left = outbox.count_unacked_upto(store, last_seq)
            while left and time.monotonic() < deadline:
                time.sleep(0.2)  # the forwarder sends; the cloud acks
                left = outbox.count_unacked_upto(store, last_seq)
            bar.update(70)
        if control.pending_flush(store) == req:
            fail(f"the agent did not pick up the flush within {timeout_s:g} s", EXIT_PARTIAL)
        if left:
            click.echo(f"flushed; {left} batches still wait for the cloud's ack")
            sys.exit(EXIT_PARTIAL)
        click.echo("flushed; every batch is acknowledged by the cloud")
    finally:
        store.close()
        lock.release()


@main.command()
@config_option
@click.option(
    "--since",
    required=True,
    help="Start: ISO 8601 (UTC), ns since the epoch, or a time before now (-2h, -1d).",
)
@click.option("--until", help="End (exclusive), same forms; default now.")
@click.option(
    "--kind",
    type=click.Choice(["raw", "windows"]),
    default="windows",
    show_default=True,
    help="Raw readings, or windows computed from them.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "parquet"]),
    default="csv",
    show_default=True,
    help="Output format (parquet needs pyarrow).",
)
@click.option(
    "-o", "--output", required=True, type=click.Path(dir_okay=False), help="File to write."
)
def export(
    config_path: str | None, since: str, until: str | None, kind: str, fmt: str, output: str
) -> None:
    """Export a time range of raw readings or windows to CSV or Parquet."""
    from edge_agent.technician.export import ExportError
    from edge_agent.technician.export import export as do_export
    from shared.timefmt import parse_time

    cfg = _load(config_path)
    try:
        a = parse_time(since)
        b = time.time_ns() if until is None else parse_time(until)
    except ValueError as exc:  # a usage error: exit 2, like every other bad option
        raise click.BadParameter(str(exc), param_hint="--since/--until") from None
    if b <= a:
        raise click.BadParameter("--until must be after --since", param_hint="--until")
    try:
        with click.progressbar(
            length=max(1, b - a), label=f"exporting {kind}", file=sys.stderr
        ) as bar:
            rows = do_export(
                cfg.storage.path,
                output,
                "raw" if kind == "raw" else "windows",
                a,
                b,
                spec=cfg.window.spec,
                fmt="parquet" if fmt == "parquet" else "csv",
                progress=bar.update,
            )
    except ExportError as exc:
        fail(str(exc))
    except BUFFER_ERRORS as exc:
        buffer_failed(exc)
    except OSError as exc:  # writing the output (a full disk)
        fail(f"cannot write {output}: {exc.strerror or exc}")
    click.echo(f"wrote {rows:,} rows to {output}")


@main.command("quarantine")
@config_option
@json_option
@click.option("--limit", default=20, show_default=True, help="Entries to list, newest first.")
@click.option("--reason", help="Only entries with this reason (e.g. bad-json).")
@click.option(
    "--payload",
    "payload_id",
    type=int,
    help="Write this entry's payload (its first 64 KiB) to stdout, as received.",
)
def quarantine_cmd(
    config_path: str | None,
    as_json: bool,
    limit: int,
    reason: str | None,
    payload_id: int | None,
) -> None:
    """What the sensor nodes sent that is not valid readings, and why.

    Lists the newest quarantined messages (time, topic, reason, size) and a count
    per reason. The quarantine keeps at most storage.quarantine_max_bytes of
    payload for storage.quarantine_max_age_s; older entries are dropped and
    counted. Reads the buffer directly: works with the agent running or not.
    """
    from edge_agent.counters import QUARANTINE_DROPPED
    from edge_agent.pipeline import quarantine
    from edge_agent.technician.status import open_readonly

    cfg = _load(config_path)
    try:
        store = open_readonly(cfg.storage.path)
    except BUFFER_ERRORS as exc:
        buffer_failed(exc)
    try:
        if payload_id is not None:
            data = quarantine.payload(store, payload_id)
            if data is None:
                fail(f"no quarantine entry {payload_id}")
            sys.stdout.buffer.write(data or b"")
            return
        items = quarantine.entries(store, limit, reason)
        counts = quarantine.by_reason(store)
        dropped = store.counters().get(QUARANTINE_DROPPED, 0)
    finally:
        store.close()
    if as_json:
        out = {
            "by_reason": counts,
            "dropped": dropped,
            "entries": [e.__dict__ for e in items],
        }
        click.echo(json.dumps(out, indent=2))
        return
    if not counts:
        click.echo(
            "nothing quarantined" + (f" ({dropped:,} old entries dropped)" if dropped else "")
        )
        return
    table(
        [
            (e.id, when(e.received_ns), e.topic, e.reason, f"{e.bytes:,}", e.message[:80])
            for e in items
        ],
        headers=("id", "received", "topic", "reason", "bytes", "why"),
    )
    click.echo("")
    table([(f"  {r}", f"{n:,}") for r, n in counts.items()], headers=("by reason", "entries"))
    if dropped:
        click.echo(f"{dropped:,} older entries were dropped (storage.quarantine_max_*)")


@main.group()
def buffer() -> None:
    """Check the SQLite buffer's integrity, or repair it."""


@buffer.command("check")
@config_option
@json_option
def buffer_check(config_path: str | None, as_json: bool) -> None:
    """Check the buffer: SQLite integrity and the agent's own invariants (exit 1 on problems)."""
    from edge_agent.technician.repair import check

    cfg = _load(config_path)
    try:
        rep = check(cfg.storage.path)
    except BUFFER_ERRORS as exc:
        buffer_failed(exc, "run `edge-agent buffer repair` with the agent stopped")
    if as_json:
        click.echo(json.dumps({"ok": rep.ok, "problems": rep.problems, "rows": rep.rows}, indent=2))
    else:
        table(sorted(rep.rows.items()), headers=("table", "readable rows"))
        for p in rep.problems[:50]:
            click.echo(f"problem: {p}")
        click.echo(
            "ok"
            if rep.ok
            else f"{len(rep.problems)} problems: run `edge-agent buffer "
            "repair` with the agent stopped"
        )
    sys.exit(EXIT_OK if rep.ok else EXIT_FAILURE)


@buffer.command("repair")
@config_option
@json_option
def buffer_repair(config_path: str | None, as_json: bool) -> None:
    """Rebuild the buffer from every readable row; the damaged file is kept beside it.

    The agent must be stopped. The report gives, per table, the rows the file
    had (by its own count), the rows kept, and the rows that could not be kept:
    dropped (unreadable or invalid, with the reasons) and missing (on pages that
    could not be read at all).
    """
    from edge_agent.technician.repair import repair

    cfg = _load(config_path)
    try:
        with click.progressbar(length=0, label="repairing", file=sys.stderr) as bar:
            rep = repair(cfg.storage.path, progress=bar.update)
    except BUFFER_ERRORS as exc:
        buffer_failed(exc)
    if as_json:
        click.echo(json.dumps(rep.to_json(), indent=2))
        return
    table(
        [
            (
                t,
                "?" if r.counted is None else r.counted,
                r.kept,
                r.dropped,
                "?" if r.missing is None else r.missing,
            )
            for t, r in rep.tables.items()
        ],
        headers=("table", "rows counted", "kept", "dropped", "missing"),
    )
    for t, r in rep.tables.items():
        for reason, n in sorted(r.reasons.items()):
            click.echo(f"{t}: {n} dropped: {reason}")
    lost = sum(rep.lost.values())
    if any(r.counted is None for r in rep.tables.values()):
        click.echo(
            f"{lost} rows could not be kept, and the file's own row counts were unreadable: "
            "rows on pages that could not be read at all are not in that number"
        )
    else:
        click.echo(f"{lost} rows could not be kept" if lost else "every row was kept")
    click.echo(f"damaged file kept as {rep.damaged_copy}")


@main.command()
@config_option
@json_option
def doctor(config_path: str | None, as_json: bool) -> None:
    """Check config, brokers, TLS, clock, disk, buffer and delivery, each with a fix hint.

    Delivery: batches waiting while the cloud has acknowledged nothing for five
    minutes is a problem even when both brokers answer. A config that does not
    load is reported as the first check (exit 2), with the checks that need none.
    """
    from edge_agent.technician.doctor import config_checks, run_checks
    from shared.config import load_config
    from shared.errors import ConfigError

    path = config_path or (str(DEFAULT_CONFIG) if DEFAULT_CONFIG.is_file() else None)
    try:  # a broken config is when doctor is needed most: report it, and go on
        cfg: AgentConfig | None = load_config(AgentConfig, path)
    except ConfigError as exc:
        cfg, checks = None, config_checks(str(exc))
    if cfg is not None:
        checks = run_checks(cfg, path)
    if as_json:
        click.echo(json.dumps([c.__dict__ for c in checks], indent=2))
    else:
        table(
            [(paint(c.level.upper(), c.level), c.name, c.detail) for c in checks],
            headers=("", "check", "found"),
        )
        for c in checks:
            if c.hint and c.level != "ok":
                say(f"{paint(c.name, c.level)}: {c.hint}")
    if cfg is None:
        sys.exit(EXIT_CONFIG)
    sys.exit(EXIT_FAILURE if any(c.level == "fail" for c in checks) else EXIT_OK)


main.add_command(config_group(AgentConfig, "edge_agent"))
