"""Commands on the device (edge_agent/pipeline/commands.py) on a real buffer: each
verified, run once by id across restarts, answered with a result that waits in
the outbox like an alert; forged, replayed and expired ones counted."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent import counters
from edge_agent.config import AgentConfig, CommandKey, CommandsConfig
from edge_agent.pipeline import outbox
from edge_agent.pipeline.commands import CommandRunner
from edge_agent.store import Store
from shared import commands
from shared.commands import Command, decode_result, sign
from shared.config import Invalid

T = 1_790_000_000 * 10**9
HOUR = 3600 * 10**9
OPS = commands.new_private_key()


@pytest.fixture
def cfg(tmp_path: Path) -> AgentConfig:
    pub = tmp_path / "ops.pub"
    pub.write_bytes(commands.public_pem(OPS.public_key()))
    return AgentConfig(device_id="dev-1", commands=CommandsConfig((CommandKey("ops-1", str(pub)),)))


def cmd(id: str = "c-1", kind: str = "ping", **kw: object) -> bytes:
    base: dict[str, object] = {"device_id": "dev-1", "issued_ns": T, "expires_ns": T + HOUR}
    return sign(Command(id=id, kind=kind, **(base | kw)), "ops-1", OPS)  # type: ignore[arg-type]


def results(store: Store) -> list[commands.Result]:
    rows = store.conn.execute("SELECT payload FROM results ORDER BY seq").fetchall()
    return [decode_result(bytes(r[0])) for r in rows]


def test_a_command_runs_once_and_its_result_waits_for_the_cloud(
    cfg: AgentConfig, tmp_path: Path
) -> None:
    store = Store(tmp_path / "b.sqlite")
    run = CommandRunner(cfg, store, now=lambda: T + 1)
    assert run.handle(cmd()) == "done"
    assert run.handle(cmd()) == "replayed"  # the same message again: not run again
    store.close()
    store = Store(tmp_path / "b.sqlite")  # a restart: the id is remembered
    run = CommandRunner(cfg, store, now=lambda: T + 2)
    assert run.handle(cmd()) == "replayed"
    (r,) = results(store)
    assert (r.id, r.status, r.kind, r.generation) == (
        "c-1",
        "done",
        "ping",
        outbox.generation(store),
    )
    assert r.result["ts_ns"] > 0
    c = store.counters()
    assert c[counters.COMMANDS_DONE] == 1 and c[counters.command_refused("replayed")] == 2
    # it leaves with the alerts, before batches, and goes when the cloud acks it
    (due,) = outbox.due(store, 10)
    assert (due.kind, due.seq) == ("result", r.seq)
    assert outbox.acknowledge(store, r.seq, stored=True, generation=r.generation)
    assert results(store) == [] and store.counters()[counters.outgoing("results", "acked")] == 1


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (cmd(expires_ns=T + 1), "expired"),
        (cmd(device_id="dev-2"), "wrong-device"),
        (cmd(kind="reboot"), "unknown-command"),
    ],
)
def test_a_verified_command_it_will_not_run_is_answered_refused(
    cfg: AgentConfig, tmp_path: Path, payload: bytes, why: str
) -> None:
    store = Store(tmp_path / "b.sqlite")
    assert CommandRunner(cfg, store, now=lambda: T + 2).handle(payload) == why
    (r,) = results(store)
    assert (r.status, r.reason) == ("refused", why)
    assert store.counters()[counters.command_refused(why)] == 1


def test_what_does_not_verify_is_counted_and_not_answered(cfg: AgentConfig, tmp_path: Path) -> None:
    store = Store(tmp_path / "b.sqlite")
    run = CommandRunner(cfg, store, now=lambda: T + 2)
    forged = sign(Command("c-9", "dev-1", "ping", T, T + HOUR), "ops-1", commands.new_private_key())
    assert run.handle(forged) == "bad-signature"
    assert run.handle(b"not json") == "bad-command"
    assert results(store) == []
    c = store.counters()
    assert c[counters.command_refused("bad-signature")] == 1
    assert c[counters.command_refused("bad-command")] == 1


def test_status_answers_with_the_buffer(cfg: AgentConfig, tmp_path: Path) -> None:
    store = Store(tmp_path / "b.sqlite")
    assert CommandRunner(cfg, store, now=lambda: T + 1).handle(cmd(kind="status")) == "done"
    (r,) = results(store)
    assert r.result["backlog_batches"] == 0 and r.result["used_bytes"] >= 0


def test_a_bad_key_file_names_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "x.pub"
    bad.write_text("not a key")
    with pytest.raises(Invalid) as exc:
        CommandKey("ops-1", str(bad))
    assert exc.value.key == "file"
    with pytest.raises(Invalid):
        CommandKey("ops 1", str(bad))
