"""Fleet health: the agent's report (edge_agent/pipeline/health.py), its wire form
(shared/health.py), and what the ingestor makes of it (lineproto, decode, fleet,
/metrics). The pipeline test is in tests/system/test_fleet.py."""

from __future__ import annotations

import dataclasses
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloud_ingest.config import FleetConfig, IngestConfig
from cloud_ingest.ingest.decode import decode_message, plan_group
from cloud_ingest.ingest.metrics import Liveness, MetricsServer
from cloud_ingest.ingest.registry import DeviceRegistry
from cloud_ingest.ingest.writer import Stats
from cloud_ingest.sinks.lineproto import health_to_line
from devstack import hostile
from edge_agent.clock import Clock, wall_minus_mono_ns
from edge_agent.config import AgentConfig, HealthConfig, StorageConfig
from edge_agent.pipeline import outbox
from edge_agent.pipeline.health import Reporter
from edge_agent.store import Store
from shared.acks import Ack, decode_ack
from shared.errors import WireError
from shared.health import FIELDS, KNOWN_DROPS, PROBLEMS, HealthReport, decode_health, state_of
from tests.shared.test_fuzz import FUZZ, huge_ints, json_values, total

VALID = json.loads(hostile.valid_health())


def reports(store: Store) -> list[HealthReport]:
    rows = store.conn.execute("SELECT payload FROM health ORDER BY seq").fetchall()
    return [decode_health(bytes(p)) for (p,) in rows]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "buf.db")


def test_a_report_round_trips_and_names_its_worst_problem() -> None:
    r = decode_health(hostile.valid_health())
    assert r.state == "dropping" and r.problems == ("dropping", "behind")
    assert decode_health(r.encode()) == r
    assert state_of(()) == "ok" and state_of({"behind", "store-failing"}) == "store-failing"
    assert set(FIELDS) == set(VALID)


@pytest.mark.parametrize("payload", hostile.poison_health(5))
def test_poison_reports_are_refused_with_bad_health(payload: bytes) -> None:
    with pytest.raises(WireError) as exc:
        decode_health(payload)
    assert exc.value.reason == "bad-health"


@FUZZ
@given(st.sampled_from(sorted(VALID)), json_values | st.just(...))
def test_reports_with_any_field_decode_or_fail(key: str, value: Any) -> None:
    obj = dict(VALID)
    if value is ...:
        del obj[key]
    else:
        obj[key] = value
    r = total(decode_health, json.dumps(obj).encode())
    if r is not None:  # what InfluxDB gets is well formed
        health_to_line("dev-1", r)
        assert 0 <= r.seq < 2**63 and set(r.problems) <= set(PROBLEMS)


@FUZZ
@given(st.sampled_from(["seq", "ts_ns", "backlog_bytes", "store_errors"]), huge_ints)
def test_every_integer_of_a_report_is_bounded(key: str, value: int) -> None:
    r = total(decode_health, json.dumps({**VALID, key: value}).encode())
    if r is not None:
        assert 0 <= getattr(r, key) < 2**63


@FUZZ
@given(st.binary(max_size=300))
def test_any_bytes_decode_or_fail(data: bytes) -> None:
    total(decode_health, data)
    total(decode_health, hostile.valid_health()[: len(data) % 400] + data)


def test_the_line_has_one_tag_and_a_fixed_set_of_fields() -> None:
    r = decode_health(hostile.valid_health())
    line = health_to_line("dev-1", r)
    head, fields, ts = line.split(" ")
    assert head == "agent_health,device_id=dev-1" and int(ts) == r.ts_ns
    keys = [f.split("=")[0] for f in fields.split(",")]
    assert {f"{k}" for k in KNOWN_DROPS} <= set(keys)
    assert "dropped_made_up" not in keys  # an unknown name is added into dropped_other
    assert "dropped_other=2i" in fields and "dropped_late=3i" in fields
    assert 'state="dropping"' in fields and "drops_total=5i" in fields
    assert "last_ack_age_s" not in keys  # null: left out
    # a report with every optional value and every drop writes the same keys, plus those
    full = HealthReport(**{**r.__dict__, "last_ack_age_s": 1.0, "drops": {"x": 1}})
    full_keys = {f.split("=")[0] for f in health_to_line("d", full).split(" ")[1].split(",")}
    assert full_keys - set(keys) == {"last_ack_age_s"}


def test_the_ingestor_decodes_plans_and_quarantines_reports() -> None:
    cfg = IngestConfig()
    ok = decode_message("telemetry/v1/dev-1/health", hostile.valid_health(7), cfg)
    assert ok.kind == "health" and ok.health is not None and ok.seq == 7
    (planned,) = plan_group([ok], cfg).planned
    assert planned.lines[0].startswith("agent_health,device_id=dev-1 ") and not planned.objects
    bad = decode_message("telemetry/v1/dev-1/health", hostile.poison_health(8)[0], cfg)
    assert bad.error is not None and bad.error.reason == "bad-health" and bad.device == "dev-1"
    assert decode_message("telemetry/v1/dev-1/health", hostile.poison_health(8)[1], cfg).seq == 8
    wrong = decode_message("telemetry/v1/a/b/health", hostile.valid_health(), cfg)
    assert wrong.error is not None and wrong.error.reason == "bad-topic"


def test_acks_carry_the_cloud_clock_outside_the_mac() -> None:
    key = b"k" * 32
    ack = Ack(5, "stored").signed("dev-1", key).at(123)
    back = decode_ack(ack.encode())
    assert back.ts_ns == 123 and back.verify("dev-1", key)
    assert decode_ack(b'{"seq":5,"status":"stored"}').ts_ns == 0
    with pytest.raises(WireError):
        decode_ack(b'{"seq":5,"status":"stored","ts_ns":-1}')


def test_an_ack_with_a_generation_covers_it_and_the_cloud_clock_with_its_mac() -> None:
    key = b"k" * 32
    ack = Ack(5, "stored", generation=77).at(123).signed("dev-1", key)
    back = decode_ack(ack.encode())
    assert (back.generation, back.ts_ns) == (77, 123) and back.verify("dev-1", key)
    assert back.covers_time
    for field, value in (("generation", 78), ("ts_ns", 124), ("seq", 6)):
        assert not dataclasses.replace(back, **{field: value}).verify("dev-1", key), field
    with pytest.raises(WireError):
        decode_ack(b'{"seq":5,"status":"stored","generation":-1}')


def test_the_clock_offset_takes_the_shortest_round_trip_and_ignores_resends() -> None:
    c = Clock()
    d = wall_minus_mono_ns()  # the wall clock against the monotonic one, now

    def ack(seq: int, cloud_ns: int, at_mono: int, trusted: bool = True, step: int = 0) -> None:
        c.acked(
            seq,
            cloud_ns,
            received_wall_ns=d + step + at_mono,
            received_mono_ns=at_mono,
            trusted=trusted,
        )

    assert c.estimate() is None and c.offset_ns() == 0
    c.published(1, 1_000)
    ack(1, cloud_ns=d + 5_000 + 10_000, at_mono=2_000)  # rtt 1000 ns, cloud 13.5 µs ahead
    c.published(2, 10_000)
    ack(2, cloud_ns=1, at_mono=30_000)  # a longer round trip: not the estimate
    c.published(3, 40_000)
    c.published(3, 41_000)  # resent: which publish the ack answers is not known
    ack(3, cloud_ns=99, at_mono=41_001)
    est = c.estimate()
    assert est is not None and est.rtt_s == pytest.approx(1e-6)
    assert est.offset_s == pytest.approx((15_000 - 1_500) / 1e9)
    assert c.offset_ns() == 13_500


def test_a_step_of_the_wall_clock_voids_the_offset_measured_before_it() -> None:
    c = Clock()
    d = wall_minus_mono_ns()
    hour = 3600 * 10**9
    # measured while the wall clock was an hour behind (it has been stepped since):
    # the shortest round trip, but not the clock as it is now
    c.published(1, 1_000)
    c.acked(1, d - hour + 2 * hour, received_wall_ns=d - hour + 2_000, received_mono_ns=2_000)
    assert c.estimate() is None and c.offset_ns() == 0
    # after the step: the next ack counts at once, whatever its round trip
    c.published(2, 10_000)
    c.acked(2, d + 110_000, received_wall_ns=d + 110_000, received_mono_ns=110_000)
    est = c.estimate()
    assert est is not None and abs(est.offset_s) < 1e-4
    # an ack whose MAC does not cover its clock is shown, but not acted on
    c2 = Clock()
    c2.published(1, 1_000)
    c2.acked(1, d + hour, received_wall_ns=d + 2_000, received_mono_ns=2_000, trusted=False)
    assert c2.estimate() is not None and c2.offset_ns() == 0


def cfg_with(**health: Any) -> AgentConfig:
    return AgentConfig(storage=StorageConfig(max_bytes=1 << 20), health=HealthConfig(**health))


def test_reports_at_start_on_change_on_interval_and_at_stop(store: Store) -> None:
    rep = Reporter(cfg_with(interval_s=3600), store, Clock())
    assert rep.tick(intake_up=True, forward_up=True)
    assert not rep.tick(intake_up=True, forward_up=True)  # checked at most once a second
    rep._next_check = 0.0
    assert not rep.tick(intake_up=True, forward_up=True)  # nothing changed, not yet due
    rep._next_check = 0.0
    assert not rep.tick(intake_up=True, forward_up=False)  # a change, within 10 s of a report
    rep._next_check = rep._next_change = 0.0
    assert rep.tick(intake_up=True, forward_up=False)  # the link went down
    rep._next_check, rep._next_report = 0.0, 0.0
    assert rep.tick(intake_up=True, forward_up=False)  # due
    assert rep.tick(intake_up=True, forward_up=False, stopping=True)
    got = reports(store)
    assert [(r.reason, r.state) for r in got] == [
        ("start", "ok"),
        ("change", "link-down"),
        ("interval", "link-down"),
        ("stop", "link-down"),
    ]
    assert [r.seq for r in got] == [1, 2, 3, 4]  # the device's seq counter
    assert got[0].disk_budget_bytes == 1 << 20 and got[0].disk_used_bytes > 0
    assert store.counters()["health_reports"] == 4


def test_drops_store_errors_and_backlog_become_problems(store: Store) -> None:
    rep = Reporter(cfg_with(behind_after_s=60), store, Clock())
    rep.tick(intake_up=True, forward_up=True)
    with store.tx():
        store.add_counter("dropped_late", 2)
        store.add_counter("store_errors", 1)
        seq = outbox.next_seq(store)
        store.conn.execute(
            "INSERT INTO outbox(seq, created_ns, windows, readings, payload, state) "
            "VALUES (?, ?, 1, 10, x'00', 'pending')",
            (seq, time.time_ns() - 61 * 10**9),
        )
    rep._next_check = rep._next_change = 0.0
    assert rep.tick(intake_up=True, forward_up=True)
    last = reports(store)[-1]
    assert last.reason == "change" and last.problems == ("store-failing", "dropping", "behind")
    assert last.drops == {"dropped_late": 2} and last.store_errors == 1
    assert last.backlog_batches == 1 and last.backlog_readings == 10
    assert last.oldest_unsent_age_s is not None and last.oldest_unsent_age_s > 60


def test_the_budget_drops_old_reports_before_any_reading(tmp_path: Path) -> None:
    from edge_agent.pipeline import budget

    store = Store(tmp_path / "b.db")
    rep = Reporter(cfg_with(), store, Clock())
    for _ in range(400):  # a flapping state, before CHANGE_EVERY_S: 400 reports
        rep._next_check = rep._next_report = 0.0
        rep.tick(intake_up=True, forward_up=False)
    before = budget.used_bytes(store)
    res = budget.enforce(store, before - 64 * 1024)
    assert res.used_bytes <= before - 64 * 1024
    kept = reports(store)
    assert 1 <= len(kept) < 400 and kept[-1].seq == 400  # the newest stays
    assert store.counters()["dropped_health"] == 400 - len(kept)
    assert res.dropped_batches == 0 and res.pruned_chunks == 0


def test_at_most_max_unsent_reports_wait_and_the_rest_are_counted(store: Store) -> None:
    rep = Reporter(cfg_with(max_unsent=3), store, Clock())
    for _ in range(7):
        rep._next_check = rep._next_report = 0.0
        rep.tick(intake_up=True, forward_up=False)
    assert [r.seq for r in reports(store)] == [5, 6, 7]  # the newest are kept
    assert store.counters()["dropped_health"] == 4
    # they leave after alerts, before batches, as kind "health"
    due = outbox.due(store, 10)
    assert [(o.seq, o.kind) for o in due] == [(5, "health"), (6, "health"), (7, "health")]
    assert outbox.acknowledge(store, 6, stored=True)
    assert store.counters()["health_acked"] == 1 and outbox.count_unacked(store) == 2


def test_the_fleet_is_bounded_and_keeps_the_newest_report() -> None:
    f = DeviceRegistry(FleetConfig(max_devices=2).max_devices)
    new = decode_health(hostile.valid_health(seq=9))
    old = decode_health(hostile.valid_health(seq=3))
    f.heard("a", new, now_ns=1)
    f.heard("a", old, now_ns=2)  # a resend of an old report after an outage
    (a,) = f.snapshot()
    assert a.health == new and a.last_heard_ns == 2
    f.heard("b", now_ns=3)
    f.heard("c", now_ns=4)
    assert [d.device for d in f.snapshot()] == ["b", "c"] and f.forgotten == 1


def test_metrics_show_each_device(tmp_path: Path) -> None:
    fleet = DeviceRegistry(10, health_fresh_s=900)
    now = time.time_ns()
    fleet.heard("dev-1", decode_health(hostile.valid_health()), now_ns=now)
    fleet.heard("dev-2", now_ns=6 * 10**9)
    fleet.heard("dev-3", decode_health(hostile.valid_health()), now_ns=now - 901 * 10**9)
    server = MetricsServer("127.0.0.1:0", Stats(), Liveness(), fleet).start()
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
    finally:
        server.stop()
    assert 'cloud_ingest_device_last_heard_timestamp_seconds{device_id="dev-2"} 6.0' in text
    assert 'edge_agent_backlog_batches{device_id="dev-1"} 4.0' in text
    assert 'edge_agent_ok{device_id="dev-1"} 0.0' in text
    assert 'edge_agent_drops_total{device_id="dev-1"} 5.0' in text
    assert 'edge_agent_ok{device_id="dev-2"}' not in text  # no report from it yet
    assert 'edge_agent_ok{device_id="dev-3"}' not in text  # its report is too old
    assert 'cloud_ingest_device_last_heard_timestamp_seconds{device_id="dev-3"}' in text
    assert "cloud_ingest_fleet_devices 3.0" in text


def test_the_technician_sees_the_reports_in_status(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from edge_agent.cli import main as agent_main
    from edge_agent.technician.status import read_status

    db = tmp_path / "buf.db"
    s = Store(db)
    rep = Reporter(cfg_with(), s, Clock())
    rep.tick(intake_up=True, forward_up=False)
    rep.tick(intake_up=True, forward_up=False, stopping=True)
    s.close()
    assert read_status(db)["unsent_health"] == 2
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[storage]\npath = "{db}"\n')
    res = CliRunner().invoke(agent_main, ["status", "-c", str(cfg)])
    assert res.exit_code == 0, res.output
    assert "2 made, 2 unsent" in res.output
