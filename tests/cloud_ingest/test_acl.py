"""The cloud broker's shipped access rules (cloud_ingest/ops/broker.py) against a real
Mosquitto, attack by attack (issue 10): what a hostile device tried against the
open broker is refused. A negative ("this never arrives") is shown with a
sentinel: a message sent after the attack that does arrive, on the same
connection, so the refused one would have arrived before it."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devstack import services
from devstack.services import Service

pytestmark = pytest.mark.integration

P = "telemetry/v1"
PASSWORDS = {
    "dev-a": "pw-a-81c2", "dev-b": "pw-b-3f9d", "ingest-1": "pw-i-77e0", "ops-1": "pw-o-5a1c",
}  # fmt: skip
NOT_AUTHORIZED = 0x87
#: a refused publish: PUBACK "not authorized", or the connection closed by the broker
REFUSED = (NOT_AUTHORIZED, -1)


class Peer:
    """One MQTT v5 client with the messages it got and its publishes' reason codes."""

    def __init__(self, port: int, user: str | None, client_id: str = "") -> None:
        self.got: queue.SimpleQueue[tuple[str, bytes, bool]] = queue.SimpleQueue()
        self.acked: dict[int, int] = {}
        self.connack: list[Any] = []
        self.disconnected = threading.Event()
        self.subacked = threading.Event()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if user is not None:
            c.username_pw_set(user, PASSWORDS[user])
        c.on_connect = lambda _c, _u, _f, rc, _p: self.connack.append(rc)
        c.on_message = lambda _c, _u, m: self.got.put((m.topic, m.payload, m.retain))
        c.on_publish = lambda _c, _u, mid, rc, _p: self.acked.__setitem__(mid, rc.value)
        c.on_subscribe = lambda *_a: self.subacked.set()
        c.on_disconnect = lambda *_a: self.disconnected.set()
        self.c = c
        c.connect("127.0.0.1", port)
        c.loop_start()
        until(lambda: bool(self.connack), "a CONNACK")

    @property
    def ok(self) -> bool:
        return not self.connack[0].is_failure

    def sub(self, topic: str) -> None:
        until(self.c.is_connected, "a connection")  # back, after a refused publish
        self.subacked.clear()
        self.c.subscribe(topic, qos=1)
        until(self.subacked.is_set, f"the SUBACK for {topic}")

    def pub(self, topic: str, payload: bytes, retain: bool = False) -> int:
        """The PUBACK's reason code: 0 accepted, 0x87 not authorized, -1 the broker
        closed the connection instead (Mosquitto 2.0.11 does after a refused publish;
        paho then reconnects, which the next call waits for)."""
        until(self.c.is_connected, "a connection")
        self.disconnected.clear()
        info = self.c.publish(topic, payload, qos=1, retain=retain)
        until(lambda: info.mid in self.acked or self.disconnected.is_set(), "a PUBACK")
        return self.acked.get(info.mid, -1)

    def messages_until(self, sentinel: bytes) -> list[tuple[str, bytes, bool]]:
        out = []
        deadline = time.monotonic() + 10
        while True:
            msg = self.got.get(timeout=max(0.0, deadline - time.monotonic()))
            if msg[1] == sentinel:
                return out
            out.append(msg)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def until(cond: Any, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"no {what} within {timeout_s} s"
        time.sleep(0.01)  # polling a callback's result, with a deadline


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Service]:
    svc = services.mosquitto(
        tmp_path / "mq", passwords=PASSWORDS, ingestors=["ingest-1"], operators=["ops-1"]
    )
    svc.start()
    try:
        yield svc
    finally:
        svc.stop()


def test_anonymous_and_unknown_clients_are_refused(broker: Service) -> None:
    anon = Peer(broker.port, None)
    assert not anon.ok
    anon.close()


def test_a_device_reads_nothing_but_its_own_acks(broker: Service) -> None:
    """Attack 1: one subscription to telemetry/# (and $SYS) read every device's
    batches and acks."""
    a, b, ingest = (Peer(broker.port, u) for u in ("dev-a", "dev-b", "ingest-1"))
    try:
        a.sub(f"{P}/#")
        a.sub("$SYS/#")
        assert b.pub(f"{P}/dev-b/batch", b"b's batch") == 0
        assert ingest.pub(f"{P}/dev-b/ack", b"b's ack") == 0
        assert ingest.pub(f"{P}/dev-a/ack", b"sentinel") == 0
        assert a.messages_until(b"sentinel") == []
    finally:
        for p in (a, b, ingest):
            p.close()


def test_a_device_cannot_publish_as_another(broker: Service) -> None:
    """Attacks 2-4: a batch on B's topic was stored under B, overwrote B's windows,
    and used B's seqs. Now the broker refuses it; only the ingestor reads batches."""
    a, ingest = Peer(broker.port, "dev-a"), Peer(broker.port, "ingest-1")
    try:
        ingest.sub(f"$share/ingest/{P}/+/batch")
        assert a.pub(f"{P}/dev-b/batch", b"forged") in REFUSED
        assert a.pub(f"{P}/dev-b/alert", b"forged") in REFUSED
        assert a.pub(f"{P}/dev-a/batch", b"sentinel") == 0  # its own: allowed
        assert ingest.messages_until(b"sentinel") == []
    finally:
        a.close()
        ingest.close()


def test_only_the_ingestor_acks_and_nothing_is_retained(broker: Service) -> None:
    """Attacks 5-6: a fake `stored` ack made B's agent delete unsent batches, and a
    retained one waited for every later subscriber."""
    a, ingest = Peer(broker.port, "dev-a"), Peer(broker.port, "ingest-1")
    try:
        assert a.pub(f"{P}/dev-b/ack", b'{"seq": 1, "status": "stored"}') in REFUSED
        assert a.pub(f"{P}/dev-a/ack", b"own ack") in REFUSED  # not even its own
        assert ingest.pub(f"{P}/dev-b/ack", b"retained", retain=True) != 0
        ingest.close()  # paho would resend the refused publish at every reconnect
        b = Peer(broker.port, "dev-b")
        b.sub(f"{P}/dev-b/ack")
        ingest = Peer(broker.port, "ingest-1")
        assert ingest.pub(f"{P}/dev-b/ack", b"sentinel") == 0
        assert b.messages_until(b"sentinel") == []
        b.close()
    finally:
        a.close()
        ingest.close()


def test_only_operators_send_commands_and_a_device_reads_only_its_own(broker: Service) -> None:
    """Commands (docs/wire-format.md §2.11): an operator identity publishes them; a
    device reads its own, cannot read another's, and cannot send one; an ingestor
    cannot send one either (a compromised ingestor must not command devices). A
    device publishes its own results, which the ingestors and operators read."""
    a, b = Peer(broker.port, "dev-a"), Peer(broker.port, "dev-b")
    ops, ingest = Peer(broker.port, "ops-1"), Peer(broker.port, "ingest-1")
    try:
        a.sub(f"{P}/dev-a/cmd")
        a.sub(f"{P}/dev-b/cmd")  # another's: the broker delivers nothing of it
        assert ops.pub(f"{P}/dev-b/cmd", b"for b") == 0
        assert b.pub(f"{P}/dev-a/cmd", b"from a device") in REFUSED
        assert ingest.pub(f"{P}/dev-a/cmd", b"from an ingestor") in REFUSED
        assert ops.pub(f"{P}/dev-a/cmd", b"sentinel") == 0
        assert a.messages_until(b"sentinel") == []
        ingest.sub(f"$share/ingest/{P}/+/result")
        ops.sub(f"{P}/+/result")
        assert a.pub(f"{P}/dev-b/result", b"forged") in REFUSED
        assert a.pub(f"{P}/dev-a/result", b"sentinel") == 0
        assert ingest.messages_until(b"sentinel") == []
        assert ops.messages_until(b"sentinel") == []
    finally:
        for p in (a, b, ops, ingest):
            p.close()


def test_a_device_sends_raw_readings_on_its_own_topic_only(broker: Service) -> None:
    """Raw readings on request (docs/wire-format.md §2.13): a device publishes its own,
    which the ingestors read; not another's."""
    a, ingest = Peer(broker.port, "dev-a"), Peer(broker.port, "ingest-1")
    try:
        ingest.sub(f"$share/ingest/{P}/+/raw")
        assert a.pub(f"{P}/dev-b/raw", b"forged") in REFUSED
        assert a.pub(f"{P}/dev-a/raw", b"sentinel") == 0
        assert ingest.messages_until(b"sentinel") == []
    finally:
        a.close()
        ingest.close()


def test_no_session_can_be_taken_over(broker: Service) -> None:
    """Attack 7: connecting with the ingestor's client id took its session (and the
    devices' batches) and disconnected it. Client ids are now the identities."""
    ingest = Peer(broker.port, "ingest-1", client_id="cloud-ingest-1")
    try:
        ingest.sub(f"$share/ingest/{P}/+/batch")
        thief = Peer(broker.port, "dev-a", client_id="ingest-1")
        thief2 = Peer(broker.port, "dev-b", client_id="cloud-ingest-1")
        assert thief.ok and thief2.ok  # admitted, but as themselves
        assert thief2.pub(f"{P}/dev-b/batch", b"sentinel") == 0
        assert ingest.messages_until(b"sentinel") == []  # still connected, still reading
        assert not ingest.disconnected.is_set()
        thief.close()
        thief2.close()
    finally:
        ingest.close()


def _tls_client(
    port: int, folder: Path, name: str, issued: Path | None = None
) -> tuple[mqtt.Client, list[Any]]:
    """Connect with ``name``'s certificate from ``cloud-ingest pki`` (in ``issued``, by
    default the folder's); its CONNACKs."""
    got: list[Any] = []
    issued = issued or folder / "issued"
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.tls_set(
        ca_certs=str(folder / "ca.pem"),
        certfile=str(issued / f"{name}.pem"),
        keyfile=str(issued / f"{name}.key"),
    )
    c.on_connect = lambda _c, _u, _f, rc, _p: got.append(rc)
    c.on_disconnect = lambda *_a: got.append("disconnected")  # e.g. refused after TLS 1.3
    try:
        c.connect("127.0.0.1", port)
    except OSError as exc:  # a handshake the broker refused
        got.append(exc)
        return c, got
    c.loop_start()
    return c, got


def test_pki_issues_devices_the_broker_admits_and_revocation_shuts_them_out(
    tmp_path: Path,
) -> None:
    """`cloud-ingest pki`: a CA, a broker certificate, device certificates whose CN is
    the identity the ACL uses, the agent's config lines with its ack key (checked by
    `edge-agent doctor`), and a revocation the broker honours after it restarts, of
    every certificate ever issued to the name (a second `issue`, for a lost key,
    once left the first one valid)."""
    import shutil
    import subprocess

    from devstack.pipeline import BIN

    pki = tmp_path / "pki"
    master = tmp_path / "master.key"
    master.write_text("cd" * 32 + "\n")
    master.chmod(0o600)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            [str(BIN / "cloud-ingest"), "pki", *args], capture_output=True, text=True, timeout=60
        )
        assert res.returncode == 0, res.stderr
        return res

    cli("init", "--dir", str(pki))
    cli("issue", "--dir", str(pki), "--server", "127.0.0.1")
    for name in ("dev-b", "ingest-1"):
        cli("issue", "--dir", str(pki), name)
    port = services.free_port()
    cli("issue", "--dir", str(pki), "dev-a")
    first = tmp_path / "first"  # dev-a's first certificate, kept by the device
    first.mkdir()
    for suffix in (".pem", ".key"):
        shutil.copy(pki / "issued" / f"dev-a{suffix}", first / f"dev-a{suffix}")
    lines = cli(
        "issue", "--dir", str(pki), "dev-a", "--host", "127.0.0.1", "--port", str(port),
        "--ack-master-key", str(master),
    )  # fmt: skip
    assert "ack_key_file" in lines.stdout
    tls = (pki / "ca.pem", pki / "issued" / "127.0.0.1.pem", pki / "issued" / "127.0.0.1.key")
    broker = services.mosquitto(
        tmp_path / "mq", port=port, tls=tls, ingestors=["ingest-1"], crl=pki / "crl.pem"
    )
    broker.start()
    try:
        agent_cfg = tmp_path / "agent.toml"
        agent_cfg.write_text(lines.stdout + f'\n[storage]\npath = "{tmp_path / "buf.sqlite"}"\n')
        doctor = subprocess.run(
            [str(BIN / "edge-agent"), "doctor", "-c", str(agent_cfg)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        row = next(ln for ln in doctor.stdout.splitlines() if " forward.broker " in ln)
        assert row.startswith("OK"), doctor.stdout
        row = next(ln for ln in doctor.stdout.splitlines() if " ack verification " in ln)
        assert row.startswith("OK"), doctor.stdout

        a, got = _tls_client(port, pki, "dev-a")
        until(lambda: bool(got), "dev-a's CONNACK")
        assert not isinstance(got[0], str | OSError) and not got[0].is_failure
        own = a.publish("telemetry/v1/dev-a/batch", b"x", qos=1)
        own.wait_for_publish(10)
        a.disconnect()
        a.loop_stop()

        cli("revoke", "--dir", str(pki), "dev-a")
        broker.stop()
        broker.start()  # Mosquitto reads its crlfile at start
        for issued in (None, first):  # the newest certificate, and the first one
            a, got = _tls_client(port, pki, "dev-a", issued)
            until(lambda: bool(got), "dev-a refused")  # noqa: B023 (called at once)
            assert got[0] == "disconnected" or isinstance(got[0], OSError) or got[0].is_failure
            a.loop_stop()
        b, got_b = _tls_client(port, pki, "dev-b")
        until(lambda: bool(got_b), "dev-b's CONNACK")
        assert not isinstance(got_b[0], str | OSError) and not got_b[0].is_failure
        b.disconnect()
        b.loop_stop()
    finally:
        broker.stop()
