"""Raw readings on request: what a ``raw`` command makes (docs/commands.md).

The command names sensors (a glob on ``<node>/<sensor>``) and a time range; the
agent copies the readings its buffer holds for them into messages of
docs/wire-format.md §2.13 (one sensor and one UTC day each, at most
``forward.max_batch_bytes``), in the ``raw`` table, in the command's own
transaction. From there they live a batch's life (edge_agent/pipeline/outbox.py):
sent after every batch, under the backfill's byte budget, and again until the
cloud acks them.

What the buffer no longer holds is said, not guessed: ``gone_before_ns`` in the
answer is the time before which retention or the disk budget has deleted
readings (buffer.GONE_BEFORE); from it on, the buffer has every reading it stored.
Readings held for being stamped ahead of the clock (edge_agent/pipeline/held.py)
are not stored yet, and not sent.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edge_agent import counters
from edge_agent.pipeline import buffer, outbox
from edge_agent.store import Store, crc
from shared.rawdata import RawReadings, day_spans, readings_per_message
from shared.timefmt import parse_time

if TYPE_CHECKING:  # the config holds the alert rules, whose captures use this module
    from edge_agent.config import AgentConfig

#: the longest glob a request may give
MAX_GLOB_CHARS = 200


class BadArgs(ValueError):
    """The command's arguments are not what its kind takes (refused ``bad-args``)."""


@dataclass(frozen=True)
class RawRequest:
    #: a glob on "<node>/<sensor>" (fnmatch, case-sensitive): ``*``, ``node-1/*``
    sensors: str
    start_ns: int
    end_ns: int

    @classmethod
    def from_args(cls, args: Mapping[str, Any], now_ns: int) -> RawRequest:
        """``sensors`` (default ``*``), ``from`` and ``to``: ISO 8601, integer ns, or a
        time before now on the device's clock (``-1h``)."""
        unknown = set(args) - {"sensors", "from", "to"}
        if unknown:
            raise BadArgs(f"unknown arguments {sorted(unknown)}; raw takes sensors, from, to")
        sensors = args.get("sensors", "*")
        if not isinstance(sensors, str) or not 0 < len(sensors) <= MAX_GLOB_CHARS:
            raise BadArgs(f"sensors must be a glob of 1-{MAX_GLOB_CHARS} characters")
        bounds = []
        for key in ("from", "to"):
            value = args.get(key)
            if type(value) is int:
                bounds.append(value)
                continue
            if not isinstance(value, str):
                raise BadArgs(f"{key} is required: ISO 8601, integer ns or -1h")
            try:
                bounds.append(parse_time(value, now_ns))
            except (ValueError, OverflowError) as exc:
                raise BadArgs(f"{key}: {exc}") from None
        start, end = bounds
        if not 0 <= start < end < 2**63:
            raise BadArgs("from must be before to, both in [1970, 2262)")
        return cls(sensors, start, end)


def queue(
    store: Store, cfg: AgentConfig, request_id: str, req: RawRequest, now_ns: int
) -> dict[str, Any]:
    """Copy the readings ``req`` asks for into the ``raw`` table; returns the answer
    (the result's ``result``). Call inside the command's transaction."""
    refs = buffer.load_sensors(store)
    glob = req.sensors
    chosen = {sid for sid, r in refs.items() if fnmatch.fnmatchcase(f"{r.node}/{r.name}", glob)}
    end, complete = _cut(store, req, chosen, cfg.commands.raw_max_readings)
    data = buffer.read_range(store, req.start_ns, end, chosen) if chosen else {}
    per_message = readings_per_message(cfg.forward.max_batch_bytes)
    generation = outbox.generation(store)
    parts = readings = size = 0
    for sid in sorted(data):
        ts, values = data[sid]
        ref = refs[sid]
        for a, b in day_spans(ts, per_message):
            seq = outbox.next_seq(store)
            message = RawReadings(
                device_id=cfg.device_id, seq=seq, request=request_id, part=parts,
                node=ref.node, sensor=ref.name, unit=ref.unit, created_ns=now_ns,
                ts=ts[a:b], values=values[a:b], generation=generation,
            )  # fmt: skip
            payload = message.encode()
            store.conn.execute(
                "INSERT INTO raw(seq, created_ns, payload, state, crc, generation, readings) "
                "VALUES (?, ?, ?, 'pending', ?, ?, ?)",
                (seq, now_ns, payload, crc(payload), generation, message.n),
            )
            parts += 1
            readings += message.n
            size += len(payload)
    store.add_counter(counters.RAW_READINGS_QUEUED, readings)
    answer: dict[str, Any] = {
        "from_ns": req.start_ns, "to_ns": req.end_ns, "sensors_matched": len(chosen),
        "sensors": len(data), "readings": readings, "messages": parts, "bytes": size,
    }  # fmt: skip
    gone = store.get_state(buffer.GONE_BEFORE)
    if gone > req.start_ns:
        answer["gone_before_ns"] = gone  # the buffer may have had more before it
    if not complete:
        answer["next_from_ns"] = end  # over raw_max_readings: ask again from here
    return answer


def _cut(store: Store, req: RawRequest, chosen: set[int], limit: int) -> tuple[int, bool]:
    """The end of the range within ``limit`` readings (counted per stored chunk, in
    time order, without reading them), and whether that is the whole range."""
    total = 0
    for sid, t_min, n in store.conn.execute(
        "SELECT sensor_id, t_min, n FROM chunks WHERE t_max >= ? AND t_min < ? ORDER BY t_min",
        (req.start_ns, req.end_ns),
    ):
        if sid not in chosen:
            continue
        total += int(n)
        if total > limit and int(t_min) > req.start_ns:
            return int(t_min), False
    return req.end_ns, True
