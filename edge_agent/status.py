"""What the agent's SQLite file says about its state: for the CLI, tests and the demo.

Reads through a read-only connection, so it works while the agent runs and
while it is stopped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edge_agent import budget, buffer, outbox
from edge_agent.store import Store


def read_status(path: str | Path) -> dict[str, Any]:
    if not Path(path).exists():
        raise FileNotFoundError(f"no agent buffer at {path}")
    store = Store(path, readonly=True)
    try:
        c = store.conn
        states = {
            str(s): int(n)
            for s, n in c.execute("SELECT state, count(*) FROM outbox GROUP BY state")
        }
        return {
            "buffer": str(path),
            "counters": store.counters(),
            "closed_until_ns": store.get_state(buffer.CLOSED_UNTIL),
            "last_ack_ns": store.get_state(outbox.LAST_ACK),
            "max_event_ns": store.get_state(buffer.MAX_TS),
            "sensors": int(c.execute("SELECT count(*) FROM sensors").fetchone()[0]),
            "raw_chunks": int(c.execute("SELECT count(*) FROM chunks").fetchone()[0]),
            "outbox": states,
            "quarantined": int(c.execute("SELECT count(*) FROM quarantine").fetchone()[0]),
            "used_bytes": budget.used_bytes(store),
            "file_bytes": sum(
                p.stat().st_size for p in (Path(path), Path(f"{path}-wal")) if p.exists()
            ),
        }
    finally:
        store.close()
