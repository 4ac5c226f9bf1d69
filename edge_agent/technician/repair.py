"""``buffer check`` and ``buffer repair``: integrity of the agent's SQLite file.

Both cover every table of the schema, as the schema itself lists them (the
tables of a file freshly created by this agent's migrations, and any other the
file has), so a table that a later migration adds cannot be missed.

check:  SQLite's own ``PRAGMA integrity_check``, then every row of every table:
        readable, and the agent's invariants (a raw chunk's BLOBs match its row
        count and time range, an outbox payload decodes and carries its seq);
        each table's rows against the count that the file's triggers keep
        (``row_counts``), so that rows on pages SQLite cannot reach are noticed
        too; and ``next_seq`` above every seq in the outbox.

repair: copies every row that can still be read, and that passes the checks
        above and the schema's constraints (a chunk of a sensor that was lost
        cannot be kept), into a fresh file with the current schema, then swaps it
        in. The report says, per table, how many rows the damaged file counted,
        how many were kept, and how many could not be kept: *dropped* (read, but
        unreadable in part or invalid) and *missing* (counted by the file, but on
        pages that could not be read at all). The damaged file and its WAL are
        kept beside it as ``<name>.damaged-<time>``; nothing is deleted. The agent
        must be stopped (the buffer's lock is taken for the whole repair). The
        repaired buffer starts a new generation (docs/wire-format.md §2.3), so
        that the cloud never takes its batches for the damaged one's even if the
        seq counter was lost (it then restarts from the clock in milliseconds).

SQLite's own ``.recover`` (in its command-line shell) would also read rows from
pages that the table's b-tree no longer reaches, but Debian 12's ``sqlite3``
(3.40.1) is built without the ``sqlite_dbpage`` table it needs and fails; the
row walk below uses only the library, and the row counts make its report exact.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent import counters
from edge_agent.lock import BufferLock
from edge_agent.pipeline import outbox, quarantine
from edge_agent.store import (
    GENERATION,
    INTAKE_SESSION,
    ROW_COUNTS,
    Store,
    crc,
    data_tables,
    new_generation,
)
from edge_agent.technician.status import open_readonly
from shared.errors import StorageError, WireError
from shared.wire import VERSIONS, decode_batch


def schema_tables() -> list[str]:
    """The tables of the current schema (a fresh file after every migration), with
    the tables that others reference first (the order rows are copied in)."""
    fresh = Store(":memory:")
    try:
        tables = data_tables(fresh.conn)
        refs = {
            t: {str(r[2]) for r in fresh.conn.execute(f"PRAGMA foreign_key_list([{t}])")} - {t}
            for t in tables
        }
    finally:
        fresh.close()
    ordered: list[str] = []
    while len(ordered) < len(tables):
        ready = [t for t in tables if t not in ordered and refs[t] <= set(ordered)]
        if not ready:
            raise RuntimeError(f"foreign keys form a cycle among {sorted(refs)}")
        ordered += ready
    return ordered


@dataclass
class CheckReport:
    problems: list[str] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


#: The BLOB columns each ``crc`` covers, per table.
CRC_OF = {
    "chunks": ("ts", "vals"),
    "outbox": ("payload",),
    "alerts": ("payload",),
    "health": ("payload",),
    "results": ("payload",),
    "raw": ("payload",),
    "held": ("ts", "vals"),
}


def _row_problem(table: str, row: dict[str, Any]) -> str | None:
    if table in CRC_OF and row.get("crc") is not None:
        blobs = [row[c] for c in CRC_OF[table]]
        if not all(isinstance(b, bytes) for b in blobs) or crc(*blobs) != row["crc"]:
            key = "id" if table in ("chunks", "held") else "seq"
            return f"{table} {key} {row[key]}: checksum mismatch (damaged data)"
    if table in ("chunks", "held"):
        what = "chunk" if table == "chunks" else "held chunk"
        n = row["n"]
        if not isinstance(n, int) or n < 0:
            return f"{what} {row['id']}: bad row count {n!r}"
        if not isinstance(row["ts"], bytes) or len(row["ts"]) != 8 * n:
            return f"{what} {row['id']}: ts BLOB does not hold {n} timestamps"
        if not isinstance(row["vals"], bytes) or len(row["vals"]) != 8 * n:
            return f"{what} {row['id']}: values BLOB does not hold {n} values"
        ts = np.frombuffer(row["ts"], "<i8")
        if n and (int(ts.min()) != row["t_min"] or int(ts.max()) != row["t_max"]):
            return f"{what} {row['id']}: t_min/t_max do not match its timestamps"
    if table == "outbox":
        try:
            b = decode_batch(bytes(row["payload"]), versions=VERSIONS)
        except (WireError, TypeError) as exc:
            return f"outbox seq {row['seq']}: payload does not decode: {exc}"
        if b.seq != row["seq"]:
            return f"outbox seq {row['seq']}: payload carries seq {b.seq}"
    return None


#: A rowid walk that hits a damaged page skips ahead by this much, doubling.
_SKIP_FIRST = 1


def _rowids(conn: sqlite3.Connection, table: str) -> list[int]:
    """Every rowid of ``table`` that SQLite can reach, past damaged pages."""
    try:
        return [int(r[0]) for r in conn.execute(f"SELECT rowid FROM [{table}] ORDER BY rowid")]
    except sqlite3.DatabaseError:
        pass  # a damaged page: walk the b-tree one seek at a time, skipping what fails
    ids: list[int] = []
    lo, skip = -(1 << 63), _SKIP_FIRST
    while lo < (1 << 63) - 1:
        try:
            r = conn.execute(f"SELECT min(rowid) FROM [{table}] WHERE rowid > ?", (lo,)).fetchone()
        except sqlite3.DatabaseError:
            lo = min(lo + skip, (1 << 63) - 1)
            skip *= 2
            continue
        if r is None or r[0] is None:
            break
        ids.append(int(r[0]))
        lo, skip = int(r[0]), _SKIP_FIRST
    return ids


def _rows(conn: sqlite3.Connection, table: str) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """Every reachable rowid of ``table`` with its row, or None where it cannot be read."""
    cols: list[str] | None = None
    for rid in _rowids(conn, table):
        try:
            cur = conn.execute(f"SELECT * FROM [{table}] WHERE rowid = ?", (rid,))
            values = cur.fetchone()
            cols = cols or [d[0] for d in cur.description]
        except sqlite3.DatabaseError:
            yield rid, None
            continue
        if values is not None:
            yield rid, dict(zip(cols, values, strict=True))


def _counted(conn: sqlite3.Connection) -> dict[str, int] | None:
    """Rows per table as the file's triggers counted them; None if unreadable."""
    try:
        return {str(n): int(c) for n, c in conn.execute(f"SELECT name, n FROM {ROW_COUNTS}")}
    except sqlite3.DatabaseError:
        return None


def _file_tables(conn: sqlite3.Connection, problems: list[str]) -> list[str]:
    try:
        return data_tables(conn)
    except sqlite3.DatabaseError as exc:
        problems.append(f"sqlite: the schema cannot be read: {exc}")
        return []


def check(path: str | Path, progress: Callable[[int], None] | None = None) -> CheckReport:
    rep = CheckReport()
    store = open_readonly(path)
    try:
        try:
            for (msg,) in store.conn.execute("PRAGMA integrity_check(100)"):
                if msg != "ok":
                    rep.problems.append(f"sqlite: {msg}")
        except sqlite3.DatabaseError as exc:
            rep.problems.append(f"sqlite: {exc}")
        in_file = _file_tables(store.conn, rep.problems)
        counted = _counted(store.conn)
        if counted is None:
            rep.problems.append(
                f"{ROW_COUNTS}: unreadable, so rows lost with their pages go unseen"
            )
        wanted = schema_tables()
        for table in wanted + sorted(set(in_file) - set(wanted)):
            if in_file and table not in in_file:
                rep.problems.append(f"{table}: the table is missing")
                continue
            n = reached = 0
            for rid, row in _rows(store.conn, table):
                reached += 1
                if row is None:
                    rep.problems.append(f"{table} row {rid}: unreadable")
                else:
                    n += 1
                    problem = _row_problem(table, row)
                    if problem:
                        rep.problems.append(problem)
                if progress:
                    progress(1)
            rep.rows[table] = n
            if counted is not None and counted.get(table, reached) > reached:
                rep.problems.append(
                    f"{table}: {counted[table] - reached} of {counted[table]} rows "
                    "cannot be reached"
                )
        try:
            max_seq = store.conn.execute("SELECT max(seq) FROM outbox").fetchone()[0]
            if max_seq is not None and store.get_state(outbox.NEXT_SEQ, 1) <= max_seq:
                rep.problems.append("state: next_seq is not above every seq in the outbox")
        except sqlite3.DatabaseError as exc:
            rep.problems.append(f"state: {exc}")
    finally:
        store.close()
    return rep


@dataclass
class TableRepair:
    """What became of one table's rows."""

    counted: int | None  # rows the damaged file's own count says it had (None: unknown)
    kept: int = 0
    dropped: int = 0  # read (or reached), but unreadable, invalid or breaking a constraint
    reasons: dict[str, int] = field(default_factory=dict)

    @property
    def found(self) -> int:
        return self.kept + self.dropped

    @property
    def missing(self) -> int | None:
        """Counted by the file but not reached at all; None if the count was lost."""
        return None if self.counted is None else max(0, self.counted - self.found)

    @property
    def lost(self) -> int:
        """Rows that could not be kept (at least this many if the count was lost)."""
        return self.dropped + (self.missing or 0)

    def drop(self, reason: str) -> None:
        self.dropped += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1


@dataclass
class RepairReport:
    tables: dict[str, TableRepair]
    damaged_copy: str

    @property
    def kept(self) -> dict[str, int]:
        return {t: r.kept for t, r in self.tables.items()}

    @property
    def lost(self) -> dict[str, int]:
        return {t: r.lost for t, r in self.tables.items()}

    def to_json(self) -> dict[str, Any]:
        return {
            "damaged_copy": self.damaged_copy,
            "tables": {
                t: {
                    "counted": r.counted,
                    "kept": r.kept,
                    "dropped": r.dropped,
                    "missing": r.missing,
                    "lost": r.lost,
                    "reasons": r.reasons,
                }
                for t, r in self.tables.items()
            },
            "lost_rows": sum(r.lost for r in self.tables.values()),
        }


def _reason(problem: str) -> str:
    """``chunk 12: ts BLOB does not …`` → ``ts BLOB does not …`` (the part that repeats)."""
    return problem.split(": ", 1)[-1]


def _copy_table(
    src: sqlite3.Connection,
    dst: Store,
    table: str,
    rep: TableRepair,
    progress: Callable[[int], None] | None,
) -> None:
    dst_cols = [str(r[1]) for r in dst.conn.execute(f"PRAGMA table_info([{table}])")]
    for _rid, row in _rows(src, table):
        if progress:
            progress(1)
        if row is None:
            rep.drop("unreadable")
            continue
        problem = _row_problem(table, row)
        if problem:
            rep.drop(_reason(problem))
            continue
        cols = [c for c in dst_cols if c in row]
        try:
            dst.conn.execute(
                f"INSERT INTO [{table}] ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                [row[c] for c in cols],
            )
        except sqlite3.IntegrityError as exc:  # e.g. a chunk whose sensor was lost
            rep.drop(f"breaks the schema: {exc}")
            continue
        rep.kept += 1


def repair(path: str | Path, progress: Callable[[int], None] | None = None) -> RepairReport:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no agent buffer at {path}")
    if path.is_dir():
        raise StorageError(f"cannot repair {path}: it is a directory, not a file")
    with BufferLock(path, "cannot repair (stop the agent first)"):
        src = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True)
        fresh_path = path.with_name(path.name + ".repairing")
        for p in (fresh_path, Path(f"{fresh_path}-wal"), Path(f"{fresh_path}-shm")):
            p.unlink(missing_ok=True)
        try:
            counted = _counted(src) or {}
            dst = Store(fresh_path)
            tables = {t: TableRepair(counted.get(t)) for t in schema_tables()}
            with dst.tx():
                # the copy's state comes from the damaged file; its generation is new
                # (below), so that the repaired buffer's seqs are its own
                fresh = {
                    k: dst.get_state(k) for k in (GENERATION, INTAKE_SESSION)
                }  # the copy's own, unless the damaged file's can be read
                dst.conn.execute(
                    "DELETE FROM state WHERE key IN (?, ?)", (GENERATION, INTAKE_SESSION)
                )
                for table, rep in tables.items():
                    _copy_table(src, dst, table, rep, progress)
                if not dst.get_state(INTAKE_SESSION):
                    # the intake's session name was lost: a new one (the readings the
                    # broker queued under the old name wait there until it expires)
                    dst.set_state(INTAKE_SESSION, fresh[INTAKE_SESSION])
                max_seq = dst.conn.execute("SELECT max(seq) FROM outbox").fetchone()[0] or 0
                next_seq = dst.get_state(outbox.NEXT_SEQ, 0)
                if next_seq == 0:
                    # The counter itself was lost. Acked batches are gone from the outbox,
                    # so max(seq) + 1 could reuse a seq the cloud already stored (and
                    # would ack as a duplicate). Jump to the clock in milliseconds: the
                    # agent makes at most a few batches a second, so every seq it ever
                    # used is below.
                    next_seq = max(max_seq + 1, time.time_ns() // 1_000_000)
                dst.set_state(outbox.NEXT_SEQ, max(next_seq, max_seq + 1))
                # A new generation (docs/wire-format.md §2.3): whatever the copy kept
                # of the counter, the cloud never takes the repaired buffer's batches
                # for resends of the damaged one's. Messages kept in the outbox keep
                # theirs, and are acknowledged under it.
                dst.set_state(GENERATION, new_generation())
                dst.add_counter(counters.REPAIR_LOST_ROWS, sum(r.lost for r in tables.values()))
                dst.set_state(quarantine.BYTES, -1)  # recounted from what was kept
            dst.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            dst.close()
        except sqlite3.Error as exc:
            raise StorageError(f"repair of {path} failed, the file is untouched: {exc}") from None
        finally:
            src.close()
        stamp = time.strftime("%Y%m%dT%H%M%S")
        damaged = path.with_name(f"{path.name}.damaged-{stamp}")
        path.replace(damaged)
        for suffix in ("-wal", "-shm"):
            side = Path(f"{path}{suffix}")
            if side.exists():
                side.replace(Path(f"{damaged}{suffix}"))
        fresh_path.replace(path)
        for suffix in ("-wal", "-shm"):
            Path(f"{fresh_path}{suffix}").unlink(missing_ok=True)
    return RepairReport(tables, str(damaged))
