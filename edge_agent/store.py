"""The agent's SQLite file: connection, schema migrations, state and counters.

One file holds everything the agent must not lose: raw reading chunks
(:mod:`edge_agent.pipeline.buffer`), the outbox of encoded batches
(:mod:`edge_agent.pipeline.outbox`), small integer state (watermarks, the next seq) and
counters (readings stored, drops by kind). Each thread opens its own
:class:`Store`; writers take ``BEGIN IMMEDIATE`` so that SQLite serialises
them, which is what makes "close windows up to T" and "store a chunk that might
be late" safe against each other.

The schema is created and migrated with sqlite-utils; ``PRAGMA user_version``
holds the schema version, and ``MIGRATIONS[i]`` moves a file from version ``i``
to ``i + 1``. Every table's rows are counted in ``row_counts`` by triggers that
:func:`count_rows` puts on whatever tables the schema has after the migrations,
so that ``buffer repair`` can say exactly how many rows of each table it could
not keep, even rows on pages it cannot read at all.

In-memory state that mirrors the file (the sensor id cache, the alert rules'
state) follows the transaction: code that changes it inside a transaction
registers an undo with :meth:`Store.on_rollback`, which runs if the
transaction does not commit. A transaction that fails on SQLite's side (a full
disk, an I/O error) is counted, and the count becomes the durable counter
``store_errors`` in the next transaction that commits.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from edge_agent import counters
from shared.errors import StorageError

if TYPE_CHECKING:  # imported by _migrate only: a running agent never needs it
    import sqlite_utils


def _sqlite_utils() -> ModuleType:
    """sqlite-utils, imported only to migrate, and without pandas: it imports pandas
    wherever pandas is installed (for DataFrame inserts, which the agent never
    makes), and pandas brings pyarrow, 100 MB of a device's memory for good."""
    hide = "pandas" not in sys.modules
    if hide:
        sys.modules["pandas"] = None  # type: ignore[assignment]  # import pandas fails
    try:
        import sqlite_utils
    finally:
        if hide:
            del sys.modules["pandas"]
    return sqlite_utils


def _v1(db: sqlite_utils.Database) -> None:
    db.table("sensors").create(
        {"id": int, "node": str, "name": str, "unit": str}, pk="id", not_null={"node", "name"}
    )
    db.table("sensors").create_index(["node", "name"], unique=True)
    db.table("chunks").create(
        {
            "id": int,
            "sensor_id": int,
            "t_min": int,
            "t_max": int,
            "n": int,
            "ts": bytes,
            "vals": bytes,
            "received_ns": int,
        },
        pk="id",
        foreign_keys=[("sensor_id", "sensors", "id")],
    )
    db.table("chunks").create_index(["t_max"])
    db.table("outbox").create(
        {
            "seq": int,
            "created_ns": int,
            "windows": int,
            "readings": int,
            "payload": bytes,
            "state": str,
            "sent_ns": int,
        },
        pk="seq",
    )
    db.table("outbox").create_index(["state", "seq"])
    # Digests of the messages already stored: a message the broker redelivers (the
    # agent died after its commit, before its PUBACK) is recognised and not stored twice.
    db.table("received").create({"digest": bytes, "received_ns": int}, pk="digest")
    db.table("received").create_index(["received_ns"])
    db.table("state").create({"key": str, "value": int}, pk="key")
    db.table("counters").create({"name": str, "value": int}, pk="name")
    db.table("quarantine").create(
        {
            "id": int,
            "received_ns": int,
            "topic": str,
            "reason": str,
            "message": str,
            "payload": bytes,
        },
        pk="id",
    )


def _v2(db: sqlite_utils.Database) -> None:
    """End-to-end acks: a sent batch is resent when ``next_try_ns`` passes without an ack."""
    outbox = db.table("outbox")
    outbox.add_column("attempts", int, not_null_default=0)
    outbox.add_column("next_try_ns", int, not_null_default=0)


def _v3(db: sqlite_utils.Database) -> None:
    """Late data: windows to revise, and how often each window was revised."""
    db.table("dirty").create({"sensor_id": int, "start_ns": int}, pk=("sensor_id", "start_ns"))
    db.table("revisions").create(
        {"sensor_id": int, "start_ns": int, "revision": int}, pk=("sensor_id", "start_ns")
    )


#: The columns of what is sent and acknowledged like a batch (alerts, health reports).
_SENT_LIKE_BATCHES = {
    "seq": int,
    "created_ns": int,
    "payload": bytes,
    "state": str,
    "sent_ns": int,
    "attempts": int,
    "next_try_ns": int,
}
_SENT_DEFAULTS = {"attempts": 0, "next_try_ns": 0}


def _v4(db: sqlite_utils.Database) -> None:
    """Alerts: events waiting for the cloud's ack (same life as outbox batches), and
    which rules are raised."""
    db.table("alerts").create(_SENT_LIKE_BATCHES, pk="seq", defaults=_SENT_DEFAULTS)
    db.table("alert_state").create({"rule": str, "raised": int, "since_ns": int}, pk="rule")


def _v5(db: sqlite_utils.Database) -> None:
    """Revisions in order: ``revisions`` records every window version sent (from
    revision 0) and the batch that carries it, and ``outbox_after`` says which batch
    waits for which: a later version of a window leaves only after the batch with
    the earlier one is acknowledged (or dropped). Deleting either batch deletes the
    pair. And a CRC-32 of every BLOB that may spill onto overflow pages (raw chunks,
    batch and alert payloads), which SQLite itself does not check: ``buffer check``
    and ``repair`` find a damaged one instead of passing it on (NULL in older rows)."""
    db.table("revisions").add_column("seq", int, not_null_default=0)
    for table in ("chunks", "outbox", "alerts"):
        db.table(table).add_column("crc", int)
    db.conn.execute(
        "CREATE TABLE outbox_after ("
        " seq INTEGER NOT NULL REFERENCES outbox(seq) ON DELETE CASCADE,"
        " after INTEGER NOT NULL REFERENCES outbox(seq) ON DELETE CASCADE,"
        " PRIMARY KEY (seq, after))"
    )
    db.conn.execute("CREATE INDEX outbox_after_after ON outbox_after(after)")
    db.conn.execute("CREATE TABLE row_counts (name TEXT PRIMARY KEY, n INTEGER NOT NULL)")


def _v6(db: sqlite_utils.Database) -> None:
    """Health reports waiting for the cloud's ack (edge_agent/pipeline/health.py): the same
    life, and the same columns, as alerts."""
    db.table("health").create({**_SENT_LIKE_BATCHES, "crc": int}, pk="seq", defaults=_SENT_DEFAULTS)


#: state: the buffer's generation (docs/wire-format.md §2.3), drawn when it is made
GENERATION = "generation"
#: state: a random number in the intake's default client id, so that no other local
#: client can take over its persistent session (and the readings queued in it)
INTAKE_SESSION = "intake_session"


def new_generation() -> int:
    """A random generation in [1, 2^63): a buffer made again (a new SD card, a
    repair) never shares one with the buffer before it."""
    return secrets.randbelow(2**63 - 1) + 1


def _v7(db: sqlite_utils.Database) -> None:
    """Generations: the buffer's own (state ``generation``), and each unacknowledged
    message's (0 in rows from before it), which its ack must name. The intake's
    session name (state ``intake_session``, edge_agent/pipeline/intake.py). And ``held``:
    readings stamped further ahead than the device's clock allows, kept until it
    does (edge_agent/pipeline/held.py) instead of being dropped."""
    for table in ("outbox", "alerts", "health"):
        db.table(table).add_column("generation", int, not_null_default=0)
    for key in (GENERATION, INTAKE_SESSION):
        db.conn.execute(
            "INSERT OR IGNORE INTO state(key, value) VALUES (?, ?)", (key, new_generation())
        )
    db.table("held").create(
        {
            "id": int,
            "node": str,
            "sensor": str,
            "unit": str,
            "n": int,
            "t_min": int,
            "t_max": int,
            "ts": bytes,
            "vals": bytes,
            "received_ns": int,
            "crc": int,
        },
        pk="id",
        not_null={"node", "sensor", "unit", "n", "t_min", "t_max", "ts", "vals"},
    )
    db.table("held").create_index(["t_max"])


def _v8(db: sqlite_utils.Database) -> None:
    """``inflight``: per committed group, the packet identifiers and digests (topic
    and payload) of its messages stamped on arrival, so that the broker's
    redelivery of one (DUP set, the same identifier) after a crash between the
    commit and its PUBACK is recognised (edge_agent/pipeline/intake.py); ``seq``
    numbers the group's last message. And ``retained``: the digest of the last
    value stored per topic, for sources with ``retained = "once"``."""
    db.conn.execute("CREATE TABLE inflight (seq INTEGER PRIMARY KEY, entries BLOB NOT NULL)")
    db.conn.execute("CREATE TABLE retained (topic TEXT PRIMARY KEY, digest BLOB NOT NULL)")


def _v9(db: sqlite_utils.Database) -> None:
    """Commands (edge_agent/pipeline/commands.py): ``commands`` remembers every
    command id the agent has answered, until the command expires, so that each runs
    once across restarts; ``results`` holds the answers until the cloud acks them
    (the same life, and the same columns, as alerts)."""
    db.table("results").create(
        {**_SENT_LIKE_BATCHES, "crc": int, "generation": int},
        pk="seq",
        defaults=_SENT_DEFAULTS,
        not_null={"generation"},
    )
    db.conn.execute(
        "CREATE TABLE commands (id TEXT PRIMARY KEY, kind TEXT NOT NULL, status TEXT NOT NULL,"
        " received_ns INTEGER NOT NULL, expires_ns INTEGER NOT NULL, result_seq INTEGER)"
    )


def _v10(db: sqlite_utils.Database) -> None:
    """Raw readings an operator asked for (edge_agent/pipeline/rawdata.py): messages
    of docs/wire-format.md §2.13 waiting for the cloud's ack, the same life as
    results; ``readings`` counts what each carries. And ``captures``: the spans of
    raw readings around alerts waiting to be sent (edge_agent/pipeline/captures.py)."""
    db.table("raw").create(
        {**_SENT_LIKE_BATCHES, "crc": int, "generation": int, "readings": int},
        pk="seq",
        defaults={**_SENT_DEFAULTS, "readings": 0},
        not_null={"generation"},
    )
    # the tumbling windows' width from each time on (edge_agent/pipeline/window.py
    # adopt_width): a width changed in the config takes effect at a boundary of both
    db.conn.execute(
        "CREATE TABLE window_widths (from_ns INTEGER PRIMARY KEY, width_ns INTEGER NOT NULL)"
    )
    # captures around alerts (edge_agent/pipeline/captures.py): at most one per rule
    db.conn.execute(
        "CREATE TABLE captures (id TEXT PRIMARY KEY, rule TEXT NOT NULL UNIQUE, node TEXT NOT NULL,"
        " sensor TEXT NOT NULL, start_ns INTEGER NOT NULL, end_ns INTEGER NOT NULL,"
        " after_s REAL NOT NULL, gone_ns INTEGER NOT NULL)"
    )


#: MIGRATIONS[i] upgrades schema version i to i + 1.
MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [
    _v1,
    _v2,
    _v3,
    _v4,
    _v5,
    _v6,
    _v7,
    _v8,
    _v9,
    _v10,
]
SCHEMA_VERSION = len(MIGRATIONS)
ROW_COUNTS = "row_counts"
LAST_STORE_ERROR = "last_store_error_ns"  # state: when the last one failed


def crc(*blobs: bytes) -> int:
    """CRC-32 of the BLOBs one after the other (the ``crc`` columns)."""
    value = 0
    for blob in blobs:
        value = zlib.crc32(blob, value)
    return value


def data_tables(conn: sqlite3.Connection) -> list[str]:
    """The tables of the schema as the file says, but for SQLite's own and ``row_counts``."""
    return [
        str(n)
        for (n,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
            "AND name != ? ORDER BY name",
            (ROW_COUNTS,),
        )
    ]


def count_rows(conn: sqlite3.Connection) -> None:
    """Give every table of the schema its row count and the triggers that keep it.

    Run after every migration, so that a table a later migration adds is counted
    without anyone remembering to. Triggers fire for deletes by ON DELETE CASCADE
    and (with ``recursive_triggers``, which :class:`Store` turns on) by REPLACE.
    """
    for table in data_tables(conn):
        conn.execute(
            f"INSERT OR IGNORE INTO {ROW_COUNTS}(name, n) SELECT ?, count(*) FROM [{table}]",
            (table,),
        )
        for op, delta in (("INSERT", "+ 1"), ("DELETE", "- 1")):
            conn.execute(
                f"CREATE TRIGGER IF NOT EXISTS [{ROW_COUNTS}_{table}_{op.lower()}] "
                f"AFTER {op} ON [{table}] BEGIN "
                f"UPDATE {ROW_COUNTS} SET n = n {delta} WHERE name = '{table}'; END"
            )


def _create_private(path: Path) -> None:
    """Create the buffer file readable by its owner only (0600), if it is not there.
    SQLite gives its -wal and -shm files the mode of the database file, so they
    are private too: the buffer holds every reading of the site."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return
    except OSError:
        return  # a missing folder and the like: sqlite3.connect says so next
    os.close(fd)


class Store:
    """One connection to the agent's SQLite file."""

    def __init__(self, path: str | Path, *, synchronous: str = "full", readonly: bool = False):
        self.path = str(path)
        if Path(path).is_dir():
            raise StorageError(f"cannot use the buffer {path}: it is a directory, not a file")
        try:
            if readonly:
                uri = f"file:{Path(path).resolve()}?mode=ro"
                self.conn = sqlite3.connect(
                    uri, uri=True, isolation_level=None, check_same_thread=False, timeout=30
                )
            else:
                if self.path != ":memory:":
                    _create_private(Path(path))
                self.conn = sqlite3.connect(
                    self.path, isolation_level=None, check_same_thread=False, timeout=30
                )
                self.conn.execute("PRAGMA journal_mode=WAL")
                self.conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self.conn.execute("PRAGMA foreign_keys=ON")
            self.conn.execute("PRAGMA recursive_triggers=ON")  # see count_rows
            self._undo: list[Callable[[], object]] | None = None  # set inside tx()
            # Inside tx(): counter increments and state values, written once, just
            # before COMMIT (a message's five counters and two states were seven
            # statements each; the benchmark of one-reading messages showed them).
            self._counts: dict[str, int] = {}
            self._states: dict[str, int] = {}
            self._dirty: set[str] = set()
            self.tx_serial = 0  # counts the transactions begun on this connection
            self.unrecorded_errors = 0
            self._last_error_ns = 0
            if not readonly:
                self._migrate()
        except sqlite3.Error as exc:
            raise StorageError(f"cannot use the buffer {self.path}: {exc}") from None

    def _migrate(self) -> None:
        with self.tx():
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StorageError(
                    f"{self.path} has schema version {version}; this agent knows up to "
                    f"{SCHEMA_VERSION}. Refusing to touch a file from a newer agent."
                )
            if version < SCHEMA_VERSION:
                db = _sqlite_utils().Database(self.conn)
            for i in range(version, SCHEMA_VERSION):
                MIGRATIONS[i](db)
            if version < SCHEMA_VERSION:
                count_rows(self.conn)
            self.conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (``BEGIN IMMEDIATE``): commit on success, else roll back.

        On a rollback, for any reason, the undos registered with :meth:`on_rollback`
        run (newest first). A failure of SQLite's own (``sqlite3.Error``: a full disk,
        an I/O error, a COMMIT that could not be written) is counted, and recorded as
        ``store_errors`` by the next transaction that commits.
        """
        if self._undo is not None:
            raise RuntimeError("Store.tx() does not nest")
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error:
            self._note_error()
            raise
        self._undo = []
        self.tx_serial += 1
        try:
            if self.unrecorded_errors:
                self.add_counter(counters.STORE_ERRORS, self.unrecorded_errors)
                self.set_state(LAST_STORE_ERROR, self._last_error_ns)
            yield self.conn
            self._write_deferred()
            self.conn.execute("COMMIT")
        except BaseException as exc:
            self._forget_deferred()
            undo, self._undo = self._undo, None
            if self.conn.in_transaction:  # SQLite may have rolled back already
                # If even this fails the connection is unusable, and the next BEGIN
                # raises (and is counted); the error that got us here is raised below.
                with suppress(sqlite3.Error):
                    self.conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                self._note_error()
            for fn in reversed(undo):
                fn()
            raise
        self._forget_deferred()
        self._undo = None
        self.unrecorded_errors = 0

    def _write_deferred(self) -> None:
        if self._counts:
            self.conn.executemany(
                "INSERT INTO counters(name, value) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                [(k, v) for k, v in self._counts.items() if v],
            )
        if self._dirty:
            self.conn.executemany(
                "INSERT INTO state(key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [(k, self._states[k]) for k in self._dirty],
            )

    def _forget_deferred(self) -> None:
        self._counts = {}
        self._states = {}
        self._dirty = set()

    def _note_error(self) -> None:
        self.unrecorded_errors += 1
        self._last_error_ns = time.time_ns()

    def on_rollback(self, undo: Callable[[], object]) -> None:
        """Run ``undo`` if the current transaction rolls back (call inside :meth:`tx`)."""
        if self._undo is None:
            raise RuntimeError("on_rollback outside a transaction: nothing could undo it")
        self._undo.append(undo)

    @property
    def in_tx(self) -> bool:
        """True inside :meth:`tx` (so between its BEGIN and its COMMIT or ROLLBACK)."""
        return self._undo is not None

    def get_state(self, key: str, default: int = 0) -> int:
        if self._undo is not None and key in self._states:
            return self._states[key]  # in a write transaction nobody else writes
        row = self.conn.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        if row is None:
            return default
        if self._undo is not None:
            self._states[key] = int(row[0])
        return int(row[0])

    def set_state(self, key: str, value: int) -> None:
        if self._undo is not None:  # written just before COMMIT
            self._states[key] = int(value)
            self._dirty.add(key)
            return
        self.conn.execute(
            "INSERT INTO state(key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def add_counter(self, name: counters.CounterName, delta: int) -> None:
        if delta and self._undo is not None:  # written just before COMMIT
            self._counts[name] = self._counts.get(name, 0) + delta
        elif delta:
            self.conn.execute(
                "INSERT INTO counters(name, value) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                (name, delta),
            )

    def counters(self) -> dict[str, int]:
        out = {str(n): int(v) for n, v in self.conn.execute("SELECT name, value FROM counters")}
        for k, v in self._counts.items():  # this transaction's, not yet written
            out[k] = out.get(k, 0) + v
        return out

    def close(self) -> None:
        self.conn.close()
