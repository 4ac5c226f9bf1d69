"""One rule for what a value from a device becomes, in every format.

docs/devices.md, "What a value becomes", has the table. In short:

* a finite number, or text holding one (``"21.5"``), is a **reading**;
* a boolean is a reading 1/0, and so is a text in the source's ``states``
  (by default ``ON``/``OFF`` and ``true``/``false``, matched exactly: Zigbee2MQTT's
  enum ``"power_on_behavior":"off"`` is not a switch state);
* NaN, ±Infinity and null (JSON ``NaN``, ``null``; the texts ``nan``, ``inf``,
  ``None``, ``null``) are an **invalid reading**: stored as NaN, counted in the
  window's ``invalid``, so a sensor that fails shows as failing, whichever
  firmware reports it (ESPHome's ``nan``, Tasmota's ``null``);
* any other text is **text**: not a reading, counted per source;
* arrays give one value per element (``<path>.<index>``, from 0) and nested
  objects dotted paths, each value by the same rule (:mod:`jsonfields`).

Counted per source (``edge-agent status``): ``readings`` (all stored values),
``invalid`` (of those, the invalid ones), ``text``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

from shared.config import Invalid

Kind = Literal["reading", "invalid", "text"]

#: the state texts every source reads, unless its ``states`` setting replaces them
DEFAULT_STATES: dict[str, float] = {"ON": 1.0, "OFF": 0.0, "true": 1.0, "false": 0.0}
#: texts that say "no value" (Home Assistant and Python firmware print None)
NULL_TEXTS = frozenset(("null", "None", "none", "NULL"))
_NOT_FINITE = frozenset(
    ("nan", "-nan", "+nan", "inf", "-inf", "+inf", "infinity", "-infinity", "+infinity")
)
MAX_NUMBER_TEXT = 64


def parse_states(items: tuple[str, ...], key: str = "states") -> dict[str, float]:
    """``["on=1", "off=0"]`` from the config as a table; :class:`Invalid` naming
    ``key`` if an item is not ``text=number``. Empty: the default states."""
    if not items:
        return dict(DEFAULT_STATES)
    out: dict[str, float] = {}
    for item in items:
        text, eq, num = item.rpartition("=")
        try:
            value = float(num)
        except ValueError:
            value = math.nan
        if not eq or not text or not math.isfinite(value) or len(text) > MAX_NUMBER_TEXT:
            raise Invalid(key, f"{item[:40]!r}: each item is text=number, e.g. 'on=1'")
        out[text] = value
    return out


def from_text(text: str, states: Mapping[str, float]) -> tuple[Kind, float]:
    """What a text value is: a reading, an invalid reading, or text."""
    s = text.strip()
    state = states.get(s)
    if state is not None:
        return "reading", state
    if s in NULL_TEXTS or s.lower() in _NOT_FINITE:
        return "invalid", math.nan
    if not s or len(s) > MAX_NUMBER_TEXT or "_" in s:
        return "text", math.nan
    try:
        v = float(s)
    except ValueError:
        return "text", math.nan
    return ("reading", v) if math.isfinite(v) else ("invalid", math.nan)


def classify(value: Any, states: Mapping[str, float]) -> tuple[Kind, float]:
    """What a decoded JSON scalar is (arrays and objects are walked by the caller)."""
    if value is None:
        return "invalid", math.nan
    if isinstance(value, bool):
        return "reading", 1.0 if value else 0.0
    if isinstance(value, int):
        return ("reading", float(value)) if abs(value) < 1e308 else ("invalid", math.nan)
    if isinstance(value, float):
        return ("reading", value) if math.isfinite(value) else ("invalid", math.nan)
    if isinstance(value, str):
        return from_text(value, states)
    return "text", math.nan
