"""``buffer check`` and ``buffer repair``: integrity of the agent's SQLite file.

check:  SQLite's own ``PRAGMA integrity_check``, then the agent's invariants:
        every raw chunk's BLOBs match its row count and time range, every outbox
        payload decodes, ``next_seq`` is above every seq in the outbox.

repair: copies every row that can still be read (and that passes the checks
        above) into a fresh file with the current schema, then swaps it in. The
        damaged file and its WAL are kept beside it as ``<name>.damaged-<time>``;
        nothing is deleted. The agent must be stopped. If the seq counter itself
        was lost, it restarts from the clock in milliseconds, so that no seq the
        cloud has already seen is ever reused.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent import control, outbox
from edge_agent.status import open_readonly
from edge_agent.store import Store
from shared.errors import StorageError, WireError
from shared.wire import decode_batch

TABLES = ("sensors", "chunks", "outbox", "state", "counters", "quarantine", "received")


@dataclass
class CheckReport:
    problems: list[str] = field(default_factory=list)
    rows: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def _row_problem(table: str, row: dict[str, Any]) -> str | None:
    if table == "chunks":
        n = row["n"]
        if not isinstance(row["ts"], bytes) or len(row["ts"]) != 8 * n:
            return f"chunk {row['id']}: ts BLOB does not hold {n} timestamps"
        if not isinstance(row["vals"], bytes) or len(row["vals"]) != 8 * n:
            return f"chunk {row['id']}: values BLOB does not hold {n} values"
        ts = np.frombuffer(row["ts"], "<i8")
        if n and (int(ts.min()) != row["t_min"] or int(ts.max()) != row["t_max"]):
            return f"chunk {row['id']}: t_min/t_max do not match its timestamps"
    if table == "outbox":
        try:
            b = decode_batch(bytes(row["payload"]))
        except (WireError, TypeError) as exc:
            return f"outbox seq {row['seq']}: payload does not decode: {exc}"
        if b.seq != row["seq"]:
            return f"outbox seq {row['seq']}: payload carries seq {b.seq}"
    return None


def _rows(conn: sqlite3.Connection, table: str) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """Every rowid of ``table`` with its row, or None where the row cannot be read."""
    try:
        ids = [r[0] for r in conn.execute(f"SELECT rowid FROM {table} ORDER BY rowid")]
    except sqlite3.DatabaseError:
        ids = []
        lo = 0
        while True:  # walk the rowids one by one past damaged pages
            try:
                r = conn.execute(
                    f"SELECT min(rowid) FROM {table} WHERE rowid > ?", (lo,)
                ).fetchone()
            except sqlite3.DatabaseError:
                lo += 1
                if lo > 1 << 40:
                    break
                continue
            if r is None or r[0] is None:
                break
            ids.append(int(r[0]))
            lo = int(r[0])
    cols: list[str] | None = None
    for rid in ids:
        try:
            cur = conn.execute(f"SELECT * FROM {table} WHERE rowid = ?", (rid,))
            values = cur.fetchone()
            cols = cols or [d[0] for d in cur.description]
        except sqlite3.DatabaseError:
            yield rid, None
            continue
        yield rid, None if values is None else dict(zip(cols, values, strict=True))


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
        for table in TABLES:
            n = 0
            for rid, row in _rows(store.conn, table):
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
class RepairReport:
    kept: dict[str, int]
    dropped: dict[str, int]
    damaged_copy: str


def repair(path: str | Path, progress: Callable[[int], None] | None = None) -> RepairReport:
    path = Path(path)
    probe = open_readonly(path)
    try:
        if control.agent_running(probe):
            raise StorageError("the agent is running; stop it before repairing its buffer")
        src = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True)
    finally:
        probe.close()
    fresh_path = path.with_name(path.name + ".repairing")
    for p in (fresh_path, Path(f"{fresh_path}-wal"), Path(f"{fresh_path}-shm")):
        p.unlink(missing_ok=True)
    kept: dict[str, int] = {}
    dropped: dict[str, int] = {}
    try:
        dst = Store(fresh_path)
        dst_cols = {t: [r[1] for r in dst.conn.execute(f"PRAGMA table_info({t})")] for t in TABLES}
        with dst.tx():
            for table in TABLES:
                kept[table] = dropped[table] = 0
                for _rid, row in _rows(src, table):
                    if progress:
                        progress(1)
                    if row is None or _row_problem(table, row):
                        dropped[table] += 1
                        continue
                    cols = [c for c in dst_cols[table] if c in row]
                    dst.conn.execute(
                        f"INSERT OR REPLACE INTO {table} ({', '.join(cols)}) "
                        f"VALUES ({', '.join('?' * len(cols))})",
                        [row[c] for c in cols],
                    )
                    kept[table] += 1
            max_seq = dst.conn.execute("SELECT max(seq) FROM outbox").fetchone()[0] or 0
            next_seq = dst.get_state(outbox.NEXT_SEQ, 0)
            if next_seq == 0:
                # The counter itself was lost. Acked batches are gone from the outbox, so
                # max(seq) + 1 could reuse a seq the cloud already stored (and would
                # ack as a duplicate). Jump to the clock in milliseconds: the agent makes
                # at most a few batches a second, so every seq it ever used is below.
                next_seq = max(max_seq + 1, time.time_ns() // 1_000_000)
            dst.set_state(outbox.NEXT_SEQ, max(next_seq, max_seq + 1))
            dst.add_counter("repair_dropped_rows", sum(dropped.values()))
        dst.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        dst.close()
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
    return RepairReport(kept, dropped, str(damaged))
