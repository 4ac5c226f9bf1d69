"""Pull: Modbus TCP and RTU devices polled with pymodbus (``[[intake.modbus]]``).

Each device has a thread that polls its register map every ``interval_s``: the
registers are read in as few requests as their addresses allow (contiguous, or
up to ``read_gap`` unmapped registers apart; at most 125 registers each, Modbus's
limit), decoded (int16 … float64, with the word
order), scaled (``raw * scale + offset``) and committed as one message, stamped
with the poll's time. A poll that fails (no answer within ``timeout_s``, a
refused connection, a Modbus exception response) is counted as
``source_<name>_errors`` and logged once until the device answers again; the
next poll reconnects. Nothing a device answers can stop the thread.

pymodbus is imported only when a Modbus device is configured (the ``modbus``
extra installs it).
"""

from __future__ import annotations

import logging
import math
import sqlite3
import struct
import threading
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from edge_agent import counters
from edge_agent.sources.config import ModbusConfig, Register
from edge_agent.sources.contract import Builder, Decoded
from edge_agent.sources.counts import PendingCounts, run_every
from shared.errors import StorageError, WireError

if TYPE_CHECKING:
    from edge_agent.pipeline.intake import Intake

log = logging.getLogger(__name__)

MAX_READ = 125  # registers per read request (Modbus application protocol, 6.3)

_FORMATS = {
    "int16": ">h",
    "uint16": ">H",
    "int32": ">i",
    "uint32": ">I",
    "float32": ">f",
    "int64": ">q",
    "uint64": ">Q",
    "float64": ">d",
}


@dataclass(frozen=True)
class Block:
    kind: str
    address: int
    count: int
    registers: tuple[Register, ...]


def plan(registers: tuple[Register, ...], gap: int = 0) -> list[Block]:
    """The read requests: registers of one kind at most ``gap`` registers apart
    share a request of at most MAX_READ registers."""
    blocks: list[Block] = []
    for kind in ("holding", "input"):
        regs = sorted((r for r in registers if r.kind == kind), key=lambda r: r.address)
        group: list[Register] = []
        start = end = 0
        for r in regs:
            r_end = r.address + r.words
            if group and r.address <= end + gap and max(end, r_end) - start <= MAX_READ:
                group.append(r)
                end = max(end, r_end)
                continue
            if group:
                blocks.append(Block(kind, start, end - start, tuple(group)))
            group, start, end = [r], r.address, r_end
        if group:
            blocks.append(Block(kind, start, end - start, tuple(group)))
    return blocks


def shortest_float32(x: float) -> str:
    """The shortest decimal text that reads back as the same float32: 229.3 for the
    float32 nearest 229.3, whose float64 expansion is 229.3000030517578."""
    if not math.isfinite(x):
        return repr(x)
    for digits in range(1, 10):  # 9 significant digits always round-trip a float32
        text = f"{x:.{digits}g}"
        if struct.unpack(">f", struct.pack(">f", float(text)))[0] == x:
            return text
    return repr(x)


def value_of(reg: Register, words: list[int]) -> float:
    """A register's value from its 16-bit words (``words`` in address order):
    ``raw * scale + offset`` computed in decimal, so that the value stored is the
    one the device means (a float32 229.3 stays 229.3, and 2293 × 0.1 is 229.3,
    not 229.29999999999998)."""
    if reg.word_order == "little":
        words = words[::-1]
    raw = struct.pack(f">{len(words)}H", *words)
    (v,) = struct.unpack(_FORMATS[reg.type], raw)
    if isinstance(v, float) and not math.isfinite(v):
        return math.nan
    text = shortest_float32(v) if reg.type == "float32" else repr(v)
    if reg.scale == 1.0 and reg.offset == 0.0:
        return float(text)
    return float(Decimal(text) * Decimal(repr(reg.scale)) + Decimal(repr(reg.offset)))


def decode_poll(
    cfg: ModbusConfig, blocks: list[Block], answers: list[list[int]], builder: Builder
) -> Decoded:
    """The readings of one poll (``answers``: each block's registers)."""
    for block, words in zip(blocks, answers, strict=True):
        if len(words) != block.count or not all(0 <= w <= 0xFFFF for w in words):
            raise WireError("bad-modbus", f"{len(words)} registers for a read of {block.count}")
        for reg in block.registers:
            i = reg.address - block.address
            value = value_of(reg, words[i : i + reg.words])
            if math.isinf(value):
                value = math.nan
            builder.add(cfg.node, reg.sensor, reg.unit, None, value, b"")
    return builder.done()


class ModbusPoller:
    label = "Modbus"

    def __init__(self, cfg: ModbusConfig, intake: Intake) -> None:
        self.cfg = cfg
        self.intake = intake
        self.registers = cfg.all_registers()
        self.blocks = plan(self.registers, cfg.read_gap)
        self.counts = PendingCounts()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"modbus-{cfg.name}", daemon=True)
        self._client: Any = None
        self._failing = False

    def start(self) -> None:
        self.thread.start()
        where = self.cfg.host or self.cfg.serial_port
        log.info(
            "modbus %s: polling %s (unit %d) every %.1f s: %d registers in %d requests",
            self.cfg.name,
            where,
            self.cfg.unit_id,
            self.cfg.interval_s,
            len(self.registers),
            len(self.blocks),
        )

    def stop(self) -> None:
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(self.cfg.timeout_s * (len(self.blocks) + 1) + 5)
        self._close()

    def _run(self) -> None:
        run_every(self.cfg.interval_s, self.stopping, self.poll_once, self._failed)

    def _failed(self) -> None:
        log.exception("modbus %s: a poll failed", self.cfg.name)
        self.counts.add(counters.source(self.cfg.name, "errors"))

    def _connect(self) -> Any:
        if self._client is None:
            from pymodbus.client import ModbusSerialClient, ModbusTcpClient

            c = self.cfg
            if c.host:
                self._client = ModbusTcpClient(c.host, port=c.port, timeout=c.timeout_s, retries=0)
            else:
                self._client = ModbusSerialClient(
                    c.serial_port,
                    baudrate=c.baudrate,
                    parity=c.parity,
                    stopbits=c.stopbits,
                    bytesize=8,
                    timeout=c.timeout_s,
                    retries=0,
                )
        if not self._client.connected and not self._client.connect():
            raise ConnectionError("cannot connect")
        return self._client

    def _close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def read(self) -> list[list[int]]:
        from pymodbus.exceptions import ModbusException

        try:
            client = self._connect()
            answers = []
            for b in self.blocks:
                fn = (
                    client.read_holding_registers
                    if b.kind == "holding"
                    else client.read_input_registers
                )
                resp = fn(b.address, count=b.count, device_id=self.cfg.unit_id)
                if resp.isError():
                    raise ConnectionError(f"the device answered {resp}")
                answers.append(list(resp.registers))
            return answers
        except (ModbusException, OSError) as exc:
            self._close()
            raise ConnectionError(str(exc)) from None

    def poll_once(self) -> None:
        name = self.cfg.name
        now = self.intake.stamp_ns()  # the device's clock, corrected when known to be off
        try:
            answers = self.read()
        except ConnectionError as exc:
            self.counts.add(counters.source(name, "errors"))
            if not self._failing:
                log.warning("modbus %s: poll failed: %s (counted; retried each poll)", name, exc)
            self._failing = True
            return
        if self._failing:
            log.info("modbus %s: the device answers again", name)
            self._failing = False
        payload = struct.pack(f">{sum(len(a) for a in answers)}H", *(w for a in answers for w in a))
        from edge_agent.pipeline.intake import Arrival

        item: Decoded | WireError
        try:
            item = decode_poll(self.cfg, self.blocks, answers, Builder(self.intake.transforms, now))
        except WireError as exc:
            item = exc
        try:
            self.intake.commit_now(Arrival(f"modbus {name}", payload, name, item))
        except (sqlite3.Error, StorageError) as exc:
            # the poll is lost: the device has no queue to resend from
            self.counts.add(counters.DROPPED_STORE_UNAVAILABLE, len(self.registers))
            log.error("modbus %s: the buffer cannot take the poll (%s); counted", name, exc)
