"""One agent per buffer: an exclusive lock on ``<buffer>.lock``, held while it runs.

Two agents on one SQLite file would both write it and knock each other off both
brokers every second (same client ids). ``edge-agent run`` takes the lock before
it opens anything else; so do the commands that write the file with the agent
stopped (``buffer repair``, ``flush`` when the agent is not running). Commands
that only read (``status``, ``sensors``, ``export``, ``buffer check``, ``doctor``)
do not take it and work beside a running agent.

The lock is ``flock(2)`` on a small file beside the buffer. The kernel releases
it when the holder exits, however it exits (SIGKILL and power cuts included), so
a stale lock file never blocks a start. The file holds the holder's PID, for the
message that a second agent prints.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType

from shared.errors import StorageError


def lock_path(buffer_path: str | Path) -> Path:
    return Path(f"{buffer_path}.lock")


class BufferBusy(StorageError):
    """Another process holds the buffer's lock."""

    def __init__(self, path: Path, pid: int | None, what: str) -> None:
        self.pid = pid
        holder = f"pid {pid}" if pid else "another process"
        super().__init__(f"{what}: an edge-agent ({holder}) is already using {path}")


class BufferLock:
    """``with BufferLock(path, "cannot start"):`` holds the lock for the block."""

    def __init__(self, buffer_path: str | Path, what: str = "cannot start") -> None:
        self.buffer = Path(buffer_path)
        self.path = lock_path(buffer_path)
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> BufferLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StorageError(
                f"cannot use the buffer {self.buffer}: its lock file {self.path}: {exc.strerror}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = holder_pid(self.path)
            os.close(fd)
            raise BufferBusy(self.buffer, pid, self.what) from None
        except OSError as exc:
            os.close(fd)
            raise StorageError(f"{self.what}: cannot lock {self.path}: {exc}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def try_acquire(self) -> bool:
        """Take the lock if it is free; False if another process holds it."""
        try:
            self.acquire()
        except BufferBusy:
            return False
        return True

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> BufferLock:
        return self.acquire()

    def __exit__(
        self,
        _t: type[BaseException] | None,
        _e: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        self.release()


def holder_pid(path: Path) -> int | None:
    """The PID written by the lock's holder, if it can be read."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def is_locked(buffer_path: str | Path) -> bool:
    """True while some process holds the buffer's lock (a running agent)."""
    path = lock_path(buffer_path)
    if not path.exists():
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the shared lock, if we got it
    return False
