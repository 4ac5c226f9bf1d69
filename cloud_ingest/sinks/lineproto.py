"""Batches to InfluxDB line protocol: one point per (device, sensor, window).

Schema (see ``docs/wire-format.md`` and ``docs/architecture.md``)::

    <measurement>,device_id=<id>,node=<node>,sensor=<name>,unit=<unit>,window=<width>
        count=<i>i,invalid=<i>i,min=<f>,max=<f>,mean=<f>,stddev=<f>,first=<f>,last=<f>,
        sum=<f>,p50=<f>,p90=<f>,p99=<f> <start_ns>

Tags are bounded by the fleet (devices × sensors × window widths); nothing per
reading is a tag. The timestamp is the window start, so a resent or replayed
batch writes the same series and time and overwrites itself. Float statistics
that are not finite (NaN when every reading was invalid) are left out, since line
protocol has no NaN, and marked in the integer field ``absent`` (:func:`float_fields`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Final

import numpy as np

from shared.alerts import Alert
from shared.commands import Result
from shared.health import INT_FIELDS, KNOWN_DROPS, OPTIONAL_FLOAT_FIELDS, HealthReport
from shared.rawdata import RawReadings
from shared.wire import EXTRA_FIELDS, STAT_FIELDS, Batch

FLOAT_FIELDS = STAT_FIELDS + EXTRA_FIELDS

_TAG_ESCAPES = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ ", "\\": "\\\\"})
_MEAS_ESCAPES = str.maketrans({",": r"\,", " ": r"\ ", "\\": "\\\\"})


def window_label(width_ns: int) -> str:
    """``10000000000`` → ``"10s"``; ``500000000`` → ``"500ms"``."""
    if width_ns % 1_000_000_000 == 0:
        return f"{width_ns // 1_000_000_000}s"
    if width_ns % 1_000_000 == 0:
        return f"{width_ns // 1_000_000}ms"
    return f"{width_ns}ns"


def _string_field(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def alert_to_line(device_id: str, alert: Alert, measurement: str = "alert") -> str:
    """One point per alert event, at the event time of the reading that caused it."""
    tags = (
        f"{measurement.translate(_MEAS_ESCAPES)},device_id={device_id.translate(_TAG_ESCAPES)}"
        f",rule={alert.rule.translate(_TAG_ESCAPES)},node={alert.node},sensor={alert.sensor}"
        f",kind={alert.kind}"
    )
    fields = [
        f"state={_string_field(alert.state)}",
        f"raised={int(alert.state == 'raised')}i",
        f"seq={alert.seq}i",
        f"message={_string_field(alert.message)}",
    ]
    if alert.value is not None and math.isfinite(alert.value):
        fields.append(f"value={alert.value!r}")
    if alert.capture:  # the lake's raw rows with this request (docs/commands.md)
        fields.append(f"capture={_string_field(alert.capture)}")
    return f"{tags} {','.join(fields)} {alert.ts_ns}"


def result_to_line(device_id: str, result: Result, measurement: str = "command_result") -> str:
    """One point per result of a command (docs/commands.md), at the device's time of
    it: tags the device and the command's kind, fields the id, status, reason and
    what the command returned (as JSON text; a result is small)."""
    import json

    tags = f"{measurement.translate(_MEAS_ESCAPES)},device_id={device_id.translate(_TAG_ESCAPES)}"
    if result.kind:
        tags += f",kind={result.kind}"
    fields = [
        f"id={_string_field(result.id)}",
        f"status={_string_field(result.status)}",
        f"ok={int(result.status == 'done')}i",
        f"reason={_string_field(result.reason)}",
        f"seq={result.seq}i",
        f"result={_string_field(json.dumps(dict(result.result), separators=(',', ':')))}",
    ]
    return f"{tags} {','.join(fields)} {result.ts_ns}"


def raw_to_lines(device_id: str, raw: RawReadings, measurement: str) -> list[str]:
    """One point per finite reading a device sent on request (docs/commands.md): the
    series of its sensor (device, node, sensor, unit), field ``value``. Line protocol
    has no NaN or infinity: those readings are in the lake only."""
    series = (
        f"{measurement.translate(_MEAS_ESCAPES)},device_id={device_id.translate(_TAG_ESCAPES)}"
        f",node={raw.node.translate(_TAG_ESCAPES)},sensor={raw.sensor.translate(_TAG_ESCAPES)}"
        + (f",unit={raw.unit.translate(_TAG_ESCAPES)}" if raw.unit else "")
    )
    keep = np.isfinite(raw.values)
    return [
        f"{series} value={v!r} {t}"
        for t, v in zip(raw.ts[keep].tolist(), raw.values[keep].tolist(), strict=True)
    ]


def command_sent_line(
    device_id: str, kind: str, command_id: str, expires_ns: int, ts_ns: int
) -> str:
    """A command an operator sent (docs/commands.md), at its issue time: measurement
    ``command_sent``, tags the device and the kind, fields the id and the expiry; with
    ``command_result`` it tells which commands wait for an answer."""
    return (
        f"command_sent,device_id={device_id.translate(_TAG_ESCAPES)},kind={kind} "
        f"id={_string_field(command_id)},expires_ns={expires_ns}i {ts_ns}"
    )


def desired_config_line(
    device_id: str, version: int, command_id: str, fragment: object, ts_ns: int
) -> str:
    """The desired config an operator set for a device (docs/commands.md): measurement
    ``config_desired``, tag the device, fields the version, the command and the
    settings as JSON text."""
    import json

    text = json.dumps(fragment, separators=(",", ":"), sort_keys=True)
    return (
        f"config_desired,device_id={device_id.translate(_TAG_ESCAPES)} version={version}i,"
        f"command={_string_field(command_id)},config={_string_field(text)} {ts_ns}"
    )


def health_to_line(device_id: str, report: HealthReport, measurement: str = "agent_health") -> str:
    """One point per report, at the device's time of the report. One series per
    device (the only tag), and a fixed set of fields (shared/health.py)."""
    fields = [
        f"state={_string_field(report.state)}",
        f"problems={_string_field(','.join(report.problems))}",
        f"reason={_string_field(report.reason)}",
        f"version={_string_field(report.version)}",
        f"seq={report.seq}i",
        f"ok={int(not report.problems)}i",
        f"uptime_s={report.uptime_s!r}",
        f"intake_up={int(report.intake_up)}i",
        f"forward_up={int(report.forward_up)}i",
        f"disk_used_ratio={report.disk_used_ratio!r}",
        f"drops_total={report.dropped_total}i",
    ]
    fields += [f"{name}={getattr(report, name)}i" for name in INT_FIELDS]
    # nothing unsent is an age of 0 (a graph of it stays a line); the other nullable
    # numbers are unknown when null, and left out
    fields.append(f"oldest_unsent_age_s={report.oldest_unsent_age_s or 0.0!r}")
    fields += [
        f"{name}={value!r}"
        for name in OPTIONAL_FLOAT_FIELDS
        if name != "oldest_unsent_age_s" and (value := getattr(report, name)) is not None
    ]
    other = sum(v for k, v in report.drops.items() if k not in KNOWN_DROPS)
    fields += [f"{k}={report.drops.get(k, 0)}i" for k in KNOWN_DROPS]
    fields.append(f"dropped_other={other}i")
    # the desired config (docs/commands.md): in force, its state, the last rolled back
    fields += [
        f"config_version={report.config_version}i",
        f"config_state={_string_field(report.config_state)}",
        f"config_rejected={report.config_rejected}i",
    ]
    meas = measurement.translate(_MEAS_ESCAPES)
    return f"{meas},device_id={device_id.translate(_TAG_ESCAPES)} {','.join(fields)} {report.ts_ns}"


def window_series(
    measurement: str,
    device_id: str,
    node: str,
    sensor: str,
    unit: str,
    window: str,
    tags: Iterable[tuple[str, str]],
    tag_keys: frozenset[str],
) -> str:
    """A window point's measurement and tags: the series key of the windows and
    of their roll-ups. A sensor's static tags are tags too, those whose keys
    ``tag_keys`` allows (``[influx] tag_keys``: the cardinality bound)."""
    return (
        f"{measurement.translate(_MEAS_ESCAPES)},device_id={device_id.translate(_TAG_ESCAPES)}"
        f",node={node.translate(_TAG_ESCAPES)},sensor={sensor.translate(_TAG_ESCAPES)}"
        + (f",unit={unit.translate(_TAG_ESCAPES)}" if unit else "")
        + f",window={window}"
        + "".join(f",{k}={v.translate(_TAG_ESCAPES)}" for k, v in tags if k in tag_keys)
    )


#: the series of the sensors the ingestor writes: a device's sensors come again in
#: every batch, and escaping their tags was a tenth of the ingestor's CPU per batch
_series = functools.lru_cache(maxsize=65536)(window_series)


#: the integer field whose bits name a point's statistics that are not finite:
#: bit i for FLOAT_FIELDS[i] (docs/wire-format.md §5)
ABSENT: Final = "absent"


def absent_bit(name: str) -> int:
    """The bit of ``absent`` that says statistic ``name`` is not the point's."""
    return 1 << FLOAT_FIELDS.index(name)


def float_fields(values: Iterable[tuple[str, float]]) -> list[str]:
    """``name=value`` for each finite value; the others are left out (line protocol
    has no NaN) and named by their bits in ``absent=<mask>i`` (:func:`absent_bit`).

    A point overwrites only the fields it has, so a later revision of a window that
    leaves a field out would leave the earlier revision's value beside its own
    count. Every point therefore writes ``absent``, 0 when nothing is: the latest
    point's ``absent`` names the fields that are not its own, and InfluxQL can
    leave them out (``WHERE absent & 128 = 0`` for p50: a condition on a field a
    point lacks would leave the point out, hence on every point). An integer, not a
    list of names: VictoriaMetrics keeps only numbers (a string field becomes a
    series of zeros there). It costs InfluxDB next to nothing (a run of zeros)."""
    out, absent = [], 0
    for name, v in values:
        if math.isfinite(v):
            out.append(f"{name}={v!r}")
        else:
            absent |= absent_bit(name)
    out.append(f"{ABSENT}={absent}i")
    return out


#: a point's float fields when every one is finite (as :func:`float_fields` writes them)
_ALL_FINITE: Final = ",".join(f"{name}={{!r}}" for name in FLOAT_FIELDS) + f",{ABSENT}=0i"


def batch_to_lines(
    batch: Batch, measurement: str = "window", tag_keys: frozenset[str] = frozenset()
) -> list[str]:
    """The batch's windows as points (:func:`window_series` for their tags)."""
    win = window_label(batch.window.width_ns)
    if batch.window.kind == "hopping":
        win += "/" + window_label(batch.window.hop_ns)  # e.g. 60s/10s: a distinct series
    prefixes = [
        _series(measurement, batch.device_id, s.node, s.name, s.unit, win, s.tags, tag_keys)
        for s in batch.sensors
    ]
    stats = np.vstack([getattr(batch, name) for name in FLOAT_FIELDS])
    finite = np.isfinite(stats).all(axis=0).tolist()
    rows = stats.T.tolist()
    counts = batch.count.tolist()
    revs = batch.revision.tolist()
    invalid = batch.invalid.tolist()
    starts = batch.start_ns.tolist()
    lines = []
    for i, sidx in enumerate(batch.sensor.tolist()):
        head = f"{prefixes[sidx]} count={counts[i]}i,invalid={invalid[i]}i,revision={revs[i]}i,"
        if finite[i]:  # the usual row: one format, nothing absent
            lines.append(head + _ALL_FINITE.format(*rows[i]) + f" {starts[i]}")
        else:
            fields = float_fields(zip(FLOAT_FIELDS, rows[i], strict=True))
            lines.append(f"{head}{','.join(fields)} {starts[i]}")
    return lines
