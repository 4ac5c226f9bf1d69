"""Push: the frames of a CAN bus, decoded with a DBC file (``[[intake.can]]``).

A thread reads the bus with python-can (SocketCAN on a Pi with a CAN HAT, or any
interface python-can knows; its ``virtual`` one in the tests) and decodes each
frame with cantools against the DBC file: every signal of a known frame is a
reading of sensor ``<message>.<signal>`` on node ``node``, in the DBC's unit,
stamped with the frame's own receive time. Frames are committed together, at
most every ``commit_every_s`` (a bus carries thousands a second; a transaction
each would cost more than the frames). A frame of an id the DBC does not know is
counted (``source_<name>_excluded``), not kept: a shared bus carries other
devices' frames. A frame the DBC knows but cannot decode (a wrong length) is
quarantined with the reason ``bad-can``. A bus that fails (an interface gone
down) counts ``source_<name>_errors`` and is opened again after a pause.

python-can and cantools are imported only when a bus is configured (the ``can``
extra installs them).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from typing import TYPE_CHECKING, Any

from edge_agent import counters
from edge_agent.sources.config import CanConfig, load_dbc
from edge_agent.sources.contract import MAX_SENSORS_PER_MESSAGE, Builder, Decoded
from edge_agent.sources.counts import PendingCounts
from shared.errors import StorageError, WireError

if TYPE_CHECKING:
    from edge_agent.pipeline.intake import Intake

log = logging.getLogger(__name__)

#: frames one commit holds at most (a busy bus: several commits a second)
MAX_FRAMES_PER_COMMIT = 5000
#: after a bus error, this long before the bus is opened again
REOPEN_S = 2.0


def decode_frames(
    cfg: CanConfig, db: Any, frames: list[tuple[int, bytes, int]], builder: Builder
) -> tuple[Decoded, int]:
    """The readings of ``frames`` ((id, data, receive time in ns) each) and how many
    frames had an id the DBC does not know."""
    unknown = 0
    for frame_id, data, ts in frames:
        try:
            message = db.get_message_by_frame_id(frame_id)
        except KeyError:
            unknown += 1
            continue
        try:
            signals = message.decode(data, decode_choices=False)
        except Exception as exc:  # noqa: BLE001 (cantools raises several kinds)
            builder.reject("bad-can", f"frame {frame_id:#x} ({message.name}): {exc}", data)
            continue
        for sig in message.signals:
            value = signals.get(sig.name)
            if isinstance(value, int | float):
                builder.add(
                    cfg.node, f"{message.name}.{sig.name}", sig.unit or "", ts, float(value), data
                )
    return builder.done(), unknown


class CanReader:
    """The thread that reads one bus and commits its frames' readings."""

    label = "CAN"

    def __init__(self, cfg: CanConfig, intake: Intake) -> None:
        self.cfg = cfg
        self.intake = intake
        self.db = load_dbc(cfg.dbc)
        self.counts = PendingCounts()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"can-{cfg.name}", daemon=True)
        self._bus: Any = None

    def start(self) -> None:
        try:  # open the bus now: a frame is lost that comes before it is open
            self._open()
        except Exception as exc:  # noqa: BLE001 (the thread counts it, and tries again)
            log.warning("can %s: cannot open the bus yet: %s", self.cfg.name, exc)
        self.thread.start()
        log.info(
            "can %s: %s %s, %d messages in %s",
            self.cfg.name,
            self.cfg.interface,
            self.cfg.channel,
            len(self.db.messages),
            self.cfg.dbc,
        )

    def stop(self) -> None:
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join(10)

    def _open(self) -> Any:
        if self._bus is None:
            import can

            kw: dict[str, Any] = {"interface": self.cfg.interface, "channel": self.cfg.channel}
            if self.cfg.bitrate:
                kw["bitrate"] = self.cfg.bitrate
            self._bus = can.Bus(**kw)
        return self._bus

    def _close(self) -> None:
        if self._bus is not None:
            try:
                self._bus.shutdown()
            finally:
                self._bus = None

    def _signals(self, frame_id: int) -> int:
        try:
            return len(self.db.get_message_by_frame_id(frame_id).signals)
        except KeyError:
            return 0

    def _run(self) -> None:
        frames: list[tuple[int, bytes, int]] = []
        ids: set[int] = set()  # of the frames in hand, and their signals: a message holds
        signals = 0  # at most MAX_SENSORS_PER_MESSAGE sensors (a large DBC's bus)
        due = time.monotonic() + self.cfg.commit_every_s
        try:
            while not self.stopping.is_set():
                try:
                    msg = self._open().recv(timeout=min(0.2, self.cfg.commit_every_s))
                except Exception as exc:  # noqa: BLE001 (python-can's and the OS's errors)
                    self.counts.add(counters.source(self.cfg.name, "errors"))
                    log.warning(
                        "can %s: the bus failed: %s (counted; opened again)", self.cfg.name, exc
                    )
                    self._close()
                    self.stopping.wait(REOPEN_S)
                    continue
                if msg is not None and not msg.is_error_frame and not msg.is_remote_frame:
                    frame_id = msg.arbitration_id
                    if frame_id not in ids:
                        more = self._signals(frame_id)
                        if frames and signals + more > MAX_SENSORS_PER_MESSAGE:
                            self.commit(frames)
                            frames, ids, signals = [], set(), 0
                        ids.add(frame_id)
                        signals += more
                    ts = int(msg.timestamp * 1e9) if msg.timestamp else self.intake.stamp_ns()
                    frames.append((frame_id, bytes(msg.data), ts))
                if frames and (time.monotonic() >= due or len(frames) >= MAX_FRAMES_PER_COMMIT):
                    self.commit(frames)
                    frames, ids, signals = [], set(), 0
                if time.monotonic() >= due:
                    due = time.monotonic() + self.cfg.commit_every_s
        finally:
            if frames:
                self.commit(frames)
            self._close()

    def commit(self, frames: list[tuple[int, bytes, int]]) -> None:
        """Decode ``frames`` and store their readings as one message."""
        from edge_agent.pipeline.intake import Arrival

        name = self.cfg.name
        item: Decoded | WireError
        try:
            item, unknown = decode_frames(
                self.cfg, self.db, frames, Builder(self.intake.transforms, self.intake.stamp_ns())
            )
        except WireError as exc:
            item, unknown = exc, 0
        if unknown:
            self.counts.add(counters.source(name, "excluded"), unknown)
        payload = b"".join(f.to_bytes(4, "big") + bytes([len(d)]) + d for f, d, _ in frames)
        try:
            self.intake.commit_now(Arrival(f"can {name}", payload, name, item))
        except (sqlite3.Error, StorageError) as exc:
            # the frames are lost: a bus keeps nothing to send again
            self.counts.add(counters.DROPPED_STORE_UNAVAILABLE, len(frames))
            log.error(
                "can %s: the buffer cannot take %d frames (%s); counted", name, len(frames), exc
            )
