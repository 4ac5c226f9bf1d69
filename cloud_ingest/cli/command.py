"""``cloud-ingest command``: the operators' side of commands (docs/commands.md):
a signing key, sending a signed command to a device, watching the results."""

from __future__ import annotations

import json
import queue
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import click

from cloud_ingest.cli.app import DEFAULT_CONFIG, config_option, main
from cloud_ingest.config import IngestConfig
from shared.cli import EXIT_CONFIG, EXIT_FAILURE, load_or_exit


@main.group()
def command() -> None:
    """Send signed commands to devices and watch their results (docs/commands.md).

    Commands are signed with an Ed25519 key only the operators hold (`keygen`); a
    device runs a command only if it verifies with one of the public keys in its
    [commands] keys, once per id, before its expiry. The MQTT identity in
    [mqtt] must be an operator's (`cloud-ingest broker-acl --operator NAME`)."""


@command.command("keygen")
@click.option("--id", "key_id", required=True, help="The key's id, e.g. ops-2026.")
@click.option(
    "--dir", "folder", type=click.Path(file_okay=False), default=".", show_default=True,
    help="Where to write <id>.key (private, 0600) and <id>.pub (for the devices).",
)  # fmt: skip
def keygen(key_id: str, folder: str) -> None:
    """Make a signing key: <id>.key stays with the operators, <id>.pub goes to every
    device (the Ansible role's edge_agent_command_keys)."""
    from shared import commands
    from shared.topics import is_valid_id

    if not is_valid_id(key_id):
        raise click.UsageError(f"--id {key_id!r} is not 1-64 characters of A-Z a-z 0-9 _ . -")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    private, public = out / f"{key_id}.key", out / f"{key_id}.pub"
    for path in (private, public):
        if path.exists():
            click.echo(f"error: {path} exists; not overwritten", err=True)
            sys.exit(EXIT_FAILURE)
    key = commands.new_private_key()
    private.touch(mode=0o600)
    private.write_bytes(commands.private_pem(key))
    public.write_bytes(commands.public_pem(key.public_key()))
    click.echo(f"{private}\n{public}")


def _default_journal() -> Path:
    import os

    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "cloud-ingest" / "commands.jsonl"


journal_option = click.option(
    "--journal",
    type=click.Path(dir_okay=False),
    help="The file of commands sent (JSON lines). Default: "
    "$XDG_STATE_HOME/cloud-ingest/commands.jsonl (~/.local/state/…).",
)


def _client(cfg: IngestConfig) -> Any:
    """A paho client on [mqtt]'s broker with its TLS and credentials: no session
    (an operator's command tool keeps nothing at the broker)."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from shared.auth import apply_paho
    from shared.tls import ssl_context

    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"operator-{secrets.token_hex(6)}",
        protocol=mqtt.MQTTv5,
    )
    ctx = ssl_context(cfg.mqtt.tls)
    if ctx is not None:
        client.tls_set_context(ctx)
    apply_paho(client, cfg.mqtt.auth)
    return client


def _connect(client: Any, cfg: IngestConfig, timeout_s: float = 10.0) -> None:
    connected: queue.SimpleQueue[Any] = queue.SimpleQueue()
    client.on_connect = lambda _c, _u, _f, rc, _p: connected.put(rc)
    try:
        client.connect(cfg.mqtt.host, cfg.mqtt.port, keepalive=cfg.mqtt.keepalive_s)
    except OSError as exc:
        click.echo(f"error: the broker at {cfg.mqtt.host}:{cfg.mqtt.port}: {exc}", err=True)
        sys.exit(EXIT_FAILURE)
    client.loop_start()
    try:
        rc = connected.get(timeout=timeout_s)
    except queue.Empty:
        rc = None
    if rc is None or rc.is_failure:
        client.loop_stop()
        click.echo(f"error: the broker refused the connection: {rc}", err=True)
        sys.exit(EXIT_FAILURE)


def _subscribe(client: Any, topic: str) -> queue.SimpleQueue[tuple[str, bytes]]:
    got: queue.SimpleQueue[tuple[str, bytes]] = queue.SimpleQueue()
    subscribed: queue.SimpleQueue[Any] = queue.SimpleQueue()
    client.on_message = lambda _c, _u, m: got.put((m.topic, bytes(m.payload)))
    client.on_subscribe = lambda _c, _u, _m, codes, _p: subscribed.put(codes)
    client.subscribe(topic, qos=1)
    try:
        codes = subscribed.get(timeout=10)
    except queue.Empty:
        click.echo(f"error: the broker did not answer the subscription to {topic}", err=True)
        sys.exit(EXIT_FAILURE)
    if any(c.is_failure for c in codes):
        click.echo(f"error: the broker refused the subscription to {topic}: {codes}", err=True)
        sys.exit(EXIT_FAILURE)
    return got


def _show(device: str, raw: bytes, as_json: bool) -> dict[str, Any] | None:
    from shared.commands import decode_result
    from shared.errors import WireError

    try:
        r = decode_result(raw)
    except WireError as exc:
        click.echo(f"{device}: not a result ({exc})", err=True)
        return None
    obj = {
        "device_id": device, "id": r.id, "kind": r.kind, "status": r.status,
        "reason": r.reason, "ts_ns": r.ts_ns, "result": dict(r.result),
    }  # fmt: skip
    if as_json:
        click.echo(json.dumps(obj, separators=(",", ":")))
    else:
        why = f" ({r.reason})" if r.reason else ""
        click.echo(f"{device} {r.id} {r.kind or '-'}: {r.status}{why} {json.dumps(dict(r.result))}")
    return obj


def _signer(key_file: str, key_id: str | None) -> tuple[Any, str]:
    from shared import commands

    try:
        private = commands.load_private(Path(key_file))
    except (OSError, ValueError) as exc:
        click.echo(f"error: --key-file: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    return private, key_id or Path(key_file).stem


def _send(
    cfg: IngestConfig,
    cmds: list[Any],
    signer: tuple[Any, str],
    *,
    expires_in: float,
    wait: float,
    as_json: bool,
    journal: str | None,
) -> None:
    """Sign and publish ``cmds`` (shared.commands.Command), journal them, and with
    ``wait`` print their results; exits 1 if one is not ``done`` in time."""
    import paho.mqtt.client as mqtt

    from cloud_ingest.sinks.lineproto import command_sent_line
    from shared import commands
    from shared.errors import WireError
    from shared.mqttprops import publish_properties
    from shared.topics import command_topic, device_from_result_topic, result_topic

    private, key_id = signer
    _record(cfg, [command_sent_line(c.device_id, c.kind, c.id, c.expires_ns, c.issued_ns)
                  for c in cmds])  # fmt: skip
    payloads = []
    for cmd in cmds:
        try:
            payload = commands.sign(cmd, key_id, private)
            commands.verify(payload, {key_id: private.public_key()})  # what the device does
        except (ValueError, WireError) as exc:
            raise click.UsageError(f"not a command a device can take: {exc}") from None
        payloads.append(payload)
    prefix = cfg.mqtt.topic_prefix
    client = _client(cfg)
    _connect(client, cfg)
    try:
        results = {}
        if wait:
            for device in {c.device_id for c in cmds}:
                results[device] = _subscribe(client, result_topic(device, prefix))
        props = publish_properties("application/json", [], int(expires_in))
        path = Path(journal) if journal else _default_journal()
        path.parent.mkdir(parents=True, exist_ok=True)
        for cmd, payload in zip(cmds, payloads, strict=True):
            topic = command_topic(cmd.device_id, prefix)
            info = client.publish(topic, payload, qos=1, properties=props)
            info.wait_for_publish(timeout=10)
            if not info.is_published() or info.rc != mqtt.MQTT_ERR_SUCCESS:
                click.echo(f"error: the broker did not take the command ({info.rc})", err=True)
                sys.exit(EXIT_FAILURE)
            entry = {
                "id": cmd.id, "device_id": cmd.device_id, "kind": cmd.kind,
                "issued_ns": cmd.issued_ns, "expires_ns": cmd.expires_ns,
            }  # fmt: skip
            with path.open("a") as fh:  # for `command pending`
                fh.write(json.dumps(entry, separators=(",", ":")) + "\n")
            if not as_json:
                click.echo(
                    f"sent {cmd.id} ({cmd.kind}) to {cmd.device_id}, expires in {expires_in:g} s"
                )
            elif not wait:
                click.echo(json.dumps({"id": cmd.id, "device_id": cmd.device_id, "sent": True}))
        if not wait:
            return
        waiting = {(c.device_id, c.id) for c in cmds}
        failed = False
        deadline = time.monotonic() + wait
        while waiting and (left := deadline - time.monotonic()) > 0:
            for device, got in results.items():
                try:
                    topic, raw = got.get(timeout=min(left, 0.1))
                except queue.Empty:
                    continue
                obj = _show(device_from_result_topic(topic, prefix) or device, raw, as_json)
                if obj is not None and (obj["device_id"], obj["id"]) in waiting:
                    waiting.discard((obj["device_id"], obj["id"]))
                    failed |= obj["status"] != "done"
        for device, cid in sorted(waiting):
            click.echo(f"error: no result for {cid} from {device} within {wait:g} s", err=True)
        if waiting or failed:
            sys.exit(EXIT_FAILURE)
    finally:
        client.disconnect()
        client.loop_stop()


def _command(
    device: str, kind: str, args: dict[str, Any], cid: str | None, expires_in: float
) -> Any:
    from shared.commands import Command
    from shared.topics import is_valid_id

    for name, value in (("DEVICE", device), ("KIND", kind)):
        if not is_valid_id(value):
            raise click.UsageError(f"{name} {value!r} is not an id")
    now = time.time_ns()
    return Command(
        id=cid or f"c-{secrets.token_hex(8)}", device_id=device, kind=kind, issued_ns=now,
        expires_ns=now + int(expires_in * 1e9), args=args,
    )  # fmt: skip


key_options = [
    click.option("--key-file", type=click.Path(dir_okay=False), required=True,
                 help="The signing key (`keygen`'s <id>.key)."),
    click.option("--key-id", help="The key's id, as the devices know it. Default: file name."),
    click.option(
        "--expires-in", type=click.FloatRange(min=1), default=3600.0, show_default=True,
        help="Seconds until the command expires (a device offline longer never runs it).",
    ),
    click.option("--wait", type=click.FloatRange(min=0), default=0.0,
                 help="Wait this many seconds for the devices' results, and print them."),
    click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts."),
]  # fmt: skip


def _key_options(f: Any) -> Any:
    for option in reversed(key_options):
        f = option(f)
    return f


@command.command("send")
@config_option("TOML config file: [mqtt] says which broker, as which operator identity.")
@click.argument("device")
@click.argument("kind")
@click.option("--arg", "args", multiple=True, help="An argument, key=value. Repeatable.")
@click.option("--id", "command_id", help="The command's id. Default: a new random one.")
@_key_options
@journal_option
def send(
    config_path: str | None,
    device: str,
    kind: str,
    args: tuple[str, ...],
    command_id: str | None,
    key_file: str,
    key_id: str | None,
    expires_in: float,
    wait: float,
    as_json: bool,
    journal: str | None,
) -> None:
    """Sign a command and publish it to DEVICE (QoS 1; the broker keeps it for a
    device that is offline, until it expires). KIND: ping, status, raw
    (--arg sensors=GLOB --arg from=TIME --arg to=TIME: the buffer's readings of
    the sensors whose "<node>/<sensor>" matches, in [from, to); times ISO 8601,
    integer ns or -1h on the device's clock; they go to the lake's raw table).
    A desired config goes with `command config`.

    Exit codes: 0 sent (and, with --wait, done), 1 refused, failed or no result in
    time, 2 bad usage or config."""
    cfg = load_or_exit(IngestConfig, config_path, DEFAULT_CONFIG)
    arguments: dict[str, Any] = {}
    for item in args:
        k, eq, v = item.partition("=")
        if not eq or not k:
            raise click.UsageError(f"--arg {item!r} is not key=value")
        arguments[k] = v
    signer = _signer(key_file, key_id)
    cmd = _command(device, kind, arguments, command_id, expires_in)
    _send(cfg, [cmd], signer, expires_in=expires_in, wait=wait, as_json=as_json, journal=journal)


@command.command("config")
@config_option(
    "TOML config file: [mqtt] says which broker, as which operator identity; [influx] "
    "where the desired versions are recorded."
)
@click.argument("devices", nargs=-1, required=True)
@click.option(
    "--file", "fragment_file", type=click.Path(dir_okay=False, exists=True), required=True,
    help="The desired settings: TOML, over each device's config.",
)  # fmt: skip
@click.option("--version", "version", type=click.IntRange(min=1), required=True,
              help="The version: above every version the devices had.")  # fmt: skip
@_key_options
@journal_option
def config_cmd(
    config_path: str | None,
    devices: tuple[str, ...],
    fragment_file: str,
    version: int,
    key_file: str,
    key_id: str | None,
    expires_in: float,
    wait: float,
    as_json: bool,
    journal: str | None,
) -> None:
    """Set the desired config of DEVICES (a group: give them all) to the settings in
    --file, as version --version (docs/commands.md, "Desired configuration"). Each
    device checks them as `edge-agent config check` does, applies them without
    losing a reading, and rolls back by itself if the cloud's acks or its readings
    stop within [commands] config_grace_s; its health report says which version is
    in force. The desired version is recorded in InfluxDB (measurement
    config_desired), where the fleet dashboard shows it beside the reported one.

    Only some settings may be set remotely: alerts, intake.sources, intake.modbus,
    window.lateness_s and max_age_s, forward limits, health reporting, log_level,
    commands.raw_max_readings (never a broker, a key, a path or the device id)."""
    from cloud_ingest.sinks.lineproto import desired_config_line
    from shared.config import read_toml
    from shared.errors import ConfigError

    cfg = load_or_exit(IngestConfig, config_path, DEFAULT_CONFIG)
    try:
        fragment = read_toml(fragment_file)
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_CONFIG)
    signer = _signer(key_file, key_id)
    args = {"version": version, "config": fragment}
    cmds = [_command(d, "config", args, None, expires_in) for d in devices]
    _record(
        cfg, [desired_config_line(c.device_id, version, c.id, fragment, c.issued_ns) for c in cmds]
    )
    _send(cfg, cmds, signer, expires_in=expires_in, wait=wait, as_json=as_json, journal=journal)


def _record(cfg: IngestConfig, lines: list[str]) -> None:
    """Points about what the operators sent, to InfluxDB ([influx]): a warning if it
    cannot take them (the command goes all the same; the journal has it)."""
    from cloud_ingest.sinks.influx import make_point_sink
    from shared.errors import SinkError

    try:
        sink = make_point_sink(cfg.influx)
        try:
            sink.write(lines)
        finally:
            sink.close()
    except SinkError as exc:
        click.echo(f"warning: not recorded in InfluxDB ({exc}); the journal has it", err=True)


@command.command("watch")
@config_option("TOML config file: [mqtt] says which broker, as which operator identity.")
@click.option("--device", help="Only this device's results.")
@click.option("--count", type=click.IntRange(min=1), help="Stop after this many results.")
@click.option("--timeout", type=click.FloatRange(min=0), help="Stop after this many seconds.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def watch(
    config_path: str | None,
    device: str | None,
    count: int | None,
    timeout: float | None,
    as_json: bool,
) -> None:
    """Print the results of commands as devices send them (and again when a device
    resends one the cloud has not acknowledged yet)."""
    from shared.topics import device_from_result_topic, result_filter, result_topic

    cfg = load_or_exit(IngestConfig, config_path, DEFAULT_CONFIG)
    prefix = cfg.mqtt.topic_prefix
    client = _client(cfg)
    _connect(client, cfg)
    try:
        got = _subscribe(client, result_topic(device, prefix) if device else result_filter(prefix))
        deadline = None if timeout is None else time.monotonic() + timeout
        seen = 0
        while count is None or seen < count:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            try:
                topic, raw = got.get(timeout=left)
            except queue.Empty:
                break
            seen += _show(device_from_result_topic(topic, prefix) or "?", raw, as_json) is not None
    except KeyboardInterrupt:
        pass
    finally:
        client.disconnect()
        client.loop_stop()


def _answered(
    reader: Any, cfg: IngestConfig, sent: list[dict[str, Any]]
) -> dict[tuple[str, str], str]:
    """Add to ``sent`` the commands InfluxDB's command_sent knows of (any operator's,
    the last 31 days); return (device, id) → status of those answered."""
    month = time.time_ns() - 31 * 86_400 * 10**9
    known = {(e["device_id"], e["id"]) for e in sent}
    for series in reader.query(
        f'SELECT "id", "expires_ns", "device_id", "kind" FROM "command_sent" WHERE time >= {month}'
    ):
        for row in series.rows():
            key = (str(row.get("device_id")), str(row.get("id")))
            if key not in known and row.get("expires_ns") is not None:
                known.add(key)
                sent.append({
                    "id": key[1], "device_id": key[0], "kind": str(row.get("kind")),
                    "issued_ns": int(row["time"]), "expires_ns": int(row["expires_ns"]),
                })  # fmt: skip
    answered: dict[tuple[str, str], str] = {}
    if sent:
        since = min(int(e["issued_ns"]) for e in sent) - 86_400 * 10**9
        measurement = cfg.influx.result_measurement.replace('"', '\\"')
        for series in reader.query(
            f'SELECT "id", "status", "device_id" FROM "{measurement}" WHERE time >= {since}'
        ):
            for row in series.rows():
                answered[(str(row.get("device_id")), str(row.get("id")))] = str(row["status"])
    return answered


@command.command("pending")
@config_option("TOML config file: [influx] says where the results are.")
@journal_option
@click.option("--all", "show_all", is_flag=True, help="Every command sent, answered or not.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def pending(config_path: str | None, journal: str | None, show_all: bool, as_json: bool) -> None:
    """The commands sent (from here: `send` keeps them in the journal; from anywhere:
    `send` and `config` record them in InfluxDB's command_sent) that no device has
    answered yet, with their state: pending (not expired: the device may still be
    offline), expired (it will never run), or with --all the answered ones too
    (done, refused, failed), from InfluxDB's command_result. The last 31 days."""
    from cloud_ingest.jobs.influxql import InfluxQLReader
    from shared.errors import SinkError

    cfg = load_or_exit(IngestConfig, config_path, DEFAULT_CONFIG)
    path = Path(journal) if journal else _default_journal()
    sent: list[dict[str, Any]] = []
    if path.exists():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            try:
                entry = json.loads(line)
                entry["id"], entry["issued_ns"], entry["expires_ns"]
            except (ValueError, KeyError, TypeError):
                click.echo(f"{path}:{n}: not a journal line; skipped", err=True)
                continue
            sent.append(entry)
    reader = InfluxQLReader(cfg.influx)
    try:
        answered = _answered(reader, cfg, sent)
    except SinkError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_FAILURE)
    finally:
        reader.close()
    now = time.time_ns()
    for e in sent:
        state = answered.get((e["device_id"], e["id"]))
        if state is None:
            state = "expired" if e["expires_ns"] <= now else "pending"
        elif not show_all:
            continue
        if as_json:
            click.echo(json.dumps({**e, "state": state}, separators=(",", ":")))
        else:
            left = (e["expires_ns"] - now) / 1e9
            until = f", expires in {left:.0f} s" if state == "pending" else ""
            click.echo(f"{e['device_id']} {e['id']} {e['kind']}: {state}{until}")
