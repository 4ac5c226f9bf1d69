"""A simulated Modbus TCP energy meter (pymodbus's own server) for tests and the demo.

Serves the input registers of docs/examples/modbus-sdm120.toml with the values
in ``METER`` (float32, high word first) as unit 1, over Modbus TCP on a loopback
port, or over Modbus RTU on a serial line (a pty of ``socat``'s in the tests)::

    python -m devstack.modbus_meter --port 5020 --ready-file /tmp/meter.ready
    python -m devstack.modbus_meter --serial /tmp/ttyMeter --ready-file /tmp/meter.ready
"""

from __future__ import annotations

import argparse
import asyncio
import struct
from pathlib import Path

#: address -> value, as an SDM120 reports it; the voltage is not exact in float32
#: (the agent stores what the meter's display shows: 229.3, not 229.3000030517578)
METER = {
    0: 229.3,  # voltage, V
    6: 1.25,  # current, A
    12: 288.125,  # active power, W
    18: 290.0,  # apparent power, VA
    24: -12.5,  # reactive power, var
    30: 0.9921875,  # power factor
    70: 50.0,  # frequency, Hz
    72: 1234.5,  # import energy, kWh
    74: 0.25,  # export energy, kWh
    342: 1234.75,  # total energy, kWh
}


def registers() -> list[int]:
    words = [0] * 400
    for address, value in METER.items():
        hi, lo = struct.unpack(">2H", struct.pack(">f", value))
        words[address], words[address + 1] = hi, lo
    return words


async def serve(port: int | None, serial: str | None, ready: Path | None) -> None:
    from pymodbus.datastore import (
        ModbusDeviceContext,
        ModbusSequentialDataBlock,
        ModbusServerContext,
    )
    from pymodbus.server import ModbusSerialServer, ModbusTcpServer

    # pymodbus's device context maps request address a to block address a + 1
    block = ModbusSequentialDataBlock(1, registers())  # type: ignore[no-untyped-call]
    device = ModbusDeviceContext(ir=block, hr=block)
    context = ModbusServerContext(devices={1: device}, single=False)
    server: ModbusTcpServer | ModbusSerialServer
    if serial is not None:
        server = ModbusSerialServer(context, port=serial, baudrate=19200)
    else:
        server = ModbusTcpServer(context, address=("127.0.0.1", port or 0))
    task = asyncio.create_task(server.serve_forever())
    while not server.is_active():
        await asyncio.sleep(0.01)
    if ready is not None:
        ready.write_text("ready\n")
    await task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--port", type=int, help="Modbus TCP on this loopback port")
    where.add_argument("--serial", help="Modbus RTU on this serial device, 19200 8N1")
    ap.add_argument("--ready-file", type=Path)
    args = ap.parse_args()
    asyncio.run(serve(args.port, args.serial, args.ready_file))


if __name__ == "__main__":
    main()
