"""The desired config on a real buffer and real files (edge_agent/desired.py): a
fragment is checked as `config check` checks a file and only for the allowed keys,
staged by its command's transaction, put in force on trial, applied when acks
and readings go on, rolled back by the device itself when they stop, in a crash
loop, or when it no longer loads."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from edge_agent import counters
from edge_agent.config import AgentConfig
from edge_agent.desired import MAX_TRIAL_STARTS, BadFragment, Desired, check_keys
from edge_agent.pipeline import buffer, outbox
from edge_agent.pipeline.commands import CommandRunner
from edge_agent.store import Store
from shared import commands
from shared.commands import Command, decode_result, sign
from shared.readings import ReadingChunk

OPS = commands.new_private_key()
HOUR = 3600 * 10**9


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    pub = tmp_path / "ops.pub"
    pub.write_bytes(commands.public_pem(OPS.public_key()))
    path = tmp_path / "edge-agent.toml"
    path.write_text(
        f'device_id = "dev-1"\n[storage]\npath = "{tmp_path / "b.sqlite"}"\n'
        f"[health]\ninterval_s = 60\n[commands]\nconfig_grace_s = 5\n"
        f'keys = [{{ id = "ops-1", file = "{pub}" }}]\n'
    )
    return path


def send(desired: Desired, cfg: AgentConfig, store: Store, id: str, **args: object) -> tuple:
    now = time.time_ns()
    payload = sign(Command(id, "dev-1", "config", now, now + HOUR, args), "ops-1", OPS)
    outcome = CommandRunner(cfg, store, desired=desired).handle(payload)
    rows = store.conn.execute("SELECT payload FROM results ORDER BY seq").fetchall()
    (r,) = [x for x in map(lambda row: decode_result(bytes(row[0])), rows) if x.id == id]
    return outcome, r


def working(store: Store) -> None:
    """Readings stored and an ack from the cloud, now."""
    chunk = ReadingChunk("n", "s", "u", np.array([time.time_ns()]), np.array([1.0]))
    buffer.store_chunk(store, buffer.SensorRegistry(store), chunk)
    with store.tx():
        store.set_state(outbox.LAST_ACK, time.time_ns())


def test_only_the_allowed_settings_may_be_set() -> None:
    check_keys({"alerts": [], "forward": {"max_in_flight": 4}, "health": {"interval_s": 5}})
    for bad in (
        {"forward": {"broker": {"host": "evil"}}},
        {"device_id": "other"},
        {"storage": {"path": "/tmp/x"}},
        {"commands": {"keys": []}},
        {"forward": 3},
    ):
        with pytest.raises(BadFragment):
            check_keys(bad)
    check_keys({"window": {"width_s": 60}})  # tumbling: from a boundary of both on
    with pytest.raises(BadFragment, match="hopping windows cross any switch time"):
        check_keys({"window": {"hop_s": 10}})


def test_a_version_is_staged_tried_and_applied(config_file: Path) -> None:
    desired = Desired(config_file)
    cfg = desired.load()
    store = Store(cfg.storage.path)
    working(store)
    fragment = {"health": {"interval_s": 7}, "alerts": [
        {"name": "hot", "sensor": "n/s", "kind": "threshold", "above": 50.0}]}  # fmt: skip
    outcome, r = send(desired, cfg, store, "c-1", version=3, config=fragment)
    assert outcome == "done" and r.result == {"version": 3, "state": "trial", "grace_s": 5.0}
    assert desired.restart  # the agent starts again on it
    desired.restart = False
    cfg = desired.load()
    assert cfg.health.interval_s == 7 and cfg.alerts[0].name == "hot"
    assert desired.status().version == 3 and desired.status().state == "trial"
    desired.tick(store, 5.0, now_mono=100.0)  # the grace starts
    working(store)
    desired.tick(store, 5.0, now_mono=105.0)
    assert desired.status().state == "applied" and not desired.restart
    assert store.counters()[counters.CONFIG_APPLIED] == 1
    # the same version again, or an older one: refused, counted
    outcome, r = send(desired, cfg, store, "c-2", version=3, config=fragment)
    assert (outcome, r.reason) == ("stale-config", "stale-config")
    assert store.counters()[counters.command_refused("stale-config")] == 1


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ({"version": 1, "config": {"health": {"interval_s": -1}}}, "health.interval_s"),
        ({"version": 1, "config": {"forward": {"broker": {"port": 1}}}}, "may not be set"),
        ({"version": 0, "config": {}}, "version"),
        ({"version": 1, "config": "health.interval_s=5"}, "table"),
        ({"version": 1, "config": {}, "extra": 1}, "unknown"),
    ],
)
def test_a_fragment_that_does_not_check_is_refused(
    config_file: Path, args: dict[str, object], words: str
) -> None:
    desired = Desired(config_file)
    cfg = desired.load()
    store = Store(cfg.storage.path)
    outcome, r = send(desired, cfg, store, "c-1", **args)
    assert (outcome, r.status) == ("bad-args", "refused") and words in r.result["message"]
    assert not desired.restart and not desired.next.exists() and not desired.current.exists()


def test_a_version_that_stops_acks_and_readings_is_rolled_back(config_file: Path) -> None:
    desired = Desired(config_file)
    store = Store(desired.load().storage.path)
    working(store)
    send(desired, desired.load(), store, "c-1", version=1, config={"health": {"interval_s": 7}})
    desired.restart = False
    cfg = desired.load()
    desired.tick(store, 5.0, now_mono=0.0)
    working(store)
    desired.tick(store, 5.0, now_mono=5.0)  # v1 applied
    send(desired, cfg, store, "c-2", version=2, config={"health": {"interval_s": 9}})
    desired.restart = False
    assert desired.load().health.interval_s == 9
    desired.tick(store, 5.0, now_mono=10.0)
    desired.tick(store, 5.0, now_mono=15.0)  # nothing stored, nothing acked since
    s = desired.status()
    assert (s.version, s.state, s.rejected) == (1, "rolled-back", 2)
    assert "no ack from the cloud and no reading stored" in s.reason and desired.restart
    assert desired.load().health.interval_s == 7  # back to version 1
    assert store.counters()[counters.CONFIG_ROLLED_BACK] == 1
    # the refused version is not taken again; a newer one is
    assert send(desired, cfg, store, "c-3", version=2, config={})[0] == "stale-config"
    assert send(desired, cfg, store, "c-4", version=4, config={})[0] == "done"


def test_a_version_that_was_stopped_nothing_before_is_applied(config_file: Path) -> None:
    """A device whose link was already down is not judged by acks it had not."""
    desired = Desired(config_file)
    store = Store(desired.load().storage.path)
    send(desired, desired.load(), store, "c-1", version=1, config={})
    desired.restart = False
    desired.load()
    desired.tick(store, 5.0, now_mono=0.0)
    desired.tick(store, 5.0, now_mono=6.0)
    assert desired.status().state == "applied"


def test_a_crash_loop_rolls_back(config_file: Path) -> None:
    desired = Desired(config_file)
    store = Store(desired.load().storage.path)
    send(desired, desired.load(), store, "c-1", version=1, config={"health": {"interval_s": 7}})
    for _ in range(MAX_TRIAL_STARTS):
        assert desired.load().health.interval_s == 7
    cfg = desired.load()  # one start too many
    assert cfg.health.interval_s == 60 and desired.status().state == "rolled-back"


def test_a_version_staged_by_a_transaction_that_committed_survives_a_crash(
    config_file: Path,
) -> None:
    desired = Desired(config_file)
    store = Store(desired.load().storage.path)
    staged = desired.stage({"version": 5, "config": {"health": {"interval_s": 8}}}, {})
    desired.write_staged(staged, "c-lost")  # its transaction never committed
    assert desired.load().health.interval_s == 60 and not desired.next.exists()
    desired.write_staged(staged, "c-kept")
    with store.tx():
        store.conn.execute(
            "INSERT INTO commands(id, kind, status, received_ns, expires_ns) "
            "VALUES ('c-kept', 'config', 'done', 0, 1)"
        )
    assert desired.load().health.interval_s == 8 and desired.status().state == "trial"


def test_a_fragment_the_config_file_no_longer_takes_is_rolled_back(config_file: Path) -> None:
    desired = Desired(config_file)
    store = Store(desired.load().storage.path)
    send(desired, desired.load(), store, "c-1", version=1, config={"window": {"max_age_s": 20}})
    config_file.write_text(config_file.read_text() + "[window]\nwidth_s = 30\n")
    cfg = Desired(config_file).load()  # max_age_s 20 < width: a hopping rule; here, fine
    assert cfg.window.max_age_s == 20
    config_file.write_text(
        config_file.read_text().replace("width_s = 30", "width_s = 30\nhop_s = 10")
    )
    again = Desired(config_file)
    cfg = again.load()
    assert cfg.window.max_age_s != 20 and again.status().state == "rolled-back"
    assert "does not load" in again.status().reason
    assert json.loads(again.status_file.read_text())["rejected"] == 1
