"""``buffer check`` and ``buffer repair`` over the whole schema: a file with rows in every
table is damaged page by page, and the repair keeps only original rows and accounts,
table by table, for every row it could not keep."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from edge_agent.cli import main as agent_main
from edge_agent.clock import Clock
from edge_agent.config import AgentConfig
from edge_agent.lock import BufferLock
from edge_agent.pipeline import alerts, buffer, outbox, quarantine, rawdata, window
from edge_agent.pipeline.alerts import AlertEngine, AlertRule
from edge_agent.pipeline.captures import Capture
from edge_agent.pipeline.health import Reporter
from edge_agent.store import Store, crc
from edge_agent.technician.repair import schema_tables
from shared.commands import Result
from shared.errors import WireError
from shared.readings import ReadingChunk
from tests.helpers import agent_cli as cli

W = 10_000_000_000
T0 = 1_800_000_000 * 10**9
LATE = buffer.LatePolicy(width_ns=W, max_age_ns=10_000 * W)


def fill_every_table(db: Path) -> None:
    s = Store(db)
    window.adopt_width(s, AgentConfig())  # the windows' width over time
    reg = buffer.SensorRegistry(s)
    for k in range(300):  # raw chunks with BLOBs over several pages each
        ts = np.arange(k * 1000, (k + 1) * 1000, dtype=np.int64) * 10**7 + T0
        chunk = ReadingChunk("n", f"s{k % 5}", "u", ts, np.full(1000, float(k)))
        buffer.store_chunk(s, reg, chunk, f"m{k}".encode(), late=LATE)
    window.close_until(s, device_id="d", width_ns=W, upto_ns=T0 + 2000 * W, max_rows=50)
    late = ReadingChunk("n", "s0", "u", np.array([T0 + 5]), np.array([7.0]))
    buffer.store_chunk(s, reg, late, b"late-1", late=LATE)
    window.revise(s, device_id="d", width_ns=W, max_rows=50, ready_until_ns=T0 + 2000 * W)
    late2 = ReadingChunk("n", "s1", "u", np.array([T0 + 6]), np.array([8.0]))
    buffer.store_chunk(s, reg, late2, b"late-2", late=LATE)  # stays dirty
    ahead = ReadingChunk("n", "s2", "u", np.array([T0 + 10**15]), np.array([9.0]))
    buffer.store_chunk(s, reg, ahead, b"ahead", future_limit_ns=T0 + 2000 * W)  # held
    # a rule that captures the readings around its raise (edge_agent/pipeline/captures.py)
    rule = AlertRule(name="r", sensor="n/s0", kind="threshold", above=1.0, capture=Capture())
    with s.tx():
        alerts.record(s, AlertEngine((rule,), s).evaluate(s, "n", "s0", [T0], [5.0]))
        quarantine.add(s, "sensors/n/x", WireError("bad-json", "nope"), b"{", max_bytes=0)
        # what the intake keeps for redeliveries and retained values (edge_agent/pipeline/intake.py)
        s.conn.execute(
            "INSERT INTO inflight(seq, entries) VALUES (1, ?)", (b"\x00\x07" + b"d" * 16,)
        )
        s.conn.execute("INSERT INTO retained(topic, digest) VALUES ('a/b', ?)", (b"r" * 16,))
        # a command's id and its result (edge_agent/pipeline/commands.py)
        seq = outbox.next_seq(s)
        result = Result(seq, "c-1", "done", "", T0, {"ts_ns": T0}, outbox.generation(s), "ping")
        data = result.encode()
        s.conn.execute(
            "INSERT INTO results(seq, created_ns, payload, state, crc, generation) "
            "VALUES (?, ?, ?, 'pending', ?, ?)",
            (seq, T0, data, crc(data), outbox.generation(s)),
        )
        s.conn.execute(
            "INSERT INTO commands(id, kind, status, received_ns, expires_ns, result_seq) "
            "VALUES ('c-1', 'ping', 'done', ?, ?, ?)",
            (T0, T0 + 10**12, seq),
        )
        # raw readings a command asked for (edge_agent/pipeline/rawdata.py)
        request = rawdata.RawRequest("n/s0", T0, T0 + 100 * W)
        assert rawdata.queue(s, AgentConfig(), "c-2", request, T0)["readings"] > 0
    outbox.mark_sent(s, [1, 2], timeout_s=30, max_backoff_s=60)
    Reporter(AgentConfig(), s, Clock()).tick(intake_up=True, forward_up=False)
    empty = [t for t in schema_tables() if not s.conn.execute(f"SELECT 1 FROM [{t}]").fetchone()]
    assert empty == [], f"fill these tables too, so the repair test covers them: {empty}"
    s.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    s.close()


def snapshot(db: Path) -> dict[str, set[tuple[object, ...]]]:
    conn = sqlite3.connect(db)
    try:
        return {t: set(conn.execute(f"SELECT * FROM [{t}]")) for t in schema_tables()}
    finally:
        conn.close()


def damage(db: Path, pick: list[tuple[str, str, int]]) -> list[int]:
    """Overwrite, for each (table, page type, n), the n-th page of that table and type
    (dbstat's 'leaf', 'internal' or 'overflow') with garbage; returns the page numbers."""
    conn = sqlite3.connect(db)
    try:
        pages = []
        for table, kind, n in pick:
            found = [
                int(p)
                for (p,) in conn.execute(
                    "SELECT pageno FROM dbstat WHERE name = ? AND pagetype = ? ORDER BY pageno",
                    (table, kind),
                )
            ]
            assert len(found) > n, (table, kind, len(found))
            pages.append(found[n])
        size = int(conn.execute("PRAGMA page_size").fetchone()[0])
    finally:
        conn.close()
    raw = bytearray(db.read_bytes())
    for p in pages:
        raw[(p - 1) * size : p * size] = b"\xa5" * size
    db.write_bytes(bytes(raw))
    return pages


def test_repair_accounts_for_every_row_of_every_table(tmp_path: Path) -> None:
    db = tmp_path / "a.sqlite"
    cfg = tmp_path / "a.toml"
    cfg.write_text(f'[storage]\npath = "{db}"\n')
    fill_every_table(db)
    assert cli("buffer", "check", "-c", str(cfg)).exit_code == 0
    before = snapshot(db)

    # raw chunks: two leaf pages (their rows vanish from the b-tree) and a BLOB's
    # overflow page (its row is read, but damaged); received and outbox: a leaf page

    damage(
        db,
        [
            ("chunks", "leaf", 3),
            ("chunks", "leaf", 7),
            ("chunks", "overflow", 500),
            ("received", "leaf", 0),
            ("outbox", "leaf", 1),
        ],
    )
    res = cli("buffer", "check", "-c", str(cfg), "--json")
    assert res.exit_code == 1
    problems = json.loads(res.stdout)["problems"]
    assert any("cannot be reached" in p for p in problems), problems

    res = cli("buffer", "repair", "-c", str(cfg), "--json")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert Path(rep["damaged_copy"]).exists()  # nothing is thrown away
    after = snapshot(db)
    for table in schema_tables():
        r = rep["tables"][table]
        assert r["counted"] == len(before[table]), table  # the file's own count was right
        if table in ("state", "counters"):
            continue  # the repair writes these itself (next_seq, repair_lost_rows)
        assert after[table] <= before[table], f"{table}: a row that was not there"
        assert len(before[table]) - len(after[table]) == r["lost"], table
        assert r["lost"] == r["dropped"] + r["missing"] and r["kept"] == len(after[table])
    lost = {t: r["lost"] for t, r in rep["tables"].items() if r["lost"]}
    assert lost.keys() >= {"chunks", "received", "outbox"}, lost
    assert rep["tables"]["chunks"]["missing"] > 0 and rep["tables"]["chunks"]["dropped"] > 0
    assert rep["lost_rows"] == sum(lost.values())
    # the lost outbox batch takes its wait-for pairs with it (they reference it)
    assert cli("buffer", "check", "-c", str(cfg)).exit_code == 0
    st = json.loads(cli("status", "-c", str(cfg), "--json").stdout)
    assert st["raw_chunks"] == rep["tables"]["chunks"]["kept"]
    assert st["counters"]["repair_lost_rows"] == rep["lost_rows"]

    # the human table names every table and says what was lost
    res = cli("buffer", "repair", "-c", str(cfg))
    assert res.exit_code == 0
    assert all(t in res.output for t in schema_tables())
    assert "every row was kept" in res.output


def test_repair_refuses_while_the_agent_holds_the_buffer(tmp_path: Path) -> None:
    db = tmp_path / "a.sqlite"
    cfg = tmp_path / "a.toml"
    cfg.write_text(f'[storage]\npath = "{db}"\n')
    Store(db).close()
    with BufferLock(db):
        res = CliRunner().invoke(agent_main, ["buffer", "repair", "-c", str(cfg)])
    assert res.exit_code == 1 and "stop the agent first" in res.output
    assert "already using" in res.output
    assert not list(tmp_path.glob("*.damaged-*"))
    assert cli("buffer", "repair", "-c", str(cfg)).exit_code == 0
