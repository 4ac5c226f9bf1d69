"""Intake: readings from the sensor nodes' local broker (and the HTTP intake) into
the durable buffer.

Subscribes to each source's topic (``[[intake.sources]]``, by default
``<prefix>/+/+`` in the chunk format) with a persistent session, so the broker
keeps readings while the agent is down; the source's decoder
(:mod:`edge_agent.sources`) turns each message into readings and rejects.
Acknowledgement is manual: messages are committed to SQLite in groups
(``storage.group_commit_max`` per transaction, one fsync) and each PUBACK goes
to the broker only after its group's commit, in arrival order, so a reading the
broker saw acknowledged is on disk. A message that cannot be parsed is stored in
the ``quarantine`` table with its reason, in its place in the group, counted,
and acknowledged (resending it cannot fix it).

When the file cannot take a group (a full disk, an I/O error), nothing of it is
acknowledged and nothing of it is forgotten: the group stays in hand, later
messages queue behind it, and the commit is tried again with a backoff (up to
``RETRY_MAX_S``) until it succeeds; the failures are counted (``store_errors``).
A group that fails for any other reason is stored message by message, and a
message that still fails is quarantined as ``store-failed``, so one bad message
cannot stop intake.

A message whose readings all carry their own time is recognised when the broker
redelivers it (its digest is kept). One stamped on arrival is recognised by what
MQTT gives: its packet identifier and a digest of its topic and payload are
committed with its readings (table ``inflight``), and a message that comes
again with the DUP flag, the same identifier and the same digest is a
redelivery of one already stored (after a crash between the commit and the
PUBACK), acknowledged and counted (``source_<name>_redelivered``), not stored
twice. The table keeps the entries of the newest :data:`INFLIGHT_KEEP`
messages: more than can lack a PUBACK at the broker, and too few for two of
them to share an identifier. Two equal values a device sends one after the
other are two messages (the broker does not resend an acknowledged one), two
readings.

A retained message whose readings carry no time of their own is state the
broker replays at every subscription, not a new reading: by the source's
``retained`` setting it is skipped (``skip``, the default) or stored the first
time its value arrives (``once``); counted as ``source_<name>_retained``.

Each filter is subscribed with its own MQTT v5 Subscription Identifier: where
two sources' filters overlap, a broker may send a copy per matching
subscription (Mosquitto 2 does), and only the copy through the filter of the
source that reads the topic is read; the others are acknowledged in their place
and counted as ``intake_overlapping_copies``
(:meth:`~edge_agent.sources.router.MqttSources.is_extra_copy`).

Counters per source: ``source_<name>_messages``, ``_readings`` (decoded, before
the late and future policies), ``_invalid`` (of those, NaN), ``_text`` (values
that are not readings), ``_filtered`` (dropped by a transform or ``ignore``),
``_retained``, ``_redelivered``, ``_rejected`` (quarantined messages and lines);
``readings_filtered`` is the sum of ``_filtered`` over the sources.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.subscribeoptions import SubscribeOptions

from edge_agent import counters
from edge_agent.config import AgentConfig
from edge_agent.mqtt import connect_async, make_client
from edge_agent.pipeline import alerts, buffer, held, quarantine
from edge_agent.pipeline.alerts import AlertEngine
from edge_agent.sources.contract import Decoded
from edge_agent.sources.router import MqttSources
from edge_agent.sources.transform import Transforms
from edge_agent.store import INTAKE_SESSION, Store
from shared.errors import StorageError, WireError
from shared.mqttprops import PACKET_OVERHEAD, subscribe_properties
from shared.readings import ReadingChunk

log = logging.getLogger(__name__)

#: Messages held while the file cannot take them. QoS 1 messages are bounded by
#: the broker's in-flight limit for the agent's session (they are not acknowledged);
#: QoS 0 messages beyond this are dropped and counted as ``dropped_store_unavailable``.
MAX_HELD = 10_000
RETRY_MAX_S = 10.0  # the longest wait between two attempts to commit a failed group
STAMP_CORRECTION_S = 1.0  # a smaller offset is measurement noise: stamps keep the clock
HELD_LOG_EVERY_S = 30.0  # readings held for a wrong clock: a log line at most this often
#: QoS 1 and 2 messages the broker may send before it has our PUBACKs (MQTT v5
#: Receive Maximum, announced at CONNECT).
RECEIVE_MAXIMUM = 1000
#: ``inflight`` keeps the entries of the newest this many messages (forgetting
#: older ones every :data:`RECEIVE_MAXIMUM` // 4). Not RECEIVE_MAXIMUM: Mosquitto
#: 2.0.11 (Debian 12's, Ubuntu 22.04's) does not hold to it (its issue #2301;
#: "various fixes around inflight quota management" came in 2.0.13): with its
#: state saved to disk often (docs/edge-agent.md, "A power cut on the device")
#: and a busy disk, it redelivered 600 to 4,700 messages over four SIGKILLs of
#: the agent in tests/edge_agent/test_redelivery.py, and a keep of 1,000 stored up to 2,265
#: of them twice. Half the packet identifier space instead: a broker that
#: numbers a session's packets in sequence, as Mosquitto does, uses an
#: identifier again only 65,535 messages later, so no two kept entries share one
#: (an older message with the same identifier and the same payload would be
#: taken for a redelivery), and 32,768 is more than a broker can have in flight
#: with distinct identifiers and room to spare.
INFLIGHT_KEEP = 32_768
#: an ``inflight`` entry: a packet identifier (2 bytes) and a 16-byte digest
_ENTRY = 18
#: the source name of a copy of a message that overlapping subscriptions brought
#: twice: acknowledged, not read (counted as ``intake_overlapping_copies``)
COPY = "(copy)"
#: counter: connections on which the broker no longer had the agent's session
#: state: 1 once the intake has subscribed with this buffer
SUBSCRIBED = "intake_subscribed"


@dataclass(frozen=True)
class Arrival:
    """A message in hand: decoded, or why it cannot be."""

    topic: str
    payload: bytes
    source: str
    item: Decoded | WireError
    #: the MQTT message to acknowledge after the commit (None: from the HTTP intake)
    msg: mqtt.MQTTMessage | None = None


@dataclass(frozen=True)
class Outcome:
    """What became of one message's readings."""

    stored: int = 0
    late: int = 0
    future: int = 0
    duplicate: int = 0
    rejected: int = 0


def _outcome(results: list[buffer.StoreResult], rejected: int) -> Outcome:
    return Outcome(
        stored=sum(r.stored for r in results),
        late=sum(r.late for r in results),
        future=sum(r.future for r in results),
        duplicate=sum(r.duplicate for r in results),
        rejected=rejected,
    )


def default_client_id(cfg: AgentConfig, store: Store) -> str:
    """``edge-agent-<device>-intake-<16 hex digits>``: the digits are drawn when the
    buffer is made and kept in it, so that the id is stable across restarts (the
    broker keeps the agent's persistent session, and the readings queued while it
    is down, under it) and no other client on the device broker can guess it and
    take that session over (a client that took the documented id stole 1,292
    readings queued for the agent)."""
    secret = store.get_state(INTAKE_SESSION)
    return f"edge-agent-{cfg.device_id}-intake-{secret:016x}"


class Intake:
    def __init__(self, cfg: AgentConfig, client: mqtt.Client | None = None) -> None:
        """``client``: a paho client to use instead of a new one (tests inject a fake)."""
        self.cfg = cfg
        self.store = Store(cfg.storage.path, synchronous=cfg.storage.synchronous)
        self.registry = buffer.SensorRegistry(self.store)
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.late_policy = buffer.LatePolicy(
            cfg.window.width_ns,
            cfg.window.max_age_ns,
            cfg.window.hop_ns,
            buffer.window_widths(self.store) if cfg.window.hop_ns == cfg.window.width_ns else (),
        )
        self.alerts = AlertEngine(cfg.alerts, self.store)
        self.transforms = Transforms(cfg.intake.transforms)
        self.sources = MqttSources(cfg.intake.mqtt_sources, self.transforms)
        # Group commit: messages wait here (unacknowledged) until their transaction.
        # The lock also serialises this thread's and the agent tick's use of self.store.
        self._lock = threading.Lock()
        self._pending: list[Arrival] = []
        self._first_pending = 0.0
        self._failures = 0  # consecutive failed commits
        self._retry_at = 0.0  # monotonic time of the next attempt after a failure
        self._dropped_held = 0  # QoS 0 messages dropped while the file failed, not yet counted
        self._busy_since = 0.0  # monotonic start of the commit in progress; 0 when none
        #: the correction to the device's wall clock that the agent may act on (the
        #: forwarder's Clock sets it: edge_agent/clock.py); 0 = none known
        self.offset_ns: Callable[[], int] = lambda: 0
        #: readings may be waiting in ``held`` (edge_agent/pipeline/held.py)
        self._held_waiting = held.count(self.store) > 0
        self._held_unlogged = 0
        self._held_log_at = 0.0
        self._suback_due = 0  # SUBACKs awaited before the intake is subscribed
        #: subscribed once with this buffer (kept in it, so that a session the broker
        #: forgot while the agent was stopped is seen too), and sessions the broker
        #: forgot that are not yet counted in the buffer
        self._subscribed_once = self.store.get_state(SUBSCRIBED) > 0
        self._note_subscribed = False
        self._sessions_lost = 0
        #: the number of the newest message with an ``inflight`` entry
        self._inflight_seq = int(
            self.store.conn.execute("SELECT coalesce(max(seq), 0) FROM inflight").fetchone()[0]
        )
        #: the newest message number when older entries were last forgotten
        self._inflight_pruned = self._inflight_seq
        #: the committed entries (packet identifier -> (message number, digest)),
        #: read at the first redelivery and kept up to date from then on; None
        #: until then
        self._inflight_known: dict[int, tuple[int, bytes]] | None = None
        #: the group's entries (packet identifier -> digest), written at its end
        self._inflight_rows: dict[int, bytes] = {}
        self._retained_policy = {r.source.name: r.source.retained for r in self.sources.routes}
        client_id = cfg.intake.broker.client_id or default_client_id(cfg, self.store)
        self.client = client or make_client(cfg.intake.broker, client_id, manual_ack=True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe

    def busy_s(self) -> float:
        """How long the commit in progress has taken so far (0 when none is): a
        commit stuck for long is a stalled intake (the agent stops feeding the
        service manager's watchdog, edge_agent/agent.py)."""
        since = self._busy_since
        return time.monotonic() - since if since else 0.0

    @property
    def failing(self) -> bool:
        """True while the last attempt to commit failed (messages are held)."""
        return self._failures > 0

    def start(self) -> None:
        # nothing larger than the largest payload a source takes: the broker keeps
        # (and drops) a larger message instead of handing it to paho, which would
        # read it whole into memory first (a 250 MB one took the agent past its
        # unit's MemoryMax)
        connect_async(
            self.client,
            self.cfg.intake.broker,
            self.sources.max_payload_bytes() + PACKET_OVERHEAD,
            RECEIVE_MAXIMUM,
        )

    def stop(self) -> None:
        self._retry_at = 0.0  # one last attempt
        self.flush()
        self.client.disconnect()
        self.client.loop_stop()
        self.store.close()

    def _on_connect(self, client: mqtt.Client, _u: Any, flags: Any, rc: Any, _p: Any) -> None:
        if rc.is_failure:
            log.warning("intake: connect refused: %s", rc)
            return
        if not flags.session_present and self._subscribed_once:
            # the broker forgot the agent's session (restarted without it saved):
            # what the nodes published since went nowhere, and nothing is queued
            self._sessions_lost += 1
            log.warning(
                "intake: the broker at %s:%s did not keep the agent's session (restarted "
                "without it on disk?); subscribing again. Readings the nodes published "
                "between its restart and this subscription reached no one "
                "(docs/edge-agent.md, 'A power cut on the device')",
                self.cfg.intake.broker.host,
                self.cfg.intake.broker.port,
            )
        # one SUBSCRIBE per filter, each with its identifier, so that the copies a
        # broker sends for overlapping filters can be told apart (_on_message)
        subs = self.sources.subscriptions()
        self._suback_due = len(subs)
        for i, (topic_filter, qos) in enumerate(subs):
            client.subscribe(
                topic_filter,
                options=SubscribeOptions(qos=qos),
                properties=subscribe_properties(i + 1),
            )
        self.connected.set()
        log.info(
            "intake: connected to %s:%s", self.cfg.intake.broker.host, self.cfg.intake.broker.port
        )

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, _mid: int, rcs: Any, _p: Any) -> None:
        if any(rc.is_failure for rc in rcs):
            log.error("intake: subscription refused: %s", rcs)
            return
        self._suback_due -= 1
        if self._suback_due <= 0:
            if not self._subscribed_once:
                self._subscribed_once = self._note_subscribed = True
            self.subscribed.set()

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        self.connected.clear()
        self.subscribed.clear()
        log.warning("intake: disconnected (%s); paho reconnects", rc)

    def _on_message(self, _client: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        payload = bytes(msg.payload)
        got = getattr(msg.properties, "SubscriptionIdentifier", None) if msg.properties else None
        if got and self.sources.is_extra_copy(msg.topic, list(got)):
            # another subscription's copy of a message read through its own: only
            # acknowledged (in order, with the group), not read twice
            arrival = Arrival(msg.topic, payload, COPY, WireError(COPY, ""), msg)
        else:
            source, item = self.sources.decode(msg.topic, payload, self.stamp_ns())
            arrival = Arrival(msg.topic, payload, source, item, msg)
        item = arrival.item
        with self._lock:
            if len(self._pending) >= MAX_HELD and msg.qos == 0:
                self._dropped_held += 1  # nothing to redeliver it: counted at the next commit
                return
            if not self._pending:
                self._first_pending = time.monotonic()
            self._pending.append(arrival)
            st = self.cfg.storage
            if (
                (isinstance(item, WireError) and arrival.source != COPY)  # quarantine it at once
                or (isinstance(item, Decoded) and len(item.chunks) > 1)  # a group of its own
                or len(self._pending) >= st.group_commit_max
                or time.monotonic() - self._first_pending >= st.group_commit_ms / 1000
            ):
                self._flush_locked()

    def flush(self) -> None:
        """Commit and acknowledge what waits for its group (the agent's tick calls
        this); and store the count of sessions the broker forgot."""
        with self._lock:
            self._flush_locked()
            lost, note = self._sessions_lost, self._note_subscribed
            if (lost or note) and not self._pending:
                try:
                    with self.store.tx():
                        self.store.add_counter(counters.INTAKE_SESSIONS_LOST, lost)
                        if note:
                            self.store.set_state(SUBSCRIBED, 1)
                except (sqlite3.Error, StorageError):
                    return  # at a later tick
                self._sessions_lost -= lost
                self._note_subscribed = False

    def commit_now(self, arrival: Arrival) -> Outcome:
        """Store one message now, in a transaction of its own, after what waits
        (for the HTTP intake, which answers only once its body is durable). Raises
        ``sqlite3.Error``/``StorageError`` when the file cannot take it."""
        with self._lock:
            self._retry_at = 0.0
            self._flush_locked()
            if self._pending:
                raise StorageError("the buffer cannot take messages now")
            self._busy_since = time.monotonic()
            try:
                try:
                    results = self._commit([arrival])
                except (sqlite3.Error, StorageError):
                    raise
                except Exception:
                    log.exception("intake: cannot store the body from %s", arrival.topic)
                    (arrival,), results = self._store_alone(arrival)
            finally:
                self._busy_since = 0.0
            self._done([arrival], results)
            return results[0]

    def _flush_locked(self) -> None:
        if not self._pending or time.monotonic() < self._retry_at:
            return
        group = list(self._pending)
        self._busy_since = time.monotonic()
        try:
            results = self._commit(group)
        except (sqlite3.Error, StorageError) as exc:
            self._storage_failed(exc, len(group))
            return
        except Exception:  # not the file: store them one by one to find the one at fault
            log.exception("intake: a group of %d messages failed; storing one by one", len(group))
            self._commit_one_by_one()
            return
        finally:
            self._busy_since = 0.0
        self._done(group, results)

    def _commit_one_by_one(self) -> None:
        while self._pending:
            try:
                one, results = self._store_alone(self._pending[0])
            except (sqlite3.Error, StorageError) as exc:
                self._storage_failed(exc, len(self._pending))
                return
            self._done(one, results)

    def _store_alone(self, arrival: Arrival) -> tuple[list[Arrival], list[Outcome]]:
        """One message in a transaction of its own; quarantined as ``store-failed`` if
        storing it fails for a reason other than the file."""
        try:
            return [arrival], self._commit([arrival])
        except (sqlite3.Error, StorageError):
            raise  # the file: the caller waits and tries again
        except Exception as exc:
            log.exception("intake: cannot store the message on %s; quarantined", arrival.topic)
            bad = WireError("store-failed", f"{type(exc).__name__}: {exc}"[:500])
            failed = Arrival(arrival.topic, arrival.payload, arrival.source, bad, arrival.msg)
            return [failed], self._commit([failed])

    def stamp_ns(self) -> int:
        """The time a reading without one of its own is stamped with on arrival: the
        device's clock, corrected by its known offset to the cloud's when that is
        over :data:`STAMP_CORRECTION_S` (a Pi that booted with a stale clock stamps
        its ESPHome and Modbus readings right once an ack has measured it)."""
        offset = self.offset_ns()
        return time.time_ns() + (offset if abs(offset) > STAMP_CORRECTION_S * 1e9 else 0)

    def future_limit_ns(self) -> int:
        """Readings stamped after this are held (edge_agent/pipeline/held.py): the
        device's clock, corrected by its known offset to the cloud's, plus
        ``window.max_future_s``."""
        return time.time_ns() + self.offset_ns() + self.cfg.window.max_future_ns

    def release_held(self) -> int:
        """Move held readings that the clock now allows into the buffer (the agent's
        tick calls this); returns how many."""
        with self._lock:
            if not self._held_waiting:
                return 0
            moved = held.release(
                self.store,
                self.registry,
                limit_ns=self.future_limit_ns(),
                late=self.late_policy,
                after_store=self._alert_hook,
            )
            if moved:
                self._held_waiting = held.count(self.store) > 0
            return moved

    def _commit(self, group: list[Arrival]) -> list[Outcome]:
        """Store the group in one transaction: readings, quarantined messages and
        lines, alert events, and the counters of each source. Held readings that the
        clock now allows go first (before newer readings move the watermark)."""
        future_limit = self.future_limit_ns()
        counts: Counter[counters.CounterName] = Counter()
        with self.store.tx():
            dropped, self._dropped_held = self._dropped_held, 0
            if dropped:
                self.store.add_counter(counters.DROPPED_STORE_UNAVAILABLE, dropped)
                self.store.on_rollback(lambda: self._add_dropped(dropped))
            if self._held_waiting:
                held.release_some(
                    self.store,
                    self.registry,
                    limit_ns=future_limit,
                    late=self.late_policy,
                    after_store=self._alert_hook,
                )
            seq = self._inflight_seq
            self.store.on_rollback(lambda: setattr(self, "_inflight_seq", seq))
            self._inflight_rows = {}
            out = [self._store_arrival(a, future_limit, counts) for a in group]
            if self._inflight_rows:
                self._inflight_seq += len(self._inflight_rows)
                entries = b"".join(
                    mid.to_bytes(2, "big") + d for mid, d in self._inflight_rows.items()
                )
                self.store.conn.execute(
                    "INSERT INTO inflight(seq, entries) VALUES (?, ?)",
                    (self._inflight_seq, entries),
                )
                if self._inflight_seq - self._inflight_pruned >= RECEIVE_MAXIMUM // 4:
                    self.store.conn.execute(
                        "DELETE FROM inflight WHERE seq <= ?",
                        (self._inflight_seq - INFLIGHT_KEEP,),
                    )
                    pruned = self._inflight_pruned
                    self.store.on_rollback(lambda: setattr(self, "_inflight_pruned", pruned))
                    self._inflight_pruned = self._inflight_seq
            for name, n in counts.items():
                self.store.add_counter(name, n)
        rows, known = self._inflight_rows, self._inflight_known
        if rows and known is not None:  # committed: kept up to date once read
            first = self._inflight_seq - len(rows) + 1
            known.update((mid, (first + i, d)) for i, (mid, d) in enumerate(rows.items()))
        if any(o.future for o in out):
            self._held_waiting = True
        return out

    def _store_arrival(
        self, a: Arrival, future_limit: int, counts: Counter[counters.CounterName]
    ) -> Outcome:
        if a.source == COPY:
            counts[counters.INTAKE_OVERLAPPING_COPIES] += 1
            return Outcome()
        counts[counters.source(a.source, "messages")] += 1
        qmax = self.cfg.storage.quarantine_max_bytes
        item = a.item
        if isinstance(item, WireError):
            quarantine.add(self.store, a.topic, item, a.payload, max_bytes=qmax)
            counts[counters.source(a.source, "rejected")] += 1
            return Outcome(rejected=1)
        for rej in item.rejects:
            quarantine.add(
                self.store, a.topic, WireError(rej.reason, rej.message), rej.payload, max_bytes=qmax
            )
        if item.rejects_not_kept:
            counts[counters.QUARANTINE_NOT_KEPT] += item.rejects_not_kept
        counts[counters.source(a.source, "rejected")] += item.rejected
        if item.stamped and a.msg is not None and item.chunks and self._replayed(a):
            counts[counters.source(a.source, "retained")] += item.readings
            return Outcome(rejected=item.rejected)
        if item.stamped and a.msg is not None and a.msg.qos > 0 and item.chunks:
            digest = buffer.message_digest(a.topic, a.payload)
            if a.msg.dup and self._stored_before(a.msg.mid, digest):
                counts[counters.source(a.source, "redelivered")] += item.readings
                return Outcome(duplicate=item.readings, rejected=item.rejected)
            self._inflight_rows[a.msg.mid] = digest
        if not item.stamped and item.chunks:
            digest = buffer.message_digest(a.topic, a.payload)
            if buffer.seen_before(self.store, digest):
                counts[counters.DUPLICATES_IGNORED] += item.readings
                return Outcome(duplicate=item.readings, rejected=item.rejected)
        counts[counters.source(a.source, "readings")] += item.readings
        for kind, n in item.counts.items():
            counts[counters.source(a.source, kind)] += n
        if item.filtered:
            counts[counters.READINGS_FILTERED] += item.filtered
            counts[counters.source(a.source, "filtered")] += item.filtered
        results = [
            buffer.store_one(
                self.store,
                self.registry,
                chunk,
                future_limit_ns=future_limit,
                late=self.late_policy,
                after_store=self._alert_hook(chunk.node, chunk.sensor),
            )
            for chunk in item.chunks
        ]
        outcome = _outcome(results, item.rejected)
        for chunk, res in zip(item.chunks, results, strict=True):
            self._log_drops(chunk, res)
        return outcome

    def _stored_before(self, mid: int, digest: bytes) -> bool:
        """True if the message with this packet identifier and digest was committed
        and its acknowledgement may not have reached the broker."""
        in_group = self._inflight_rows.get(mid)
        if in_group is not None:  # the original is in this very group (a reconnect)
            return in_group == digest
        if self._inflight_known is None:  # read once, at the first redelivery
            known: dict[int, tuple[int, bytes]] = {}
            for seq, entries in self.store.conn.execute(
                "SELECT seq, entries FROM inflight ORDER BY seq"
            ):
                raw = bytes(entries)
                first = seq - len(raw) // _ENTRY + 1
                for k, i in enumerate(range(0, len(raw) - _ENTRY + 1, _ENTRY)):
                    mid_i = int.from_bytes(raw[i : i + 2], "big")
                    known[mid_i] = (first + k, raw[i + 2 : i + _ENTRY])
            self._inflight_known = known
        entry = self._inflight_known.get(mid)
        return (
            entry is not None
            and entry[0] > self._inflight_seq - INFLIGHT_KEEP
            and entry[1] == digest
        )

    def _replayed(self, a: Arrival) -> bool:
        """True if ``a`` (stamped on arrival) is the broker replaying retained state,
        not a new reading. ``retained = "once"``: the last value of each topic is
        remembered (in the caller's transaction), and a retained message with that
        value is a replay; a new value is stored once."""
        assert a.msg is not None
        policy = self._retained_policy.get(a.source, "skip")
        if policy == "skip":
            return bool(a.msg.retain)
        digest = buffer.message_digest(a.topic, a.payload)
        row = self.store.conn.execute(
            "SELECT digest FROM retained WHERE topic = ?", (a.topic,)
        ).fetchone()
        if a.msg.retain and row is not None and bytes(row[0]) == digest:
            return True
        if row is None or bytes(row[0]) != digest:
            self.store.conn.execute(
                "INSERT OR REPLACE INTO retained(topic, digest) VALUES (?, ?)", (a.topic, digest)
            )
        return False

    def _add_dropped(self, n: int) -> None:
        self._dropped_held += n

    def _storage_failed(self, exc: BaseException, held: int) -> None:
        self._failures += 1
        delay = min(RETRY_MAX_S, 0.25 * 2 ** min(self._failures, 8))
        self._retry_at = time.monotonic() + delay
        log.error(
            "intake: the buffer cannot take %d messages (%s); they stay unacknowledged, "
            "retrying in %.1f s (attempt %d)",
            held,
            exc,
            delay,
            self._failures,
        )

    def _done(self, group: list[Arrival], results: list[Outcome]) -> None:
        """After the commit: forget the group, log, and PUBACK in arrival order."""
        if group and group[0].msg is not None:
            del self._pending[: len(group)]
        if self._failures:
            log.info("intake: the buffer takes messages again after %d failures", self._failures)
        self._failures = 0
        self._retry_at = 0.0
        for a in group:
            if isinstance(a.item, WireError) and a.source != COPY:
                log.warning("intake: quarantined message on %s: %s", a.topic, a.item)
            elif isinstance(a.item, Decoded) and a.item.rejects:
                first = a.item.rejects[0]
                log.warning(
                    "intake: quarantined %d lines or parts of the message on %s, the first: %s: %s",
                    a.item.rejected,
                    a.topic,
                    first.reason,
                    first.message,
                )
            if a.msg is not None:
                # Only after the commit above: now the broker may forget the message.
                self.client.ack(a.msg.mid, a.msg.qos)

    def _log_drops(self, chunk: ReadingChunk, res: buffer.StoreResult) -> None:
        if res.future:
            # a wrong clock holds every message: one line per HELD_LOG_EVERY_S
            self._held_unlogged += res.future
            now = time.monotonic()
            if now >= self._held_log_at:
                self._held_log_at = now + HELD_LOG_EVERY_S
                offset = self.offset_ns()
                log.warning(
                    "intake: held %d readings (the last of %s/%s) stamped more than %.0f s "
                    "ahead of the clock%s, until it allows them (edge-agent status: "
                    "held_readings; is the device's clock behind?)",
                    self._held_unlogged,
                    chunk.node,
                    chunk.sensor,
                    self.cfg.window.max_future_s,
                    f" corrected by {offset / 1e9:+.1f} s" if offset else "",
                )
                self._held_unlogged = 0
        if res.late:
            log.warning(
                "intake: dropped %d late readings of %s/%s (windows closed, and too old "
                "for a revision or revisions are off)",
                res.late,
                chunk.node,
                chunk.sensor,
            )

    def _alert_hook(self, node: str, sensor: str) -> Callable[[Any, Any], None] | None:
        """Rules for this sensor, evaluated inside the transaction that stores its readings."""
        if f"{node}/{sensor}" not in self.alerts.by_sensor:
            return None

        def hook(ts: Any, vals: Any) -> None:
            events = self.alerts.evaluate(self.store, node, sensor, ts.tolist(), vals.tolist())
            if events:
                alerts.record(self.store, events)
                for ev in events:
                    log.warning("alert %s %s: %s", ev.rule, ev.state, ev.message)

        return hook
