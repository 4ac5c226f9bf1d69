"""``edge-agent doctor``: is this device in a state to deliver its data? Each check
says ok, warn or fail, what it found, and how to fix it."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from edge_agent import counters
from edge_agent.config import AgentConfig, BrokerConfig
from edge_agent.mqtt import make_client
from edge_agent.pipeline import budget, buffer
from edge_agent.store import LAST_STORE_ERROR
from edge_agent.technician.status import open_readonly, read_status
from shared.errors import StorageError
from shared.mqttprops import connect_properties
from shared.tls import server_certificate_expiry

Level = Literal["ok", "warn", "fail"]
#: The project's first release: a clock before it is certainly wrong.
EARLIEST_SANE = 1_767_225_600  # 2026-01-01T00:00:00Z


@dataclass(frozen=True)
class Check:
    name: str
    level: Level
    detail: str
    hint: str = ""


def check_broker(
    name: str, cfg: BrokerConfig, timeout_s: float = 3.0, session: str | None = None
) -> Check:
    """Connect to the broker and say how it went. ``session``: connect as that
    (stopped) agent's persistent session, and leave it as it was: not a clean start,
    the same expiry, nothing acknowledged (a broker that binds the client id to the
    username, as the cloud broker does, would otherwise give doctor the agent's
    session and end it). Without it, the broker names a throw-away session."""
    client = make_client(cfg, session or "", manual_ack=session is not None)
    where = f"{cfg.host}:{cfg.port}"
    if cfg.tls.enabled:
        # Handshake on our own socket first: paho leaks its socket when TLS fails.
        try:
            server_certificate_expiry(cfg.host, cfg.port, cfg.tls, timeout_s)
        except (OSError, ssl.SSLError) as exc:
            return Check(
                name,
                "fail",
                f"{where}: TLS: {exc}",
                f"check [{name}.tls] ca_file, and that {where} is the TLS port",
            )
    refused: list[str] = []  # the CONNACK's reason, when the broker says no

    def on_connect(_c: object, _u: object, _f: object, reason: Any, _p: object) -> None:
        if getattr(reason, "is_failure", False):
            refused.append(str(reason))

    client.on_connect = on_connect
    try:
        if session is None:
            client.connect(cfg.host, cfg.port, keepalive=10)
        else:
            client.connect(
                cfg.host,
                cfg.port,
                keepalive=10,
                clean_start=False,
                properties=connect_properties(cfg.session_expiry_s),
            )
        client.loop_start()
        deadline = time.monotonic() + timeout_s
        while not client.is_connected() and not refused and time.monotonic() < deadline:
            time.sleep(0.02)  # polling paho's state, with a deadline
        ok = client.is_connected()
    except OSError as exc:
        return Check(
            name,
            "fail",
            f"{where}: {exc.strerror or exc}",
            f"is the broker running and listening on {where}? check [{name}] host/port",
        )
    finally:
        client.disconnect()
        client.loop_stop()
    if refused:
        return Check(
            name,
            "fail",
            f"{where}: refused: {refused[0]}",
            f"check [{name}.auth] username and password, or [{name}.tls] client certificate",
        )
    if not ok:
        return Check(
            name,
            "fail",
            f"{where}: no CONNACK within {timeout_s:g} s",
            "the port answers but not as an MQTT broker, or refuses this client",
        )
    return Check(name, "ok", f"{where}: MQTT v5 connect ok")


def check_tls(cfg: BrokerConfig, now_s: float | None = None) -> Check:
    """The cloud broker's certificate: trusted, and how long until it expires."""
    if not cfg.tls.enabled:
        return Check(
            "tls certificate",
            "warn",
            "TLS is off: MQTT to the cloud is plain text"
            + (" (insecure = true)" if cfg.insecure else ""),
            "set [forward.broker.tls] ca_file (and use the broker's TLS port)",
        )
    now_s = time.time() if now_s is None else now_s
    try:
        expires = server_certificate_expiry(cfg.host, cfg.port, cfg.tls)
    except (OSError, ssl.SSLError) as exc:
        return Check(
            "tls certificate",
            "fail",
            f"{cfg.host}:{cfg.port}: {exc}",
            "check ca_file against the broker's certificate chain and host name",
        )
    days = (expires - now_s) / 86400
    stamp = time.strftime("%Y-%m-%d", time.gmtime(expires))
    if days < 0:
        return Check(
            "tls certificate",
            "fail",
            f"the broker's certificate expired on {stamp}",
            "renew the broker's certificate",
        )
    if days < 30:
        return Check(
            "tls certificate",
            "warn",
            f"expires in {days:.0f} days ({stamp})",
            "renew the broker's certificate soon",
        )
    return Check("tls certificate", "ok", f"trusted, expires in {days:.0f} days ({stamp})")


def check_clock(cfg: AgentConfig | None, now_s: float | None = None) -> list[Check]:
    """The system clock and NTP; with a config, also the newest reading's event time."""
    now_s = time.time() if now_s is None else now_s
    out = []
    if now_s < EARLIEST_SANE:
        out.append(
            Check(
                "clock",
                "fail",
                f"system time {time.ctime(now_s)} is before 2026",
                "the RTC battery may be flat; enable NTP (timedatectl set-ntp true)",
            )
        )
    else:
        out.append(
            Check(
                "clock",
                "ok",
                f"system time {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(now_s))}",
            )
        )
    if shutil.which("timedatectl"):
        res = subprocess.run(
            ["timedatectl", "show", "-p", "NTPSynchronized", "--value"],
            capture_output=True,
            text=True,
            check=False,
            timeout=5,
        )
        if res.returncode == 0 and res.stdout.strip() == "no":
            out.append(
                Check(
                    "ntp",
                    "warn",
                    "the clock is not NTP-synchronised",
                    "timedatectl set-ntp true, and check that UDP 123 is reachable",
                )
            )
        elif res.returncode == 0:
            out.append(Check("ntp", "ok", "NTP synchronised"))
    if cfg is not None and Path(cfg.storage.path).exists():
        try:
            store = open_readonly(cfg.storage.path)
            max_ts = store.get_state(buffer.MAX_TS)
            store.close()
        except StorageError:
            max_ts = 0
        if max_ts and max_ts / 1e9 > now_s + cfg.window.max_future_s:
            out.append(
                Check(
                    "event clock",
                    "fail",
                    f"newest reading is {max_ts / 1e9 - now_s:.0f} s ahead of this clock",
                    "a sensor node or this device has a wrong clock; fix it: readings "
                    "stamped further ahead are held meanwhile (edge-agent status)",
                )
            )
    return out


#: Store errors this recent make ``doctor`` warn.
RECENT_STORE_ERROR_S = 3600.0


def check_disk(cfg: AgentConfig) -> list[Check]:
    path = Path(cfg.storage.path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.exists():
        return [
            Check(
                "disk",
                "fail",
                f"folder {folder} does not exist",
                "create it, or point storage.path elsewhere",
            )
        ]
    usage = shutil.disk_usage(folder)
    used = 0
    out = []
    if path.exists():
        try:
            store = open_readonly(path)
            used = budget.used_bytes(store)
            quick = store.conn.execute("PRAGMA quick_check").fetchone()[0]
            errors = store.counters().get(counters.STORE_ERRORS, 0)
            last_error_ns = store.get_state(LAST_STORE_ERROR)
            store.close()
            age_s = time.time() - last_error_ns / 1e9
            if last_error_ns and age_s < RECENT_STORE_ERROR_S:
                out.append(
                    Check(
                        "buffer writes",
                        "warn",
                        f"{errors:,} failed transactions, the last {age_s / 60:.0f} min ago",
                        "free space on the SD card (df -h), check the kernel log for I/O "
                        "errors (dmesg); the agent retries on its own meanwhile",
                    )
                )
            out.append(
                Check(
                    "buffer",
                    "ok" if quick == "ok" else "fail",
                    f"{path}: quick_check {quick}",
                    ""
                    if quick == "ok"
                    else "run: edge-agent buffer check, then buffer repair with the agent stopped",
                )
            )
        except StorageError as exc:
            out.append(Check("buffer", "fail", str(exc), "run: edge-agent buffer repair"))
    need = max(0, cfg.storage.max_bytes - used) if cfg.storage.max_bytes else 0
    free = usage.free
    if cfg.storage.max_bytes and free < need:
        out.append(
            Check(
                "disk",
                "fail",
                f"{free:,} bytes free on {folder}, the budget may still grow by {need:,}",
                "lower storage.max_bytes or free space: the agent must not fill the disk",
            )
        )
    elif free < 100 << 20:
        out.append(
            Check(
                "disk", "warn", f"only {free:,} bytes free on {folder}", "free space on the SD card"
            )
        )
    else:
        out.append(Check("disk", "ok", f"{free:,} bytes free on {folder}"))
    return out


#: The cloud has acknowledged nothing for this long while batches wait: warn.
SILENT_CLOUD_S = 300.0


def check_delivery(cfg: AgentConfig, now_ns: int | None = None) -> list[Check]:
    """Is data leaving? Batches waiting while the cloud acknowledges nothing is a
    problem even when every broker answers (the ingestor is down, or rejects)."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    if not Path(cfg.storage.path).is_file():
        return []
    try:
        st = read_status(cfg.storage.path, now_ns)
    except StorageError:
        return []  # check_disk reports the buffer itself
    waiting, age = st["backlog_batches"], st["last_ack_age_s"]
    if not waiting:
        return [Check("delivery", "ok", "nothing waits for the cloud")]
    oldest = st["oldest_unsent_age_s"] or 0.0
    if age is None or age > SILENT_CLOUD_S:
        since = "ever" if age is None else f"{age / 60:.0f} min"
        return [
            Check(
                "delivery",
                "fail" if oldest > SILENT_CLOUD_S else "warn",  # young: it may just start
                f"{waiting:,} batches wait (the oldest {oldest / 60:.0f} min); the cloud has "
                f"acknowledged nothing for {since}",
                "check the forward.broker check above; if it is ok, the cloud ingestor is "
                "down or rejects the device (edge-agent status: acks_rejected, acks_unverified)",
            )
        ]
    if oldest > cfg.health.behind_after_s:
        return [
            Check(
                "delivery",
                "warn",
                f"{waiting:,} batches wait, the oldest {oldest / 60:.0f} min old; acks arrive "
                f"(last {age:.0f} s ago): the link is slower than the data",
                "forward.backfill_bytes_per_s caps the backfill; a slow link catches up later",
            )
        ]
    return [Check("delivery", "ok", f"{waiting:,} batches in flight; last ack {age:.0f} s ago")]


def check_acks(cfg: AgentConfig) -> Check:
    """Does the agent act only on acks the ingestors signed?"""
    f = cfg.forward
    if f.ack_key_file or f.ack_key_env:
        return Check("ack verification", "ok", "acts only on acks signed with this device's key")
    return Check(
        "ack verification",
        "warn",
        "off: any ack the cloud broker delivers can make the agent delete a batch",
        "set [forward] ack_key_file to this device's key (cloud-ingest device-key, or "
        "cloud-ingest pki issue --ack-master-key)",
    )


def agent_status(cfg: AgentConfig) -> dict[str, Any] | None:
    """The running agent's own view (edge-agent status), or None if it is not running."""
    if not Path(cfg.storage.path).is_file():
        return None
    try:
        st = read_status(cfg.storage.path)
    except StorageError:
        return None
    return st if st["running"] else None


def check_forward(cfg: AgentConfig, status: dict[str, Any] | None) -> Check:
    """The cloud broker. While the agent runs, its own connection says it: connecting
    as the device would take over its session (the cloud broker binds the client id
    to the device's identity) and cost it its acks."""
    if status is None:
        session = cfg.forward.broker.client_id or f"edge-agent-{cfg.device_id}-forward"
        return check_broker("forward.broker", cfg.forward.broker, session=session)
    where = f"{cfg.forward.broker.host}:{cfg.forward.broker.port}"
    if status["forward_connected"]:
        return Check("forward.broker", "ok", f"{where}: the running agent is connected")
    return Check(
        "forward.broker",
        "fail" if status["healthy"] else "warn",
        f"{where}: the running agent is not connected"
        + ("" if status["healthy"] else " (and its heartbeat is late)"),
        "see the agent's log (journalctl -u edge-agent) for why; stop the agent to let "
        "doctor try the connection itself",
    )


def check_clock_offset(cfg: AgentConfig, status: dict[str, Any] | None) -> list[Check]:
    """The device's clock against the cloud's, as the running agent measured it from
    the acks (edge_agent/clock.py)."""
    if status is None or status.get("clock_offset_s") is None:
        return []
    offset, rtt = status["clock_offset_s"], status["clock_rtt_s"] or 0.0
    held = status.get("held_readings", 0)
    error = max(0.0, abs(offset) - rtt / 2)
    side = "behind" if offset > 0 else "ahead of"
    detail = (
        f"this device's clock is {abs(offset):.1f} s {side} the cloud's "
        f"(± {rtt / 2:.2f} s, measured {status['clock_measured_age_s']:.0f} s ago)"
        + (f"; {held:,} readings held for it" if held else "")
    )
    if error < 2.0:
        return [Check("clock offset", "ok", detail)]
    return [
        Check(
            "clock offset",
            "fail" if error > cfg.window.max_future_s else "warn",
            detail,
            "enable NTP (timedatectl set-ntp true) and check that UDP 123 is reachable; "
            "readings stamped ahead of this clock are held until it is right",
        )
    ]


def run_checks(cfg: AgentConfig, config_path: str | None) -> list[Check]:
    checks = [Check("config", "ok", f"{config_path or 'defaults'}: valid")]
    status = agent_status(cfg)
    checks.append(check_broker("intake.broker", cfg.intake.broker))
    checks.append(check_forward(cfg, status))
    checks.append(check_tls(cfg.forward.broker))
    checks.append(check_acks(cfg))
    checks += check_clock(cfg)
    checks += check_clock_offset(cfg, status)
    checks += check_disk(cfg)
    checks += check_delivery(cfg)
    return checks


def config_checks(error: str) -> list[Check]:
    """With a config that does not load: say so, and check what needs no config."""
    return [
        Check(
            "config",
            "fail",
            error,
            "fix the key it names (`edge-agent config sample` shows every key), then run "
            "doctor again for the brokers, the buffer and the disk",
        ),
        *check_clock(None),
    ]
