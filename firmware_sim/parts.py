"""The parts behind the simulated sensors, and the resolution each reports at.

Real sensors do not report full-precision float64 noise: a DS18B20 counts in
1/16 °C, an ADC in whole counts. The simulator's readings are rounded to the
step of the part named here, so that the window statistics, the sketches and
every byte count measured on them are what a device with that part sends. The
steps come from the parts' datasheets (below); ``resolution = 0``
on a sensor (or ``--full-precision``) keeps the noise unrounded.

* temperature: DS18B20, 1/16 °C. Maxim's DS18B20 datasheet: 12-bit
  conversion, 0.0625 °C.
* humidity: BME280, 1/1024 %RH. Bosch's BME280 datasheet, compensation code:
  humidity "in Q22.10 format", 47445 represents 46.333 %RH.
* pressure: BME280, 0.01 hPa (1 Pa). The same datasheet's 32-bit compensation
  code returns "pressure in Pa as unsigned 32 bit integer".
* adc: a 12-bit converter (MCP3208, the ESP32's ADC), whole counts of 0..4095.
* vibration: ADXL345, 1/256 g. Analog Devices' ADXL345 datasheet: full
  resolution, 256 LSB/g (3.9 mg/LSB).

A binary step (1/16, 1/1024, 1/256) is exact in a float64, so the value is the
count times the step. A decimal step (0.01) is not: the value is the float64
nearest the decimal (``np.round(v, 2)``), which is what parsing the part's
two-decimal payload gives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class Part:
    name: str
    step: float  # the reported resolution, in the sensor's unit
    unit: str
    low: float  # the part's range, where the signal is clipped
    high: float


PARTS: dict[str, Part] = {
    "temperature": Part("DS18B20", 1 / 16, "degC", -55.0, 125.0),
    "humidity": Part("BME280", 1 / 1024, "%RH", 0.0, 100.0),
    "pressure": Part("BME280", 0.01, "hPa", 300.0, 1100.0),
    "adc": Part("12-bit ADC", 1.0, "counts", 0.0, 4095.0),
    "vibration": Part("ADXL345", 1 / 256, "g", -2.0, 2.0),
}


def _decimals(step: float) -> int | None:
    """The decimal places of a power-of-ten step (0.01 -> 2, 1 -> 0), else None."""
    places = -math.log10(step)
    return round(places) if abs(places - round(places)) < 1e-9 and places >= 0 else None


def quantize(
    values: npt.NDArray[np.float64], kind: str, resolution: float | None = None
) -> npt.NDArray[np.float64]:
    """``values`` as the part of ``kind`` reports them: clipped to its range and
    rounded to ``resolution`` (the part's step when None; 0 = unrounded)."""
    part = PARTS[kind]
    step = part.step if resolution is None else resolution
    values = np.clip(values, part.low, part.high)
    if step == 0:
        return values
    places = _decimals(step)
    if places is not None:
        return np.round(values, places)
    return np.round(values / step) * step
