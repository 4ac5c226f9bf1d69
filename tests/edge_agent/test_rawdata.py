"""The ``raw`` command on a real buffer (edge_agent/pipeline/rawdata.py): the messages
hold exactly the stored readings of the sensors and range asked for, split by day
and size, sent after every batch; what the buffer no longer holds is said; what
is over the limit says where to go on; the disk budget drops them first, counted."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from edge_agent import counters
from edge_agent.config import AgentConfig, ForwardConfig
from edge_agent.pipeline import budget, buffer, outbox, window
from edge_agent.pipeline.commands import CommandRunner
from edge_agent.store import Store
from shared.rawdata import DAY_NS, RawReadings, decode_raw
from shared.readings import ReadingChunk
from tests.edge_agent.test_commands import HOUR, cfg, cmd, results

__all__ = ["cfg"]  # the fixture, shared with test_commands

S = 10**9
T0 = (1_790_000_000 * S) // DAY_NS * DAY_NS + DAY_NS - 50 * S  # 50 s before a UTC midnight
NOW = T0 + HOUR


def fill(store: Store) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
    """100 s of readings of three sensors across midnight, in chunks of 10; the truth."""
    reg = buffer.SensorRegistry(store)
    rng = np.random.default_rng(3)
    truth = {}
    for node, name in (("n1", "temp"), ("n1", "hum"), ("n2", "temp")):
        ts = T0 + np.sort(rng.integers(0, 100 * S, 400))
        values = np.round(rng.normal(20, 3, 400), 2)
        values[7] = np.nan  # stored as received: raw is what the buffer holds
        for a in range(0, 400, 10):
            chunk = ReadingChunk(node, name, "u", ts[a : a + 10], values[a : a + 10])
            buffer.store_chunk(store, reg, chunk, f"{node}{name}{a}".encode())
        truth[(node, name)] = (ts, values)
    return truth


def messages(store: Store) -> list[RawReadings]:
    rows = store.conn.execute("SELECT payload FROM raw ORDER BY seq").fetchall()
    return [decode_raw(bytes(r[0])) for r in rows]


def run_raw(config: AgentConfig, store: Store, id: str = "c-r", **args: object) -> dict:
    payload = cmd(id=id, kind="raw", args=args, issued_ns=NOW - 1, expires_ns=NOW + HOUR)
    CommandRunner(config, store, now=lambda: NOW).handle(payload)
    (r,) = [r for r in results(store) if r.id == id]
    return {"status": r.status, "reason": r.reason, **r.result}


def test_the_readings_asked_for_are_sent_exactly_split_by_day(
    cfg: AgentConfig, tmp_path: Path
) -> None:
    store = Store(tmp_path / "b.sqlite")
    truth = fill(store)
    lo, hi = T0 + 20 * S, T0 + 80 * S
    answer = run_raw(cfg, store, sensors="n1/*", **{"from": lo, "to": str(hi)})
    msgs = messages(store)
    assert answer["status"] == "done" and answer["sensors_matched"] == 2
    got: dict[tuple[str, str], list[RawReadings]] = {}
    for m in msgs:
        assert m.request == "c-r" and m.device_id == "dev-1"
        assert m.ts[0] // DAY_NS == m.ts[-1] // DAY_NS  # one UTC day each
        got.setdefault((m.node, m.sensor), []).append(m)
    assert set(got) == {("n1", "temp"), ("n1", "hum")}
    for key, parts in got.items():
        ts, values = truth[key]
        sel = (ts >= lo) & (ts < hi)
        order = np.argsort(ts[sel], kind="stable")
        assert np.concatenate([m.ts for m in parts]).tolist() == ts[sel][order].tolist()
        sent = np.concatenate([m.values for m in parts])
        assert sent.tobytes() == values[sel][order].tobytes()  # NaN included, bit for bit
    assert answer["readings"] == sum(m.n for m in msgs) == store.counters()["raw_readings_queued"]
    assert answer["messages"] == len(msgs) == 4  # two sensors x two days
    assert sorted(m.part for m in msgs) == list(range(4))
    assert "gone_before_ns" not in answer and "next_from_ns" not in answer


def test_raw_goes_after_every_batch_and_leaves_when_acked(cfg: AgentConfig, tmp_path: Path) -> None:
    store = Store(tmp_path / "b.sqlite")
    fill(store)
    run_raw(cfg, store, sensors="n2/temp", **{"from": "-2h", "to": "-1s"})
    window.close_until(store, device_id="dev-1", width_ns=10 * S, upto_ns=T0 + 100 * S, max_rows=5)
    due = outbox.due(store, 100)
    kinds = [d.kind for d in due]
    assert kinds[0] == "result" and kinds[-2:] == ["raw", "raw"]
    assert set(kinds[1:-2]) == {"batch"}
    assert not any(d.live for d in due if d.kind == "raw")  # under the backfill's budget
    for d in due:
        if d.kind == "raw":
            assert outbox.acknowledge(
                store, d.seq, stored=True, generation=outbox.generation(store)
            )
    assert messages(store) == [] and store.counters()["raw_acked"] == 2


def test_what_the_buffer_no_longer_holds_is_said(cfg: AgentConfig, tmp_path: Path) -> None:
    store = Store(tmp_path / "b.sqlite")
    truth = fill(store)
    with store.tx():
        store.set_state(buffer.CLOSED_UNTIL, T0 + 60 * S)
    assert buffer.prune(store, T0 + 40 * S) > 0
    answer = run_raw(cfg, store, sensors="*", **{"from": T0, "to": T0 + 100 * S})
    assert answer["gone_before_ns"] == T0 + 40 * S
    # from there on, every reading is still there
    kept = [m for m in messages(store) if (m.node, m.sensor) == ("n1", "temp")]
    ts = truth[("n1", "temp")][0]
    sent = np.concatenate([m.ts for m in kept])
    assert set(ts[ts >= T0 + 40 * S].tolist()) <= set(sent.tolist())
    assert answer["readings"] == sum(m.n for m in messages(store)) < 1200


def test_over_the_limit_the_answer_says_where_to_go_on(cfg: AgentConfig, tmp_path: Path) -> None:
    small = dataclasses.replace(
        cfg,
        commands=dataclasses.replace(cfg.commands, raw_max_readings=250),
        forward=ForwardConfig(max_batch_bytes=4096),
    )
    store = Store(tmp_path / "b.sqlite")
    truth = fill(store)
    first = run_raw(small, store, "c-1", sensors="n1/temp", **{"from": T0, "to": T0 + 100 * S})
    assert first["readings"] <= 250 and first["next_from_ns"] > T0
    assert all(m.n <= 128 for m in messages(store))  # 4 KiB messages
    second = run_raw(small, store, "c-2", sensors="n1/temp", **{"from": first["next_from_ns"],
                                                                "to": T0 + 100 * S})  # fmt: skip
    assert "next_from_ns" not in second
    sent = np.concatenate([m.ts for m in messages(store)])
    assert sorted(sent.tolist()) == sorted(truth[("n1", "temp")][0].tolist())  # once each


@pytest.mark.parametrize(
    "args",
    [
        {"from": "-1h"},  # no end
        {"from": "-1h", "to": "-2h"},  # backwards
        {"from": "yesterday", "to": "-1s"},
        {"from": "-1h", "to": "-1s", "sensors": ""},
        {"from": "-1h", "to": "-1s", "limit": 5},
        {"from": 1.5, "to": "-1s"},
    ],
)
def test_arguments_it_does_not_take_are_refused_and_counted(
    cfg: AgentConfig, tmp_path: Path, args: dict
) -> None:
    store = Store(tmp_path / "b.sqlite")
    answer = run_raw(cfg, store, **args)
    assert (answer["status"], answer["reason"]) == ("refused", "bad-args") and answer["message"]
    assert store.counters()[counters.command_refused("bad-args")] == 1
    assert messages(store) == []


def test_the_disk_budget_drops_raw_copies_before_data_counted(
    cfg: AgentConfig, tmp_path: Path
) -> None:
    store = Store(tmp_path / "b.sqlite")
    fill(store)
    run_raw(cfg, store, sensors="*", **{"from": T0, "to": T0 + 100 * S})
    assert messages(store)
    chunks = store.conn.execute("SELECT count(*) FROM chunks").fetchone()[0]
    budget.enforce(store, budget.used_bytes(store) - 1, keep_raw_after_ns=0)
    c = store.counters()
    assert c[counters.DROPPED_BUDGET_RAW] >= 1
    # no window is closed, so no chunk may go: the copies went, and no batch
    assert c.get(counters.DROPPED_BUDGET_BATCHES, 0) == 0
    assert store.conn.execute("SELECT count(*) FROM chunks").fetchone()[0] == chunks
