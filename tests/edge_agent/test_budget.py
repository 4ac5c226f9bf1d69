"""The disk budget's drop policy on a real SQLite file, with exact accounting."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_agent.pipeline import budget, buffer, outbox, window
from edge_agent.store import Store
from shared.readings import ReadingChunk

W = 10_000_000_000
T0 = 1_800_000_000 * 10**9


def fill(s: Store, windows: int, per_window: int = 4, n: int = 250) -> int:
    reg = buffer.SensorRegistry(s)
    rng = np.random.default_rng(0)
    total = 0
    for w in range(windows):
        for k in range(per_window):
            ts = T0 + w * W + k * (W // per_window) + np.arange(n, dtype=np.int64)
            buffer.store_chunk(s, reg, ReadingChunk("n1", f"s{w % 7}", "u", ts, rng.normal(size=n)))
            total += n
    return total


def test_under_budget_nothing_happens(tmp_path: Path) -> None:
    s = Store(tmp_path / "a.sqlite")
    fill(s, 5)
    res = budget.enforce(s, 64 << 20)
    assert res.pruned_chunks == res.dropped_batches == 0
    assert budget.enforce(s, 0).used_bytes == res.used_bytes  # 0 = no budget


def closed_store(tmp_path: Path) -> tuple[Store, int, int]:
    s = Store(tmp_path / "a.sqlite")
    total = fill(s, 400)  # 400 windows x 1000 readings, ~6.4 MB of raw BLOBs
    closed_until = T0 + 390 * W
    window.close_until(s, device_id="d", width_ns=W, upto_ns=closed_until, max_rows=1)
    return s, total, closed_until


def open_chunks(s: Store, closed_until: int) -> int:
    return int(
        s.conn.execute("SELECT count(*) FROM chunks WHERE t_max >= ?", (closed_until,)).fetchone()[
            0
        ]
    )


def test_raw_chunks_of_closed_windows_go_first(tmp_path: Path) -> None:
    s, _total, closed_until = closed_store(tmp_path)
    keep = open_chunks(s, closed_until)
    limit = budget.used_bytes(s) - (1 << 20)
    res = budget.enforce(s, limit)
    assert res.used_bytes <= limit and res.pruned_chunks > 0 and res.dropped_batches == 0
    assert outbox.count_unacked(s) == 390  # no batch was touched
    assert open_chunks(s, closed_until) == keep
    assert s.counters()["budget_pruned_chunks"] == res.pruned_chunks


def test_then_the_oldest_batches_with_every_reading_accounted(tmp_path: Path) -> None:
    s, total, closed_until = closed_store(tmp_path)
    keep = open_chunks(s, closed_until)
    buffer.prune(s, closed_until)  # no closed raw left: the budget must take batches
    batch_bytes = s.conn.execute("SELECT sum(length(payload)) FROM outbox").fetchone()[0]
    limit = budget.used_bytes(s) - batch_bytes // 2
    res = budget.enforce(s, limit)
    assert res.used_bytes <= limit and 0 < res.dropped_batches < 390
    # the oldest went: what is left is a suffix of the seqs
    seqs = [o.seq for o in outbox.due(s, 10_000)]
    assert seqs == list(range(res.dropped_batches + 1, 391))
    # open windows are never touched: intake and windowing go on
    assert open_chunks(s, closed_until) == keep
    # exact accounting: every closed reading is in a batch or counted as dropped
    c = s.counters()
    left = s.conn.execute("SELECT sum(readings) FROM outbox").fetchone()[0]
    assert left + c["dropped_budget_readings"] == 390 * 1000
    assert c["dropped_budget_batches"] == res.dropped_batches
    assert c["dropped_budget_windows"] == res.dropped_batches  # one window per batch here
    assert c["readings_stored"] == total


def test_an_impossible_budget_is_reported_not_fatal(tmp_path: Path) -> None:
    s = Store(tmp_path / "a.sqlite")
    fill(s, 400)  # nothing closed: nothing may be dropped
    res = budget.enforce(s, 1 << 20)
    assert res.used_bytes > 1 << 20 and res.pruned_chunks == res.dropped_batches == 0
    assert s.counters()["budget_overruns"] == 1


def bad(s: Store, k: int, size: int = 100_000, cap: int = 0) -> None:
    from edge_agent.pipeline import quarantine
    from shared.errors import WireError

    with s.tx():
        exc = WireError("bad-json", f"message {k}")
        quarantine.add(s, f"sensors/n1/x{k}", exc, bytes([k % 256]) * size, max_bytes=cap)


def test_the_quarantine_goes_first_then_raw_then_batches(tmp_path: Path) -> None:
    """The documented order: bad input never costs good data while there is any left."""
    from edge_agent.pipeline import quarantine

    s, _total, closed_until = closed_store(tmp_path)
    for k in range(60):  # 60 x 64 KiB kept of 100 KB each
        bad(s, k)
    kept = quarantine.total_bytes(s)
    assert kept == 60 * quarantine.KEEP_BYTES
    limit = budget.used_bytes(s) - kept // 2
    res = budget.enforce(s, limit)
    assert res.used_bytes <= limit and res.pruned_chunks == 0 and res.dropped_batches == 0
    c = s.counters()
    left = s.conn.execute("SELECT count(*) FROM quarantine").fetchone()[0]
    assert 0 < left < 60 and c["quarantine_dropped"] == 60 - left
    # the newest bad messages are the ones kept
    ids = [e.id for e in quarantine.entries(s, 100)]
    assert ids == list(range(60, 60 - left, -1))
    assert quarantine.total_bytes(s) == left * quarantine.KEEP_BYTES
    # then raw chunks of closed windows: the quarantine is gone first
    limit = budget.used_bytes(s) - quarantine.total_bytes(s) - (1 << 20)
    res = budget.enforce(s, limit)
    assert res.pruned_chunks > 0 and res.dropped_batches == 0
    assert s.conn.execute("SELECT count(*) FROM quarantine").fetchone()[0] == 0
    assert open_chunks(s, closed_until) > 0


def test_the_quarantine_keeps_to_its_own_cap_and_age(tmp_path: Path) -> None:
    from edge_agent.pipeline import quarantine

    s = Store(tmp_path / "a.sqlite")
    cap = 10 * quarantine.KEEP_BYTES
    for k in range(25):
        bad(s, k, cap=cap)
    assert quarantine.total_bytes(s) <= cap
    assert s.counters()["quarantine_dropped"] == 15
    assert [e.message for e in quarantine.entries(s, 1)] == ["bad-json: message 24"]
    with s.tx():
        quarantine.free(s, older_than_ns=2**62)  # everything is older than that
    assert quarantine.entries(s) == [] and quarantine.total_bytes(s) == 0
    assert s.counters()["quarantine_dropped"] == 25
