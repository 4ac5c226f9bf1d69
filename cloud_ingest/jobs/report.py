"""The fleet report: one self-contained HTML file with plots, to read or to mail.

``cloud-ingest report --since … --until … --out FILE`` reads InfluxDB (InfluxQL,
cloud_ingest/jobs/influxql.py) and writes:

* **data completeness** per device and day: the windows the daily roll-ups
  counted (``<measurement>_1d``, field ``windows``) against the windows a day
  holds at each sensor's width, over all its sensors (today: up to now);
* **each sensor's daily range and p99**, from the same roll-ups;
* **alerts over time**: alerts raised per hour (or per day, for ranges over
  three days), by rule;
* **silent devices**: every device with the last time it was heard (its newest
  health report or window), marked silent when that is more than
  ``--silent-after`` before the end of the range;
* **ingest lag**: the age of each device's oldest data not yet in the cloud, from
  its health reports (``oldest_unsent_age_s``);
* **commands and captures** (docs/commands.md): the commands sent in the range
  (``command_sent``, which `cloud-ingest command` records) that no device answered,
  pending or expired; those refused or failed (``command_result``); and the
  captures of raw readings around alerts (the alerts' ``capture``).

The roll-ups come from ``cloud-ingest rollup`` (the timer runs it hourly); a range
without them says so rather than showing a device as empty. Plots are PNG images
inside the file (``data:`` URIs): nothing is fetched when it is opened.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cloud_ingest.jobs.influxql import InfluxQLReader

DAY_NS = 86_400 * 10**9
HOUR_NS = 3_600 * 10**9
MAX_SENSOR_PLOTS = 24
MAX_LAG_LINES = 10


def window_ns(label: str) -> int | None:
    """``10s`` → 10e9, ``500ms``, ``1500ns``; None for a hopping label (``60s/10s``)."""
    m = re.fullmatch(r"(\d+)(s|ms|ns)", label)
    if not m:
        return None
    return int(m[1]) * {"s": 10**9, "ms": 10**6, "ns": 1}[m[2]]


@dataclass
class Report:
    since_ns: int
    until_ns: int
    generated_ns: int
    silent_after_s: float
    #: device → day start (ns) → share of the day's windows present
    completeness: dict[str, dict[int, float]] = field(default_factory=dict)
    #: (device, node, sensor) → [(day start, min, max, p99 or None)]
    daily: dict[tuple[str, str, str], list[tuple[int, float, float, float | None]]] = field(
        default_factory=dict
    )
    #: rule → [(bucket start, alerts raised)]
    alerts: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    alert_bucket: str = "1h"
    #: device → when last heard (ns)
    last_heard: dict[str, int] = field(default_factory=dict)
    #: device → [(bucket start, age of its oldest unsent data, s)]
    lag: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    #: commands sent without an answer: (device, id, kind, sent, "pending" or "expired")
    unanswered: list[tuple[str, str, str, int, str]] = field(default_factory=list)
    #: commands refused or failed: (device, id, kind, time, status, reason)
    failed: list[tuple[str, str, str, int, str, str]] = field(default_factory=list)
    #: captures around alerts: (device, rule, alert time, capture id)
    captures: list[tuple[str, str, int, str]] = field(default_factory=list)

    @property
    def end_ns(self) -> int:
        """The end of the range, or now if that is earlier."""
        return min(self.until_ns, self.generated_ns)

    def silent(self) -> list[str]:
        limit = self.end_ns - int(self.silent_after_s * 1e9)
        return sorted(d for d, t in self.last_heard.items() if t < limit)


def _q(name: str) -> str:
    return '"' + name.replace('"', '\\"') + '"'


def gather(
    reader: InfluxQLReader,
    since_ns: int,
    until_ns: int,
    *,
    measurement: str = "window",
    health_measurement: str = "agent_health",
    alert_measurement: str = "alert",
    result_measurement: str = "command_result",
    silent_after_s: float = 3600.0,
    now_ns: int,
) -> Report:
    rep = Report(since_ns, until_ns, now_ns, silent_after_s)
    day0 = since_ns - since_ns % DAY_NS
    rng = f"time >= {since_ns} AND time < {until_ns}"
    days = f"time >= {day0} AND time < {until_ns}"

    # roll-ups: completeness, and each sensor's daily range
    have: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    want: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    for s in reader.query(
        f'SELECT "windows", "min", "max", "p99" FROM {_q(measurement + "_1d")} WHERE {days} '
        'GROUP BY "device_id", "node", "sensor", "window"'
    ):
        width = window_ns(s.tags.get("window", ""))
        device = s.tags.get("device_id", "")
        key = (device, s.tags.get("node", ""), s.tags.get("sensor", ""))
        for row in s.rows():
            t = int(row["time"])
            if width:
                have[device][t] += int(row["windows"] or 0)
                want[device][t] += (min(t + DAY_NS, now_ns) - t) / width
            if row["min"] is not None and row["max"] is not None:
                p99 = row["p99"] if row["p99"] is not None else None
                rep.daily.setdefault(key, []).append((t, row["min"], row["max"], p99))
    rep.completeness = {
        d: {t: min(1.0, have[d][t] / w) for t, w in sorted(want[d].items()) if w > 0}
        for d in sorted(want)
    }

    # alerts raised, per hour (per day over three days) and rule
    rep.alert_bucket = "1h" if until_ns - since_ns <= 3 * DAY_NS else "1d"
    for s in reader.query(
        f'SELECT sum("raised") FROM {_q(alert_measurement)} WHERE {rng} '
        f'GROUP BY time({rep.alert_bucket}), "rule" fill(0)'
    ):
        rep.alerts[s.tags.get("rule", "")] = [(int(r[0]), int(r[1] or 0)) for r in s.values]

    # last heard: the newest health report or window of each device
    for meas, fld in ((health_measurement, "seq"), (measurement, "count")):
        for s in reader.query(
            f'SELECT last("{fld}") FROM {_q(meas)} WHERE {rng} GROUP BY "device_id"'
        ):
            device = s.tags.get("device_id", "")
            t = max(int(r[0]) for r in s.values)
            rep.last_heard[device] = max(rep.last_heard.get(device, 0), t)

    # ingest lag: the oldest unsent data, per device
    for s in reader.query(
        f'SELECT max("oldest_unsent_age_s") FROM {_q(health_measurement)} WHERE {rng} '
        f'GROUP BY time({rep.alert_bucket}), "device_id" fill(none)'
    ):
        rep.lag[s.tags.get("device_id", "")] = [
            (int(r[0]), float(r[1])) for r in s.values if r[1] is not None
        ]
    _commands(reader, rep, rng, alert_measurement, result_measurement)
    return rep


def _commands(
    reader: InfluxQLReader, rep: Report, rng: str, alert_measurement: str, result_measurement: str
) -> None:
    """Commands without an answer, refused or failed ones, and captures (docs/commands.md)."""
    answered: set[tuple[str, str]] = set()
    # a result comes after its command (up to its expiry): read them up to now
    for s in reader.query(
        f'SELECT "id", "status", "reason" FROM {_q(result_measurement)} '
        f'WHERE time >= {rep.since_ns} GROUP BY "device_id", "kind"'
    ):
        device, kind = s.tags.get("device_id", ""), s.tags.get("kind", "")
        for row in s.rows():
            answered.add((device, str(row["id"])))
            if row["status"] != "done" and int(row["time"]) < rep.until_ns:
                rep.failed.append(
                    (device, str(row["id"]), kind, int(row["time"]), str(row["status"]),
                     str(row["reason"] or ""))
                )  # fmt: skip
    for s in reader.query(
        f'SELECT "id", "expires_ns" FROM "command_sent" WHERE {rng} GROUP BY "device_id", "kind"'
    ):
        device, kind = s.tags.get("device_id", ""), s.tags.get("kind", "")
        for row in s.rows():
            if (device, str(row["id"])) not in answered:
                expired = int(row["expires_ns"] or 0) <= rep.generated_ns
                state = "expired" if expired else "pending"
                rep.unanswered.append((device, str(row["id"]), kind, int(row["time"]), state))
    for s in reader.query(
        f'SELECT "rule", "capture" FROM {_q(alert_measurement)} WHERE {rng} '
        'AND "capture" != \'\' GROUP BY "device_id"'
    ):
        for row in s.rows():
            rep.captures.append(
                (s.tags.get("device_id", ""), str(row["rule"]), int(row["time"]),
                 str(row["capture"]))
            )  # fmt: skip


# ---- plots ----


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    FigureCanvasAgg(fig)  # the Agg canvas: no display, no pyplot state
    fig.savefig(buf, format="png", dpi=90)
    return base64.b64encode(buf.getvalue()).decode()


def _dates(ns: list[int]) -> np.ndarray:
    return np.array(ns, dtype="datetime64[ns]")


def _day(t: int) -> str:
    return dt.datetime.fromtimestamp(t / 1e9, dt.UTC).strftime("%Y-%m-%d")


def completeness_png(rep: Report) -> str | None:
    devices = sorted(rep.completeness)
    day_set = sorted({t for d in devices for t in rep.completeness[d]})
    if not devices or not day_set:
        return None
    grid = [[rep.completeness[d].get(t, math.nan) for t in day_set] for d in devices]
    fig = Figure(figsize=(max(6.0, 1.1 * len(day_set) + 3), 0.45 * len(devices) + 1.8))
    ax = fig.add_subplot()
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(day_set)), [_day(t) for t in day_set], rotation=45, ha="right")
    ax.set_yticks(range(len(devices)), devices)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if not math.isnan(v):
                ax.text(j, i, f"{v:.0%}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="share of windows present")
    ax.set_title("Data completeness per device and day (UTC)")
    fig.tight_layout()
    return _png(fig)


def daily_png(rep: Report) -> str | None:
    keys = sorted(rep.daily)[:MAX_SENSOR_PLOTS]
    if not keys:
        return None
    cols = 3 if len(keys) > 2 else len(keys)
    rows = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(4.2 * cols, 2.8 * rows))
    first = rep.since_ns - rep.since_ns % DAY_NS
    days = max(1, math.ceil((rep.until_ns - first) / DAY_NS))
    for i, key in enumerate(keys):
        ax = fig.add_subplot(rows, cols, i + 1)
        pts = sorted(rep.daily[key])
        x = [(p[0] - first) / DAY_NS + 0.5 for p in pts]  # the middle of each day
        # each day's range as a bar from its min to its max, its p99 as a dot
        ax.vlines(x, [p[1] for p in pts], [p[2] for p in pts], linewidth=8, alpha=0.4)
        p99 = [(xi, p[3]) for xi, p in zip(x, pts, strict=True) if p[3] is not None]
        ax.plot([a for a, _ in p99], [b for _, b in p99], "o", color="tab:red", markersize=4)
        ax.set_xlim(0, days)
        ticks = range(0, days, max(1, days // 7))
        ax.set_xticks([t + 0.5 for t in ticks], [_day(first + t * DAY_NS)[5:] for t in ticks])
        ax.set_title("/".join(key), fontsize=9)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return _png(fig)


def alerts_png(rep: Report) -> str | None:
    rules = sorted(rep.alerts, key=lambda r: -sum(n for _, n in rep.alerts[r]))[:8]
    if not rules or not any(n for r in rules for _, n in rep.alerts[r]):
        return None
    fig = Figure(figsize=(9, 3.2))
    ax = fig.add_subplot()
    width = (1 / 24 if rep.alert_bucket == "1h" else 1.0) * 0.9
    bottom: dict[int, int] = defaultdict(int)
    for rule in rules:
        pts = rep.alerts[rule]
        ax.bar(
            _dates([t for t, _ in pts]),
            [n for _, n in pts],
            width=width,
            bottom=[bottom[t] for t, _ in pts],
            label=rule,
            align="edge",
        )
        for t, n in pts:
            bottom[t] += n
    ax.set_ylabel(f"raised per {'hour' if rep.alert_bucket == '1h' else 'day'}")
    ax.legend(fontsize=7)
    ax.set_title("Alerts raised")
    fig.autofmt_xdate()
    fig.tight_layout()
    return _png(fig)


def silent_png(rep: Report) -> str | None:
    if not rep.last_heard:
        return None
    devices = sorted(rep.last_heard, key=lambda d: rep.last_heard[d])
    hours = [(rep.end_ns - rep.last_heard[d]) / HOUR_NS for d in devices]
    fig = Figure(figsize=(8, 0.35 * len(devices) + 1.5))
    ax = fig.add_subplot()
    limit = rep.silent_after_s / 3600
    ax.barh(devices, hours, color=["tab:red" if h > limit else "tab:green" for h in hours])
    ax.axvline(limit, color="grey", linestyle="--", label=f"silent after {limit:g} h")
    ax.set_xlabel("hours since last heard, at the end of the range")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _png(fig)


def lag_png(rep: Report) -> str | None:
    worst = sorted(rep.lag, key=lambda d: -max((a for _, a in rep.lag[d]), default=0))
    worst = [d for d in worst[:MAX_LAG_LINES] if rep.lag[d]]
    if not worst:
        return None
    fig = Figure(figsize=(9, 3.2))
    ax = fig.add_subplot()
    for d in worst:
        pts = rep.lag[d]
        ax.plot(_dates([t for t, _ in pts]), [a / 60 for _, a in pts], label=d)
    ax.set_ylabel("oldest unsent data, minutes")
    ax.set_title("Ingest lag: how far each device's data in the cloud is behind")
    ax.legend(fontsize=7)
    fig.autofmt_xdate()
    fig.tight_layout()
    return _png(fig)


# ---- the page ----

_STYLE = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
img { max-width: 100%; } table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; font-size: 0.9em; }
.silent { color: #b00; font-weight: bold; } .note { color: #666; font-size: 0.9em; }
"""


def _when(t: int) -> str:
    return dt.datetime.fromtimestamp(t / 1e9, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _section(title: str, png: str | None, missing: str, note: str = "") -> str:
    out = f"<h2>{html.escape(title)}</h2>\n"
    if note:
        out += f'<p class="note">{html.escape(note)}</p>\n'
    if png is None:
        return out + f"<p>{html.escape(missing)}</p>\n"
    return out + f'<img alt="{html.escape(title)}" src="data:image/png;base64,{png}">\n'


def _n(n: int, thing: str) -> str:
    return f"{n} {thing}" + ("" if n == 1 else "s")


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>\n" for row in rows
    )
    return f"<table><tr>{cells}</tr>\n{body}</table>"


#: rows of each commands table at most (the newest first)
MAX_COMMAND_ROWS = 100


def _commands_html(rep: Report) -> str:
    out = ["<h2>Commands and captures</h2>"]
    waiting = sorted(rep.unanswered, key=lambda r: -r[3])[:MAX_COMMAND_ROWS]
    out.append(
        f"<p>{_n(len(rep.unanswered), 'command')} sent without an answer "
        f"({sum(r[4] == 'pending' for r in rep.unanswered)} pending, the rest expired), "
        f"{_n(len(rep.failed), 'command')} refused or failed, "
        f"{_n(len(rep.captures), 'capture')} around alerts.</p>"
    )
    if waiting:
        out.append(_table(("device", "command", "kind", "sent", "state"),
                          [(d, c, k, _when(t), s) for d, c, k, t, s in waiting]))  # fmt: skip
    failed = sorted(rep.failed, key=lambda r: -r[3])[:MAX_COMMAND_ROWS]
    if failed:
        out.append(_table(("device", "command", "kind", "answered", "status", "reason"),
                          [(d, c, k, _when(t), s, r) for d, c, k, t, s, r in failed]))  # fmt: skip
    caps = sorted(rep.captures, key=lambda r: -r[2])[:MAX_COMMAND_ROWS]
    if caps:
        out.append(_table(("device", "rule", "alert", "capture (the lake's raw request)"),
                          [(d, r, _when(t), c) for d, r, t, c in caps]))  # fmt: skip
    return "\n".join(out)


def render_html(rep: Report) -> str:
    silent = set(rep.silent())
    rows = "".join(
        f'<tr class="{"silent" if d in silent else ""}"><td>{html.escape(d)}</td>'
        f"<td>{_when(rep.last_heard[d])}</td><td>{'silent' if d in silent else 'ok'}</td></tr>\n"
        for d in sorted(rep.last_heard, key=lambda d: rep.last_heard[d])
    )
    day_set = sorted({t for d in rep.completeness.values() for t in d})
    completeness = (
        "<table><tr><th>device</th>"
        + "".join(f"<th>{_day(t)}</th>" for t in day_set)
        + "</tr>\n"
        + "".join(
            f"<tr><td>{html.escape(d)}</td>"
            + "".join(
                f"<td>{rep.completeness[d][t]:.1%}</td>"
                if t in rep.completeness[d]
                else "<td></td>"
                for t in day_set
            )
            + "</tr>\n"
            for d in sorted(rep.completeness)
        )
        + "</table>"
        if day_set
        else ""
    )
    more = len(rep.daily) - MAX_SENSOR_PLOTS
    parts = [
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>",
        f"<title>Fleet report {_day(rep.since_ns)} to {_day(rep.until_ns)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>Fleet report</h1>",
        f"<p>{_when(rep.since_ns)} to {_when(rep.until_ns)}; made {_when(rep.generated_ns)}. "
        f"{_n(len(rep.last_heard), 'device')} heard, {len(silent)} silent "
        f"(not heard for {rep.silent_after_s / 3600:g} h), "
        f"{_n(sum(n for pts in rep.alerts.values() for _, n in pts), 'alert')} raised.</p>",
        _section(
            "Data completeness per device and day",
            completeness_png(rep),
            "No daily roll-ups in this range: run `cloud-ingest rollup` (its timer runs hourly).",
            "Windows in the daily roll-ups against the windows a day holds at each sensor's "
            "width, over all of a device's sensors; today up to now.",
        ),
        completeness,
        _section(
            "Each sensor's daily range and p99",
            daily_png(rep),
            "No daily roll-ups in this range.",
            "From the daily roll-ups (p99 from merged sketches)."
            + (f" The first {MAX_SENSOR_PLOTS} sensors; {more} more." if more > 0 else ""),
        ),
        _section("Alerts over time", alerts_png(rep), "No alert was raised in this range."),
        _section(
            "Silent devices",
            silent_png(rep),
            "No device was heard in this range.",
        ),
        f"<table><tr><th>device</th><th>last heard</th><th></th></tr>\n{rows}</table>",
        _section(
            "Ingest lag",
            lag_png(rep),
            "No health reports in this range.",
            "The age of each device's oldest data not yet acknowledged by the cloud, from "
            "its health reports (at most the worst ten devices).",
        ),
        _commands_html(rep),
        "</body></html>\n",
    ]
    return "\n".join(parts)
