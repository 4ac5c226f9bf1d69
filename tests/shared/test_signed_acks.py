"""Acks a device can verify itself (shared/acks.py): signing, and a real agent that
keeps its batches when a fake `stored` ack reaches it through an open broker."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from devstack import influxq
from devstack.pipeline import IngestTarget, Pipeline
from devstack.services import Service, wait_until
from shared.acks import Ack, decode_ack, device_key
from shared.config import Invalid
from shared.errors import WireError
from tests.conftest import SpecFactory

MASTER = bytes(range(32))


def test_a_signed_ack_verifies_and_any_change_breaks_it() -> None:
    key = device_key(MASTER, "dev-a")
    ack = Ack(17, "rejected", "sink-rejected").signed("dev-a", key)
    back = decode_ack(ack.encode())
    assert back == ack and back.verify("dev-a", key)
    for forged in (
        Ack(18, "rejected", "sink-rejected", ack.mac),
        Ack(17, "stored", "sink-rejected", ack.mac),
        Ack(17, "rejected", "other", ack.mac),
        Ack(17, "rejected", "sink-rejected", ""),
    ):
        assert not forged.verify("dev-a", key)
    assert not ack.verify("dev-b", device_key(MASTER, "dev-b"))  # another device's key
    assert device_key(MASTER, "dev-a") != device_key(MASTER, "dev-b")
    with pytest.raises(WireError, match="mac"):
        decode_ack(b'{"seq": 1, "status": "stored", "mac": "' + b"a" * 33 + b'"}')


def test_a_key_must_be_long_hex_in_a_private_file(tmp_path: Path) -> None:
    from shared.auth import read_key

    f = tmp_path / "k"
    for text, message in (("zz", "not a hex"), ("ab" * 8, "shorter than 32 bytes")):
        f.write_text(text)
        f.chmod(0o600)
        with pytest.raises(Invalid, match=message):
            read_key("ack_key", str(f), "")
    f.write_text(secrets.token_hex(32) + "\n")
    assert read_key("ack_key", str(f), "") is not None


@pytest.mark.integration
def test_a_fake_stored_ack_cannot_make_the_agent_delete_a_batch(
    pipeline_spec: SpecFactory, fresh: Callable[[str], Service], unique: str, tmp_path: Path
) -> None:
    """The broker here is open (no ACL): the signature alone protects the device. With
    no ingestor running, a hostile client publishes `stored` acks for every seq the
    agent has (unsigned, and signed with a wrong key); the agent ignores and counts
    each, and keeps its batches. Then an ingestor with the master key starts, and
    every reading arrives once."""
    broker, influx = fresh("mosquitto"), fresh("influxdb")
    influxq.create_database(influx.url, "t")
    device = f"dev-{unique}"
    master = tmp_path / "master.key"
    master.write_text(MASTER.hex() + "\n")
    master.chmod(0o600)
    devkey = tmp_path / "device.key"
    devkey.write_text(device_key(MASTER, device).hex() + "\n")
    devkey.chmod(0o600)
    width = 10 * 10**9
    pipe = Pipeline(
        pipeline_spec(
            broker=broker,
            device_id=device,
            duration_s=60.0,
            speed=8.0,
            start_ns=(time.time_ns() // width - 8) * width + 1_000_000,
            ack_timeout_s=1.0,
            agent_tables={"forward": {"ack_key_file": str(devkey)}},
            targets=[
                IngestTarget(
                    "signed",
                    {"api": "v1", "url": influx.url, "database": "t"},
                    {"url": f"file://{tmp_path / 'lake'}"},
                    acks={"key_file": str(master)},
                )
            ],
        )
    )

    def counter(name: str) -> int:
        return int(pipe.agent_status()["counters"].get(name, 0))

    hostile = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    try:
        agent = pipe.start_agent()
        sim = pipe.start_sim()
        wait_until(lambda: counter("batches_created") >= 3, 60, "3 batches in the outbox")
        hostile.connect("127.0.0.1", broker.port)
        hostile.loop_start()
        wrong = device_key(b"\x01" * 32, device)
        fakes = [Ack(seq, "stored") for seq in range(0, 40)]
        fakes += [Ack(seq, "stored").signed(device, wrong) for seq in range(0, 40)]
        for ack in fakes:
            hostile.publish(f"telemetry/v1/{device}/ack", ack.encode(), qos=1).wait_for_publish(10)
        wait_until(lambda: counter("acks_unverified") == len(fakes), 30, "every fake counted")
        assert counter("batches_acked") == 0
        assert len(pipe.agent_status()["outbox"]) > 0  # nothing was deleted

        (ingestor,) = pipe.start_ingestors()
        produced = int(pipe.finish_sim(sim, timeout_s=120)["produced"])
        pipe.wait_agent_has(produced, timeout_s=60)
        assert agent.terminate(timeout_s=90) == 0  # drains until every batch is acked
        c = pipe.agent_status()["counters"]
        assert c["batches_acked"] == c["batches_created"] and pipe.agent_status()["outbox"] == {}
        assert c["acks_unverified"] == len(fakes)  # the real, signed acks all verified
        assert influxq.total_count(influxq.v1_windows(influx.url, "t")) == produced
        assert ingestor.terminate() == 0
    finally:
        hostile.loop_stop()
        pipe.stop_all()
