"""The newest version of each revised window that this ingestor has written.

InfluxDB keeps the last point written for a series and time, so a window's
versions must reach it in order. The device sees to most of that: it sends a
later version only after the cloud acknowledged the earlier one
(docs/cloud-ingest.md, "Revisions in order"). This is the ingestor's own line:
a version older than one it has written itself (a copy of an old batch that a
broker kept and delivered again, say) is not written over the newer one. The
rows of that batch that are not superseded are written as usual, and the lake
keeps every version anyway.

Only windows with a revision above 0 are remembered (a first version has
nothing older to be protected from), at most ``max_windows`` of them, the least
recently written forgotten first; a device with no revised window costs nothing.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from shared.wire import Batch

#: (device_id, generation, node, sensor, width_ns, hop_ns, window start): one
#: InfluxDB point as one buffer of the device sent it (a re-created buffer, a new
#: generation, numbers its revisions afresh: docs/wire-format.md §2.3).
WindowKey = tuple[str, int, str, str, int, int, int]

MAX_WINDOWS = 100_000


class RevisionMemory:
    def __init__(self, max_windows: int = MAX_WINDOWS) -> None:
        self.max_windows = max_windows
        self._newest: OrderedDict[WindowKey, int] = OrderedDict()
        self._devices: dict[str, int] = {}  # windows remembered per device

    def __len__(self) -> int:
        return len(self._newest)

    def screen(
        self, batch: Batch, written: dict[WindowKey, int]
    ) -> tuple[np.ndarray, dict[WindowKey, int]]:
        """Which rows of ``batch`` to write (a boolean mask), and the revised windows it
        would write (to :meth:`remember` once written). ``written`` holds what earlier
        batches of the same group will write; it is updated."""
        revs = batch.revision
        keep = np.ones(len(revs), dtype=bool)
        if batch.device_id not in self._devices and not written and not revs.any():
            return keep, {}  # nothing revised here, nothing remembered: the usual case
        w = batch.window
        fresh: dict[WindowKey, int] = {}
        for i, (sidx, start, rev) in enumerate(
            zip(batch.sensor.tolist(), batch.start_ns.tolist(), revs.tolist(), strict=True)
        ):
            ref = batch.sensors[sidx]
            key = (
                batch.device_id,
                batch.generation,
                ref.node,
                ref.name,
                w.width_ns,
                w.hop_ns,
                start,
            )
            newest = max(self._newest.get(key, -1), written.get(key, -1))
            if rev < newest:
                keep[i] = False
            elif rev > 0:
                fresh[key] = written[key] = rev
        return keep, fresh

    def remember(self, versions: dict[WindowKey, int]) -> None:
        for key, rev in versions.items():
            if key in self._newest:
                if rev <= self._newest[key]:
                    continue
                self._newest.move_to_end(key)
            else:
                self._devices[key[0]] = self._devices.get(key[0], 0) + 1
            self._newest[key] = rev
        while len(self._newest) > self.max_windows:
            old, _ = self._newest.popitem(last=False)
            left = self._devices[old[0]] - 1
            if left:
                self._devices[old[0]] = left
            else:
                del self._devices[old[0]]
