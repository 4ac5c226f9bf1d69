"""The agent's SQLite file: connection, schema migrations, state and counters.

One file holds everything the agent must not lose: raw reading chunks
(:mod:`edge_agent.buffer`), the outbox of encoded batches
(:mod:`edge_agent.outbox`), small integer state (watermarks, the next seq) and
counters (readings stored, drops by kind). Each thread opens its own
:class:`Store`; writers take ``BEGIN IMMEDIATE`` so that SQLite serialises
them, which is what makes "close windows up to T" and "store a chunk that might
be late" safe against each other.

The schema is created and migrated with sqlite-utils; ``PRAGMA user_version``
holds the schema version, and ``MIGRATIONS[i]`` moves a file from version ``i``
to ``i + 1``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlite_utils

from shared.errors import StorageError


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


def _v4(db: sqlite_utils.Database) -> None:
    """Alerts: events waiting for the cloud's ack (same life as outbox batches), and
    which rules are raised."""
    db.table("alerts").create(
        {
            "seq": int,
            "created_ns": int,
            "payload": bytes,
            "state": str,
            "sent_ns": int,
            "attempts": int,
            "next_try_ns": int,
        },
        pk="seq",
        defaults={"attempts": 0, "next_try_ns": 0},
    )
    db.table("alert_state").create({"rule": str, "raised": int, "since_ns": int}, pk="rule")


#: MIGRATIONS[i] upgrades schema version i to i + 1.
MIGRATIONS: list[Callable[[sqlite_utils.Database], None]] = [_v1, _v2, _v3, _v4]
SCHEMA_VERSION = len(MIGRATIONS)


class Store:
    """One connection to the agent's SQLite file."""

    def __init__(self, path: str | Path, *, synchronous: str = "full", readonly: bool = False):
        self.path = str(path)
        try:
            if readonly:
                uri = f"file:{Path(path).resolve()}?mode=ro"
                self.conn = sqlite3.connect(
                    uri, uri=True, isolation_level=None, check_same_thread=False, timeout=30
                )
            else:
                self.conn = sqlite3.connect(
                    self.path, isolation_level=None, check_same_thread=False, timeout=30
                )
                self.conn.execute("PRAGMA journal_mode=WAL")
                self.conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self.conn.execute("PRAGMA foreign_keys=ON")
            self.db = sqlite_utils.Database(self.conn)
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
            for i in range(version, SCHEMA_VERSION):
                MIGRATIONS[i](self.db)
            self.conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (``BEGIN IMMEDIATE``): commit on success, else roll back."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def get_state(self, key: str, default: int = 0) -> int:
        row = self.conn.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return default if row is None else int(row[0])

    def set_state(self, key: str, value: int) -> None:
        self.conn.execute(
            "INSERT INTO state(key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def add_counter(self, name: str, delta: int) -> None:
        if delta:
            self.conn.execute(
                "INSERT INTO counters(name, value) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                (name, delta),
            )

    def counters(self) -> dict[str, int]:
        return {str(n): int(v) for n, v in self.conn.execute("SELECT name, value FROM counters")}

    def close(self) -> None:
        self.conn.close()
