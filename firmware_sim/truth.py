"""Ground truth: every reading the simulator produced, for tests to check against.

A JSON Lines file, one object per published chunk::

    {"node": "env-1", "sensor": "temperature", "unit": "degC", "ts": [...], "values": [...]}

``"stamped": true`` marks readings whose payload carried no time (ESPHome's, say):
the agent stamps them on arrival, so their windows depend on arrival and only their
counts per sensor are exact; ``ts`` is then the simulator's event time.

Floats are written with Python's shortest round-tripping repr, so reading the
file back gives bit-identical float64 values.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True, eq=False)
class TruthChunk:
    node: str
    sensor: str
    unit: str
    ts: npt.NDArray[np.int64]
    values: npt.NDArray[np.float64]
    stamped: bool = False


class TruthWriter:
    def __init__(self, path: str | Path) -> None:
        # line-buffered: a message is in the file once it is published, so a test
        # can follow the simulator's progress (it polls the file)
        self._fh: IO[str] = open(path, "w", encoding="utf-8", buffering=1)  # noqa: SIM115

    def write(
        self,
        node: str,
        sensor: str,
        unit: str,
        ts: list[int],
        values: list[float],
        *,
        stamped: bool = False,
    ) -> None:
        rec: dict[str, object] = {"node": node, "sensor": sensor, "unit": unit, "ts": ts}
        rec["values"] = values
        if stamped:
            rec["stamped"] = True
        self._fh.write(json.dumps(rec, separators=(",", ":")) + "\n")

    def close(self) -> None:
        self._fh.flush()
        self._fh.close()


def read_truth(path: str | Path) -> Iterator[TruthChunk]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            obj = json.loads(line)
            yield TruthChunk(
                obj["node"],
                obj["sensor"],
                obj["unit"],
                np.array(obj["ts"], dtype=np.int64),
                np.array(obj["values"], dtype=np.float64),
                bool(obj.get("stamped", False)),
            )


def truth_by_sensor(
    path: str | Path,
) -> dict[tuple[str, str], tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]]:
    """All readings per (node, sensor), sorted by timestamp."""
    parts: dict[
        tuple[str, str], tuple[list[npt.NDArray[np.int64]], list[npt.NDArray[np.float64]]]
    ] = {}
    for c in read_truth(path):
        t, v = parts.setdefault((c.node, c.sensor), ([], []))
        t.append(c.ts)
        v.append(c.values)
    out = {}
    for key, (t, v) in parts.items():
        ts = np.concatenate(t)
        vals = np.concatenate(v)
        order = np.argsort(ts, kind="stable")
        out[key] = (ts[order], vals[order])
    return out
