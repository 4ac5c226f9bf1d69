"""The edge agent as a process against a real broker: bad input, SIGKILL and restart."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from devstack.pipeline import Pipeline, PipelineSpec, truth_window_counts
from devstack.publish import publish_all
from devstack.services import Service, wait_until
from edge_agent.cli import EXIT_PARTIAL
from edge_agent.cli import main as agent_main
from edge_agent.store import Store
from shared.readings import encode_chunk
from shared.wire import decode_batch
from tests.conftest import SpecFactory

pytestmark = pytest.mark.integration
WIDTH = 10_000_000_000


def outbox_window_counts(db: Path) -> Counter[tuple[str, str, int]]:
    """Readings per (node, sensor, window) over every batch in the agent's outbox."""
    s = Store(db, readonly=True)
    out: Counter[tuple[str, str, int]] = Counter()
    try:
        for (payload,) in s.conn.execute("SELECT payload FROM outbox ORDER BY seq"):
            b = decode_batch(bytes(payload))
            for i, sidx in enumerate(b.sensor.tolist()):
                ref = b.sensors[sidx]
                out[(ref.node, ref.name, int(b.start_ns[i]))] += int(b.count[i] + b.invalid[i])
    finally:
        s.close()
    return out


def test_bad_messages_are_quarantined_and_intake_goes_on(
    pipeline_spec: SpecFactory, fresh: Callable[[str], Service], tmp_path: Path
) -> None:
    broker = fresh("mosquitto")
    pipe = Pipeline(
        pipeline_spec(
            broker=broker,
            workdir=tmp_path,
            drain_timeout_s=0.2,
        )  # no ingestor: nothing will ack
    )
    agent = pipe.start_agent()
    try:
        t0 = (time.time_ns() // WIDTH - 5) * WIDTH
        msgs = [
            ("sensors/n1/temp", b"{not json"),
            ("sensors/n1/temp", b'{"ts": [1, 2], "values": [1.0]}'),
            ("sensors/n1/temp", encode_chunk("C", [t0, t0 + 1], [20.0, 21.0])),
            ("sensors/n1/temp", encode_chunk("C", [t0 + WIDTH], [22.0])),
        ]
        publish_all(broker.port, msgs)
        wait_until(
            lambda: (
                pipe.agent_status()["counters"].get("readings_stored") == 3
                and pipe.agent_status()["quarantined"] == 2
            ),
            30,
            "intake of all 4 messages",
        )
        # flush with no cloud ingestor: the windows close and go out, but no ack comes
        cfg = str(tmp_path / "edge-agent.toml")
        wait_until(lambda: pipe.agent_status()["running"], 30, "the agent's heartbeat")
        res = CliRunner().invoke(agent_main, ["flush", "-c", cfg, "--timeout", "5"])
        assert res.exit_code == EXIT_PARTIAL, res.output
        assert "still wait for the cloud's ack" in res.output
    finally:
        assert agent.terminate() == 0
    st = pipe.agent_status()
    assert st["counters"]["quarantined_bad-json"] == 1
    assert st["counters"]["quarantined_bad-chunk"] == 1
    assert outbox_window_counts(pipe.agent_db) == {
        ("n1", "temp", t0): 2,
        ("n1", "temp", t0 + WIDTH): 1,
    }


def test_kill_and_restart_lose_and_double_nothing(
    pipeline_spec: SpecFactory, fresh: Callable[[str], Service], tmp_path: Path
) -> None:
    """Stop the agent four times while the simulator publishes, twice with SIGKILL and
    twice with SIGTERM (open windows stay open), restarting it each time; in the end
    every reading is in exactly one closed window of the outbox, and none was late."""
    broker = fresh("mosquitto")
    spec = pipeline_spec(
        broker=broker,
        workdir=tmp_path,
        duration_s=90.0,
        speed=10.0,
        seed=3,
        start_ns=(time.time_ns() // WIDTH - 12) * WIDTH + 5_000_000,
        drain_timeout_s=0.2,  # no ingestor: batches stay in the outbox, unacked, for the check
    )
    pipe = Pipeline(spec)
    agent = pipe.start_agent(flush_on_shutdown=False)
    sim = pipe.start_sim()
    try:
        for kill in range(1, 5):
            target = kill * 3000

            def stored(target: int = target) -> bool:
                return int(pipe.agent_status()["counters"].get("readings_stored", 0)) >= target

            wait_until(stored, 60, f"{target} readings stored")
            if kill % 2:
                agent.popen.kill()  # SIGKILL: no flush, no clean disconnect
                agent.popen.wait()
            else:
                assert agent.terminate() == 0
            agent = pipe.start_agent(flush_on_shutdown=False)
        produced = int(pipe.finish_sim(sim, timeout_s=120)["produced"])
        pipe.wait_agent_has(produced, timeout_s=60)
        assert agent.terminate() == 0
        agent = pipe.start_agent(flush_on_shutdown=True)  # the final stop sends every window
    finally:
        assert agent.terminate() == 0
        pipe.stop_all()
    c = pipe.agent_status()["counters"]
    assert c["readings_stored"] == produced and c.get("dropped_late", 0) == 0
    assert outbox_window_counts(pipe.agent_db) == truth_window_counts(pipe.truth, WIDTH)


def test_disk_budget_holds_while_the_uplink_is_down(
    fresh: Callable[[str], Service], tmp_path: Path
) -> None:
    """No cloud broker at all (the uplink is down) and a 1 MiB budget: the running agent
    keeps taking readings, stays within the budget, and counts what it dropped."""
    local = fresh("mosquitto")
    dead_port = local.port + 1 if local.port < 65000 else local.port - 1  # nothing listens
    spec = PipelineSpec(
        workdir=tmp_path,
        local_port=local.port,
        cloud_port=dead_port,
        targets=[],
        duration_s=900.0,
        speed=60.0,
        seed=4,
        drain_timeout_s=0.2,
        start_ns=(time.time_ns() // WIDTH - 95) * WIDTH,
        agent_tables={"storage": {"max_bytes": 1 << 20}, "window": {"max_age_s": 20.0}},
    )
    pipe = Pipeline(spec)
    try:
        agent = pipe.start_agent()
        produced = int(pipe.finish_sim(pipe.start_sim(), timeout_s=120)["produced"])
        pipe.wait_agent_has(produced, timeout_s=60)
        assert agent.terminate() == 0
    finally:
        pipe.stop_all()
    st = pipe.agent_status()
    c = st["counters"]
    assert c["readings_stored"] == produced  # intake never stopped
    # the budget freed room: old raw chunks and old digests first (no loss); batches
    # only if that was not enough (tests/edge_agent/test_budget.py drops batches for sure)
    assert c["budget_pruned_chunks"] > 0 and c["budget_pruned_digests"] > 0
    assert st["used_bytes"] <= 1048576 + 65536  # the last tick's data may still be on top
    # every closed reading is either in a batch still waiting, or counted as dropped
    assert st["backlog_readings"] + c.get("dropped_budget_readings", 0) == produced
