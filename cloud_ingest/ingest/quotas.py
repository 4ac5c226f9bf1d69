"""What one device may cost the fleet: per-device quotas, checked before anything costs.

A device authenticated at the broker can still be hostile, or run buggy firmware
that does the same by accident: a sensor name with a counter or a MAC in it, a
clock that boots in 1970, a flood. Without bounds, one such device fills
InfluxDB's series limits (after which every device's new sensors are refused),
makes thousands of lake objects and InfluxDB shards, or holds every other
device's acks behind its flood. Each bound here is per device, in ``[quotas]``
(docs/cloud-ingest.md, "What one device can cost the fleet"):

* **rate**: at most ``max_messages_per_s`` messages, bursts of
  ``burst_messages``. Beyond that a message is *deferred* before it is decoded:
  acknowledged to the broker, not answered, so that the device sends it again
  after its ack timeout (a real agent backs off). It costs a topic split.
* **time**: a window (or alert) that starts more than ``max_past_s`` before the
  ingestor's clock (tie it to InfluxDB's retention), more than ``max_future_s``
  after it, or a batch whose windows span more than ``max_batch_span_s``, is
  quarantined (``time-too-old``, ``time-too-new``, ``time-span``).
* **sensors in a batch**: more than ``max_sensors_per_batch`` in its header:
  quarantined (``quota-sensors``).
* **series**: an InfluxDB series is (device, node, sensor, unit, window, the
  static tags written as tags). A device may have ``max_series_per_device``
  series seen within ``series_expiry_s``, at most ``max_new_series_per_day`` of
  them new on one UTC day, and at most ``max_tag_values`` values of its ``unit``
  and of each static tag written to InfluxDB. Windows of series over a bound are
  left out and the batch is quarantined with the reason (``quota-series``,
  ``quota-new-series``, ``quota-tag-values``); its other windows are written and
  the device told ``stored`` with that reason, so that a firmware that invents a
  sensor name per message keeps its real sensors.
* **quarantine**: at most ``max_quarantined_per_min`` quarantine entries are
  kept per device a minute; beyond that they are counted, not kept.

The series each device has are remembered in memory and, with ``state_file``,
in a small SQLite file, so that a restart neither forgets them (a hostile
device would get a new allowance) nor takes a device's known series for new
ones. All devices' series together are bounded by ``max_tracked_series``:
beyond that a new series is deferred (the device sends it again later), since
that bound is this process's state, not the device's fault. With several
ingestors sharing the load each keeps its own record: a device can then reach
at most that many times the bounds.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from cloud_ingest.config import QuotasConfig
from shared.errors import StorageError, WireError
from shared.wire import Batch, SensorRef, WindowSpec, take_rows

log = logging.getLogger(__name__)

DAY_S = 86_400
#: quota reasons a message is quarantined for (shared/errors.py lists them all)
TIME_TOO_OLD, TIME_TOO_NEW, TIME_SPAN = "time-too-old", "time-too-new", "time-span"
SENSORS, SERIES, NEW_SERIES, TAG_VALUES = (
    "quota-sensors",
    "quota-series",
    "quota-new-series",
    "quota-tag-values",
)
#: why a message is deferred (acknowledged to the broker, not answered)
DEFER_RATE, DEFER_TRACKED = "rate", "series-table-full"

#: devices remembered; beyond it, those without a series (a rate bucket and a
#: quarantine bucket each) are forgotten. Those with series are bounded by
#: max_tracked_series.
MAX_DEVICES = 100_000

#: the tags of a series that have a value bound: the unit, and each static tag
TagValues = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Checked:
    """What :meth:`Quotas.check_batch` makes of a batch: the batch to write (all of
    it, part of it, or None), why (part of) it is quarantined, or why it is deferred."""

    batch: Batch | None
    error: WireError | None = None
    defer: str | None = None
    #: windows left out of ``batch`` (of series over a bound)
    refused_rows: int = 0


@dataclass
class _Series:
    last_day: int
    tags: TagValues


@dataclass
class _Device:
    series: dict[int, _Series] = field(default_factory=dict)
    new_day: int = -1
    new_count: int = 0
    #: tag -> value -> series with it
    tags: dict[str, Counter[str]] = field(default_factory=dict)
    tokens: float = -1.0  # rate bucket; -1: full
    stamp: float = 0.0
    q_tokens: float = -1.0  # quarantine bucket
    q_stamp: float = 0.0

    def count_tags(self, values: TagValues, delta: int) -> None:
        for tag, value in values:
            c = self.tags.setdefault(tag, Counter())
            c[value] += delta
            if c[value] <= 0:
                del c[value]


@functools.lru_cache(maxsize=65536)  # a device's sensors come in every batch
def series_key(ref: SensorRef, window: WindowSpec, tag_keys: frozenset[str]) -> int:
    """A stable 63-bit number for the InfluxDB series of ``ref``'s windows (the same
    in every process: it is stored in ``state_file``)."""
    text = "\0".join(
        (
            ref.node,
            ref.name,
            ref.unit,
            str(window.width_ns),
            str(window.hop_ns if window.kind == "hopping" else 0),
            *(f"{k}={v}" for k, v in ref.tags if k in tag_keys),
        )
    )
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 1


def tag_values(ref: SensorRef, tag_keys: frozenset[str]) -> TagValues:
    out = [("unit", ref.unit)] if ref.unit else []
    out += [(k, v) for k, v in ref.tags if k in tag_keys]
    return tuple(out)


class Quotas:
    """The quotas of every device; thread-safe (decoding runs in worker threads)."""

    def __init__(
        self,
        cfg: QuotasConfig,
        tag_keys: frozenset[str],
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.tag_keys = tag_keys
        self._mono = monotonic
        self._wall = wall
        self._lock = threading.Lock()
        self._devices: dict[str, _Device] = {}
        self.tracked = 0
        self._day = self._today()
        self.state_errors = 0
        self._error_logged = float("-inf")
        self._db: sqlite3.Connection | None = None
        if cfg.state_file:
            try:
                self._db = _open_state(cfg.state_file)
                self._load()
            except sqlite3.Error as exc:
                raise StorageError(f"quotas.state_file {cfg.state_file}: {exc}") from None

    # ---- time and rate --------------------------------------------------------------

    def admit(self, device: str) -> bool:
        """A message of ``device`` may be decoded now (its rate bucket has a token)."""
        with self._lock:
            d = self._device(device)
            now = self._mono()
            rate, burst = self.cfg.max_messages_per_s, float(self.cfg.burst_messages)
            d.tokens = burst if d.tokens < 0 else min(burst, d.tokens + (now - d.stamp) * rate)
            d.stamp = now
            if d.tokens < 1.0:
                return False
            d.tokens -= 1.0
            return True

    def keep_quarantined(self, device: str | None) -> bool:
        """A quarantine entry of ``device`` may be kept (at most
        ``max_quarantined_per_min`` a minute per device; without a device, always)."""
        if device is None:
            return True
        with self._lock:
            d = self._device(device)
            now = self._mono()
            per_min = float(self.cfg.max_quarantined_per_min)
            if d.q_tokens < 0:
                d.q_tokens = per_min
            else:
                d.q_tokens = min(per_min, d.q_tokens + (now - d.q_stamp) * per_min / 60.0)
            d.q_stamp = now
            if d.q_tokens < 1.0:
                return False
            d.q_tokens -= 1.0
            return True

    def check_time(self, ts_min: int, ts_max: int, now_ns: int, what: str) -> WireError | None:
        """The time bounds, for an alert's or a report's time or a batch's windows."""
        cfg = self.cfg
        if ts_min < now_ns - int(cfg.max_past_s * 1e9):
            return WireError(
                TIME_TOO_OLD,
                f"{what} starts {(now_ns - ts_min) / 1e9 / DAY_S:.1f} days before the "
                f"ingestor's clock; quotas.max_past_s is {cfg.max_past_s:g} s",
            )
        if ts_max > now_ns + int(cfg.max_future_s * 1e9):
            return WireError(
                TIME_TOO_NEW,
                f"{what} starts {(ts_max - now_ns) / 1e9:.0f} s after the ingestor's clock; "
                f"quotas.max_future_s is {cfg.max_future_s:g} s",
            )
        return None

    # ---- batches ---------------------------------------------------------------------

    def check_batch(self, batch: Batch, now_ns: int) -> Checked:
        cfg = self.cfg
        if len(batch.sensors) > cfg.max_sensors_per_batch:
            return Checked(
                None,
                WireError(
                    SENSORS,
                    f"{len(batch.sensors)} sensors in one batch; quotas.max_sensors_per_batch "
                    f"is {cfg.max_sensors_per_batch}",
                ),
            )
        if not batch.rows:
            return Checked(batch)
        lo, hi = int(batch.start_ns.min()), int(batch.start_ns.max())
        error = self.check_time(lo, hi, now_ns, "a window")
        if error is None and hi - lo > int(cfg.max_batch_span_s * 1e9):
            error = WireError(
                TIME_SPAN,
                f"its windows span {(hi - lo) / 1e9:.0f} s; quotas.max_batch_span_s is "
                f"{cfg.max_batch_span_s:g} s",
            )
        if error is not None:
            return Checked(None, error)
        return self._check_series(batch)

    def _check_series(self, batch: Batch) -> Checked:
        used = np.unique(batch.sensor).tolist()
        refused: dict[int, str] = {}  # sensor index -> reason
        defer = False
        new: list[tuple[int, _Series]] = []
        touched: list[int] = []
        with self._lock:
            self._roll_day()
            d = self._device(batch.device_id)
            if d.new_day != self._day:
                d.new_day, d.new_count = self._day, 0
            for sidx in used:
                ref = batch.sensors[sidx]
                key = series_key(ref, batch.window, self.tag_keys)
                known = d.series.get(key)
                if known is not None:
                    if known.last_day != self._day:
                        known.last_day = self._day
                        touched.append(key)
                    continue
                why = self._over(d, tag_values(ref, self.tag_keys))
                if why is not None:
                    refused[sidx] = why
                    continue
                if self.tracked >= self.cfg.max_tracked_series:
                    defer = True
                    break
                s = _Series(self._day, tag_values(ref, self.tag_keys))
                d.series[key] = s
                d.count_tags(s.tags, 1)
                d.new_count += 1
                self.tracked += 1
                new.append((key, s))
            self._save(batch.device_id, new, touched)
        if defer:
            log.error(
                "quotas: %d series tracked, quotas.max_tracked_series: new series are "
                "deferred until the limit is raised or series expire",
                self.tracked,
            )
            return Checked(None, defer=DEFER_TRACKED)
        if not refused:
            return Checked(batch)
        mask = ~np.isin(batch.sensor, np.fromiter(refused, dtype=np.int64))
        reason = Counter(refused.values()).most_common(1)[0][0]
        names = ", ".join(
            f"{batch.sensors[i].node}/{batch.sensors[i].name}" for i in list(refused)[:3]
        )
        error = WireError(
            reason,
            f"{len(refused)} new series over the device's quota ({names}"
            f"{', …' if len(refused) > 3 else ''}): {int((~mask).sum())} of "
            f"{batch.rows} windows left out",
        )
        if not mask.any():
            return Checked(None, error, refused_rows=batch.rows)
        return Checked(take_rows(batch, mask), error, refused_rows=int((~mask).sum()))

    def _over(self, d: _Device, values: TagValues) -> str | None:
        """Why a new series of ``d`` with these tag values is over a bound, or None."""
        cfg = self.cfg
        if len(d.series) >= cfg.max_series_per_device:
            return SERIES
        if d.new_count >= cfg.max_new_series_per_day:
            return NEW_SERIES
        for tag, value in values:
            seen = d.tags.get(tag)
            if seen is not None and value not in seen and len(seen) >= cfg.max_tag_values:
                return TAG_VALUES
        return None

    # ---- state ---------------------------------------------------------------------

    def _device(self, device: str) -> _Device:
        d = self._devices.get(device)
        if d is None:
            if len(self._devices) >= MAX_DEVICES:
                # only rate and quarantine buckets: forgetting one refills it, no more
                for name in [n for n, v in self._devices.items() if not v.series]:
                    del self._devices[name]
            d = self._devices[device] = _Device()
        return d

    def _today(self) -> int:
        return int(self._wall() // DAY_S)

    def _expiry_days(self) -> int:
        return max(1, int((self.cfg.series_expiry_s or self.cfg.max_past_s) // DAY_S))

    def _roll_day(self) -> None:
        """On a new UTC day, forget the series not seen within the expiry."""
        today = self._today()
        if today == self._day:
            return
        self._day = today
        oldest = today - self._expiry_days()
        gone = 0
        for name in list(self._devices):
            d = self._devices[name]
            for key in [k for k, s in d.series.items() if s.last_day < oldest]:
                d.count_tags(d.series.pop(key).tags, -1)
                gone += 1
        self.tracked -= gone
        self._write("DELETE FROM series WHERE last_day < ?", [(oldest,)])
        if gone:
            log.info("quotas: %d series not seen for %d days forgotten", gone, self._expiry_days())

    def _save(self, device: str, new: list[tuple[int, _Series]], touched: list[int]) -> None:
        if new:
            self._write(
                "INSERT OR REPLACE INTO series(device, key, first_day, last_day, tags) "
                "VALUES (?, ?, ?, ?, ?)",
                [(device, k, s.last_day, s.last_day, _tags_text(s.tags)) for k, s in new],
            )
        if touched:
            self._write(
                "UPDATE series SET last_day = ? WHERE device = ? AND key = ?",
                [(self._day, device, k) for k in touched],
            )

    def _write(self, sql: str, rows: list[tuple[object, ...]]) -> None:
        """One transaction on the state file. It is a record, not the data: a failure
        (a full disk) is logged and the quotas go on from memory."""
        db = self._db
        if db is None:
            return
        try:
            db.execute("BEGIN")
            try:
                db.executemany(sql, rows)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            self.state_errors += 1
            now = self._mono()
            if now >= self._error_logged + 60:
                self._error_logged = now
                log.error(
                    "quotas: cannot write %s (%s); the quotas go on from memory, and a "
                    "restart would forget what was not written (%d failures)",
                    self.cfg.state_file,
                    exc,
                    self.state_errors,
                )

    def _load(self) -> None:
        assert self._db is not None
        oldest = self._today() - self._expiry_days()
        for device, key, first_day, last_day, tags in self._db.execute(
            "SELECT device, key, first_day, last_day, tags FROM series WHERE last_day >= ?",
            (oldest,),
        ):
            d = self._device(device)
            s = _Series(int(last_day), _tags_parse(tags))
            d.series[int(key)] = s
            d.count_tags(s.tags, 1)
            if first_day == self._day:
                d.new_day = self._day
                d.new_count += 1
            self.tracked += 1
        log.info(
            "quotas: %d series of %d devices from %s", self.tracked, len(self._devices),
            self.cfg.state_file,
        )  # fmt: skip

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def _tags_text(values: TagValues) -> str:
    return "\0".join(f"{k}={v}" for k, v in values)


def _tags_parse(text: str | None) -> TagValues:
    if not text:
        return ()
    return tuple((k, v) for k, _, v in (item.partition("=") for item in str(text).split("\0")))


def _open_state(path: str) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute(
        "CREATE TABLE IF NOT EXISTS series (device TEXT NOT NULL, key INTEGER NOT NULL, "
        "first_day INTEGER NOT NULL, last_day INTEGER NOT NULL, tags TEXT NOT NULL, "
        "PRIMARY KEY (device, key)) WITHOUT ROWID"
    )
    return db
