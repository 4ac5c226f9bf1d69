"""[[intake.can]]: frames of a CAN bus, decoded with a DBC file, on python-can's
virtual bus (a real bus needs a CAN interface; SocketCAN's vcan needs a kernel
module this machine does not load).

The DBC below is this test's own (an engine and a battery); the frames are encoded
with cantools from known values, so the readings' ground truth is those values.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest

can = pytest.importorskip("can")
cantools = pytest.importorskip("cantools")

from devstack.services import wait_until  # noqa: E402
from devstack.stubs import StubPahoClient  # noqa: E402
from edge_agent.config import AgentConfig  # noqa: E402
from edge_agent.pipeline import buffer  # noqa: E402
from edge_agent.pipeline.intake import Intake  # noqa: E402
from edge_agent.sources.can import CanReader  # noqa: E402
from edge_agent.sources.config import CanConfig  # noqa: E402
from shared.config import from_dict  # noqa: E402
from shared.errors import ConfigError  # noqa: E402
from tests.helpers import windows_hold_their_readings  # noqa: E402

DBC = """VERSION ""

NS_ :

BS_:

BU_: ECU

BO_ 496 EngineData: 8 ECU
 SG_ rpm : 0|16@1+ (0.25,0) [0|16383.75] "rpm" Vector__XXX
 SG_ coolant_temp : 16|8@1+ (1,-40) [-40|215] "degC" Vector__XXX

BO_ 497 Battery: 4 ECU
 SG_ voltage : 0|16@1+ (0.001,0) [0|65.535] "V" Vector__XXX
 SG_ current : 16|16@1- (0.01,0) [-327.68|327.67] "A" Vector__XXX
"""
W = 10_000_000_000
CHANNELS = itertools.count()


def on_a_virtual_bus(
    tmp_path: Path, name: str, dbc: Path, commit_every_s: float
) -> tuple[Intake, CanReader, Any]:
    """An Intake on a buffer of its own, a reader of a new virtual bus, and a sender
    on that bus (the reader is not started)."""
    channel = f"test-{next(CHANNELS)}-{tmp_path.name}"
    cfg = from_dict(AgentConfig, {"storage": {"path": str(tmp_path / f"{name}.sqlite")}})
    intake = Intake(cfg, client=StubPahoClient())  # type: ignore[arg-type]
    source = CanConfig(name=name, node="ecu", dbc=str(dbc), interface="virtual",
                       channel=channel, commit_every_s=commit_every_s)  # fmt: skip
    return intake, CanReader(source, intake), can.Bus(interface="virtual", channel=channel)


def test_frames_become_readings_exactly(tmp_path: Path) -> None:
    dbc = tmp_path / "car.dbc"
    dbc.write_text(DBC)
    db = cantools.database.load_file(str(dbc))
    engine, battery = db.get_message_by_name("EngineData"), db.get_message_by_name("Battery")
    intake, reader, sender = on_a_virtual_bus(tmp_path, "car", dbc, 0.1)
    sent: dict[str, list[float]] = {}
    rng = np.random.default_rng(5)
    reader.start()
    try:
        for k in range(200):
            values = {
                "rpm": float(rng.integers(0, 20000)) * 0.25,
                "coolant_temp": float(k % 120 - 40),
            }
            frames = [(engine, values)]
            if k % 2:
                frames.append((battery, {"voltage": 12.0 + k / 1000, "current": -3.5 + k / 100}))
            for message, vals in frames:
                data = message.encode(vals)
                sender.send(
                    can.Message(arbitration_id=message.frame_id, data=data, is_extended_id=False)
                )
                for name, value in message.decode(data).items():  # what the bus carries
                    sent.setdefault(f"{message.name}.{name}", []).append(value)
            if k % 50 == 0:  # another device's frame, and a frame of the wrong length
                sender.send(can.Message(arbitration_id=0x7FF, data=b"\x01", is_extended_id=False))
                sender.send(can.Message(arbitration_id=497, data=b"\x01", is_extended_id=False))
        total = sum(len(v) for v in sent.values())
        wait_until(
            lambda: intake.store.counters().get("readings_stored", 0) >= total, 20, "the frames"
        )
    finally:
        reader.stop()
        sender.shutdown()
    c = intake.store.counters()
    assert c["readings_stored"] == total  # none lost, none twice
    assert c["source_car_rejected"] == 4  # the four short Battery frames: quarantined
    assert reader.counts.take() == {"source_car_excluded": 4}  # the other device's frames
    sensors = {r.name: (sid, r.unit) for sid, r in buffer.load_sensors(intake.store).items()}
    assert sensors["Battery.voltage"][1] == "V" and sensors["EngineData.rpm"][1] == "rpm"
    data = buffer.read_range(intake.store, 0, 2**62)
    for name, values in sent.items():
        _ts, got = data[sensors[name][0]]
        assert got.tolist() == values, name  # in order, the DBC's values bit for bit
    assert windows_hold_their_readings(intake.store, W) == total
    intake.store.close()


def test_a_bad_dbc_names_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.dbc"
    bad.write_text("BO_ this is not a DBC")
    for dbc in (str(bad), str(tmp_path / "missing.dbc")):
        with pytest.raises(ConfigError, match=r"intake\.can\[0\]\.dbc"):
            from_dict(
                AgentConfig,
                {"intake": {"can": [{"name": "car", "node": "ecu", "dbc": dbc}]}},
            )


def test_a_bus_of_more_signals_than_a_message_holds_loses_none(tmp_path: Path) -> None:
    """A message holds at most 1,000 sensors (MAX_SENSORS_PER_MESSAGE): frames whose
    signals would pass it within one commit go in the next one, not to quarantine."""
    lines = ['VERSION ""', "", "NS_ :", "", "BS_:", "", "BU_: ECU", ""]
    for m in range(150):  # 150 messages of 8 signals: 1,200 sensors
        lines.append(f"BO_ {256 + m} M{m}: 8 ECU")
        lines += [f' SG_ s{j} : {8 * j}|8@1+ (1,0) [0|255] "" Vector__XXX' for j in range(8)]
        lines.append("")
    dbc = tmp_path / "big.dbc"
    dbc.write_text("\n".join(lines))
    intake, reader, sender = on_a_virtual_bus(tmp_path, "big", dbc, 5.0)
    reader.start()
    try:
        for m in range(150):
            sender.send(
                can.Message(arbitration_id=256 + m, data=bytes(range(8)), is_extended_id=False)
            )
        wait_until(
            lambda: intake.store.counters().get("readings_stored", 0) >= 1000, 20, "a commit"
        )
    finally:
        reader.stop()  # stores the frames still in hand
        sender.shutdown()
    c = intake.store.counters()
    assert c["readings_stored"] == 1200 and c.get("source_big_rejected", 0) == 0
    assert c["source_big_messages"] == 2
    intake.store.close()
