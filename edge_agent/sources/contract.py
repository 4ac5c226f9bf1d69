"""The contract every input adapter keeps, and the builder they share.

A decoder turns the bytes of one message into a :class:`Decoded`: chunks of
readings (one per node and sensor) plus :class:`Reject` entries for the parts it
could not read. Bad input is never an exception past a decoder: the adapters'
callers (:mod:`edge_agent.pipeline.intake`, :mod:`edge_agent.sources.http`) turn a
``WireError`` raised for the whole message into a quarantine entry too.

A reading without a timestamp of its own is stamped with the agent's clock on
arrival (``now_ns``), and the message is marked ``stamped``: its digest says
nothing about a redelivery (equal values are new readings), so the intake
recognises one by MQTT's packet identifier instead
(:mod:`edge_agent.pipeline.intake`; docs/devices.md, "Timestamps").
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from edge_agent.sources.transform import Transforms
from shared.errors import WireError
from shared.readings import ReadingChunk
from shared.topics import ID_PATTERN

#: Distinct sensors one message may carry (a hostile body cannot create more): the
#: cloud's own bound on a batch (quotas.max_sensors_per_batch, 1,000 by default).
MAX_SENSORS_PER_MESSAGE = 1_000
#: Readings one message may carry.
MAX_READINGS_PER_MESSAGE = 1_000_000
#: Rejected parts of one message kept as quarantine entries; the rest are counted.
MAX_REJECTS_KEPT = 100


@dataclass(frozen=True)
class Reject:
    """A part of a message that is not a valid reading (an MQTT payload, one line)."""

    reason: str
    message: str
    payload: bytes


@dataclass
class Decoded:
    chunks: list[ReadingChunk] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    #: rejected parts beyond MAX_REJECTS_KEPT: counted, not kept
    rejects_not_kept: int = 0
    #: some reading was stamped on arrival (so the message's digest cannot tell a
    #: redelivery from a new message with the same values)
    stamped: bool = False
    #: readings a transform dropped on purpose (``drop = true``): not a loss
    filtered: int = 0
    #: values by what they became (edge_agent/sources/values.py): ``invalid``
    #: (stored as NaN, also in ``readings``), ``text`` (not readings)
    counts: Counter[str] = field(default_factory=Counter)

    @property
    def readings(self) -> int:
        return sum(len(c) for c in self.chunks)

    @property
    def rejected(self) -> int:
        return len(self.rejects) + self.rejects_not_kept


#: What an adapter offers: ``(topic, payload, now_ns)`` in, readings and rejects out,
#: never an exception for bad input (a ``WireError`` raised for the whole message
#: is allowed, and quarantined by the caller).
Decoder = Callable[[str, bytes, int], Decoded]


_BAD_ID_CHAR = str.maketrans({c: "_" for c in "/#+ \t\n\r\0:,=\"'\\"})


def clean_id(raw: str) -> str | None:
    """A node or sensor name from a device, made safe for the buffer and the cloud:
    characters outside ``A-Z a-z 0-9 _ . -`` become ``_``; None if the result is
    empty or longer than 64 characters."""
    if not raw or len(raw) > 64:
        return None
    if ID_PATTERN.match(raw):
        return raw
    out = "".join(c if ID_PATTERN.match(c) else "_" for c in raw.translate(_BAD_ID_CHAR))
    return out if ID_PATTERN.match(out) else None


class Builder:
    """Collects readings per (node, sensor) and makes a :class:`Decoded`, applying
    the transforms; bounded in sensors and readings per message."""

    def __init__(self, transforms: Transforms, now_ns: int) -> None:
        self.transforms = transforms
        self.now_ns = now_ns
        self.out = Decoded()
        self._series: dict[tuple[str, str], tuple[str, list[int], list[float]]] = {}
        self._n = 0

    def reject(self, reason: str, message: str, payload: bytes | str) -> None:
        """A part that is not a reading: kept for the quarantine (the first
        MAX_REJECTS_KEPT of a message), or counted."""
        if len(self.out.rejects) < MAX_REJECTS_KEPT:
            raw = payload.encode("utf-8", "replace") if isinstance(payload, str) else payload
            self.out.rejects.append(Reject(reason, message[:1000], raw[:4096]))
        else:
            self.out.rejects_not_kept += 1

    def text(self, n: int = 1) -> None:
        """Values that are text, not readings (counted: docs/devices.md)."""
        self.out.counts["text"] += n

    def add(
        self, node: str, sensor: str, unit: str, ts: int | None, value: float, part: bytes | str
    ) -> None:
        """One reading (NaN: an invalid one); ``ts`` None = stamped now. ``part`` is
        quarantined if the reading cannot be taken."""
        if ts is None:
            ts = self.now_ns
            self.out.stamped = True
        key = (node, sensor)
        series = self._series.get(key)
        if series is None:
            rule = self.transforms.rule_for(node, sensor)
            if rule is not None and rule.drop:
                self.out.filtered += 1
                return
            if len(self._series) >= MAX_SENSORS_PER_MESSAGE:
                self.reject(
                    "too-many-sensors",
                    f"more than {MAX_SENSORS_PER_MESSAGE} sensors in one message",
                    part,
                )
                return
            series = self._series[key] = (unit, [], [])
        if self._n >= MAX_READINGS_PER_MESSAGE:
            self.reject("too-many-readings", f"more than {MAX_READINGS_PER_MESSAGE} readings", part)
            return
        self._n += 1
        if value != value:
            self.out.counts["invalid"] += 1
        series[1].append(ts)
        series[2].append(value)

    def done(self) -> Decoded:
        for (node, sensor), (unit, ts, vals) in self._series.items():
            if not ts:
                continue
            chunk = ReadingChunk(
                node, sensor, unit, np.array(ts, dtype=np.int64), np.array(vals, dtype=np.float64)
            )
            self.add_chunk(chunk, count_invalid=False)
        return self.out

    def add_chunk(self, chunk: ReadingChunk, *, count_invalid: bool = True) -> None:
        """A whole chunk (decoded elsewhere), transformed."""
        if count_invalid:
            self.out.counts["invalid"] += int(np.isnan(chunk.values).sum())
        out = self.transforms.apply(chunk)
        if out is None:
            self.out.filtered += len(chunk)
        else:
            self.out.chunks.append(out)


def guard(decode: Decoder) -> Decoder:
    """Wrap a decoder so that a bug in it quarantines the message (``undecodable``)
    instead of ending the thread that called it."""

    def guarded(topic: str, payload: bytes, now_ns: int) -> Decoded:
        try:
            return decode(topic, payload, now_ns)
        except WireError:
            raise
        except Exception as exc:  # noqa: BLE001 (a decoder bug must not end paho's thread)
            raise WireError("undecodable", f"{type(exc).__name__}: {exc}"[:500]) from None

    return guarded
