"""Every command has help text; config errors give one line and exit code 2."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

from cloud_ingest.cli import main as ingest_main
from edge_agent.cli import main as agent_main
from firmware_sim.cli import main as sim_main

MAINS = [agent_main, ingest_main, sim_main]


def walk(
    cmd: click.Command, path: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], click.Command]]:
    out = [(path, cmd)]
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            out += walk(sub, (*path, name))
    return out


@pytest.mark.parametrize("main", MAINS, ids=lambda m: m.name)
def test_every_command_has_help(main: click.Group) -> None:
    for path, cmd in walk(main):
        assert cmd.help and len(cmd.help.strip()) > 20, f"{main.name} {' '.join(path)}"
        res = CliRunner().invoke(main, [*path, "--help"])
        assert res.exit_code == 0, res.output
        for p in cmd.params:
            if isinstance(p, click.Option) and p.name != "help":
                assert p.help, f"{main.name} {' '.join(path)} {p.opts}"


@pytest.mark.parametrize("main", MAINS, ids=lambda m: m.name)
def test_config_check_names_key_and_file(main: click.Group, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("no_such_key = 1\n")
    res = CliRunner().invoke(main, ["config", "check", str(bad)])
    assert res.exit_code == 2
    assert f"config error in {bad}: no_such_key: unknown key" in res.output
    assert len(res.output.strip().splitlines()) == 1


@pytest.mark.parametrize("main", MAINS, ids=lambda m: m.name)
def test_sample_passes_check(main: click.Group, tmp_path: Path) -> None:
    sample = CliRunner().invoke(main, ["config", "sample"])
    assert sample.exit_code == 0
    p = tmp_path / "s.toml"
    key = tmp_path / "ack.key"  # the agent's sample verifies acks with the device's key
    key.write_text("ab" * 32 + "\n")
    key.chmod(0o600)
    p.write_text(sample.output.replace("/etc/iot-telemetry/edge-agent-ack.key", str(key)))
    res = CliRunner().invoke(main, ["config", "check", str(p)])
    assert res.exit_code == 0 and "ok" in res.output
    if main is agent_main:  # as shipped, without the key: one line naming it
        p.write_text(sample.output)
        res = CliRunner().invoke(main, ["config", "check", str(p)])
        assert res.exit_code == 2 and "forward.ack_key_file" in res.output


def test_run_with_bad_config_stops_before_starting(tmp_path: Path) -> None:
    bad = tmp_path / "agent.toml"
    bad.write_text("[window]\nwidth_s = 0\n")
    res = CliRunner().invoke(agent_main, ["run", "-c", str(bad)])
    assert res.exit_code == 2 and "window.width_s: must be > 0" in res.output


def test_run_with_unusable_buffer_path_fails_in_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[storage]\npath = "{tmp_path / "no" / "such" / "dir.sqlite"}"\n')
    res = CliRunner().invoke(agent_main, ["run", "-c", str(cfg)])
    assert res.exit_code == 1
    assert res.output.startswith("error: cannot use the buffer") and res.output.count("\n") == 1


def test_status_without_buffer_fails_cleanly(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'[storage]\npath = "{tmp_path / "none.sqlite"}"\n')
    res = CliRunner().invoke(agent_main, ["status", "-c", str(cfg)])
    assert res.exit_code == 1 and "no agent buffer" in res.output


def test_edge_agent_docs_list_every_command() -> None:
    """docs/edge-agent.md's command table and the CLI must not drift apart."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "edge-agent.md").read_text()
    documented = set(re.findall(r"^\| `edge-agent ([a-z ]+?)(?: FILE)?` \|", doc, re.M))
    commands = {
        " ".join(path)
        for path, cmd in walk(agent_main)
        if path and not isinstance(cmd, click.Group)
    }
    assert documented == commands


@pytest.mark.parametrize(
    "args",
    [
        ["replay", "--from", "http://nope"],
        ["rollup", "--from", "http://nope", "--since", "2026-01-01"],
        ["compact", "--from", "http://nope", "--since-day", "2026-01-01"],
    ],
)
def test_a_bad_lake_url_is_one_line_and_exit_2(args: list[str]) -> None:
    res = CliRunner().invoke(ingest_main, args)
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error: --from: must be file://") and res.output.count("\n") == 1


#: The technician commands that read the buffer ({tmp}: the test's folder).
BUFFER_READERS = [
    ["status"],
    ["sensors"],
    ["quarantine"],
    ["buffer", "check"],
    ["export", "--since", "2026-01-01", "--until", "2026-01-02", "-o", "{tmp}/x.csv"],
]


@pytest.mark.parametrize("args", BUFFER_READERS)
def test_a_buffer_that_is_not_a_database_is_one_line_and_exit_1(
    args: list[str], tmp_path: Path
) -> None:
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    (tmp_path / "bad.sqlite").write_text("not a database\n")
    cfg = tmp_path / "a.toml"
    cfg.write_text(f'[storage]\npath = "{tmp_path / "bad.sqlite"}"\n')
    res = CliRunner().invoke(agent_main, [*args, "-c", str(cfg)])
    assert res.exit_code == 1, res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("error: the buffer cannot be read (file is not a database)")
    assert "Traceback" not in res.output
    assert not list(tmp_path.glob("x.csv*"))  # a failed export leaves no half file


def test_a_lake_folder_that_does_not_exist_is_one_line_and_exit_2(tmp_path: Path) -> None:
    res = CliRunner().invoke(ingest_main, ["replay", "--from", f"file://{tmp_path}/none"])
    assert res.exit_code == 2 and res.output.startswith("error: --from: no lake at ")


@pytest.mark.parametrize(
    "args", [*BUFFER_READERS, ["buffer", "repair"], ["flush", "--timeout", "1"]]
)
def test_a_buffer_path_that_is_a_directory_is_one_line_and_exit_1(
    args: list[str], tmp_path: Path
) -> None:
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    (tmp_path / "buf").mkdir()
    cfg = tmp_path / "a.toml"
    cfg.write_text(f'[storage]\npath = "{tmp_path / "buf"}"\n')
    res = CliRunner().invoke(agent_main, [*args, "-c", str(cfg)])
    assert res.exit_code == 1, res.output
    last = res.output.strip().splitlines()[-1]
    assert last.endswith(f"{tmp_path / 'buf'}: it is a directory, not a file"), last
    assert "Traceback" not in res.output


def test_an_export_to_a_missing_folder_is_one_line_and_exit_1(tmp_path: Path) -> None:
    cfg = tmp_path / "a.toml"
    cfg.write_text(f'[storage]\npath = "{tmp_path / "buf.sqlite"}"\n')
    from edge_agent.store import Store

    Store(tmp_path / "buf.sqlite").close()
    out = tmp_path / "none" / "x.csv"
    args = ["export", "--since", "2026-01-01", "--until", "2026-01-02", "-o", str(out)]
    res = CliRunner().invoke(agent_main, [*args, "-c", str(cfg)])
    assert res.exit_code == 1, res.output
    assert res.output.strip().splitlines()[-1] == (
        f"error: cannot write {out}: No such file or directory"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--duration", "-5"], "duration_s: must be > 0"),
        (["--port", "0"], "port: must be a TCP port"),
    ],
)
def test_a_bad_firmware_sim_option_is_a_usage_error(args: list[str], message: str) -> None:
    res = CliRunner().invoke(sim_main, ["run", *args])
    assert res.exit_code == 2, res.output
    assert f"Error: {message}" in res.output and "Traceback" not in res.output


def test_replay_of_a_damaged_lake_object_is_counted_and_exit_1(tmp_path: Path) -> None:
    import json

    key = "aggregates/dt=2026-01-01/part-1-ab-000001.parquet"
    (tmp_path / key).parent.mkdir(parents=True)
    (tmp_path / key).write_bytes(b"PAR1 not really")
    res = CliRunner().invoke(ingest_main, ["replay", "--quiet", "--from", f"file://{tmp_path}"])
    assert res.exit_code == 1, res.output
    summary = json.loads(res.output.strip().splitlines()[-1])
    assert summary["damaged"] == 1 and summary["objects"] == 0


def _buffer(tmp_path: Path) -> Path:
    """A config for an empty buffer in ``tmp_path``."""
    from edge_agent.store import Store

    Store(tmp_path / "buf.sqlite").close()
    cfg = tmp_path / "a.toml"
    cfg.write_text(f'[storage]\npath = "{tmp_path / "buf.sqlite"}"\n')
    return cfg


@pytest.mark.parametrize(
    ("since", "until"),
    [("yesterday", "2026-01-02"), ("2026-01-01", "soon"), ("2026-01-02", "2026-01-01")],
)
def test_a_bad_export_time_is_a_usage_error_exit_2(tmp_path: Path, since: str, until: str) -> None:
    cfg = _buffer(tmp_path)
    args = ["export", "--since", since, "--until", until, "-o", str(tmp_path / "x.csv")]
    res = CliRunner().invoke(agent_main, [*args, "-c", str(cfg)])
    assert res.exit_code == 2, res.output
    assert "--since/--until" in res.output or "--until" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "x.csv").exists()


def test_export_takes_times_before_now_and_until_defaults_to_now(tmp_path: Path) -> None:
    from edge_agent.pipeline import buffer
    from edge_agent.store import Store
    from shared.readings import ReadingChunk

    cfg = _buffer(tmp_path)
    s = Store(tmp_path / "buf.sqlite")
    now = time.time_ns()
    ts = np.array([now - 3600 * 10**9, now - 60 * 10**9])  # an hour ago, a minute ago
    late = buffer.LatePolicy(width_ns=10**10, max_age_ns=10**13)
    buffer.store_chunk(
        s, buffer.SensorRegistry(s), ReadingChunk("n", "t", "C", ts, np.array([1.0, 2.0])),
        b"m", late=late,
    )  # fmt: skip
    s.close()
    out = tmp_path / "x.csv"
    res = CliRunner().invoke(
        agent_main, ["export", "--kind", "raw", "--since", "-10m", "-o", str(out), "-c", str(cfg)]
    )
    assert res.exit_code == 0, res.output
    assert "wrote 1 rows" in res.output  # the minute-old reading, not the hour-old one


def test_flush_on_a_missing_buffer_creates_nothing(tmp_path: Path) -> None:
    cfg = tmp_path / "a.toml"
    missing = tmp_path / "none.sqlite"
    cfg.write_text(f'[storage]\npath = "{missing}"\n')
    res = CliRunner().invoke(agent_main, ["flush", "--timeout", "1", "-c", str(cfg)])
    assert res.exit_code == 1, res.output
    assert res.output.strip() == (
        f"error: no agent buffer at {missing}: nothing to flush (see storage.path)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.toml"]


def test_sensors_json_is_strict_json(tmp_path: Path) -> None:
    from edge_agent.pipeline import buffer
    from edge_agent.store import Store
    from shared.readings import ReadingChunk

    cfg = _buffer(tmp_path)
    s = Store(tmp_path / "buf.sqlite")
    t0 = 1_800_000_000 * 10**9
    ts = np.array([t0, t0 + 50 * 10**9])  # windows between them hold nothing: NaN means
    late = buffer.LatePolicy(width_ns=10**10, max_age_ns=10**13)
    buffer.store_chunk(
        s, buffer.SensorRegistry(s), ReadingChunk("n", "t", "C", ts, np.array([1.0, 2.0])),
        b"m", late=late,
    )  # fmt: skip
    s.close()
    res = CliRunner().invoke(agent_main, ["sensors", "--json", "-c", str(cfg)])
    assert res.exit_code == 0, res.output

    def refuse(name: str) -> None:
        raise ValueError(f"not strict JSON: {name}")

    (view,) = json.loads(res.output, parse_constant=refuse)
    assert None in view["trend"] and 1.0 in view["trend"] and 2.0 in view["trend"]


def test_the_config_comes_from_c_then_the_environment_then_the_default_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a device the technician types `edge-agent status`: the deployed config at
    /etc/iot-telemetry/edge-agent.toml (here a file of the test's) is used, or the
    one $EDGE_AGENT_CONFIG names; -c wins over both."""
    import edge_agent.cli as agent_cli

    def config(name: str) -> Path:
        (tmp_path / name).mkdir()
        cfg = _buffer(tmp_path / name)
        return cfg

    default, env, explicit = config("default"), config("env"), config("explicit")
    monkeypatch.setattr(agent_cli, "DEFAULT_CONFIG", default)

    def buffer_of(*args: str, env_var: str | None = None) -> str:
        envs = {"EDGE_AGENT_CONFIG": env_var} if env_var else {}
        res = CliRunner(env=envs).invoke(agent_main, ["status", "--json", *args])
        assert res.exit_code == 0, res.output
        return str(json.loads(res.output)["buffer"])

    assert buffer_of() == str(tmp_path / "default" / "buf.sqlite")
    assert buffer_of(env_var=str(env)) == str(tmp_path / "env" / "buf.sqlite")
    assert buffer_of("-c", str(explicit), env_var=str(env)) == str(
        tmp_path / "explicit" / "buf.sqlite"
    )
    monkeypatch.setattr(agent_cli, "DEFAULT_CONFIG", tmp_path / "none.toml")
    monkeypatch.chdir(tmp_path)  # the built-in default is a file in the current folder
    res = CliRunner().invoke(agent_main, ["status", "--json"])
    assert res.exit_code == 1 and "no agent buffer at edge-agent.sqlite" in res.output


def test_cloud_ingest_takes_its_config_from_the_environment(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[influx]\nurl = "http://127.0.0.1:9"\n')
    res = CliRunner(env={"CLOUD_INGEST_CONFIG": str(cfg)}).invoke(
        ingest_main, ["report", "--since", "-1d", "--out", str(tmp_path / "r.html")]
    )
    assert res.exit_code == 1 and "InfluxDB unreachable at http://127.0.0.1:9" in res.output


def test_sensors_rate_age_and_stale(tmp_path: Path) -> None:
    """A 1 Hz sensor with 30 s of data reads 1 Hz (not 30/60); one that stopped is
    flagged stale with its age; the table shows both."""
    from edge_agent.pipeline import buffer
    from edge_agent.store import Store
    from edge_agent.technician.sensors import read_sensors
    from shared.readings import ReadingChunk

    cfg = _buffer(tmp_path)
    db = tmp_path / "buf.sqlite"
    s = Store(db)
    now = time.time_ns()
    late = buffer.LatePolicy(width_ns=10**10, max_age_ns=10**13)
    reg = buffer.SensorRegistry(s)
    live = now - np.arange(30, 0, -1) * 10**9  # 30 readings, 1 s apart, to a second ago
    gone = now - np.arange(200, 170, -1) * 10**9  # the same, stopped 171 s ago
    for name, ts in (("live", live), ("gone", gone)):
        chunk = ReadingChunk("n", name, "C", ts.astype(np.int64), np.ones(30))
        buffer.store_chunk(s, reg, chunk, name.encode(), late=late)
    s.close()
    views = {v.sensor: v for v in read_sensors(db, width_ns=10**10, now_ns=now)}
    assert views["live"].rate_hz == pytest.approx(1.0)
    assert views["live"].last_seen_age_s == pytest.approx(1.0) and not views["live"].stale
    assert views["gone"].stale and views["gone"].last_seen_age_s == pytest.approx(171.0)
    res = CliRunner().invoke(agent_main, ["sensors", "-c", str(cfg)])
    assert res.exit_code == 0, res.output
    (gone_row,) = [line for line in res.output.splitlines() if "n/gone" in line]
    assert "min ago  STALE" in gone_row or "s ago  STALE" in gone_row
    (live_row,) = [line for line in res.output.splitlines() if "n/live" in line]
    assert "1 Hz" in live_row and "STALE" not in live_row


def test_doctor_reports_a_broken_config_and_still_checks_the_clock(tmp_path: Path) -> None:
    cfg = tmp_path / "a.toml"
    cfg.write_text("[window]\nwidht_s = 10\n")
    res = CliRunner().invoke(agent_main, ["doctor", "--json", "-c", str(cfg)])
    assert res.exit_code == 2, res.output
    checks = {c["name"]: c for c in json.loads(res.output)}
    assert checks["config"]["level"] == "fail" and "widht_s" in checks["config"]["detail"]
    assert "config sample" in checks["config"]["hint"]
    assert checks["clock"]["level"] == "ok"  # what needs no config is still checked


def test_doctor_fails_delivery_when_the_cloud_acknowledges_nothing(tmp_path: Path) -> None:
    """Both brokers may answer while nothing is acknowledged (the ingestor is down):
    the delivery check says so, where the other checks all say ok."""
    from edge_agent.config import AgentConfig, StorageConfig
    from edge_agent.pipeline import outbox
    from edge_agent.store import Store
    from edge_agent.technician.doctor import check_delivery

    db = tmp_path / "buf.sqlite"
    s = Store(db)
    now = time.time_ns()
    with s.tx():
        seq = outbox.next_seq(s)
        s.conn.execute(
            "INSERT INTO outbox(seq, created_ns, windows, readings, payload, state) "
            "VALUES (?, ?, 1, 10, x'00', 'sent')",
            (seq, now - 700 * 10**9),
        )
    s.close()
    cfg = AgentConfig(storage=StorageConfig(path=str(db)))
    (check,) = check_delivery(cfg, now)
    assert check.level == "fail" and "acknowledged nothing for ever" in check.detail
    s = Store(db)
    outbox.acknowledge(s, 999, stored=True, now_ns=now - 30 * 10**9)  # an ack 30 s ago
    s.close()
    (check,) = check_delivery(cfg, now)  # acks arrive, but the oldest is over 10 min old
    assert check.level == "warn" and "slower than the data" in check.detail
    s = Store(db)
    s.conn.execute("DELETE FROM outbox")
    s.close()
    assert check_delivery(cfg, now)[0].detail == "nothing waits for the cloud"


def test_doctor_colours_fail_and_warn_on_a_terminal_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "a.toml"
    cfg.write_text("[intake]\nbroker = 5\n")  # a broken config: a FAIL line
    red = "\x1b[31m"
    coloured = CliRunner().invoke(agent_main, ["doctor", "-c", str(cfg)], color=True)
    assert coloured.exit_code == 2 and red in coloured.output, coloured.output
    assert "FAIL" in click.unstyle(coloured.output)
    plain = CliRunner().invoke(agent_main, ["doctor", "-c", str(cfg)])  # not a terminal
    assert "\x1b[" not in plain.output and "FAIL" in plain.output
    monkeypatch.setenv("NO_COLOR", "1")
    no_color = CliRunner().invoke(agent_main, ["doctor", "-c", str(cfg)], color=True)
    assert "\x1b[" not in no_color.output
