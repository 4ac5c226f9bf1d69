"""The first two stages of a group, in a worker thread: decode, then plan the writes.

Each stage hands the next an immutable value:

- :class:`Decoded`: one message as read from the wire, within its device's quotas
  (cloud_ingest/ingest/quotas.py). Exactly one of ``batch``, ``alert``, ``health``,
  ``result``, ``raw``, ``error`` and ``defer`` is set; a batch taken in part has ``partial`` too. A
  message that fails to decode still names its device and seq when they can be
  read, so that the device gets a ``rejected`` ack.
- :class:`Planned`: one message and what it writes: its InfluxDB lines and, for an
  alert, its lake object, or the earlier message of the group that it repeats.
- :class:`GroupPlan`: the group's messages planned, and the Arrow rows of all its
  batches, one :class:`~cloud_ingest.lake.GroupRows` per day, which become one
  lake object each (:func:`~cloud_ingest.lake.to_parquet` encodes them).

Nothing here raises: a message that a decoder cannot take is quarantined with a
reason (``undecodable`` if a decoder ever raised something other than WireError;
tests/shared/test_fuzz.py holds them to that).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from cloud_ingest.config import IngestConfig
from cloud_ingest.ingest.quotas import DEFER_RATE, Quotas
from cloud_ingest.lake import GroupRows, alert_object, group_rows, raw_objects
from cloud_ingest.sinks.lineproto import (
    alert_to_line,
    batch_to_lines,
    health_to_line,
    raw_to_lines,
    result_to_line,
)
from shared import jsonwire
from shared.alerts import Alert, decode_alert
from shared.commands import Result, decode_result
from shared.errors import WireError
from shared.health import HealthReport, decode_health
from shared.rawdata import RawReadings, decode_raw, peek_raw_ids
from shared.topics import (
    device_from_alert_topic,
    device_from_batch_topic,
    device_from_health_topic,
    device_from_raw_topic,
    device_from_result_topic,
)
from shared.wire import Batch, check_ranges_many, decode_batch, peek_ids

log = logging.getLogger(__name__)

Kind = Literal["batch", "alert", "health", "result", "raw"]
#: A lake object: its key and its Parquet bytes.
LakeObject = tuple[str, bytes]


@dataclass(frozen=True)
class Decoded:
    topic: str
    payload: bytes
    kind: Kind
    device: str | None
    seq: int | None
    batch: Batch | None = None
    alert: Alert | None = None
    health: HealthReport | None = None
    #: the result of a command (docs/commands.md)
    result: Result | None = None
    #: raw readings a command asked for (docs/wire-format.md §2.13)
    raw: RawReadings | None = None
    #: why it is quarantined
    error: WireError | None = None
    #: the device's buffer generation (docs/wire-format.md §2.3); 0 = none
    generation: int = 0
    #: why it is deferred (not written, not answered: the device sends it again;
    #: CLOUD_DEFER_REASONS), None if it is not
    defer: str | None = None
    #: the batch is written in part: why the rest is quarantined (a quota)
    partial: WireError | None = None
    #: windows of it left out (partial)
    refused_rows: int = 0

    @property
    def key(self) -> tuple[str, int, int] | None:
        """(device, generation, seq): what identifies the message, when known."""
        if self.device is None or self.seq is None:
            return None
        return (self.device, self.generation, self.seq)


@dataclass(frozen=True)
class Planned:
    msg: Decoded
    lines: tuple[str, ...] = ()
    objects: tuple[LakeObject, ...] = ()
    #: the index of an earlier message of the group with the same (device, seq)
    repeat_of: int | None = None

    @property
    def writes(self) -> bool:
        """True if this message is to be written (not quarantined, deferred or a repeat)."""
        return self.msg.error is None and self.msg.defer is None and self.repeat_of is None


def decode_group(
    messages: Sequence[tuple[str, bytes]], cfg: IngestConfig, quotas: Quotas | None = None
) -> list[Decoded]:
    """Decode each (topic, payload), then check the ranges of every batch at once
    (a group of batches costs about what one did), then each device's quotas
    (cloud_ingest/ingest/quotas.py). A message over its device's rate is deferred before
    it is decoded: a flood costs a topic split per message."""
    out: list[Decoded] = []
    for topic, payload in messages:
        try:
            kind, device = route(topic, cfg.mqtt.topic_prefix, cfg.mqtt.topic_prefix_v2)
        except Exception:  # noqa: BLE001 (decode_message says why, with the traceback)
            kind, device = "batch", None
        if quotas is not None and device is not None and not quotas.admit(device):
            out.append(Decoded(topic, payload, kind, device, None, defer=DEFER_RATE))
        else:
            out.append(decode_message(topic, payload, cfg))
    now = time.time_ns()
    at = [(i, d.batch) for i, d in enumerate(out) if d.batch is not None]
    verdicts = check_ranges_many([b for _, b in at])
    for (i, _), verdict in zip(at, verdicts, strict=True):
        if verdict is not None:
            out[i] = dataclasses.replace(out[i], batch=None, error=verdict)
    if quotas is not None:
        out = [_within_quotas(d, quotas, now) for d in out]
    return out


def _within_quotas(d: Decoded, quotas: Quotas, now_ns: int) -> Decoded:
    try:
        return _quotas(d, quotas, now_ns)
    except Exception as exc:  # a bug must not stop the ingestor (as in decode_message)
        log.exception("quotas: %s on %s", type(exc).__name__, d.topic)
        error = WireError("undecodable", f"{type(exc).__name__}: {exc}"[:500])
        return dataclasses.replace(d, batch=None, alert=None, health=None, raw=None, error=error)


def _quotas(d: Decoded, quotas: Quotas, now_ns: int) -> Decoded:
    """The message within its device's quotas, in part, deferred or quarantined."""
    if d.batch is not None:
        c = quotas.check_batch(d.batch, now_ns)
        if c.defer is not None:
            return dataclasses.replace(d, batch=None, defer=c.defer)
        if c.batch is None:
            return dataclasses.replace(d, batch=None, error=c.error)
        if c.error is not None:
            return dataclasses.replace(
                d, batch=c.batch, partial=c.error, refused_rows=c.refused_rows
            )
        return d
    if d.raw is not None and d.raw.n:
        error = quotas.check_time(int(d.raw.ts[0]), int(d.raw.ts[-1]), now_ns, "the raw message")
        if error is not None:
            return dataclasses.replace(d, raw=None, error=error)
        return d
    message = d.alert or d.health or d.result
    if message is not None:
        when = message.ts_ns
        error = quotas.check_time(when, when, now_ns, f"the {d.kind}")
        if error is not None:
            return dataclasses.replace(d, alert=None, health=None, result=None, error=error)
    return d


def route(topic: str, prefix: str, prefix_v2: str = "") -> tuple[Kind, str | None]:
    """A message's kind and device, from its topic alone (None: not a valid one).
    Batches come under ``prefix``, or in wire format v2 under ``prefix_v2``."""
    if topic.endswith("/alert"):
        return "alert", device_from_alert_topic(topic, prefix)
    if topic.endswith("/health"):
        return "health", device_from_health_topic(topic, prefix)
    if topic.endswith("/result"):
        return "result", device_from_result_topic(topic, prefix)
    if topic.endswith("/raw"):
        return "raw", device_from_raw_topic(topic, prefix)
    device = device_from_batch_topic(topic, prefix)
    if device is None and prefix_v2:
        device = device_from_batch_topic(topic, prefix_v2)
    return "batch", device


def decode_message(topic: str, payload: bytes, cfg: IngestConfig) -> Decoded:
    """One message, on ``…/<device>/batch``, ``…/alert``, ``…/health``, ``…/result`` or
    ``…/raw``."""
    kind: Kind = "batch"
    try:
        kind, device = route(topic, cfg.mqtt.topic_prefix, cfg.mqtt.topic_prefix_v2)
        if kind == "raw":
            return _decode_raw(topic, payload, device, cfg)
        if kind != "batch":
            return _decode_json(topic, payload, kind, device)
        return _decode_batch(topic, payload, cfg)
    except Exception as exc:  # a decoder bug must not stop the ingestor
        log.exception("decode: %s on %s", type(exc).__name__, topic)
        error = WireError("undecodable", f"{type(exc).__name__}: {exc}"[:500])
        return Decoded(topic, payload, kind, None, None, error=error)


def _decode_batch(topic: str, payload: bytes, cfg: IngestConfig) -> Decoded:
    """A batch: of wire format v1 on v1's topics, of v2 on v2's (§2.6: a payload of
    the other version there is ``unsupported-version``)."""
    device = device_from_batch_topic(topic, cfg.mqtt.topic_prefix)
    if device is None and cfg.mqtt.topic_prefix_v2:
        device = device_from_batch_topic(topic, cfg.mqtt.topic_prefix_v2)
        if device is not None:
            return _decode_binary(topic, payload, "batch", device, cfg, version=2)
    return _decode_binary(topic, payload, "batch", device, cfg)


def _decode_raw(topic: str, payload: bytes, device: str | None, cfg: IngestConfig) -> Decoded:
    return _decode_binary(topic, payload, "raw", device, cfg)


def _decode_binary(
    topic: str, payload: bytes, kind: Literal["batch", "raw"], device: str | None,
    cfg: IngestConfig, version: int = 1,
) -> Decoded:  # fmt: skip
    """A batch (shared/wire.py) or raw readings (shared/rawdata.py): the same framing,
    limits and checks of the topic's device; a refused one still names its seq."""
    limits = {
        "max_payload_bytes": cfg.limits.max_payload_bytes,
        "max_body_bytes": cfg.limits.max_body_bytes,
    }
    try:
        if device is None:
            raise WireError("bad-topic", f"{topic!r} is not <prefix>/<device_id>/{kind}")
        value: Batch | RawReadings = (
            decode_batch(payload, **limits, versions=(version,))
            if kind == "batch"
            else decode_raw(payload, **limits)
        )
        if value.device_id != device:
            raise WireError(
                "device-mismatch",
                f"payload device_id {value.device_id!r} on the topic of {device!r}",
            )
    except WireError as exc:
        peek = peek_ids if kind == "batch" else peek_raw_ids
        seq, gen = peek(payload, max_body_bytes=cfg.limits.max_body_bytes)
        return Decoded(topic, payload, kind, device, seq, error=exc, generation=gen)
    if isinstance(value, Batch):
        return Decoded(
            topic, payload, kind, device, value.seq, batch=value, generation=value.generation
        )
    return Decoded(topic, payload, kind, device, value.seq, raw=value, generation=value.generation)


def _decode_json(topic: str, payload: bytes, kind: Kind, device: str | None) -> Decoded:
    """An alert, a health report or a command's result (JSON: shared/alerts.py,
    shared/health.py, shared/commands.py)."""
    try:
        if device is None:
            raise WireError("bad-topic", f"{topic!r} is not <prefix>/<device_id>/{kind}")
        value: Alert | HealthReport | Result = (
            decode_alert(payload)
            if kind == "alert"
            else decode_result(payload)
            if kind == "result"
            else decode_health(payload)
        )
    except WireError as exc:
        seq, gen = _json_ids(payload)
        return Decoded(topic, payload, kind, device, seq, error=exc, generation=gen)
    if isinstance(value, Alert):
        return Decoded(
            topic, payload, kind, device, value.seq, alert=value, generation=value.generation
        )
    if isinstance(value, Result):
        return Decoded(
            topic, payload, kind, device, value.seq, result=value, generation=value.generation
        )
    return Decoded(
        topic, payload, kind, device, value.seq, health=value, generation=value.generation
    )


def _json_ids(payload: bytes) -> tuple[int | None, int]:
    """Best effort: the (seq, generation) of a JSON message that failed validation."""
    try:
        obj = jsonwire.loads(payload, reason="bad-json", what="a message", max_bytes=1 << 20)
        seq, gen = obj.get("seq"), obj.get("generation", 0)
    except (WireError, AttributeError):
        return None, 0
    gen = gen if type(gen) is int and 0 <= gen < 2**63 else 0
    return (seq if type(seq) is int and 0 <= seq < 2**63 else None), gen


@dataclass(frozen=True)
class GroupPlan:
    planned: list[Planned]
    #: the rows of the batches to write, per day; ``which`` holds indexes of ``planned``
    rows: list[GroupRows]


def plan_group(decoded: Sequence[Decoded], cfg: IngestConfig) -> GroupPlan:
    """What each message writes. A message with the (device, generation, seq) of an
    earlier one of the group (alerts and batches share the device's seqs) repeats it
    and writes nothing. The Arrow rows of all the group's batches are built at once."""
    seen: dict[tuple[str, int, int], int] = {}
    out: list[Planned] = []
    batches: list[tuple[int, Batch]] = []  # the batches to write, and their indexes
    for i, msg in enumerate(decoded):
        key = msg.key
        if msg.error is not None or msg.defer is not None or key is None or msg.device is None:
            out.append(Planned(msg))
            continue
        if key in seen:
            out.append(Planned(msg, repeat_of=seen[key]))
            continue
        seen[key] = i
        if msg.batch is not None:
            lines = batch_to_lines(msg.batch, cfg.influx.measurement, cfg.influx.allowed_tags)
            out.append(Planned(msg, tuple(lines)))
            batches.append((i, msg.batch))
        elif msg.alert is not None:
            line = alert_to_line(msg.device, msg.alert, cfg.influx.alert_measurement)
            out.append(Planned(msg, (line,), (alert_object(msg.device, msg.alert),)))
        elif msg.raw is not None:  # the lake, and InfluxDB if [influx] raw_measurement
            measurement = cfg.influx.raw_measurement
            lines = raw_to_lines(msg.device, msg.raw, measurement) if measurement else []
            out.append(Planned(msg, tuple(lines), raw_objects(msg.device, msg.raw)))
        elif msg.result is not None:  # InfluxDB only: an answer to an operator
            line = result_to_line(msg.device, msg.result, cfg.influx.result_measurement)
            out.append(Planned(msg, (line,)))
        else:  # a health report: InfluxDB only (it describes the device, not its data)
            assert msg.health is not None
            line = health_to_line(msg.device, msg.health, cfg.influx.health_measurement)
            out.append(Planned(msg, (line,)))
    at = np.array([i for i, _ in batches], dtype=np.int64)
    rows = [dataclasses.replace(g, which=at[g.which]) for g in group_rows([b for _, b in batches])]
    return GroupPlan(out, rows)
